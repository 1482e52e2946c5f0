"""Tests of ``combiner`` beyond the conformance contract."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers.testing import random_grid


def test_combiner_and_block_transformer_decode_and_weights():
    torch.manual_seed(0)
    c = attnzoo.create("combiner", dim=32, n_heads=4, block=4).double()
    x = random_grid(grid=(10,), b=1)
    w = c.effective_weights(x, causal=True)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert (w[..., torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)] == 0).all()
    bt = attnzoo.create("block_transformer", dim=32, n_heads=4, block_size=4).double()
    cache = attnzoo.layers.KVCache()
    outs = [bt(x[:, i:i + 3], cache=cache) for i in range(0, 10, 3)]
    torch.testing.assert_close(torch.cat(outs, 1), bt(x), rtol=1e-10, atol=1e-12)
