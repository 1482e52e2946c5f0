"""``gist_pool``: GistPool, in-context compression into gist tokens restricted to their context chunks.

The sequence is ``[context (L tokens); g gist tokens; later tokens]``. :class:`GistMask`: context
tokens attend causally within the context; gist token j attends only to chunk j of the context
(token ``t < L`` is in chunk ``t g // L``: contiguous chunks of ``L / g`` tokens, a pooling-like
attention); later tokens attend to the gist tokens and causally to later tokens, never to the raw
context. The entry is ``mha`` with this pattern (every backend consumes it). Needs ``L >= g``.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY
from attnzoo.patterns.base import Pattern
from attnzoo.registry import Reduction, register

__all__ = ["GistMask", "gist_pool"]


class GistMask(Pattern):
    """The GistPool mask over ``[context (context_len); n_gist gists; later tokens]`` (see the module docstring)."""

    def __init__(self, context_len: int, n_gist: int) -> None:
        self.context_len = check_int("context_len", context_len)
        self.n_gist = check_int("n_gist", n_gist)
        if n_gist > context_len:
            raise ValueError(f"n_gist: expected n_gist <= context_len = {context_len} (one chunk per gist), "
                             f"got {n_gist}")

    def value_key(self) -> tuple:
        return ("GistMask", self.context_len, self.n_gist)

    def allow(self, b, h, q, kv, shape):
        length, g = self.context_len, self.n_gist
        kv_ctx, q_ctx = kv < length, q < length
        kv_gist = (kv >= length) & (kv < length + g)
        q_gist = (q >= length) & (q < length + g)
        q_after, kv_after = q >= length + g, kv >= length + g
        context = q_ctx & kv_ctx & (kv <= q)
        gist = q_gist & kv_ctx & ((kv * g) // length == q - length)
        after = q_after & (kv_gist | (kv_after & (kv <= q)))
        return context | gist | after

    def __repr__(self) -> str:
        return f"GistMask(context_len={self.context_len}, n_gist={self.n_gist})"


def gist_pool(dim: int, n_heads: int = 8, *, context_len: int, n_gist: int, head_dim: int | None = None,
              bias: bool = True, scale: float | None = None, backend: str = "auto", **kw: Any) -> MultiHeadAttention:
    """``mha`` under :class:`GistMask` (``x`` ``[B, N, C]`` laid out as context, gists, later tokens)."""
    return MultiHeadAttention(dim, n_heads, pattern=GistMask(context_len, n_gist), head_dim=head_dim, bias=bias,
                              scale=scale, backend=backend, **kw)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _uniform_gist_is_chunk_mean() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(gist_pool, dim=8, n_heads=2, context_len=6, n_gist=2, backend="reference")
    with torch.no_grad():
        m.q_proj.weight.zero_()
        m.q_proj.bias.zero_()
    x = _x()
    chunks = torch.stack([x[:, 0:3].mean(1), x[:, 3:6].mean(1)], 1)
    return m(x)[:, 6:8], m.o_proj(m.v_proj(chunks))


def _later_tokens_skip_the_context() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(gist_pool, dim=8, n_heads=2, context_len=6, n_gist=2, backend="reference")
    x = _x()
    x2 = x.clone()
    x2[:, :6] = _x(1)[:, :6]
    return m(x2)[:, 8:], m(x)[:, 8:]


register(
    "gist_pool", family=FAMILY, type="pattern", priority=3, papers=("GistPool",),
    supports={"self", "causal", "padding", "gqa"}, complexity="O(N^2 - pruned context)",
    summary="GistPool mask: gist token j attends only to context chunk j; later tokens see the context only "
            "through the gists (mha under GistMask).",
    test_kwargs={"dim": 32, "n_heads": 4, "context_len": 6, "n_gist": 2},
    reductions=(
        Reduction("uniform_gist_is_chunk_mean", "a gist token attending uniformly to its chunk equals chunk mean "
                  "pooling (W_O W_V of the chunk mean)", _uniform_gist_is_chunk_mean),
        Reduction("later_tokens_skip_context", "tokens after the gists cannot attend to the raw context",
                  _later_tokens_skip_the_context),
    ),
)(gist_pool)
