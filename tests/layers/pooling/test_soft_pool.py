"""soft_pool: avg <= SoftPool <= max per channel; adaUnPool on padded and packed bags."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_softpool_between_avg_and_max():
    x, mask, _, _ = bags()
    y = attnzoo.create("soft_pool", dim=16, mode="softpool")(x, mask=mask)
    avg = attnzoo.create("mean_pool", dim=16)(x, mask=mask)
    top = attnzoo.create("mean_pool", dim=16, mode="max")(x, mask=mask)
    assert (avg <= y + 1e-12).all() and (y <= top + 1e-12).all()


@pytest.mark.parametrize("mode", ["softpool", "edscw", "adapool"])
def test_adaunpool_packed_padded_and_weights(mode):
    torch.manual_seed(0)
    x, mask, packed, cu = bags()
    m = attnzoo.create("soft_pool", dim=16, mode=mode).double()
    y = m(x, mask=mask)
    up = m.unpool(y, x, mask=mask)
    assert up.shape == x.shape and (up[~mask] == 0).all()
    torch.testing.assert_close(m.unpool(y, packed, cu_seqlens=cu)[0], up[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up.sum(1), y, rtol=1e-12, atol=1e-12)
    const = x[:, :1].expand(4, 5, 16)                          # a constant bag: equal weights, y / N each
    torch.testing.assert_close(m.unpool(y, const), y[:, None].expand(4, 5, 16) / 5, rtol=1e-12, atol=1e-12)


def test_adaunpool_gradients_and_bad_y():
    torch.manual_seed(0)
    x, mask, _, _ = bags()
    m = attnzoo.create("soft_pool", dim=16).double()
    m.unpool(m(x, mask=mask).detach() * 2, x, mask=mask).square().sum().backward()
    assert m.beta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"y: expected a torch.float64 tensor \[4, 16\] \(one vector per bag\), "
                                         r"got torch.float64 \[3, 16\]"):
        m.unpool(torch.zeros(3, 16, dtype=torch.float64), x, mask=mask)
