"""Tests of ``moa_window`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.testing import random_grid


def test_moa_profile_respects_budget_and_prefers_useful_spans():
    torch.manual_seed(0)
    m = attnzoo.create("moa_window", dim=32, n_heads=4).double()
    x = random_grid(grid=(24,), b=2)
    cands = [(2.0, 0.0), (4.0, 0.0), (2.0, 0.25), (24.0, 0.0)]
    for budget in (0.3, 0.6, 1.0):
        chosen = m.profile(x, lambda y: y.pow(2).mean(), cands, budget)
        kept = m.pattern.density(attnzoo.patterns.Shape(1, 4, 24, 24)) * 24 * 24 / (24 * 25 / 2)
        assert kept <= budget + 1e-12 and len(chosen) == 4 and all(c in cands for c in chosen)
    with pytest.raises(ValueError, match=r"budget: 0.01 is below the sparsest configuration"):
        m.profile(x, lambda y: y.pow(2).mean(), cands, 0.01)
