"""Properties of the cross-multimodal entries beyond the conformance suite (catalogue section 7)."""

from __future__ import annotations

import pytest
import torch

import attnzoo


def _x(b=2, n=10, c=32, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_latent_side_is_m_by_n_and_latent_size_does_not_depend_on_n():
    torch.manual_seed(0)
    m = attnzoo.create("latent_cross_attention", dim=32, n_heads=4, n_latents=3, backend="reference").double()
    for n in (5, 40):
        lat, keep = m.latents_of(_x(n=n))
        assert lat.shape == (2, 3, 32) and keep is None
        _, w = m.read(lat, context=_x(n=n), return_weights=True)
        assert w.shape == (2, 4, 3, n)  # the read map is m x N


def test_latent_context_padding_and_bad_context():
    torch.manual_seed(0)
    m = attnzoo.create("latent_cross_attention", dim=32, n_heads=4, n_latents=3, context_dim=16).double()
    x, ctx = _x(), _x(n=7, c=16, seed=1)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    y = m(x, context=ctx, context_mask=keep)
    ctx2 = torch.where(keep[..., None], ctx, 9.0)
    torch.testing.assert_close(m(x, context=ctx2, context_mask=keep), y)
    with pytest.raises(ValueError, match="context"):
        m(x, context=_x(n=7, c=32))
    with pytest.raises(ValueError, match="context_mask"):
        m(x, context=ctx, context_mask=keep[:, :5])
    with pytest.raises(ValueError, match="context"):
        m(x)  # a context of width 16 is required


def test_dcal_glca_rows_and_pwca_training_only():
    torch.manual_seed(0)
    m = attnzoo.create("dcal", dim=32, n_heads=4, top_r=3).double()
    x = _x()
    y = m(x)
    assert ((y.abs().sum(-1) > 0).sum(-1) == 3).all()  # exactly R query rows
    scores = torch.zeros(2, 10, dtype=torch.float64)
    scores[:, [2, 5, 7]] = 1.0
    y2 = m(x, scores=scores)
    assert (y2[:, [2, 5, 7]].abs().sum(-1) > 0).all() and (y2[:, [0, 1, 3, 4, 6, 8, 9]] == 0).all()
    m.eval()
    with pytest.raises(ValueError, match="context.*training-only"):
        m(x, context=x)
    with pytest.raises(ValueError, match="scores"):
        m(x, scores=scores[:, :4])


def test_pointer_distribution_size_follows_the_input_and_masks_are_exact():
    torch.manual_seed(0)
    m = attnzoo.create("pointer_attention", dim=32, context_dim=8).double()
    x = _x(n=4)
    for n_in in (3, 11):
        e = _x(n=n_in, c=8, seed=n_in)
        keep = torch.ones(2, n_in, dtype=torch.bool)
        keep[0, -1] = False
        p = m.probabilities(x, context=e, context_mask=keep)
        assert p.shape == (2, 4, n_in)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, dtype=torch.float64))
        assert (p[0, :, -1] == 0).all()
    with pytest.raises(ValueError, match="exclude"):
        m.probabilities(x, context=e, exclude=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        m(x, context=_x(n=5, c=7))


def test_attention_upsample_shapes_padding_and_bad_skip():
    torch.manual_seed(0)
    m = attnzoo.create("attention_upsample", dim=32, n_heads=4, scale_factor=2, window=4, context_dim=16).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 32, generator=g, dtype=torch.float64)
    skip = torch.randn(2, 8, 12, 16, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 8, 12, dtype=torch.bool)
    keep[0, :, 10:] = False
    y = m(x, context=skip, context_mask=keep)
    assert y.shape == (2, 8, 12, 32)
    torch.testing.assert_close(m(x, context=skip.reshape(2, 96, 16), context_mask=keep.reshape(2, 96)), y)
    skip2 = torch.where(keep[..., None], skip, 5.0)
    torch.testing.assert_close(m(x, context=skip2, context_mask=keep), y)
    with pytest.raises(ValueError, match="context"):
        m(x, context=skip[:, :4])
    with pytest.raises(ValueError, match="context_mask"):
        m(x, context=skip, context_mask=keep[:, :4])
    with pytest.raises(ValueError, match="extent"):
        m(torch.randn(1, 3, 6, 32, dtype=torch.float64), context=torch.randn(1, 6, 12, 16, dtype=torch.float64))
