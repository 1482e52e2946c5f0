"""Tests of ``gqa`` beyond the conformance contract."""

from __future__ import annotations

import attnzoo
from attnzoo.layers import KVCache
from attnzoo.layers.testing import random_tokens


def test_gqa_cache_holds_kv_heads_only():
    m = attnzoo.create("mqa", dim=32, n_heads=4).double()
    cache = KVCache()
    m(random_tokens(n=10), causal=True, cache=cache)
    assert cache.k.shape == (2, 1, 10, 8)
