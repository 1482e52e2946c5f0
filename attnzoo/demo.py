"""``attnzoo tour`` (also ``attnzoo demo``): the core layer in one minute on CPU.

Checks a few patterns against the float64 reference, shows what the dispatcher picks and
why, and times the block-sparse path against SDPA on a sliding window.
"""

from __future__ import annotations

import time

import torch

import attnzoo
from attnzoo import patterns as P


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_demo(n: int = 4096) -> None:
    """Print correctness checks, dispatcher decisions and a timing at sequence length ``n``."""
    torch.manual_seed(0)
    print("1. Every backend against the float64 reference (forward and gradients), N=200, GQA 4:2")
    q, k, v = (torch.randn(2, h, 200, 32, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    cases = {
        "causal": P.Causal(),
        "sliding window 32 + 4 sinks": P.SlidingWindow(32, causal=True, n_sink=4),
        "2-D neighborhood 5x5 on 10x20": P.Neighborhood(5, grid=(10, 20)),
        "packed documents": P.Document([50, 100, 50]),
        "window | global tokens": P.SlidingWindow(16) | P.GlobalTokens(2),
    }
    for name, pattern in cases.items():
        ref = attnzoo.attention(q, k, v, pattern=pattern, backend="reference")
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for backend in ("sdpa", "blocksparse"):
            out = attnzoo.attention(q, k, v, pattern=pattern, backend=backend)
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            err = max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
            print(f"   {name:32s} {backend:12s} max |diff| = {err:.1e}")

    print(f"\n2. What `auto` picks for a causal sliding window of 256 at N={n} (training on CPU):")
    x = torch.randn(1, 8, n, 64, requires_grad=True)
    window = P.SlidingWindow(256, causal=True)
    print("   " + str(attnzoo.explain(x, x, x, pattern=window)).replace("\n", "\n   "))

    print(f"\n3. Forward+backward time at N={n}, H=8, D=64, float32:")

    def step(pattern, backend):
        def run():
            out = attnzoo.attention(x, x, x, pattern=pattern, backend=backend)
            out.sum().backward()
            x.grad = None
        return run

    t_sparse = _time(step(window, "blocksparse"))
    t_dense = _time(step(P.Causal(), "sdpa"), repeats=1)
    print(f"   blocksparse sliding window: {t_sparse:.3f} s")
    print(f"   SDPA causal (dense):        {t_dense:.3f} s   -> {t_dense / t_sparse:.1f}x")
    print("\nNext: `attnzoo explain --help`, `attnzoo list`, and benchmarks/RESULTS.md.")
