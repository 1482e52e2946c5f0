"""The FlexAttention block mask a pattern gives agrees with its own block layout and dense mask."""

from __future__ import annotations

import pytest
import torch

from attnzoo import patterns as P
from attnzoo.ops.layout import EMPTY

SHAPE = P.Shape(2, 2, 640, 640)
EXACT = {
    "causal": lambda: P.Causal(),
    "window": lambda: P.SlidingWindow(100, causal=True),
    "symmetric window + sinks": lambda: P.SlidingWindow(130, n_sink=3),
    "documents": lambda: P.Document([100, 300, 240]),
    "global | window": lambda: P.GlobalTokens(5) | P.SlidingWindow(64, causal=True),
    "per-head windows": lambda: P.SlidingWindow([32, 256], causal=True),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_flex_block_mask_matches_layout_and_dense_mask(name: str) -> None:
    pattern = EXACT[name]()
    bm = pattern.flex_block_mask(SHAPE)
    assert pattern.flex_block_mask(SHAPE) is bm  # cached
    flex_active = bm.to_dense().bool()  # [B'|1, H'|1, nqb, nkb] at 128
    ours = pattern.block_layout(SHAPE, 128, 128).state != EMPTY
    flex_active, ours = torch.broadcast_tensors(flex_active, ours)
    assert torch.equal(flex_active, ours)
    b, h, q, kv = (torch.arange(n).view(*[-1 if i == d else 1 for i in range(4)])
                   for d, n in enumerate((SHAPE.batch, SHAPE.heads, SHAPE.n_q, SHAPE.n_kv)))
    dense = pattern.dense_mask(SHAPE)
    assert torch.equal(torch.broadcast_to(bm.mask_mod(b, h, q, kv), (2, 2, 640, 640)),
                       torch.broadcast_to(dense, (2, 2, 640, 640)))
