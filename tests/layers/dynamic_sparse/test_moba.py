"""moba while decoding: the block means kept in the cache give exactly the full forward, step by step or in
chunks, and a reset cache starts over."""

from __future__ import annotations

import torch

from attnzoo.layers.cache import KVCache
from attnzoo.registry import create


def _model():
    torch.manual_seed(0)
    return create("moba", dim=32, n_heads=4, block_size=4, top_k=2).double()


def test_decoding_with_kept_block_means_equals_the_full_forward():
    m = _model()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    want = m(x, causal=True)
    for sizes in ([1] * 23, [5, 1, 3, 6, 1, 7]):
        cache, outs, start = KVCache(), [], 0
        with torch.no_grad():
            for size in sizes:
                outs.append(m(x[:, start:start + size], causal=True, cache=cache))
                start += size
        assert (torch.cat(outs, 1) - want).abs().max() < 1e-12
        done, means = cache.state["moba_block_means"]
        assert done == 23 // 4 and means.shape[2] == done
        cache.reset()
        with torch.no_grad():
            again = m(x[:, :9], causal=True, cache=cache)
        assert (again - want[:, :9]).abs().max() < 1e-12


def test_explain_says_which_backend_a_call_runs():
    m = create("moba", dim=32, n_heads=4, block_size=4, top_k=2)
    assert "fused CPU flash tiles" in m.explain(torch.randn(1, 16, 32), causal=True)
    assert "3 queries < block_k=4" in m.explain(torch.randn(1, 3, 32), causal=True)
    hip = create("hip", dim=32, n_heads=4, top_k=3, query_block=4)
    assert "blocks of 4 queries" in hip.explain(torch.randn(1, 16, 32), causal=True)
    forced = create("moba", dim=32, n_heads=4, block_size=4, top_k=2, backend="reference")
    assert "forced to 'reference'" in forced.explain(torch.randn(1, 16, 32))
