"""dynamic_token_pool: causal upsampling, padding ignored, segments' rows sum to 1, boundary supervision."""

from __future__ import annotations

import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_upsample_is_causal_and_padding_ignored():
    torch.manual_seed(0)
    m = attnzoo.create("dynamic_token_pool", dim=16).double()
    x, mask, _, _ = bags()
    pooled, (seg, seg_mask) = m(x, mask=mask, return_info=True)
    up = m.upsample(pooled, seg, x)
    for t in (2, 5):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        p2, (s2, _) = m(x2, mask=mask, return_info=True)
        torch.testing.assert_close(m.upsample(p2, s2, x2)[:, : t + 1], up[:, : t + 1])
    x3 = torch.where(mask[..., None], x, 7 * torch.randn_like(x))
    torch.testing.assert_close(m(x3, mask=mask), pooled)
    assert seg_mask.sum(1).tolist() == [int(s) for s in (seg * mask).amax(1) + 1]


def test_boundary_loss_trains_the_predictor():
    torch.manual_seed(0)
    m = attnzoo.create("dynamic_token_pool", dim=16).double()
    x, mask, _, _ = bags()
    target = x[..., 0] > 0
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    first = m.boundary_loss(x, target, mask).item()
    for _ in range(60):
        opt.zero_grad()
        m.boundary_loss(x, target, mask).backward()
        opt.step()
    assert m.boundary_loss(x, target, mask).item() < 0.5 * first
    pooled = m(x, mask=mask)
    pooled.sum().backward()
    assert m.predictor[0].weight.grad is not None
