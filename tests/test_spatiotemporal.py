"""Properties of the spatiotemporal entries beyond the conformance suite (catalogue section 8)."""

from __future__ import annotations

import pytest
import torch

import attnzoo


def _video(b=2, t=4, h=3, w=4, seed=0):
    return torch.randn(b, t, h, w, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _build(**kw):
    torch.manual_seed(0)
    return attnzoo.create("factorized_spacetime", dim=32, n_heads=4, **kw).double()


def test_divided_stages_are_separable():
    m = _build()
    x = _video().reshape(2, 4, 12, 32)
    y = m.spatial_stage(x)
    x2 = x.clone()
    x2[:, [0, 2, 3]] = torch.randn_like(x2[:, [0, 2, 3]])
    torch.testing.assert_close(m.spatial_stage(x2)[:, 1], y[:, 1], rtol=0, atol=0)  # frame 1 sees only frame 1
    z = m.temporal_stage(x)
    x3 = x.clone()
    x3[:, :, 5:] = torch.randn_like(x3[:, :, 5:])
    torch.testing.assert_close(m.temporal_stage(x3)[:, :, :5], z[:, :, :5], rtol=0, atol=0)  # no location mixing


@pytest.mark.parametrize("spatial,kw", [("neighborhood", {"kernel_size": 3}), ("swin_window", {"window": 2})])
def test_spatial_stage_on_a_grid_entry(spatial, kw):
    m = _build(spatial=spatial, spatial_kwargs=kw)
    x = _video(t=3, h=4, w=4)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    frames = m.spatial.double()(x[:, 1])  # the grid entry on one frame
    torch.testing.assert_close(m.spatial_stage(x.reshape(2, 3, 16, 32), space=(4, 4))[:, 1].reshape(2, 4, 4, 32),
                               frames)


def test_causal_time_frame_order():
    for mode in ("divided", "joint"):
        m = _build(mode=mode, causal_time=True)
        x = _video()
        y = m(x)
        x2 = x.clone()
        x2[:, 2:] = torch.randn_like(x2[:, 2:])
        torch.testing.assert_close(m(x2)[:, :2], y[:, :2], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(m(x2)[:, 1, 0, 0], _build(mode=mode)(x2)[:, 1, 0, 0])  # frame 1 sees all of frame 1


def test_video_grid_mismatch_is_refused_before_work():
    m = _build(grid=(4, 3, 4))
    torch.testing.assert_close(m(_video().reshape(2, 48, 32)), m(_video()).reshape(2, 48, 32))
    with pytest.raises(ValueError, match=r"grid \(4, 3, 4\)"):
        m(_video(t=5))
    with pytest.raises(ValueError, match="grid"):
        m(_video().reshape(2, 4, 12, 32))
    with pytest.raises(ValueError, match="mask"):
        m(_video(), mask=torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="grid"):
        attnzoo.create("factorized_spacetime", dim=32, n_heads=4, grid=(4, 0, 2))
    with pytest.raises(ValueError, match="spatial"):
        attnzoo.create("factorized_spacetime", dim=32, n_heads=4, spatial="gated_attention")
    f = attnzoo.create("freelong", dim=32, n_heads=4, grid=(4, 3, 4))
    with pytest.raises(ValueError, match="grid"):
        f(_video(t=3).float())


def test_freelong_local_window_branch_and_errors():
    torch.manual_seed(0)
    m = attnzoo.create("freelong", dim=32, n_heads=4, windows=(None, 1), cutoffs=(0.5,)).double()
    x = _video(t=8)
    y = m(x)
    assert y.shape == x.shape
    # the high band of a window-1 branch: replacing it with the global branch changes the output
    g = attnzoo.create("freelong", dim=32, n_heads=4, windows=(None, None), cutoffs=(0.5,)).double()
    g.load_state_dict(m.state_dict())
    assert not torch.allclose(g(x), y)
    with pytest.raises(ValueError, match="cutoffs"):
        attnzoo.create("freelong", dim=32, windows=(None, 2), cutoffs=(0.5, 0.7))
    with pytest.raises(ValueError, match="causal"):
        m(x, causal=True)
