"""``causal``: Causal mask j <= i + (L_k - L_q) (KV-cache offset): patterns.Causal, as an always-causal mha."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, seeded
from attnzoo.layers.local_sparse._common import FAMILY, SMALL, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.patterns import Causal
from attnzoo.registry import Reduction, register


class CausalAttention(MultiHeadAttention):
    """Multi-head attention under the causal mask ``j <= i + (L_k - L_q)`` (always applied;
    the offset makes KV-cache decoding exact)."""

    refused_arguments = ('context_dim', 'pattern')  # base-class arguments it sets itself or cannot honour

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, pattern=Causal(), **kw)


def _causal_is_mha_causal():
    m = seeded(CausalAttention, dim=32, n_heads=4)
    x = rand_x()
    return m(x), mha_from(m)(x, causal=True)


def _causal_future_independent():
    m = seeded(CausalAttention, dim=32, n_heads=4)
    x = rand_x(n=13)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return m(x2)[:, :7], m(x)[:, :7]


register(
    "causal", family=FAMILY, type="pattern", priority=1, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(N^2 / 2)",
    summary="Causal mask j <= i + (L_k - L_q) (KV-cache offset): patterns.Causal, as an always-causal mha.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("equals_mha_causal", "the entry equals mha(causal=True) with the same weights",
                  _causal_is_mha_causal),
        Reduction("future_independent", "outputs at i are unchanged when inputs after i change",
                  _causal_future_independent),
    ),
)(CausalAttention)
