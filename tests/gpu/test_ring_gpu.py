"""Ring attention's block computations on CUDA (one process: the same plan, merge and backward as on P processes)
against the float64 reference; the multi-process NCCL run is ``benchmarks/gpu_session.sh ring``."""

from __future__ import annotations

import pytest
import torch

import attnzoo
import attnzoo.patterns as P
from attnzoo.parallel import ring_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name, pattern, h_kv, mod", [
    ("causal", P.Causal(), 4, None),
    ("window_gqa", P.SlidingWindow(100, causal=True), 2, None),
    ("document_alibi", P.Document([300, 500, 224]) & P.Causal(), 4, P.ALiBi(4)),
])
def test_ring_on_cuda_matches_reference(layout, name, pattern, h_kv, mod):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1024, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, h_kv, 1024, 64, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, 4, 1024, 64, generator=g, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attnzoo.attention(*ref_in, pattern=pattern, score_mod=mod, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    cuda_mod = mod.to("cuda") if mod is not None else None
    xs = [t.float().cuda().requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*xs, pattern=pattern, score_mod=cuda_mod, layout=layout)
    grads = torch.autograd.grad(out, xs, dout.float().cuda())
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-3, rtol=2e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, atol=5e-3, rtol=5e-3)
