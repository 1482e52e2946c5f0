"""Overhead of ``attnzoo.attention(backend="auto")`` over calling SDPA / FlexAttention directly.

Run on a GPU: ``python benchmarks/bench_dispatch.py``. Same inputs, same kernels, side by
side in one process; prints per-call times and the overhead ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median_time  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import patterns as P  # noqa: E402
from attnzoo.ops.backends.flex import _compiled, block_mask  # noqa: E402
from attnzoo.ops.problem import make_problem  # noqa: E402


def _callables(q, k, v, name: str):
    """(direct, through attnzoo) callables running the same kernel."""
    if name.startswith("sdpa"):
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda: attnzoo.attention(q, k, v, pattern=P.Causal()))
    pattern = P.SlidingWindow(256, causal=True)
    problem = make_problem(q, k, v, pattern=pattern, score_mod=None, scale=None, return_weights=False, return_lse=False)
    bm = block_mask(problem)
    scale = q.shape[-1] ** -0.5
    return (lambda: _compiled()(q, k, v, block_mask=bm, scale=scale),
            lambda: attnzoo.attention(q, k, v, pattern=pattern))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"machine: {machine()}")
    print("| case | direct (ms) | attnzoo auto (ms) | overhead |")
    print("|---|---|---|---|")
    for n, heads, d in ((1024, 16, 64), (4096, 16, 128), (16384, 16, 128)):
        q, k, v = (torch.randn(1, heads, n, d, device=device, dtype=dtype) for _ in range(3))
        for name in ("sdpa causal", "flex window 256"):
            if name.startswith("flex") and device != "cuda":
                continue
            direct, ours = _callables(q, k, v, name)
            with torch.no_grad():
                t_direct, t_ours = [], []
                for _ in range(5):  # interleave to cancel drift
                    t_direct.append(median_time(direct, device, repeats=20, warmup=3))
                    t_ours.append(median_time(ours, device, repeats=20, warmup=3))
            a, b = sorted(t_direct)[2], sorted(t_ours)[2]
            print(f"| {name}, N={n}, H={heads}, D={d} | {a * 1e3:.3f} | {b * 1e3:.3f} | {(b / a - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
