"""GPU: sliding-window attention through attnzoo (auto = flex, and blocksparse) vs SDPA causal.

Run on a GPU: ``python benchmarks/bench_gpu_window.py``. bf16, B=1, H=16, D=128; forward
and forward+backward median times side by side in one process, with effective TFLOP/s
counted from the pattern's exact density.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median_time  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import patterns as P  # noqa: E402
from attnzoo.patterns import Shape  # noqa: E402


def main() -> None:
    print(f"machine: {machine()}")
    print("| N | window | backend | fwd ms | fwd eff. TFLOP/s | fwd+bwd ms | fwd+bwd eff. TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    heads, dim = 16, 128
    for n, window in ((8192, 256), (32768, 256), (32768, 1024)):
        q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        cases = [("sdpa causal", P.Causal(), "sdpa"), ("flex", P.SlidingWindow(window, causal=True), "flex"),
                 ("blocksparse", P.SlidingWindow(window, causal=True), "blocksparse")]
        for name, pattern, backend in cases:
            density = pattern.density(Shape(1, heads, n, n))
            flops = 4 * heads * n * n * dim * density

            def fwd(qkv=(q, k, v), pattern=pattern, backend=backend):
                with torch.no_grad():
                    attnzoo.attention(*qkv, pattern=pattern, backend=backend)

            def fwd_bwd(qkv=(q, k, v), pattern=pattern, backend=backend):
                out = attnzoo.attention(*qkv, pattern=pattern, backend=backend)
                out.backward(torch.ones_like(out))

            tf = median_time(fwd, "cuda", repeats=10, warmup=2)
            tb = median_time(fwd_bwd, "cuda", repeats=10, warmup=2)
            print(f"| {n} | {window} | {name} | {tf * 1e3:.3f} | {flops / tf / 1e12:.1f} | {tb * 1e3:.3f} | "
                  f"{3.5 * flops / tb / 1e12:.1f} |")


if __name__ == "__main__":
    main()
