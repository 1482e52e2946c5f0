"""Tests of ``sliding_window`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.layers import KVCache
from attnzoo.layers.testing import random_tokens
from tests.helpers import seeded_mha


@pytest.mark.parametrize("n_sink", [0, 2])
def test_sliding_window_cache_is_bounded(n_sink):
    window = 4
    m = seeded_mha(pattern=P.SlidingWindow(window, causal=True, n_sink=n_sink))
    x = random_tokens(n=30)
    full = m(x, causal=True)
    cache, outs = KVCache(), []
    for t in range(30):
        outs.append(m(x[:, t:t + 1], causal=True, cache=cache))
        assert len(cache) <= window + n_sink
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.nbytes() == 2 * 2 * 4 * (window + n_sink) * 8 * 8


def test_sliding_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        attnzoo.create("mha", dim=32, n_heads=4, pattern=P.SlidingWindow(0))
