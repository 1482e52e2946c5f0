"""Dynamic-sparse attention on CPU: moba against causal mha (SDPA), topk_attention's memory, effective throughput.

Run: ``python benchmarks/bench_dynamic_sparse.py [--n 16384] [--repeats 3] [--threads 0]``.

- ``moba`` (block 256, top_k 4) and ``mha`` with the same weights (``mha_from``), dim 512, 8 heads, float32,
  causal, forward + backward, interleaved rounds; wall time, every round printed (the spread) and the median.
- Effective throughput: ``t_moba / (t_mha x density)``, ``density`` = attended pairs / causal pairs of the
  call (1 would be "sparse as fast as dense per attended pair").
- ``topk_attention`` (top_k 64) memory: bytes autograd saves for the backward, per N (linear in N when the
  ratio bytes / N stays flat), next to mha on SDPA.
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

from attnzoo.layers.base import Call  # noqa: E402
from attnzoo.layers.testing import mha_from  # noqa: E402
from attnzoo.registry import create  # noqa: E402


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    t = time.perf_counter()
    module(x, causal=True).sum().backward()
    return time.perf_counter() - t


def moba_density(m: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        q, k, _ = m.project(x, x)
        r = m.route(q, k, None, Call(x=x, src=x, causal=True))
        n = x.shape[1]
        rows = r.index.sum(-1).double() * m.block_size  # keys per query before the causal cut, own block full
        pos = torch.arange(n, dtype=torch.float64)
        attended = rows - (m.block_size - 1 - pos % m.block_size)  # own block cut at the query
        return (attended.mean() / ((pos + 1).mean())).item()


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x, causal=True)
    y.sum().backward()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    torch.manual_seed(0)
    if not args.skip_speed:
        moba = create("moba", dim=512, n_heads=8, block_size=256, top_k=4)
        mha = mha_from(moba).float()
        x = torch.randn(1, args.n, 512)
        rounds = {"moba": [], "mha": []}
        for _ in range(args.repeats):
            rounds["moba"].append(fwd_bwd(moba, x))
            rounds["mha"].append(fwd_bwd(mha, x))
            print(f"round: moba {rounds['moba'][-1]:.2f}s, mha {rounds['mha'][-1]:.2f}s", flush=True)
        tm, td = statistics.median(rounds["moba"]), statistics.median(rounds["mha"])
        dens = moba_density(moba, x)
        print(f"\nN={args.n} causal fwd+bwd, float32, dim 512, 8 heads")
        print("| module | rounds (s) | median (s) |\n|---|---|---|")
        for name in rounds:
            print(f"| {name} | {', '.join(f'{t:.2f}' for t in rounds[name])} | {statistics.median(rounds[name]):.2f} |")
        print(f"\nspeed-up mha/moba: {td / tm:.2f}x (rounds: "
              f"{', '.join(f'{d / s:.2f}' for s, d in zip(rounds['moba'], rounds['mha']))})")
        print(f"moba density (attended / causal pairs): {dens:.4f}; t_moba / (t_mha x density): "
              f"{tm / (td * dens):.2f}")
    print("\ntopk_attention (top_k 64) vs mha: bytes saved for backward, dim 512, 8 heads")
    print("| N | topk_attention (MB) | per token (KB) | mha SDPA (MB) |\n|---|---|---|---|")
    topk = create("topk_attention", dim=512, n_heads=8, top_k=64)
    dense = mha_from(topk).float()
    for n in (1024, 2048, 4096, 8192):
        x = torch.randn(1, n, 512)
        a, b = saved_bytes(topk, x), saved_bytes(dense, x)
        print(f"| {n} | {a / 2**20:.1f} | {a / n / 1024:.1f} | {b / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
