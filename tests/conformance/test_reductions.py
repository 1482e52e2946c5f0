"""Exact reductions declared by every registered entry (any type), checked to float64 precision."""

from __future__ import annotations

import pytest
import torch

import attnzoo

REDUCTIONS = [pytest.param(r, id=f"{s.slug}-{r.name}") for s in attnzoo.list() for r in s.reductions]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exact_reduction(reduction):
    got, want = reduction.check()
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.dtype == torch.float64, "exact reductions are checked in float64"
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-12)
