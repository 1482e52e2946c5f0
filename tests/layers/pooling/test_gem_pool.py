"""gem_pool: large p approaches the max; packed equals padded."""

from __future__ import annotations

import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_large_p_approaches_max_and_packs():
    x, mask, packed, cu = bags()
    x, packed = x.abs() + 0.1, packed.abs() + 0.1
    m = attnzoo.create("gem_pool", dim=16, groups=2, p=200.0).double()
    y = m(x, mask=mask)
    want = torch.stack([x[b, :n].amax(0) for b, n in enumerate(mask.sum(1).tolist())])
    assert (y <= want + 1e-12).all() and ((want - y) / want).max() < 0.02
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y)
