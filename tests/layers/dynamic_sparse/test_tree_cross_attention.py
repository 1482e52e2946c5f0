"""tree_cross_attention beyond the conformance contract: the descent, backends, weights, training, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.dynamic_sparse.tree_cross_attention import build_tree, descend
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create


def _double(**kw):
    torch.manual_seed(0)
    return create("tree_cross_attention", dim=32, n_heads=4, **kw).double()


def test_tree_nodes_are_means_of_their_kept_leaves():
    k = torch.randn(1, 1, 5, 2, dtype=torch.float64)
    keep = torch.tensor([[True, True, False, True, True]])
    k_nodes, _, counts, offsets = build_tree(k, k, keep)
    assert offsets == [0, 8, 12, 14] and k_nodes.shape[2] == 15
    assert counts[1].tolist() == [[2.0, 1.0, 1.0, 0.0]] and counts[3].tolist() == [[4.0]]
    assert torch.allclose(k_nodes[0, 0, 14], k[0, 0, keep[0]].mean(0))
    assert torch.allclose(k_nodes[0, 0, 9], k[0, 0, 3])


def test_greedy_descent_follows_the_best_child_and_keeps_the_siblings():
    """Keys rising along the leaves: the query (+1 on that axis) walks to the last leaf; it retrieves that leaf and
    the left sibling at every level."""
    n = 16
    k = torch.stack([torch.arange(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)], -1).view(1, 1, n, 2)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    k_nodes, _, counts, offsets = build_tree(k, k, None)
    nodes, _ = descend(q, k_nodes, counts, offsets, 1, scale=1.0)
    want = {offsets[3] + 0, offsets[2] + 2, offsets[1] + 6, offsets[0] + 14, offsets[0] + 15}
    assert sorted(nodes.flatten().tolist()) == sorted(want)


@pytest.mark.parametrize("beam", [1, 2, 3])
def test_retrieved_nodes_partition_the_kept_leaves(beam):
    """Whatever the beam, the retrieved nodes are non-empty, their subtrees disjoint, and every kept leaf lies in
    one of them."""
    k = torch.randn(2, 3, 13, 4, dtype=torch.float64)
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 3:6] = False
    k_nodes, _, counts, offsets = build_tree(k, k, keep)
    nodes, _ = descend(q, k_nodes, counts, offsets, beam, scale=0.5)
    cover = torch.zeros(2, 3, 5, 16, dtype=torch.int64)
    for level, off in enumerate(offsets):
        span = 1 << level
        size = counts[level].shape[1]
        inside = (nodes >= off) & (nodes < off + size)
        for leaf in range(16):
            cover[..., leaf] += (inside & ((nodes - off) == leaf // span)).sum(-1)
    want = torch.nn.functional.pad(keep, (0, 3)).long().view(2, 1, 1, 16).expand_as(cover)
    assert (cover <= 1).all() and (cover >= want).all()
    cnt_all = torch.cat(counts, 1)
    assert (cnt_all.gather(1, nodes.clamp(min=0).flatten(1)).view(nodes.shape)[nodes >= 0] > 0).all()
    assert ((nodes >= 0).sum(-1) <= beam * (len(offsets))).all()


def test_every_backend_equals_the_reference():
    m = _double(beam=2)
    ref = _double(beam=2, backend="reference")
    x, ctx = random_tokens(n=7).requires_grad_(), random_tokens(n=19, seed=1).requires_grad_()
    keep = torch.ones(2, 19, dtype=torch.bool)
    keep[1, 12:] = False
    want = ref(x, context=ctx, context_mask=keep)
    gw = torch.autograd.grad(want.square().sum(), (x, ctx))
    for backend in ("auto", "gather", "sdpa"):
        m.backend = backend
        got = m(x, context=ctx, context_mask=keep)
        assert (got - want).abs().max() < 1e-12, backend
        for a, b in zip(torch.autograd.grad(got.square().sum(), (x, ctx)), gw, strict=True):
            assert (a - b).abs().max() < 1e-12, backend


def test_weights_are_token_level_and_reproduce_the_output():
    m = _double(beam=1)
    x, ctx = random_tokens(n=5), random_tokens(n=12, seed=1)
    out, w = m(x, context=ctx, return_weights=True)
    assert w.shape == (2, 4, 5, 12) and (w.sum(-1) - 1).abs().max() < 1e-12
    z = w @ m.split(m.v_proj(ctx), 4)
    assert (m.output(z, x) - out).abs().max() < 1e-12


@pytest.mark.parametrize("scorer", ["attention", "learned"])
def test_training_loss_trains_the_policy_by_reinforce(scorer):
    m = _double(beam=1, scorer=scorer)
    x, ctx, target = random_tokens(n=5), random_tokens(n=16, seed=1), random_tokens(n=5, seed=2)

    def loss_fn():
        return ((m(x, context=ctx) - target) ** 2).sum()

    loss = m.training_loss(loss_fn, seed=3)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    if scorer == "learned":
        m.zero_grad()
        loss_fn().backward()
        assert m.policy_proj.weight.grad is None  # a plain backward never reaches the policy
    again = m.training_loss(loss_fn, seed=3)
    assert torch.equal(again, loss)


def test_sampled_descent_log_probability():
    """beam 1 over a depth-1 tree: the path's log-probability is the log-softmax of the chosen child's score."""
    k = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    q = torch.randn(1, 1, 1, 3, dtype=torch.float64)
    k_nodes, _, counts, offsets = build_tree(k, k, None)
    nodes, lp = descend(q, k_nodes, counts, offsets, 1, scale=0.7, sample=torch.Generator().manual_seed(0))
    leaf = int(nodes[0, 0, 0, -1])
    want = torch.log_softmax(0.7 * (q[0, 0, 0] @ k[0, 0].T), -1)[leaf]
    assert abs(float(lp) - float(want)) < 1e-12


@pytest.mark.parametrize("kw,name", [({"beam": 0}, "beam"), ({"scorer": "rl"}, "scorer"), ({"rope": True}, "rope"),
                                     ({"backend": "blocksparse"}, "backend")])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        create("tree_cross_attention", dim=32, n_heads=4, **kw)


def test_causal_is_refused():
    m = create("tree_cross_attention", dim=32, n_heads=4)
    with pytest.raises(ValueError, match="causal"):
        m(random_tokens(n=8).float(), causal=True)
