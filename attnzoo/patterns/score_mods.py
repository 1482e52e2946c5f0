"""Built-in score modifiers: ALiBi, soft-capping, additive bias, learned relative-position bias."""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.ops.layout import Shape
from attnzoo.ops.score_mod import Chain, CustomScore, ScoreMod, as_score_mod

__all__ = [
    "ALiBi", "Bias", "Chain", "CustomScore", "RelativePositionBias", "ScoreMod", "SoftCap",
    "alibi_slopes", "as_score_mod",
]


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes, including its rule for a non-power-of-two head count (float64, so that
    each call rounds them once to its own dtype)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads: expected a positive integer head count, got {heads!r}")

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(pow2(heads), dtype=torch.float64)
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: heads - closest], dtype=torch.float64)


class ALiBi(ScoreMod):
    """``s -= slope_h * |i - j|`` with ``i = q + offset`` (offset defaults to ``n_kv - n_q``)."""

    per_head = True
    additive = True

    def __init__(self, slopes: torch.Tensor | int, *, offset: int | None = None) -> None:
        slopes = alibi_slopes(slopes) if isinstance(slopes, int) else torch.as_tensor(slopes)
        if slopes.dim() != 1:
            raise ValueError(f"slopes: expected a 1-D tensor [H] or a head count, got shape {list(slopes.shape)}")
        self.slopes = slopes
        self.offset = offset

    def check(self, shape: Shape) -> None:
        if self.slopes.shape[0] != shape.heads:
            raise ValueError(f"slopes: expected {shape.heads} slopes (one per head), got {self.slopes.shape[0]}")

    def tensors(self) -> list[torch.Tensor]:
        return [self.slopes]

    def to(self, *args, **kwargs) -> ALiBi:
        """A copy with the slopes moved (``torch.Tensor.to`` arguments)."""
        return ALiBi(self.slopes.to(*args, **kwargs), offset=self.offset)

    def __call__(self, score, b, h, q, kv, shape):
        off = shape.offset if self.offset is None else self.offset
        slope = self.on(self.slopes, score)[h]
        return score - slope * (q + off - kv).abs().to(score.dtype)

    def has_pair_bias(self) -> bool:
        return True

    def pair_bias_index(self, q: torch.Tensor, kv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, int]:
        """The distance ``|q + offset - kv|`` of each pair, and one more than the largest."""
        off = shape.offset if self.offset is None else self.offset
        dist = (q + off - kv).abs()
        return dist, int(dist.max()) + 1 if dist.numel() else 1

    def pair_bias_table(self, size: int) -> torch.Tensor:
        """``-slope_h * d`` for distances ``d < size``."""
        return -self.slopes[:, None] * torch.arange(size, dtype=self.slopes.dtype, device=self.slopes.device)


class SoftCap(ScoreMod):
    """``s = cap * tanh(s / cap)`` (Gemma 2 / Grok logit soft-capping)."""

    def __init__(self, cap: float) -> None:
        if not cap > 0:
            raise ValueError(f"cap: expected a positive float, got {cap!r}")
        self.cap = float(cap)

    def __call__(self, score, b, h, q, kv, shape):
        return self.cap * torch.tanh(score / self.cap)


class Bias(ScoreMod):
    """Additive bias tensor broadcastable to ``[B, H, n_q, n_kv]`` (each dim 1 or full size)."""

    additive = True

    def __init__(self, bias: torch.Tensor) -> None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point or bias.dim() != 4:
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias: expected a float tensor [B|1, H|1, n_q, n_kv], got {got}")
        self.bias = bias
        self.per_batch, self.per_head = bias.shape[0] != 1, bias.shape[1] != 1

    def check(self, shape: Shape) -> None:
        want = (shape.batch, shape.heads, shape.n_q, shape.n_kv)
        got = tuple(self.bias.shape)
        if any(g not in (1, w) for g, w in zip(got[:2], want[:2])) or got[2:] != want[2:]:
            raise ValueError(
                f"bias: expected shape [{shape.batch}|1, {shape.heads}|1, {shape.n_q}, {shape.n_kv}], got {list(got)}"
            )

    def tensors(self) -> list[torch.Tensor]:
        return [self.bias]

    def check_finite(self) -> None:
        """NaN and ``+inf`` are refused; ``-inf`` masks the pair."""
        b = self.bias.detach()
        nan, pos = int(torch.isnan(b).sum()), int((b == float("inf")).sum())
        if nan or pos:
            raise ValueError(f"bias: holds {nan} NaN and {pos} +inf value(s) (only -inf, which masks a pair, "
                             "may be non-finite)")

    def to(self, *args, **kwargs) -> Bias:
        """A copy with the bias moved (``torch.Tensor.to`` arguments)."""
        return Bias(self.bias.to(*args, **kwargs))

    def __call__(self, score, b, h, q, kv, shape):
        bias = self.bias
        b = b if bias.shape[0] != 1 else torch.zeros_like(b)
        h = h if bias.shape[1] != 1 else torch.zeros_like(h)
        return score + self.on(bias, score)[b, h, q, kv]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


class RelativePositionBias(nn.Module, ScoreMod):
    """Learned relative-position bias per head.

    1-D (``grid=None``): ``s += table[h, clip(j - i, -max_distance, max_distance)]``.
    2-D (``grid=(Wh, Ww)``, Swin): tokens are a row-major ``Wh x Ww`` window and
    ``s += table[h, (dy + Wh - 1) * (2 Ww - 1) + dx + Ww - 1]`` with a ``(2Wh-1)(2Ww-1)`` table.
    The table is an ``nn.Parameter``: zero-initialised (the module starts as a no-op), or normal
    with standard deviation ``init_std``.
    """

    per_head = True
    additive = True

    def __init__(self, heads: int, *, max_distance: int = 128, grid: tuple[int, int] | None = None,
                 init_std: float = 0.0) -> None:
        nn.Module.__init__(self)
        _check_positive_int("max_distance", max_distance)
        if grid is not None:
            if len(grid) != 2:
                raise ValueError(f"grid: expected (Wh, Ww), got {grid!r}")
            for i, g in enumerate(grid):
                _check_positive_int(f"grid[{i}]", g)
        if heads < 1:
            raise ValueError(f"heads: expected a positive int, got {heads}")
        self.heads, self.grid, self.max_distance = heads, grid, max_distance
        size = (2 * grid[0] - 1) * (2 * grid[1] - 1) if grid is not None else 2 * max_distance + 1
        self.table = nn.Parameter(torch.zeros(heads, size))
        if init_std < 0:
            raise ValueError(f"init_std: expected a standard deviation >= 0, got {init_std}")
        if init_std:
            nn.init.normal_(self.table, std=init_std)

    def check(self, shape: Shape) -> None:
        if shape.heads != self.heads:
            raise ValueError(f"RelativePositionBias: built for heads={self.heads}, got {shape.heads}")
        if self.grid is not None and shape.n_q != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"RelativePositionBias: grid {self.grid} needs {self.grid[0] * self.grid[1]} tokens, "
                f"got n_q={shape.n_q}"
            )

    def tensors(self) -> list[torch.Tensor]:
        return [self.table]

    def index(self, q: torch.Tensor, kv: torch.Tensor, shape: Shape) -> torch.Tensor:
        if self.grid is None:
            rel = (kv - q - shape.offset).clamp(-self.max_distance, self.max_distance)
            return rel + self.max_distance
        wh, ww = self.grid
        dy = torch.div(q, ww, rounding_mode="floor") - torch.div(kv, ww, rounding_mode="floor")
        dx = torch.remainder(q, ww) - torch.remainder(kv, ww)
        return (dy + wh - 1) * (2 * ww - 1) + dx + ww - 1

    def forward(self, score, b, h, q, kv, shape):
        return score + self.on(self.table, score)[h, self.index(q, kv, shape)]


