"""super_token: association rows sum to 1 over each token's (at most 9) candidate super tokens."""

from __future__ import annotations

import pytest
import torch

import attnzoo


def test_association_rows_and_shapes():
    torch.manual_seed(0)
    m = attnzoo.create("super_token", dim=16, n_heads=2, stride=2, n_iter=2).double()
    x = torch.randn(2, 6, 8, 16, dtype=torch.float64)
    g, hs, ws = m._grid(x)
    s = g.view(2, 3, 2, 4, 2, 16).mean((2, 4))
    q = m.association(g, s, hs, ws)
    torch.testing.assert_close(q.sum(-1), torch.ones(2, 6, 8, dtype=torch.float64))
    assert ((q > 0).sum(-1)[:, 0, 0] == 4).all() and ((q > 0).sum(-1)[:, 2, 2] == 9).all()  # corner / interior
    assert m(x).shape == x.shape and m(torch.randn(2, 12, 16, dtype=torch.float64)).shape == (2, 12, 16)
    with pytest.raises(ValueError, match=r"x: grid extent \(6, 7\) must be a multiple of the stride"):
        m(torch.randn(1, 6, 7, 16, dtype=torch.float64))
