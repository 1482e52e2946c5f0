"""Tests of ``pooled_kv`` beyond the conformance contract."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers.testing import random_grid


def test_pooled_kv_2d_padding_and_hilo_1d():
    torch.manual_seed(0)
    m = attnzoo.create("pooled_kv", dim=32, n_heads=4, pool=2).double()
    x = random_grid(grid=(4, 6))
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[1, 2:, 4:] = False  # a whole 2x2 cell padded
    y = m(x, mask=keep)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 3)
    torch.testing.assert_close(m(x2, mask=keep)[keep], y[keep], rtol=1e-10, atol=1e-12)
    h = attnzoo.create("hilo", dim=32, n_heads=4, alpha=0.5, window=3).double()
    assert h(random_grid(grid=(12,))).shape == (2, 12, 32)
