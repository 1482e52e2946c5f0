"""Tests of ``relative_position_bias`` beyond the conformance contract."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers import MultiHeadAttention


def test_relative_position_bias_2d_grid():
    rpb = attnzoo.create("relative_position_bias", heads=2, grid=(3, 3), init_std=1.0)
    assert rpb.table.shape == (2, 25)
    m = MultiHeadAttention(16, 2, score_mod=rpb)
    assert m(torch.randn(1, 9, 16)).shape == (1, 9, 16)
