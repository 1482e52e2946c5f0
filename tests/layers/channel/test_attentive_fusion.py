"""attentive_fusion: weights in [0, 1] (summing to 1 over the sources for softmax); bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo


@pytest.mark.parametrize("mode, m", [("afa", 2), ("softmax", 3)])
def test_weights_convex(mode, m):
    torch.manual_seed(0)
    f = attnzoo.create("attentive_fusion", channels=8, n_sources=m, mode=mode).double()
    maps = [torch.randn(2, 8, 4, 5, dtype=torch.float64) for _ in range(m)]
    a = f.weights(*maps)
    assert ((a >= 0) & (a <= 1)).all()
    torch.testing.assert_close(a.sum(1), torch.ones_like(a.sum(1)))
    torch.testing.assert_close(f(*maps), (a * torch.stack(maps, 1)).sum(1))


def test_bad_input():
    f = attnzoo.create("attentive_fusion", channels=8)
    with pytest.raises(ValueError, match=r"maps\[1\]: expected the shape of maps\[0\] \[2, 8, 4, 5\]"):
        f(torch.randn(2, 8, 4, 5), torch.randn(2, 8, 4, 6))
    with pytest.raises(ValueError, match="maps: expected 2 feature maps"):
        f(*[torch.randn(2, 8, 4, 5)] * 3)
