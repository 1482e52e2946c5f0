"""Tests of ``moh`` beyond the conformance contract."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers.dense_multihead.moh import MixtureOfHeads
from attnzoo.layers.testing import random_tokens


def test_moh_gates_and_aux_loss():
    m = attnzoo.create("moh", dim=32, n_heads=4, n_shared=1, top_k=2).double()
    y = m(random_tokens(n=10))
    assert m.aux_loss.requires_grad and torch.isfinite(m.aux_loss)
    (y.sum() + m.aux_loss).backward()


def test_moh_auto_dispatch_rule():
    m = MixtureOfHeads(32, 8, n_shared=2, top_k=2)  # top_k / routed = 1/3
    assert m.gathers(256) and not m.gathers(255) and not m.gathers(1024, return_weights=True)
    assert not MixtureOfHeads(32, 8, n_shared=2, top_k=4).gathers(4096)  # 2/3 of the tokens per head
    assert not MixtureOfHeads(32, 8, router="drop_one").gathers(4096)
    m.dispatch = "dense"
    assert not m.gathers(4096)


def test_moh_gather_gradients_equal_dense():
    torch.manual_seed(0)
    m = MixtureOfHeads(32, 6, head_dim=8, n_shared=2, top_k=2, n_kv_heads=3).double()
    x = random_tokens(n=40).requires_grad_()
    grads = []
    for dispatch in ("dense", "gather"):
        m.dispatch, m.gather_chunk = dispatch, 8
        y = m(x, causal=True)
        grads.append(torch.autograd.grad((y ** 2).sum() + m.aux_loss, [x, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_moh_gather_runs_on_every_routed_backend():
    """The gather dispatch is a query routing of the routed-attention op: each backend (reference, sdpa,
    blocksparse, auto) gives the dense dispatch's output and gradients (causal, padding, GQA)."""
    torch.manual_seed(1)
    x = random_tokens(n=19).requires_grad_()
    keep = torch.ones(2, 19, dtype=torch.bool)
    keep[1, 15:] = False
    for backend in ("reference", "sdpa", "blocksparse", "auto"):
        m = MixtureOfHeads(32, 6, head_dim=8, n_shared=1, top_k=2, n_kv_heads=2, backend=backend).double()
        outs = []
        for dispatch in ("dense", "gather"):
            m.dispatch, m.gather_chunk = dispatch, 4
            y = m(x, causal=True, mask=keep)
            outs.append((y, *torch.autograd.grad((y ** 2).sum(), [x, m.q_proj.weight, m.k_proj.weight])))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
