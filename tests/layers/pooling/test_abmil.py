"""abmil: masked instances get exactly 0 weight, smoothed max -> max, STKIM ranks agree when packed."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.pooling._common import Bags, rank_in_bag
from tests.layers.pooling._bags import bags


@pytest.mark.parametrize("kw", [{}, {"gated": False}, {"n_branches": 3}], ids=["gated", "plain", "branches"])
def test_weights_and_packing(kw):
    torch.manual_seed(0)
    m = attnzoo.create("abmil", dim=16, attn_dim=8, **kw).double()
    x, mask, packed, cu = bags()
    y, a = m(x, mask=mask, return_weights=True)
    assert y.shape == ((4, 3, 16) if "n_branches" in kw else (4, 16))
    assert (a[~mask] == 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones_like(a.sum(1)))
    yp, ap = m(packed, cu_seqlens=cu, return_weights=True)
    torch.testing.assert_close(yp, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ap[0], a[mask], rtol=1e-12, atol=1e-12)


def test_smoothed_max_tends_to_max():
    x, mask, packed, cu = bags()
    want = torch.stack([x[b, :n].amax(0) for b, n in enumerate(mask.sum(1).tolist())])
    for tau, tol in ((1e-2, 0.03), (1e-4, 3e-4)):
        m = attnzoo.create("abmil", dim=16, mode="smoothed_max", tau=tau)
        y = m(x, mask=mask)
        assert (y <= want + 1e-12).all() and (want - y).max() < tol
        torch.testing.assert_close(m(packed, cu_seqlens=cu), y, rtol=1e-12, atol=1e-12)


def test_rank_in_bag_packed_equals_padded():
    x, mask, packed, cu = bags()
    s = torch.randn(4, 9, 2, dtype=torch.float64)
    padded = rank_in_bag(Bags.build(x, mask, None), s)
    p = rank_in_bag(Bags.build(packed, None, cu), s[mask])
    torch.testing.assert_close(p, padded[mask])
    assert (padded[0, :6].sort(0).values == torch.arange(6)[:, None]).all()


def test_stkim_drops_only_in_training():
    torch.manual_seed(0)
    m = attnzoo.create("abmil", dim=16, attn_dim=8, stkim=(2, 1.0)).double()
    x, mask, _, _ = bags()
    _, a_eval = m.eval()(x, mask=mask, return_weights=True)
    _, a_train = m.train()(x, mask=mask, return_weights=True)
    top2 = a_eval.argsort(1, descending=True)[:, :2]
    assert (a_train.gather(1, top2)[[0, 1, 3]] == 0).all()  # bag 2 has one instance: dropping it empties the bag
    with pytest.raises(ValueError, match="stkim"):
        attnzoo.create("abmil", dim=16, stkim=(2, 1.5))


def test_many_bags_take_the_index_add_path():
    """B * H > D: the packed weighted sum adds products per bag instead of one assignment matmul."""
    torch.manual_seed(0)
    m = attnzoo.create("abmil", dim=16, attn_dim=8, n_branches=2).double()
    lengths = tuple(int(v) for v in torch.randint(1, 7, (20,)))
    x, mask, packed, cu = bags(lengths)
    xp, xd = packed.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yd = m(xp, cu_seqlens=cu), m(xd, mask=mask)
    torch.testing.assert_close(yp, yd, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(yd)
    (yp * g).sum().backward()
    (yd * g).sum().backward()
    torch.testing.assert_close(xp.grad[0], xd.grad[mask], rtol=1e-12, atol=1e-12)
