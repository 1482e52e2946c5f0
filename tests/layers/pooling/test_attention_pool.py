"""attention_pool: weights sum to 1 over valid frames, streaming is causal, every variant packs."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from tests.layers.pooling._bags import bags

VARIANTS = [{}, {"n_heads": 4}, {"per_dim": True}, {"cond": "concat", "cond_dim": 3}, {"cond": "gate", "cond_dim": 3},
            {"cond": "affine", "cond_dim": 3}]


def _cond(kw, x):
    return torch.randn(*x.shape[:2], 3, dtype=x.dtype, generator=torch.Generator().manual_seed(9)) \
        if "cond" in kw else None


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: "-".join(map(str, k.values())) or "plain")
def test_weights_sum_to_one_and_packed_equals_padded(kw):
    torch.manual_seed(0)
    m = attnzoo.create("attention_pool", dim=16, **kw).double()
    x, mask, packed, cu = bags()
    c = _cond(kw, x)
    y, a = m(x, mask=mask, return_weights=True, cond=c)
    a = a if a.dim() == 3 else a.unsqueeze(-1)
    torch.testing.assert_close(a.sum(1), torch.ones(4, a.shape[-1], dtype=torch.float64))
    assert (a[~mask] == 0).all()
    yp, ap = m(packed, cu_seqlens=cu, return_weights=True, cond=None if c is None else c[mask][None])
    torch.testing.assert_close(yp, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ap[0], a[mask].view_as(ap[0]), rtol=1e-12, atol=1e-12)


def test_streaming_depends_only_on_past_frames():
    torch.manual_seed(0)
    m = attnzoo.create("attention_pool", dim=16, n_heads=2).double()
    x, mask, _, _ = bags()
    z = m.stream(x, mask=mask)
    for t in (0, 3, 7):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        torch.testing.assert_close(m.stream(x2, mask=mask)[:, : t + 1], z[:, : t + 1])
    for t in range(1, 6):  # z_t is the offline pooling of frames <= t (bag 0 has 6 frames)
        torch.testing.assert_close(z[:1, t], m(x[:1, : t + 1]))


def test_bad_cond():
    m = attnzoo.create("attention_pool", dim=16, cond="gate", cond_dim=3)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"cond: expected a tensor \[2, 5, 3\], got \[2, 5, 4\]"):
        m(x, cond=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="cond_dim"):
        attnzoo.create("attention_pool", dim=16, cond="gate")
    with pytest.raises(ValueError, match="n_heads: must divide dim=16, got n_heads=3"):
        attnzoo.create("attention_pool", dim=16, n_heads=3)
