"""slot_pool: slots are convex combinations of the kept instances, padded or packed."""

from __future__ import annotations

import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_slots_are_convex_combinations():
    torch.manual_seed(0)
    x, mask, packed, cu = bags()
    m = attnzoo.create("slot_pool", dim=16, n_slots=3).double()
    y, w = m(x, mask=mask, return_weights=True)
    assert (w >= 0).all() and (w[~mask] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(4, 3, dtype=torch.float64))
    yp, wp = m(packed, cu_seqlens=cu, return_weights=True)
    torch.testing.assert_close(yp, y)
    torch.testing.assert_close(wp[0], w[mask])
