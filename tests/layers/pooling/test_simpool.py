"""simpool: the output lies within [min, max] of the bag's values."""

from __future__ import annotations

import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_output_within_bag_range():
    torch.manual_seed(0)
    x, mask, packed, cu = bags()
    m = attnzoo.create("simpool", dim=16).double()
    y = m(x, mask=mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        assert x[b, :n].min() - 1e-9 <= y[b].min() and y[b].max() <= x[b, :n].max() + 1e-9
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y)
