"""squeeze_excite: gates in (0, 1), constant over space, on 1-D, 2-D and 3-D maps; bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo


@pytest.mark.parametrize("shape", [(2, 16, 11), (2, 16, 5, 6), (2, 16, 3, 4, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("stat", ["mean", "contrast"])
def test_gates_in_unit_interval_and_constant_over_space(shape, stat):
    torch.manual_seed(0)
    m = attnzoo.create("squeeze_excite", channels=16, stat=stat).double()
    x = torch.randn(*shape, dtype=torch.float64)
    s = m.gates(x)
    assert ((s > 0) & (s < 1)).all()
    y = m(x)
    ratio = y / x
    torch.testing.assert_close(ratio, s.view(*s.shape, *([1] * (x.dim() - 2))).expand_as(x))


def test_condition_changes_the_gates_and_bad_input():
    torch.manual_seed(0)
    m = attnzoo.create("squeeze_excite", channels=16, cond_dim=4).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    c = torch.randn(2, 4, dtype=torch.float64)
    assert not torch.allclose(m(x, c), m(x, c + 1))
    with pytest.raises(ValueError, match=r"cond: expected a tensor \[2, 4\], got \[2, 3\]"):
        m(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x: expected a tensor \[B, 16, S0\] or .*got \[2, 8, 5, 5\]"):
        m(torch.randn(2, 8, 5, 5))
