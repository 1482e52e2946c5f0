"""mixed_pool: the gated output lies in [avg, max]; tree pooling on padded, packed and holed bags."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.pooling._common import Bags
from attnzoo.layers.pooling.mixed_pool import region_positions
from tests.layers.pooling._bags import bags


def test_gated_between_avg_and_max():
    torch.manual_seed(0)
    x, mask, packed, cu = bags()
    m = attnzoo.create("mixed_pool", dim=16, mode="gated").double()
    y = m(x, mask=mask)
    avg = attnzoo.create("mean_pool", dim=16)(x, mask=mask)
    top = attnzoo.create("mean_pool", dim=16, mode="max")(x, mask=mask)
    assert (avg <= y + 1e-12).all() and (y <= top + 1e-12).all()
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y)


def test_tree_packed_padded_holes_and_bounds():
    torch.manual_seed(0)
    x, mask, packed, cu = bags()
    m = attnzoo.create("mixed_pool", dim=16, mode="tree", region=9, depth=3).double()
    y = m(x, mask=mask)
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y, rtol=1e-12, atol=1e-12)
    holed = torch.zeros(4, 18, dtype=torch.bool)
    holed[:, 1::2] = mask                                  # the same instances, padding between them
    xh = torch.full((4, 18, 16), 50.0, dtype=torch.float64)
    xh[:, 1::2] = x
    torch.testing.assert_close(m(xh, mask=holed), y, rtol=1e-12, atol=1e-12)
    leaf = torch.einsum("brc,lr->blc", region_positions(Bags.build(x, mask, None), 9), m.leaves)
    assert (leaf.amin(1) - 1e-12 <= y).all() and (y <= leaf.amax(1) + 1e-12).all()   # gates mix convexly
    y.square().sum().backward()
    assert m.leaves.grad.abs().sum() > 0 and m.gates.grad.abs().sum() > 0


def test_tree_options_are_checked():
    with pytest.raises(ValueError, match="x: tree pooling's filters cover region=4 positions, got a bag of 9"):
        attnzoo.create("mixed_pool", dim=16, mode="tree", region=4)(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="region: mode='tree' needs"):
        attnzoo.create("mixed_pool", dim=16, mode="tree")
    with pytest.raises(ValueError, match="depth: only used with mode='tree'"):
        attnzoo.create("mixed_pool", dim=16, depth=3)
    assert attnzoo.create("mixed_pool", dim=16, mode="tree", region=5, depth=1).gates.shape == (0, 5)
