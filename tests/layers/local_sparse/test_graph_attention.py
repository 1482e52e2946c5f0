"""Tests of ``graph_attention`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.testing import random_grid


def test_gatv2_ranking_can_depend_on_the_query():
    torch.manual_seed(3)
    m = attnzoo.create("graph_attention", dim=32, n_heads=4, scorer="gatv2").double()
    x = random_grid(grid=(10,), b=2)
    q, k, _ = m.project(x, x)
    best = m.dense_scores(q, k).argmax(-1)
    assert any(len(torch.unique(best[b, h])) > 1 for b in range(2) for h in range(4))


def test_graph_attention_edges_adjacency_and_codebook():
    torch.manual_seed(0)
    m = attnzoo.create("graph_attention", dim=32, n_heads=4, scorer="gat", codebook_size=4).double()
    x = random_grid(grid=(7,), b=2)
    edges = torch.tensor([[0, 0, 1, 2, 6], [1, 2, 0, 2, 3]])
    adj = torch.zeros(7, 7, dtype=torch.bool)
    adj[edges[0], edges[1]] = True
    torch.testing.assert_close(m(x, edges=edges), m(x, adj=adj), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"adj: expected a bool tensor \[7, 7\] or \[2, 7, 7\], got torch.bool"):
        m(x, adj=torch.ones(6, 6, dtype=torch.bool))
