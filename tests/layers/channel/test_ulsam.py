"""ulsam: each map sums to 1 over H x W; the shape is kept; parameters O(C)."""

from __future__ import annotations

import torch

import attnzoo


def test_maps_sum_to_one_and_parameters_linear_in_channels():
    torch.manual_seed(0)
    m = attnzoo.create("ulsam", channels=32, groups=4).double()
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64)
    a = m.maps(x)
    torch.testing.assert_close(a.flatten(2).sum(-1), torch.ones(2, 4, dtype=torch.float64))
    assert m(x).shape == x.shape
    n = sum(p.numel() for p in m.parameters())
    assert n == 32 * 2 + 32 + 4  # depthwise 1x1 (weight + bias), pointwise per group to one map
