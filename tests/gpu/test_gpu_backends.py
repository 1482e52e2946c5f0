"""GPU paths against the float64 reference; skipped where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PATTERNS = {
    "full": lambda: None,
    "causal": lambda: P.Causal(),
    "window": lambda: P.SlidingWindow(100, causal=True),
    "window+sinks": lambda: P.SlidingWindow(64, causal=True, n_sink=4),
    "neighborhood2d": lambda: P.Neighborhood((5, 7), grid=(20, 30)),
    "document": lambda: P.Document([150, 250, 200]),
    "padding": lambda: P.KeyPadding(torch.arange(600).view(1, -1).expand(2, -1) < torch.tensor([[400], [0]])),
    "perhead": lambda: P.PerHead([P.Causal(), P.SlidingWindow(32)]),
}
SCORE_MODS = {
    "none": lambda h: None,
    "alibi": lambda h: P.ALiBi(h).to("cuda"),
    "softcap": lambda h: P.SoftCap(20.0),
    "rpb": lambda h: P.RelativePositionBias(h, max_distance=64).cuda(),
}


def _inputs(dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, n: int = 600, d: int = 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(2, h, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _grads(out: torch.Tensor, tensors: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(out.shape, device="cuda", dtype=torch.float64, generator=g).to(out.dtype)
    return list(torch.autograd.grad((out * weight).sum(), tensors))


@pytest.mark.parametrize("mod_name", list(SCORE_MODS))
@pytest.mark.parametrize("pat_name", list(PATTERNS))
@pytest.mark.parametrize("backend", ["flex", "blocksparse"])
def test_gpu_backend_matches_reference(backend: str, pat_name: str, mod_name: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float32 if backend == "flex" else torch.float64
    q, k, v = _inputs(dtype)
    pattern = PATTERNS[pat_name]()
    mod, mod64 = SCORE_MODS[mod_name](4), SCORE_MODS[mod_name](4)
    if mod_name == "rpb":
        torch.nn.init.normal_(mod.table)
        mod, mod64 = mod.to(dtype), mod64.double()
        mod64.table.data.copy_(mod.table.detach())
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend=backend)
    ref = attnzoo.attention(q64, k64, v64, pattern=pattern, score_mod=mod64, backend="reference")
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    extra, extra64 = ([mod.table], [mod64.table]) if mod_name == "rpb" else ([], [])
    for a, b in zip(_grads(out, [q, k, v, *extra]), _grads(ref, [q64, k64, v64, *extra64])):
        torch.testing.assert_close(a.double(), b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("pat_name", ["full", "causal", "padding", "document"])
def test_gpu_sdpa_matches_reference(pat_name: str) -> None:
    q, k, v = _inputs(torch.float64)
    pattern = PATTERNS[pat_name]()
    ref = attnzoo.attention(q, k, v, pattern=pattern, backend="reference")
    out = attnzoo.attention(q, k, v, pattern=pattern, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_flex_refuses_score_mod_tensors_on_another_device() -> None:
    q, k, v = _inputs(torch.float32, n=64)
    assert "same device" in attnzoo.explain(q, k, v, score_mod=P.ALiBi(4)).reasons["flex"]


def test_gpu_auto_prefers_fused_kernels() -> None:
    q, k, v = _inputs(torch.bfloat16, n=4096)
    assert attnzoo.explain(q, k, v, pattern=P.Causal()).backend == "sdpa"
    assert attnzoo.explain(q, k, v, pattern=P.SlidingWindow(256, causal=True)).backend == "flex"
    assert attnzoo.explain(q, k, v, return_weights=True).backend == "reference"
