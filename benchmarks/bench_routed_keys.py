"""Key routings on CPU: the gather path against SDPA with the routing's dense mask, by length and keys per query.

Run: ``python benchmarks/bench_routed_keys.py [--lengths 512 1024 2048 4096] [--keys 32 64 256] [--repeats 3]``.

Causal forward + backward of ``key_routed_attention`` on random routings (``K`` distinct keys per query among
all ``N``, the causally invisible ones dropped), batch 1, 4 heads, head dim 64, float32, one thread, process CPU
time; the two backends interleaved, every round printed and the median kept. ``density`` is the fraction of the
``N x N`` pairs the routing keeps; where ``gather / dense`` crosses 1 sets ``KEY_DENSE_MIN_DENSITY``, the
threshold of ``backend="auto"``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

from attnzoo.patterns.routed import key_routed_attention  # noqa: E402


def fwd_bwd(q, k, v, keys, backend: str) -> float:
    t = time.process_time()
    key_routed_attention(q, k, v, keys, causal=True, backend=backend).sum().backward()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--keys", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine(), "clock: cpu")
    print("| N | K | density | gather rounds (s) | dense-mask rounds (s) | gather / dense (medians) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for n in args.lengths:
        for kk in args.keys:
            q, k, v = (torch.randn(1, 4, n, 64, generator=g).requires_grad_() for _ in range(3))
            keys = torch.rand(4 * n, n, generator=g).argsort(-1)[:, :kk].view(1, 4, n, kk)
            keys = torch.where(keys <= torch.arange(n).view(1, 1, n, 1), keys, -1)
            density = (keys >= 0).sum().item() / (4 * n * n)
            rounds: dict[str, list[float]] = {"gather": [], "sdpa": []}
            for backend in rounds:
                fwd_bwd(q, k, v, keys, backend)  # warm-up
            for _ in range(args.repeats):
                for backend in rounds:
                    rounds[backend].append(fwd_bwd(q, k, v, keys, backend))
            ratio = statistics.median(rounds["gather"]) / statistics.median(rounds["sdpa"])
            print(f"| {n} | {kk} | {density:.4f} | {', '.join(f'{t:.3f}' for t in rounds['gather'])} | "
                  f"{', '.join(f'{t:.3f}' for t in rounds['sdpa'])} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
