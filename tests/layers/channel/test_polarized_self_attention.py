"""polarized_self_attention: channel gates constant over space, spatial gates constant over channels, in (0, 1)."""

from __future__ import annotations

import pytest
import torch

import attnzoo


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_gates_and_shape(layout):
    torch.manual_seed(0)
    m = attnzoo.create("polarized_self_attention", channels=16, layout=layout).double()
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    gc, gs = m.channel_gate(x), m.spatial_gate(x)
    assert gc.shape == (2, 16, 1, 1) and gs.shape == (2, 1, 5, 7)
    assert ((gc > 0) & (gc < 1)).all() and ((gs > 0) & (gs < 1)).all()
    assert m(x).shape == x.shape
    if layout == "parallel":
        torch.testing.assert_close(m(x), x * (gc + gs))
