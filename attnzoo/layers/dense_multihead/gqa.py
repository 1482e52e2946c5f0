"""``gqa``: Grouped-query attention (alias mqa: one key/value head)."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, load_shared, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, MIXER_SUPPORT, rand_x
from attnzoo.registry import Reduction, register


class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads.

    Query head i reads key/value head ``i // (n_heads // n_kv_heads)``; the KV cache holds
    ``n_kv_heads`` heads. ``n_kv_heads = 1`` is multi-query attention (alias ``mqa``).
    """

    def __init__(self, dim: int, n_heads: int = 8, n_kv_heads: int = 2, **kw: Any) -> None:
        super().__init__(dim, n_heads, n_kv_heads=n_kv_heads, **kw)


def _gqa_equals_mha() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=4)
    m = MultiHeadAttention(32, 4).double()
    load_shared(g, m)
    x = rand_x()
    return g(x, causal=True), m(x, causal=True)


def _gqa_mqa_is_shared_kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=1)
    m = MultiHeadAttention(32, 4).double()
    sd = g.state_dict()
    for name in ("k_proj", "v_proj"):  # MHA whose 4 K/V heads are copies of the single shared one
        sd[f"{name}.weight"] = sd[f"{name}.weight"].repeat(4, 1)
        sd[f"{name}.bias"] = sd[f"{name}.bias"].repeat(4)
    m.load_state_dict(sd)
    x = rand_x()
    return g(x), m(x)


def _gqa_cache_size() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    got = []
    for g in (1, 2, 4):
        m = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=g)
        cache = KVCache()
        m(rand_x(), causal=True, cache=cache)
        got.append(cache.nbytes())
    got = torch.tensor(got, dtype=torch.float64)
    return got / got[0], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)


register(
    "gqa", family=FAMILY, type="mixer", priority=1, papers=("baseline",), supports=MIXER_SUPPORT,
    aliases={"mqa": {"n_kv_heads": 1}},
    summary="Grouped-query attention (alias mqa: one key/value head).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_kv_heads": 2},
    reductions=(
        Reduction("groups_eq_heads", "n_kv_heads = n_heads equals mha", _gqa_equals_mha),
        Reduction("mqa", "n_kv_heads = 1 equals mha with every K/V head a copy of one (MQA)", _gqa_mqa_is_shared_kv),
        Reduction("cache_size", "the KV-cache size is proportional to n_kv_heads (1, 2, 4)", _gqa_cache_size),
    ),
)(GroupedQueryAttention)
