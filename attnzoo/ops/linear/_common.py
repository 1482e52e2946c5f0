"""Shared validation and packing for the linear / recurrent attention ops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from attnzoo.ops.dtypes import compute_dtype

FORMS = ("parallel", "chunked", "recurrent")

# Per-step log decays are clamped from below to this value: exp(-1e4) is 0 in every float
# format, and a finite floor keeps differences of cumulative sums finite (log 0 = -inf
# would give -inf - -inf = nan).
LOG_DECAY_FLOOR = -1.0e4


def check_form(form: str, chunk_size: int) -> None:
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")


def check_bhnd(name: str, t: Any, b: int | None = None, h: int | None = None, n: int | None = None,
               d: int | None = None) -> torch.Tensor:
    """``t`` as a floating tensor ``[B, H, N, D]`` matching the given sizes, else ``ValueError``."""
    want = "[" + ", ".join(str(x) if x is not None else s for x, s in zip((b, h, n, d), "BHND")) + "]"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {want}, got {type(t).__name__}")
    if t.dim() != 4 or any(x is not None and t.shape[i] != x for i, x in enumerate((b, h, n, d))):
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    return t


def per_token(name: str, x: Any, b: int, h: int, n: int, ref: torch.Tensor, *, default: float | None = None
              ) -> torch.Tensor | None:
    """A per-(batch, head, token) scalar as ``[B, H, N]``.

    Accepts None (-> ``default`` or None), a Python number, a tensor ``[H]`` (one value per
    head, constant over tokens) or ``[B, H, N]``.
    """
    if x is None:
        return None if default is None else torch.full((b, h, n), default, dtype=ref.dtype, device=ref.device)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.full((b, h, n), float(x), dtype=ref.dtype, device=ref.device)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: expected a float, a float tensor [H] or [B, H, N], got {x!r:.80}")
    if tuple(x.shape) == (h,):
        # Upcast before expanding: the backward of the expand sums the gradient over B x N
        # tokens, which must happen in float32, not in the input's half precision.
        return x.to(compute_dtype(x.dtype)).view(1, h, 1).expand(b, h, n)
    if tuple(x.shape) == (b, h, n):
        return x
    raise ValueError(f"{name}: expected a tensor [H]=[{h}] or [B, H, N]=[{b}, {h}, {n}], got {list(x.shape)}")


def check_log_decay(g: torch.Tensor | None) -> None:
    """Log decays must be <= 0 (decays in (0, 1]); checked eagerly (not under tracing)."""
    if g is not None:
        check_sign("log_decay", g, positive=False, what="decays in (0, 1]")


def check_sign(name: str, t: torch.Tensor, *, positive: bool, what: str) -> None:
    """``t`` ``>= 0`` (``positive``) or ``<= 0`` everywhere, and no NaN (eagerly, not under tracing)."""
    if torch.compiler.is_compiling():
        return
    ok = (t >= 0) if positive else (t <= 0)
    if not bool(ok.all()):
        bad = "NaN" if bool(t.isnan().any()) else f"{'a minimum' if positive else 'a maximum'} of " \
            f"{float(t.min() if positive else t.max()):.4g}"
        raise ValueError(f"{name}: expected values {'>=' if positive else '<='} 0 ({what}); got {bad}")


def check_state(name: str, s: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    if s is None:
        return None
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(shape):
        got = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"{name}: expected a tensor {list(shape)}, got {got}")
    return s


def check_cu_seqlens(cu: Any, total: int, batch: int) -> torch.Tensor:
    """Validated ``cu_seqlens`` (int64 ``[S + 1]``, 0 ... total, non-decreasing)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"cu_seqlens: expected an integer tensor [S + 1], got {cu!r:.80}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch size 1 (all sequences along N), got B={batch}")
    c = cu.to(torch.long)
    if int(c[0]) != 0 or int(c[-1]) != total or bool((c[1:] < c[:-1]).any()):
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to N={total}, got {c.tolist()[:8]}"
            f"{' ...' if c.numel() > 8 else ''}"
        )
    return c


class Packing:
    """Gather packed sequences ``[1, H, T, *]`` into a padded batch ``[S, H, L_max, *]`` and back.

    Padded positions are filled with ``fill`` values chosen by the caller so that they are
    identity steps of the recurrence (zero keys/values, zero log decay, zero write strength):
    the state after the padding equals the state at the end of each sequence.
    """

    def __init__(self, cu: torch.Tensor) -> None:
        lens = cu[1:] - cu[:-1]
        self.n_seq = lens.numel()
        self.max_len = max(int(lens.max()), 1)
        pos = torch.arange(self.max_len, device=cu.device)
        self.valid = pos.view(1, -1) < lens.view(-1, 1)  # [S, L]
        self.index = (cu[:-1].view(-1, 1) + pos.view(1, -1)).clamp(max=max(int(cu[-1]) - 1, 0))

    def pad(self, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[1, H, T, *rest]`` (or ``[1, H, T]``) -> ``[S, H, L, *rest]`` with ``fill`` at padded positions."""
        h, rest = t.shape[1], t.shape[3:]
        if t.shape[2] == 0:
            out = t.new_full((self.n_seq, h, self.max_len, *rest), fill)
            return out
        g = t[0].index_select(1, self.index.reshape(-1)).view(h, self.n_seq, self.max_len, *rest).transpose(0, 1)
        mask = self.valid.view(self.n_seq, 1, self.max_len, *([1] * len(rest)))
        return torch.where(mask, g, torch.as_tensor(fill, dtype=t.dtype, device=t.device))

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """``[S, H, L, *rest]`` -> ``[1, H, T, *rest]`` (the valid positions, in order)."""
        h, rest = t.shape[1], t.shape[3:]
        flat = t.transpose(0, 1).reshape(h, self.n_seq * self.max_len, *rest)
        return flat[:, self.valid.reshape(-1)].unsqueeze(0)


def run_packed(fn: Callable[..., Any], cu_seqlens: torch.Tensor, tensors: Sequence[tuple[torch.Tensor | None, float]],
               total: int, batch: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``fn(*padded, **kwargs) -> (out, state)`` on packed sequences; returns ``(out [1, H, T, *], state)``.

    ``tensors`` are ``(tensor [1, H, T, *] or None, fill)`` pairs.
    """
    cu = check_cu_seqlens(cu_seqlens, total, batch)
    pk = Packing(cu)
    padded = [None if t is None else pk.pad(t, fill) for t, fill in tensors]
    out, state = fn(*padded, **kwargs)
    return pk.unpad(out), state


def split_chunks(t: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, H, N, *]`` (N a multiple of ``size``) -> ``[B, H, N // size, size, *]``."""
    b, h, n = t.shape[:3]
    return t.reshape(b, h, n // size, size, *t.shape[3:])


def pad_to(t: torch.Tensor, n: int, fill: float = 0.0) -> torch.Tensor:
    """Pad dim 2 of ``t`` with ``fill`` up to length ``n``."""
    extra = n - t.shape[2]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[2] = extra
    return torch.cat([t, t.new_full(shape, fill)], dim=2)
