"""The routed-attention op's query routings on CUDA (mixture-of-heads' gather dispatch) against the float64
reference, forward and gradients; skipped where no CUDA device exists (run by ``benchmarks/gpu_session.sh tests``)."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.routed import Routing, gather_routes
from attnzoo.patterns.routed import routed_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["gather", "flex", "sdpa", "auto"])
def test_query_routing_on_cuda_equals_reference(causal, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    b, r, n, d = 2, 6, 700, 64
    sel = torch.rand(b, n, r, device="cuda", generator=g) < 0.3
    sel[0, :, 0] = False
    idx, valid, _ = gather_routes(sel)
    routing = Routing("queries", torch.where(valid, idx, torch.full_like(idx, -1)), n_queries=n)
    keep = torch.ones(b, n, dtype=torch.bool, device="cuda")
    keep[1, 600:] = False
    q = torch.randn(b, r, idx.shape[-1], d, device="cuda", generator=g).requires_grad_()
    k, v = (torch.randn(b, r, n, d, device="cuda", generator=g).requires_grad_() for _ in range(2))
    out = routed_attention(q, k, v, routing, causal=causal, keep=keep, backend=backend)
    ref = routed_attention(q, k, v, routing, causal=causal, keep=keep, backend="reference")
    assert (out.double() - ref.double()).abs().max() < 2e-3
    w = torch.randn(out.shape, device="cuda", generator=g)
    for a, c in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert (a.double() - c.double()).abs().max() < 2e-3
    assert (out[~valid] == 0).all()
