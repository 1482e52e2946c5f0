"""bi_level_routing, routing_transformer and varied_size_window on CPU against their dense baselines.

Run: ``python benchmarks/bench_dyn_grid.py [--side 32] [--n 2048] [--repeats 5]``.

Forward + backward, float32, one thread, process CPU time (stable on a shared machine), interleaved rounds
(every round printed: the spread; then the median), the same q/k/v/o weights in both modules:

- ``bi_level_routing`` (regions 8 per side, top_k 4: each query sees 4 of 64 regions) vs ``mha`` on a
  ``side x side`` grid; effective ratio ``t_bra / (t_mha x density)``.
- ``routing_transformer`` (balanced, ``n_clusters = sqrt(n)``) vs ``mha`` on ``n`` tokens.
- ``varied_size_window`` vs ``swin_window`` (window 8): the cost of the window regression and the sampling.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

from attnzoo.layers import MultiHeadAttention  # noqa: E402
from attnzoo.layers.base import load_shared  # noqa: E402
from attnzoo.registry import create  # noqa: E402


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    t = time.process_time()
    module(x).sum().backward()
    return time.process_time() - t


def compare(name: str, a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    fwd_bwd(a, x), fwd_bwd(b, x)  # warm-up
    ta, tb = [], []
    for r in range(repeats):
        ta.append(fwd_bwd(a, x))
        tb.append(fwd_bwd(b, x))
        print(f"  {name} round {r}: {ta[-1]:.3f} s vs {tb[-1]:.3f} s")
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"{name}: median {ma:.3f} s vs baseline {mb:.3f} s, ratio {ma / mb:.2f} "
          f"(rounds {min(ta):.3f}-{max(ta):.3f} vs {min(tb):.3f}-{max(tb):.3f})")
    return ma, mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(machine())
    torch.manual_seed(0)
    grid = torch.randn(1, a.side, a.side, a.dim)

    bra = create("bi_level_routing", dim=a.dim, n_heads=a.heads, regions=8, top_k=4)
    dense = load_shared(bra, MultiHeadAttention(a.dim, a.heads))
    t_bra, t_mha = compare("bi_level_routing vs mha", bra, lambda g: dense(g.reshape(1, -1, a.dim)), grid,
                           a.repeats)
    print(f"  effective ratio t_bra / (t_mha x density 1/16): {t_bra / (t_mha / 16):.2f}")

    rt = create("routing_transformer", dim=a.dim, n_heads=a.heads, n_clusters=int(math.sqrt(a.n)),
                update_centroids=False)
    dense = load_shared(rt, MultiHeadAttention(a.dim, a.heads))
    compare("routing_transformer vs mha", rt, dense, torch.randn(1, a.n, a.dim), a.repeats)

    vsa = create("varied_size_window", dim=a.dim, n_heads=a.heads, window=8)
    swin = load_shared(vsa, create("swin_window", dim=a.dim, n_heads=a.heads, window=8))
    compare("varied_size_window vs swin_window", vsa, swin, grid, a.repeats)


if __name__ == "__main__":
    main()
