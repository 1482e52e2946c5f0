"""soft_pool: avg <= SoftPool <= max per channel."""

from __future__ import annotations

import attnzoo
from tests.layers.pooling._bags import bags


def test_softpool_between_avg_and_max():
    x, mask, _, _ = bags()
    y = attnzoo.create("soft_pool", dim=16, mode="softpool")(x, mask=mask)
    avg = attnzoo.create("mean_pool", dim=16)(x, mask=mask)
    top = attnzoo.create("mean_pool", dim=16, mode="max")(x, mask=mask)
    assert (avg <= y + 1e-12).all() and (y <= top + 1e-12).all()
