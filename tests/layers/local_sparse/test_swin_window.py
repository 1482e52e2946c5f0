"""Tests of ``swin_window`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.testing import random_grid


def test_zero_halo_padding_counts_border_keys():
    """HaloNet's zero padding differs from a clipped halo exactly at the border windows."""
    torch.manual_seed(0)
    zeros = attnzoo.create("swin_window", dim=32, n_heads=4, window=2, halo=1, halo_padding="zeros").double()
    clipped = attnzoo.create("swin_window", dim=32, n_heads=4, window=2, halo=1).double()
    clipped.load_state_dict(zeros.state_dict())
    x = random_grid(grid=(6, 8))
    diff = (zeros(x) - clipped(x)).abs().sum(-1)[0]
    assert (diff[0] > 1e-6).all() and (diff[:, 0] > 1e-6).all()
    assert torch.allclose(diff[2:4, 2:6], torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("cosine", [True, False])
def test_swin_global_queries_with_an_empty_pooled_cell_have_finite_gradients(cosine):
    """A shifted window reads the global query of a pooled cell whose tokens are all padded: its pooled mean
    is 0, and its gradient must stay finite (dividing by a tiny clamp gave inf, then NaN at the padded
    tokens)."""
    torch.manual_seed(0)
    m = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=2, query="global", cosine=cosine).double()
    x = torch.randn(2, 4, 4, 32, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[0, 0, 0] = False
    keep[1, :2, :2] = False
    (m(x, mask=keep) * 1000).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~keep] == 0).all()
