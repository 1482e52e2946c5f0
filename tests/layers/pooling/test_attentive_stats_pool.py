"""attentive_stats_pool: DRASP's dual resolution on padded, packed and holed bags; its weights and gradients."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from tests.layers.pooling._bags import bags


def _drasp(**kw):
    torch.manual_seed(0)
    m = attnzoo.create("attentive_stats_pool", dim=16, attn_dim=8, dual_resolution=True, segment_size=3, **kw)
    m = m.double()
    with torch.no_grad():
        m.beta.fill_(0.6)
    return m


@pytest.mark.parametrize("kw", [{}, {"channel_dependent": True, "global_context": True}])
def test_dual_resolution_packed_padded_and_holes(kw):
    m = _drasp(**kw)
    x, mask, packed, cu = bags()
    y, w = m(x, mask=mask, return_weights=True)
    yp, wp = m(packed, cu_seqlens=cu, return_weights=True)
    torch.testing.assert_close(yp, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wp[0], w[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.sum(1), torch.ones_like(w.sum(1)), rtol=1e-12, atol=1e-12)  # fine-branch weights
    holed = torch.zeros(4, 2 * mask.shape[1], dtype=torch.bool)
    holed[:, 1::2] = mask                                              # the same frames, padding between them
    xh = torch.zeros(4, 2 * mask.shape[1], 16, dtype=torch.float64)
    xh[:, 1::2] = x
    torch.testing.assert_close(m(xh, mask=holed), y, rtol=1e-12, atol=1e-12)


def test_dual_resolution_with_beta_zero_is_statistics_pooling():
    m = _drasp()
    x, mask, _, _ = bags()
    coarse = m.alpha * torch.cat(m.stats(*_stats_args(x, mask)), -1)
    with torch.no_grad():
        m.beta.zero_()
    torch.testing.assert_close(m(x, mask=mask), coarse.detach(), rtol=1e-12, atol=1e-12)


def _stats_args(x, mask):
    from attnzoo.layers.pooling._common import Bags

    return Bags.build(x, mask, None), None


def test_dual_resolution_every_parameter_learns_and_bad_options():
    m = _drasp()
    x, mask, _, _ = bags()
    m(x, mask=mask).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(ValueError, match="segment_size: only used with dual_resolution=True"):
        attnzoo.create("attentive_stats_pool", dim=16, segment_size=2)
    with pytest.raises(ValueError, match="segment_size"):
        attnzoo.create("attentive_stats_pool", dim=16, dual_resolution=True, segment_size=0)
