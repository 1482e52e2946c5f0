"""Conformance of the grid mixers (``input_kind`` ``grid1d``/``grid2d``/``grid3d``) on channels-last grids.

The sequence suite (``test_mixers.py``) runs every mixer on ``[B, N, C]`` (a 1-D grid); this
suite runs the grid entries on ``[B, H, W, C]`` (and ``[B, T, H, W, C]`` where the test
configuration fits): shapes and dtypes, the float64 reference (forward and gradients, with
padding and raster-order causality), padding invariance, batch independence and, on a larger
grid, the chunked (tiled) path against the reference. Nothing here names an entry.
"""

from __future__ import annotations

import pytest
import torch

from tests.conformance._build import (
    DIM,
    build,
    build_pair,
    check_against_reference,
    grid_inputs,
    grid_mask,
    mixer_specs,
    supports,
)

GRID_SPECS = [s for s in mixer_specs() if s.input_kind.startswith("grid")]
IDS = [s.slug for s in GRID_SPECS]
GRID2D = (12, 12)
GRID3D = (4, 4, 8)


def run(m, x, **kw):
    try:
        return m(x, **kw)
    except ValueError as err:  # the entry's test configuration does not fit this grid
        if "extent" in str(err) or "spatial axes" in str(err):
            pytest.skip(f"configuration does not fit grid {tuple(x.shape[1:-1])}: {err}")
        raise


def _modes(spec, grid):
    modes = [{}]
    if supports(spec, "causal"):
        modes.append({"causal": True})
    if supports(spec, "padding"):
        modes.append({"mask": grid_mask(grid)})
    return modes


@pytest.mark.parametrize("grid", [GRID2D, GRID3D], ids=["2d", "3d"])
@pytest.mark.parametrize("spec", GRID_SPECS, ids=IDS)
def test_grid_shape_dtype_finite(spec, grid):
    m = build(spec)
    for dtype in (torch.float32, torch.bfloat16):
        m = m.to(dtype)
        x = grid_inputs(grid, dtype=dtype)
        y = run(m, x)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", GRID_SPECS, ids=IDS)
def test_grid_matches_float64_reference(spec):
    m, ref = build_pair(spec)
    for kw in _modes(spec, GRID2D):
        check_against_reference(spec.slug, m, ref, run, grid_inputs(GRID2D, seed=3), kw)


@pytest.mark.parametrize("spec", [s for s in GRID_SPECS if supports(s, "padding")], ids=lambda s: s.slug)
def test_grid_padding_invariance(spec):
    m = build(spec).double()
    x, keep = grid_inputs(GRID2D), grid_mask(GRID2D)
    y = run(m, x, mask=keep)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 5)
    torch.testing.assert_close(run(m, x2, mask=keep)[keep], y[keep], rtol=1e-10, atol=1e-12)
    assert (y[~keep] == 0).all()
    assert (run(m, x, mask=torch.zeros_like(keep)) == 0).all()


@pytest.mark.parametrize("spec", [s for s in GRID_SPECS if supports(s, "causal")], ids=lambda s: s.slug)
def test_grid_raster_causal_prefix(spec):
    m = build(spec).double()
    x = grid_inputs(GRID2D)
    y = run(m, x, causal=True)
    flat = x.reshape(2, -1, DIM).clone()
    flat[:, 40:] = torch.randn_like(flat[:, 40:])
    y2 = run(m, flat.view_as(x), causal=True)
    torch.testing.assert_close(y2.reshape(2, -1, DIM)[:, :40], y.reshape(2, -1, DIM)[:, :40], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", GRID_SPECS, ids=IDS)
def test_grid_batch_independence(spec):
    m = build(spec).double()
    x = grid_inputs(GRID2D, b=3)
    torch.testing.assert_close(run(m, x[1:2]), run(m, x)[1:2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", GRID_SPECS, ids=IDS)
def test_grid_tiled_path_matches_reference_on_a_larger_grid(spec):
    """At 24 x 24 the patterns are sparse enough for ``auto`` to take the chunked (tiled) path."""
    m, ref = build_pair(spec)
    m = m.double()
    x = grid_inputs((24, 24), b=1, seed=5)
    keep = torch.ones(1, 24, 24, dtype=torch.bool)
    keep[0, 20:, 5:] = False
    kw = {"mask": keep} if supports(spec, "padding") else {}
    torch.testing.assert_close(run(m, x, **kw), run(ref, x, **kw), rtol=1e-10, atol=1e-10)
