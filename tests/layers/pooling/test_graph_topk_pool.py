"""graph_topk_pool: exactly ceil(kN) nodes kept, a node permutation permutes the kept set, padding ignored."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from tests.layers.pooling._bags import bags


def test_kept_count_and_permutation():
    torch.manual_seed(0)
    m = attnzoo.create("graph_topk_pool", dim=16, ratio=0.3).double()
    x, mask, _, _ = bags()
    adj = (torch.rand(4, 9, 9) > 0.5).double()
    out, (idx, kept, adj2) = m(x, mask=mask, adj=adj, return_info=True)
    assert out.shape == (4, math.ceil(0.3 * 9), 16)
    assert kept.sum(1).tolist() == [math.ceil(0.3 * n) for n in mask.sum(1).tolist()]
    assert mask.gather(1, idx)[kept].all()
    torch.testing.assert_close(adj2[1], adj[1][idx[1]][:, idx[1]])
    perm = torch.randperm(9)
    _, (idx_p, kept_p, _) = m(x[1:2, perm], return_info=True)
    assert sorted(perm[idx_p[0][kept_p[0]]].tolist()) == idx[1][kept[1]].tolist()
    x2 = torch.where(mask[..., None], x, 9 * torch.randn_like(x))
    torch.testing.assert_close(m(x2, mask=mask), out)
    with pytest.raises(ValueError, match=r"adj: expected a tensor \[4, 9, 9\], got \[4, 9, 8\]"):
        m(x, adj=adj[..., :8])
