"""Tests of ``flashblock`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers import KVCache
from attnzoo.layers.testing import random_tokens


def test_flashblock_denoise_and_commit_steps():
    torch.manual_seed(0)
    m = attnzoo.create("flashblock", dim=32, n_heads=4, block_size=4).double()
    cache = KVCache()
    blocks = [random_tokens(n=4, seed=s) for s in range(3)]
    for blk in blocks:  # denoise (two steps, the second reusing the external part) then commit
        m.denoise(random_tokens(n=4, seed=9), cache, refresh=True)
        m.denoise(blk, cache, refresh=False)
        m.commit(blk, cache)
    assert cache.position == 12 and len(cache) == 12 and "flashblock" not in cache.state
    with pytest.raises(ValueError, match="block"):
        m.denoise(random_tokens(n=5), cache)
