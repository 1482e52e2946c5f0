"""seer_attention, tidal_decode and landmark on CUDA against their float64 reference; skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from attnzoo.registry import create

DEVICE = "cuda"  # float64 on the device: the routing is the reference's, the backends must agree to rounding
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [
    ("seer_attention", {"n_kv_heads": 2, "block_size": 64, "top_k": 3}, ("flex", "blocksparse", "sdpa", "gather")),
    ("tidal_decode", {"top_k": 64, "n_layers": 3, "first_sparse": 1}, ("gather", "sdpa", "flex")),
    ("landmark", {"block_size": 63, "top_k": 2, "window": 1}, ("auto",)),
]


@pytest.mark.parametrize("slug,kw,backends", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_match_the_float64_reference(slug, kw, backends, causal):
    torch.manual_seed(0)
    m = create(slug, dim=128, n_heads=4, **kw).double().to(DEVICE)
    ref = create(slug, dim=128, n_heads=4, backend="reference", **kw).double()
    ref.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    x = torch.randn(2, 640, 128, dtype=torch.float64)
    want = ref(x, causal=causal)
    for backend in backends:
        m.backend = backend
        xx = x.to(DEVICE).requires_grad_()
        got = m(xx, causal=causal)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-7, atol=1e-9, msg=lambda s, b=backend: f"{b}: {s}")
        got.square().sum().backward()
        assert torch.isfinite(xx.grad).all(), backend
