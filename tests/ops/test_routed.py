"""Routed attention (ops.routed / patterns.routed) against its float64 reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.routed import gather_pays, gather_routes, routed_attention_reference
from attnzoo.patterns.routed import routed_attention


def _case(seed: int = 0, b: int = 2, r: int = 3, n: int = 11, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(b, n, r, generator=g) < 0.4
    sel[0, :, 0] = False  # a route nobody picked
    idx, valid, counts = gather_routes(sel)
    q = torch.randn(b, r, idx.shape[-1], d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, r, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 8:] = False
    return sel, idx, valid, counts, q, k, v, keep


def test_gather_routes_lists_each_routes_tokens_in_order():
    sel, idx, valid, counts, *_ = _case()
    assert torch.equal(counts, sel.sum(1))
    for b in range(sel.shape[0]):
        for r in range(sel.shape[2]):
            want = torch.nonzero(sel[b, :, r]).flatten()
            assert torch.equal(idx[b, r][valid[b, r]], want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 128])
def test_routed_attention_equals_reference_with_gradients(causal, padded, chunk):
    _, idx, valid, _, q, k, v, keep = _case(seed=1)
    qpos = torch.where(valid, idx, torch.full_like(idx, -1))
    kp = keep if padded else None
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    got = routed_attention(q32, k32, v32, qpos, causal=causal, keep=kp, chunk=chunk)
    want = routed_attention_reference(q64, k64, v64, qpos, causal=causal, keep=kp)
    got = got * valid.unsqueeze(-1)  # empty slots are free outside causal calls
    want = want * valid.unsqueeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    got.backward(grad.float())
    want.backward(grad)
    for a, b in ((q32, q64), (k32, k64), (v32, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def test_a_causal_empty_slot_returns_zeros():
    _, idx, valid, _, q, k, v, _ = _case(seed=2)
    qpos = torch.where(valid, idx, torch.full_like(idx, -1))
    out = routed_attention(q, k, v, qpos, causal=True)
    assert torch.isfinite(out).all() and (out[~valid] == 0).all()
    assert (routed_attention_reference(q, k, v, qpos, causal=True)[~valid] == 0).all()


def test_gather_pays_only_for_sparse_routes_on_long_calls():
    assert gather_pays(0.25, 512) and not gather_pays(0.5, 512) and not gather_pays(0.25, 64)
