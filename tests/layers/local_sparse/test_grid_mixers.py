"""The grid mixers of local-sparse beyond the contract: relative bias, schedules, input errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.local_sparse.dilated_neighborhood import dinat_dilations
from attnzoo.layers.local_sparse.swin_window import msw_shift_schedule
from attnzoo.layers.testing import random_grid


def _with_table(m):
    for mod in m.modules():
        if isinstance(mod, attnzoo.patterns.GridRelativeBias):
            with torch.no_grad():
                mod.table.normal_()
    return m


@pytest.mark.parametrize("slug, kw, grid", [
    ("neighborhood", {"kernel_size": (3, 5), "dilation": (2, 1), "rpb": True}, (8, 10)),
    ("neighborhood", {"kernel_size": 3, "rpb": True, "ndim": 3}, (3, 4, 5)),
    ("swin_window", {"window": (2, 4), "shift": (1, 2), "rpb": True}, (6, 8)),
    ("swin_window", {"window": 2, "halo": 1, "rpb": True}, (6, 8)),
    ("swin_window", {"window": 2, "halo": 1, "halo_padding": "zeros", "rpb": True}, (6, 8)),
    ("multi_axis", {"block": 2, "grid": (3, 2), "rpb": True}, (6, 8)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_relative_bias_matches_reference_with_gradients(slug, kw, grid):
    torch.manual_seed(0)
    m = _with_table(attnzoo.create(slug, dim=32, n_heads=4, **kw)).double()
    torch.manual_seed(1)
    inner_ref = dict(kw)
    ref = attnzoo.create(slug, dim=32, n_heads=4, backend="reference", **inner_ref).double()
    ref.load_state_dict(m.state_dict())
    x = random_grid(grid=grid).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = m(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
        if "table" in name:
            assert p.grad.abs().sum() > 0


def test_shift_schedule_and_dinat_dilations():
    assert [msw_shift_schedule(8)(t) for t in range(5)] == [(0, 0), (4, 0), (0, 4), (4, 4), (0, 0)]
    sched = msw_shift_schedule(4)
    torch.manual_seed(0)
    m = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift_schedule=sched).double()
    fixed = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=(2, 0)).double()
    fixed.load_state_dict(m.state_dict())
    x = random_grid(grid=(8, 8))
    m.step = 2
    assert not torch.allclose(m(x), fixed(x))
    fixed.shift = (0, 2)
    torch.testing.assert_close(m(x), fixed(x), rtol=1e-12, atol=1e-12)
    assert dinat_dilations((56, 56), 7, 4) == [(1, 1), (8, 8), (1, 1), (8, 8)]


@pytest.mark.parametrize("slug, kw, grid, match", [
    ("swin_window", {"window": 5}, (12, 12), r"window: window 5 does not divide the grid extent 12 on axis 0"),
    ("neighborhood", {"kernel_size": 9}, (8, 16), r"kernel_size: 9 is larger than the grid extent 8 on axis 0"),
    ("neighborhood", {"kernel_size": 3, "stride": 5}, (8, 16), r"stride: stride 5 is larger than kernel_size 3"),
    ("dilated_neighborhood", {"kernel_size": 5, "dilation": 3}, (12, 12),
     r"dilation: dilation 3 on axis 0 \(extent 12\) leaves groups of 4 positions, fewer than kernel_size 5"),
    ("multi_axis", {"block": 4, "grid": 5}, (8, 8), r"cells: 5 grid cells do not divide the grid extent 8"),
    ("hilo", {"window": 3}, (8, 9), r"window: window 3 does not divide the grid extent 8 on axis 0"),
    ("pooled_kv", {"pool": 3}, (8, 9), r"pool: pool 3 does not divide the grid extent 8 on axis 0"),
    ("neighborhood", {"kernel_size": (3, 3)}, (4, 4, 4), r"configured for 2 spatial axes, got grid \(4, 4, 4\)"),
    ("swin_window", {"window": (2, 2, 2)}, (4, 4), r"configured for 3 spatial axes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_grid_mixer_bad_input_names_values(slug, kw, grid, match):
    m = attnzoo.create(slug, dim=32, n_heads=4, **kw)
    with pytest.raises(ValueError, match=match):
        m(random_grid(grid=grid).float())


def test_grid_mixer_input_errors():
    m = attnzoo.create("neighborhood", dim=32, n_heads=4, kernel_size=3)
    with pytest.raises(ValueError, match=r"x: expected a channels-last tensor \[B, \*spatial, 32\] with 1 to 3"):
        m(torch.zeros(2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[2, 4, 4\], got torch.bool \[2, 16\]"):
        m(torch.zeros(2, 4, 4, 32), mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache: NeighborhoodAttention does not decode"):
        m(torch.zeros(2, 4, 4, 32), cache=attnzoo.layers.KVCache())
    with pytest.raises(ValueError, match=r"stride: expected an int >= 1 or 2 of them"):
        attnzoo.create("neighborhood", dim=32, kernel_size=(3, 3), stride=(1, 1, 1))
    with pytest.raises(ValueError, match=r"shift: shift 4 must be smaller than the window 4"):
        attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=4)(torch.zeros(1, 8, 8, 32))
    with pytest.raises(ValueError, match=r"alpha: expected a fraction in \[0, 1\], got 1.5"):
        attnzoo.create("hilo", dim=32, n_heads=4, alpha=1.5)
    with pytest.raises(ValueError, match=r"even head count, got heads=3"):
        attnzoo.create("shifted_group_attention", dim=30, n_heads=3)
    with pytest.raises(ValueError, match=r"segment_ids: expected int \[2, 5\] or \[5\], got \[4\]"):
        attnzoo.create("segment_mask", dim=32, n_heads=4)(torch.zeros(2, 5, 32), segment_ids=torch.zeros(4))
