"""mixed_pool: the gated output lies in [avg, max]."""

from __future__ import annotations

import torch

import attnzoo
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
