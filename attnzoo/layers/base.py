"""Shared machinery of the attention token mixers: validation, masks, KV cache, capture.

Token-mixer contract: ``forward(x [B, N, C], *, mask=None, causal=False, context=None,
cache=None) -> [B, N, C]``. ``mask`` is bool ``[B, N]`` (True = keep) over ``x``;
``context`` ``[B, M, C_ctx]`` turns self-attention into cross-attention (``context_mask``
bool ``[B, M]`` pads it); ``cache`` is a :class:`~attnzoo.layers.cache.KVCache`. Output
rows at padded positions are zero, so a fully padded sequence gives zeros, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from attnzoo.layers.cache import KVCache, window_of
from attnzoo.ops import attention
from attnzoo.ops.backends import BACKENDS
from attnzoo.parallel import current as current_sharding
from attnzoo.parallel import ring_attention, unshard
from attnzoo.patterns import And, Causal, KeyPadding

__all__ = ["AttentionMixer", "Call", "MultiHeadAttention", "check_int", "check_choice", "build_pattern"]


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_divides(name: str, value: int, other_name: str, other: int) -> None:
    if other % value:
        raise ValueError(f"{name}: must divide {other_name}={other}, got {name}={value}")


def head_dim_for(dim: int, n_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or ``dim // n_heads`` when it is None (then ``n_heads`` must divide ``dim``)."""
    if head_dim is None:
        if dim % n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={n_heads} (or pass head_dim), got dim={dim}")
        head_dim = dim // n_heads
    return check_int("head_dim", head_dim)


def seeded(factory: Any, seed: int = 0, **kw: Any) -> nn.Module:
    """``factory(**kw)`` built after ``torch.manual_seed(seed)``, in float64 (for reduction checks)."""
    torch.manual_seed(seed)
    return factory(**kw).double()


def load_shared(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy every parameter/buffer of ``src`` whose name and shape ``dst`` shares; return ``dst``."""
    own = dst.state_dict()
    own.update({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape})
    dst.load_state_dict(own)
    return dst


def check_input_tensor(x: Any, name: str = "x", *, module: nn.Module | None = None, decoding: bool = False) -> None:
    """``x`` is a non-empty floating tensor (``decoding``: a step with a cache, which may hold no new token), of the
    dtype of ``module``'s parameters when given (unless autocast is on): else a ``TypeError`` / ``ValueError``
    naming ``name`` with the expected and actual values."""
    if not isinstance(x, torch.Tensor):
        return
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor (float32, float64, float16, bfloat16), got {x.dtype} "
                        f"of shape {list(x.shape)}")
    empty = x.dim() == 0 or x.shape[0] == 0 if decoding else x.numel() == 0
    if empty:
        what = "one batch element" if decoding else "one batch element and one token"
        raise ValueError(f"{name}: expected a non-empty tensor (at least {what}), got shape {list(x.shape)}")
    if module is not None and not torch.is_autocast_enabled(x.device.type):
        own = next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), None)
        if own is not None and own != x.dtype:
            raise TypeError(f"{name}: expected dtype {own} (the dtype of the module's parameters), got {x.dtype}; "
                            f"convert one of them (x.to({own}) or module.to({x.dtype}))")


def check_mixer_input(
    x: torch.Tensor, mask: torch.Tensor | None, context: torch.Tensor | None, dim: int,
    module: nn.Module | None = None, decoding: bool = False,
) -> None:
    """Validate ``x`` ``[B, N, dim]`` (floating, B >= 1; N >= 1 and the dtype of ``module``'s parameters when
    ``module`` is given and not ``decoding``), ``mask`` bool ``[B, N]`` and ``context`` ``[B, M, *]``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor [B, N, {dim}], got {got}")
    check_input_tensor(x, module=module, decoding=decoding or module is None)  # no module: a cache may be in use
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
        raise ValueError(
            f"mask: expected a bool tensor [{x.shape[0]}, {x.shape[1]}], got {mask.dtype} {list(mask.shape)}"
        )
    if context is not None and (context.dim() != 3 or context.shape[0] != x.shape[0]):
        raise ValueError(f"context: expected a tensor [{x.shape[0]}, M, C], got {list(context.shape)}")


def check_context(context: torch.Tensor | None, context_mask: torch.Tensor | None, width: int | None) -> None:
    """Validate ``context`` ``[B, M, width]`` (``width`` None: any) and ``context_mask`` bool ``[B, M]``."""
    if context is not None and width is not None and context.shape[-1] != width:
        raise ValueError(f"context: expected a tensor [{context.shape[0]}, M, {width}] (the module's context width), "
                         f"got {list(context.shape)}")
    if context_mask is None:
        return
    if context is None:
        raise ValueError("context_mask: given without a context (the padding mask of x is mask)")
    if context_mask.dtype != torch.bool or tuple(context_mask.shape) != tuple(context.shape[:2]):
        raise ValueError(f"context_mask: expected a bool tensor [{context.shape[0]}, {context.shape[1]}], got "
                         f"{context_mask.dtype} {list(context_mask.shape)}")


def build_pattern(user: Any, causal: bool, keep: torch.Tensor | None) -> Any:
    """``user & Causal() & KeyPadding(keep)``, leaving out the parts that are absent."""
    parts = [p for p in (user, Causal() if causal else None) if p is not None]
    if keep is not None and not bool(keep.all()):
        parts.append(KeyPadding(keep))
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = And(out, p)
    return out


def zero_padded(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero rows of ``y`` ``[B, N, C]`` where ``mask`` ``[B, N]`` is False."""
    return y if mask is None else y * mask.unsqueeze(-1).to(y.dtype)


@dataclass(frozen=True)
class Call:
    """The values of one forward call, passed to the hooks (never stored on the module).

    ``x`` ``[B, N, C]`` the queries' input; ``src`` the keys' and values' input (``x`` or the
    context); ``mask`` bool ``[B, N]`` over ``x``; ``kv_keep`` bool ``[B, M]`` over the keys of
    this call (the cached ones included once the cache is appended; None: all kept);
    ``causal``; ``cache``; ``pattern`` and ``score_mod`` the module's own or this call's
    (:meth:`AttentionMixer.mix`); ``extra`` entry-specific values (e.g. a grid mixer's ``grid``).
    """

    x: torch.Tensor
    src: torch.Tensor
    mask: torch.Tensor | None = None
    kv_keep: torch.Tensor | None = None
    causal: bool = False
    cache: Any = None
    pattern: Any = None
    score_mod: Any = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


class AttentionMixer(nn.Module):
    """Base class of the softmax-attention token mixers.

    Subclasses implement :meth:`project` (``q`` ``[B, H, N, D]``, ``k``/``v``
    ``[B, H_kv, M, D(_v)]``) and :meth:`output` (``z`` ``[B, H, N, D_v]`` -> ``[B, N, C]``)
    and may override :meth:`post_attention` (gates), :meth:`score_mod_for` and
    :meth:`attend`. ``project``, ``attend``, ``score_mod_for`` and ``post_attention`` receive the :class:`Call`
    (``call=``) with the values of the forward call. The base handles rotary / q-k transforms, the KV cache, causal and
    padding masks, the per-head multiplier ``head_mask`` (ξ, applied before W_O) and capture.

    Capture: set ``layer.capture = True``; each forward then stores ``layer.captured``
    with ``"weights"`` ``[B, H, N, M]`` (reference backend) and ``"z"`` (per-head outputs
    before W_O, after gates and ξ).
    """

    dim: int
    causal_ok: bool = True
    cross_ok: bool = True
    context_width: int | None = None  # the width context must have (None: not checked here)
    last_call_outputs: tuple[str, ...] = ("captured",)  # attributes a forward sets for the caller to read
    call_pattern: bool = False  # the forward builds a pattern of its own per call (``mix(pattern=...)``)

    def __init__(self, dim: int, *, pattern: Any = None, score_mod: Any = None, qk_transform: Any = None,
                 scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if qk_transform is not None and not callable(qk_transform):
            raise ValueError(
                f"rope/qk_transform: expected a module (q, k, q_offset=, k_offset=) -> (q, k), got {qk_transform!r}"
            )
        self.pattern = pattern
        self.score_mod = score_mod
        self.qk_transform = qk_transform
        self.scale = scale
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {['auto', *BACKENDS]}, got {backend!r}")
        self.backend = backend
        self.capture = False
        self.captured: dict[str, torch.Tensor] = {}

    # Hooks ---------------------------------------------------------------------------------
    def project(self, x: torch.Tensor, src: torch.Tensor, call: Call | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def post_attention(self, z: torch.Tensor, x: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        return z

    def score_mod_for(self, q: torch.Tensor, k: torch.Tensor, call: Call | None = None) -> Any:
        """The score modifier of this call; a modifier with ``from_qk(q, k, keep, scale)`` is built per call."""
        mod = self.score_mod if call is None or call.score_mod is None else call.score_mod
        if mod is not None and hasattr(mod, "from_qk"):
            scale = self.attention_scale(q)
            return mod.from_qk(q, k, None if call is None else call.kv_keep,
                               1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        return mod

    def attention_scale(self, q: torch.Tensor) -> float | None:
        return self.scale

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Any,
               want_weights: bool, call: Call | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        sharding = current_sharding()
        if sharding is not None:  # q, k, v are this process's shards; pattern is the whole sequence's
            z = ring_attention(q, k, v, pattern=pattern, score_mod=self.score_mod_for(q, k, call=call),
                               scale=self.attention_scale(q), group=sharding.group, layout=sharding.layout)
            return z, None
        res = attention(q, k, v, pattern=pattern, score_mod=self.score_mod_for(q, k, call=call),
                        scale=self.attention_scale(q), backend=self.backend if not want_weights else "reference",
                        return_weights=want_weights)
        return (res[0], res[1]) if want_weights else (res, None)

    def sequence_sharding_reason(self) -> str | None:
        """Why this mixer cannot run with its sequence sharded (:func:`attnzoo.parallel.sequence_sharded`), or
        None: it must be a plain :class:`MultiHeadAttention` (any pattern, score modifier, GQA, rotary
        embedding), whose only exchange between tokens is the attention itself."""
        cls = type(self)
        same = (cls.forward is AttentionMixer.forward and cls.attend is AttentionMixer.attend
                and cls.post_attention is AttentionMixer.post_attention and isinstance(self, MultiHeadAttention)
                and cls.project is MultiHeadAttention.project and cls.output is MultiHeadAttention.output)
        if not same:
            return (f"{cls.__name__} changes the attention of MultiHeadAttention (its own project, output, "
                    "post_attention or attend), so it cannot run with its sequence sharded")
        if self.score_mod is not None and hasattr(self.score_mod, "from_qk"):
            return f"its score modifier {type(self.score_mod).__name__} is built from q and k on each call"
        return None

    def _sharded_call(self, sharding: Any, context: torch.Tensor | None, cache: Any, want: bool) -> None:
        reason = self.sequence_sharding_reason()
        if reason is None and (context is not None or cache is not None or want):
            reason = "cross-attention, a KV cache, return_weights and capture need the whole sequence"
        if reason is not None:
            raise ValueError(f"sequence_sharded: {type(self).__name__} cannot run here: {reason}")

    def _sharded_qk(self, q: torch.Tensor, k: torch.Tensor, sharding: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The q-k transform (rotary) at the global positions of this process's shard."""
        from attnzoo.parallel import positions

        n = q.shape[2] * sharding.world_size
        if sharding.layout == "contiguous":
            start = sharding.rank * q.shape[2]
            return self.qk_transform(q, k, q_offset=start, k_offset=start)
        pos = positions(n, sharding.layout, rank=sharding.rank, world_size=sharding.world_size, device=q.device)
        try:
            return self.qk_transform(q, k, q_pos=pos, k_pos=pos)
        except TypeError:
            raise ValueError(f"sequence_sharded: the zigzag layout needs a q-k transform that takes positions "
                             f"(q_pos=, k_pos=), {type(self.qk_transform).__name__} does not; use the contiguous "
                             "layout") from None

    # Forward -------------------------------------------------------------------------------
    def check_call(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool, context: torch.Tensor | None,
                   cache: Any) -> None:
        """Validate the arguments of :meth:`forward` (shapes, and what this mixer supports)."""
        check_mixer_input(x, mask, context, self.dim, module=self, decoding=cache is not None)
        if causal and not self.causal_ok:
            raise ValueError(f"causal: {type(self).__name__} does not support causal attention")
        if context is not None and not self.cross_ok:
            raise ValueError(f"context: {type(self).__name__} does not support cross-attention")
        if context is not None and cache is not None:
            raise ValueError("cache: KV-cache decoding is for self-attention; got a context too")
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected an attnzoo.layers.KVCache, got {type(cache).__name__}")

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (and weights ``[B, H, N, M]`` if ``return_weights``).

        ``mask``: bool ``[B, N]``, **True = keep** (a real token), False = padding (as ``KeyPadding``; the
        opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``); padded positions are not attended to
        and come out as zeros. ``context_mask``: the same for ``context`` ``[B, M, C]``. ``causal``: position
        ``i`` sees keys ``<= i``. ``cache``: a :class:`~attnzoo.layers.KVCache` for decoding.
        ``head_mask``: ξ, ``[H]`` or ``[B, H]``, multiplies each head's output before W_O.
        """
        return self.mix(x, mask=mask, causal=causal, context=context, context_mask=context_mask, cache=cache,
                        head_mask=head_mask, return_weights=return_weights)

    def mix(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head_mask: torch.Tensor | None = None,
        return_weights: bool = False,
        pattern: Any = None,
        score_mod: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` with this call's ``pattern`` / ``score_mod`` (None: the module's own) and
        entry-specific values ``extra``, all handed to the hooks in the :class:`Call`."""
        self.check_call(x, mask, causal, context, cache)
        check_context(context, context_mask, self.context_width)
        sharding = current_sharding()
        if sharding is not None:
            self._sharded_call(sharding, context, cache, return_weights or self.capture)
        src = x if context is None else context
        keep = mask if context is None else context_mask
        call = Call(x=x, src=src, mask=mask, kv_keep=keep, causal=causal, cache=cache,
                    pattern=self.pattern if pattern is None else pattern,
                    score_mod=self.score_mod if score_mod is None else score_mod, extra=extra or {})
        q, k, v = self.project(x, src, call=call)
        pos = cache.position if cache is not None else 0
        if self.qk_transform is not None and context is None:
            if sharding is not None:
                q, k = self._sharded_qk(q, k, sharding)
            else:
                q, k = self.qk_transform(q, k, q_offset=pos, k_offset=pos)
        if sharding is not None and keep is not None:  # the key padding of the whole sequence
            keep = unshard(keep, 1, sharding.layout, group=sharding.group)
            call = replace(call, kv_keep=keep)
        if cache is not None:
            k, v, keep = cache.append(k, v, keep)
            call = replace(call, kv_keep=keep)
        want = return_weights or self.capture
        z, weights = self.attend(q, k, v, build_pattern(call.pattern, causal, keep), want, call=call)
        if cache is not None:
            cache.advance(x.shape[1])
            bound = window_of(call.pattern)
            if bound is not None:
                cache.trim(*bound)
        z = self.post_attention(z, x, call=call)
        if head_mask is not None:
            xi = head_mask.to(z.dtype)
            z = z * (xi.view(1, -1, 1, 1) if xi.dim() == 1 else xi.view(xi.shape[0], -1, 1, 1))
        if self.capture:
            self.captured = {"weights": weights, "z": z}
        y = zero_padded(self.output(z, x), mask)
        return (y, weights) if return_weights else y


class MultiHeadAttention(AttentionMixer):
    """Multi-head (and grouped-query) scaled-dot-product attention, self or cross.

    ``O_h = softmax(Q_h K_hᵀ / √d_h + B) V_h``, ``Y = Σ_h O_h W_O^h``, with
    ``Q = X W_Q``, ``K, V = C W_K, C W_V`` (``C = X`` for self-attention).

    Args:
        dim: model width C.
        n_heads: query heads H.
        head_dim: per-head width (default ``dim // n_heads``; decoupled from ``dim``).
        n_kv_heads: key/value heads (GQA; must divide ``n_heads``; default ``n_heads``).
        bias: biases in the projections.
        context_dim: width of ``context`` for cross-attention (default ``dim``).
        pattern: an :mod:`attnzoo.patterns` pattern applied on every call.
        score_mod: a score modifier (e.g. ``ALiBi``, ``RelativePositionBias``).
        rope: a :class:`~attnzoo.layers.rotary.RotaryEmbedding` (or ``True`` for the default one).
        scale: logit scale (default ``1/√head_dim``).
        backend: the :func:`attnzoo.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        *,
        head_dim: int | None = None,
        n_kv_heads: int | None = None,
        bias: bool = True,
        context_dim: int | None = None,
        pattern: Any = None,
        score_mod: Any = None,
        rope: Any = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        check_int("dim", dim)
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        n_kv_heads = n_heads if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads)
        check_divides("n_kv_heads", n_kv_heads, "n_heads", n_heads)
        if rope is True:
            from attnzoo.layers.rotary import RotaryEmbedding

            rope = RotaryEmbedding(head_dim)
        super().__init__(dim, pattern=pattern, score_mod=score_mod, qk_transform=rope or None, scale=scale,
                         backend=backend)
        self.n_heads, self.head_dim, self.n_kv_heads = n_heads, head_dim, n_kv_heads
        ctx = dim if context_dim is None else check_int("context_dim", context_dim)
        self.context_width = ctx
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(ctx, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(ctx, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    @staticmethod
    def split(t: torch.Tensor, heads: int) -> torch.Tensor:
        """``[B, N, H*D]`` -> ``[B, H, N, D]``."""
        b, n, _ = t.shape
        return t.view(b, n, heads, -1).transpose(1, 2)

    @staticmethod
    def merge(z: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
        b, h, n, d = z.shape
        return z.transpose(1, 2).reshape(b, n, h * d)

    def project(self, x, src, call=None):
        return (self.split(self.q_proj(x), self.n_heads), self.split(self.k_proj(src), self.n_kv_heads),
                self.split(self.v_proj(src), self.n_kv_heads))

    def output(self, z, x):
        return self.o_proj(self.merge(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, head_dim={self.head_dim}, n_kv_heads={self.n_kv_heads}"


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
