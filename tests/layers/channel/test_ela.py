"""ela: gates in (0, 1), parameters independent of H and W, any H and W."""

from __future__ import annotations

import pytest
import torch

import attnzoo


@pytest.mark.parametrize("variant", ["T", "B", "S", "L"])
def test_gates_and_any_size(variant):
    torch.manual_seed(0)
    m = attnzoo.create("ela", channels=32, variant=variant).double()
    for h, w in ((5, 9), (16, 3), (1, 1)):
        x = torch.randn(2, 32, h, w, dtype=torch.float64)
        a_h, a_w = m.gates(x)
        assert a_h.shape == (2, 32, h) and a_w.shape == (2, 32, w)
        assert ((a_h > 0) & (a_h < 1)).all() and ((a_w > 0) & (a_w < 1)).all()
        assert m(x).shape == x.shape


def test_parameter_count_depends_on_kernel_and_groups_only():
    counts = {v: sum(p.numel() for p in attnzoo.create("ela", channels=64, variant=v).parameters()) for v in "TBSL"}
    # conv: C * (C / groups) * k weights; GroupNorm: 2 C
    assert counts == {"T": 64 * 5 + 128, "B": 64 * 7 + 128, "S": 64 * 8 * 5 + 128, "L": 64 * 8 * 7 + 128}
