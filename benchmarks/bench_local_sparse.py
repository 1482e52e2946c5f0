"""Local / static sparse patterns (issue 4) against dense SDPA on the same shapes, side by side.

Run: ``python benchmarks/bench_local_sparse.py [--threads N] [--clock wall|cpu] [--cases ...]``.
Cases (B=1, H=8, D=64, float32 by default):

- ``window256``: causal sliding window 256 at N = 16384;
- ``nbhd7x7``: 2-D neighbourhood 7x7 on a 128x128 grid (N = 16384);
- ``swin8x8``: Swin 8x8 windows on 64x64 (N = 4096);
- ``maxvit8``: MaxViT block (8x8 windows) then grid (8x8 groups) attention on 64x64: two calls,
  against two dense calls.

Each (case, implementation, mode) runs in a fresh process: forward (``fwd``, no grad) and
forward+backward (``fwd+bwd``), median time over repeats after a warm-up (dense SDPA at
N = 16384 runs once, no warm-up), peak extra memory (RSS high-water mark over the inputs).
``blocksparse`` is ``attnzoo.attention(..., backend="blocksparse")``, which runs these patterns
on their tile plans (on CPU with the compiled tile kernels, ``tile_kernels.cpp``); the
neighbourhood and the sliding window also run on ``gather`` (the compiled per-query CPU kernels;
``auto`` picks them for the neighbourhood and the tiles for the window of 256 keys, see run F in
RESULTS.md). Reported per row: the pattern's exact density, the target time
``dense time x density`` (what the sparsity allows), the ratio to it (issue target: <= 2), and
effective throughput: FLOPs of the kept (q, k) pairs, ``4 D`` per pair forward and 3.5x that
for forward+backward, per second. ``--clock cpu`` measures process CPU time (use with
``--threads 1``): stable on a machine shared with other jobs, where wall time is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, peak_rss_bytes, run_isolated  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import patterns as P  # noqa: E402
from attnzoo.patterns import Shape  # noqa: E402

H, D = 8, 64
CASES = {
    "window256": (16384, "causal sliding window 256, N=16384"),
    "nbhd7x7": (16384, "2-D neighbourhood 7x7 on 128x128"),
    "swin8x8": (4096, "Swin 8x8 windows on 64x64"),
    "maxvit8": (4096, "MaxViT block 8x8 + grid 8x8 on 64x64 (2 calls)"),
}
# attnzoo backends measured per case (default: blocksparse only).
IMPLS = {"nbhd7x7": ["blocksparse", "gather"], "window256": ["blocksparse", "gather"]}


def patterns(case: str) -> list:
    if case == "window256":
        return [P.SlidingWindow(256, causal=True)]
    if case == "nbhd7x7":
        return [P.Neighborhood(7, grid=(128, 128))]
    if case == "swin8x8":
        return [P.WindowPartition(8, grid=(64, 64))]
    if case == "maxvit8":
        return [P.WindowPartition(8, grid=(64, 64)), P.GridPartition(8, grid=(64, 64))]
    raise ValueError(f"case: expected one of {list(CASES)}, got {case!r}")


def measure(case: str, impl: str, mode: str, dtype: str, repeats: int, clock: str) -> dict:
    torch.manual_seed(0)
    n = CASES[case][0]
    dt = getattr(torch, dtype)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(1, H, n, D, dtype=dt, requires_grad=grad) for _ in range(3))
    pats = patterns(case)

    def one(p):
        if impl == "sdpa-dense":
            return F.scaled_dot_product_attention(q, k, v)
        return attnzoo.attention(q, k, v, pattern=p, backend=impl)

    def step():
        if grad:
            out = sum(one(p).sum() for p in pats)
            out.backward()
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                for p in pats:
                    one(p)

    timer = time.process_time if clock == "cpu" else time.perf_counter
    big_dense = impl == "sdpa-dense" and n >= 16384
    base = peak_rss_bytes()
    if not big_dense:
        step()  # warm-up (tile plans, masks)
    times = []
    for _ in range(1 if big_dense else repeats):
        start = timer()
        step()
        times.append(timer() - start)
    kept = sum(p.density(Shape(1, H, n, n)) for p in pats) * n * n * H
    return {"time_s": statistics.median(times), "extra_mem_mib": (peak_rss_bytes() - base) / 2**20,
            "kept_pairs": kept, "density": kept / (len(pats) * n * n * H)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--one", nargs=3, metavar=("CASE", "IMPL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        case, impl, mode = args.one
        print(json.dumps(measure(case, impl, mode, args.dtype, args.repeats, args.clock)))
        return
    info = machine()
    info["load_avg_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {info}")
    print(f"B=1 H={H} D={D} {args.dtype}; clock={args.clock}; threads={torch.get_num_threads()}\n")
    common = ["--dtype", args.dtype, "--repeats", str(args.repeats), "--clock", args.clock]
    if args.threads:
        common += ["--threads", str(args.threads)]
    dense_cache: dict[tuple, dict] = {}
    rows = []
    for case in args.cases:
        n = CASES[case][0]
        calls = len(patterns(case))
        for mode in ("fwd", "fwd+bwd"):
            key = (n, mode, calls)
            if key not in dense_cache:
                dense_cache[key] = run_isolated(__file__, ["--one", case, "sdpa-dense", mode, *common])
            dense = dense_cache[key]
            sparse = {impl: run_isolated(__file__, ["--one", case, impl, mode, *common])
                      for impl in IMPLS.get(case, ["blocksparse"])}
            rows.append((case, mode, dense, sparse))
    info["load_avg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print("| case | mode | impl | time (s) | density | dense x density (s) | ratio (target <= 2) | "
          "eff. GFLOP/s | extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = []
    for case, mode, dense, sparse in rows:
        failed = [r["error"] for r in (dense, *sparse.values()) if "error" in r]
        if failed:
            print(f"| {case} | {mode} | error | {failed[0]} | | | | | |")
            continue
        flops_per_pair = 4 * D * (3.5 if mode == "fwd+bwd" else 1.0)
        first = next(iter(sparse.values()))
        density, kept = first["density"], first["kept_pairs"]
        ideal = dense["time_s"] * density
        measured = [("sdpa dense", dense, kept / density)] + [(impl, r, kept) for impl, r in sparse.items()]
        for impl, r, pairs in measured:
            dense_row = impl == "sdpa dense"
            ratio = "" if dense_row else f"{r['time_s'] / ideal:.2f}"
            eff = pairs * flops_per_pair / r["time_s"] / 1e9
            dens = "1" if dense_row else f"{density:.5f}"
            print(f"| {case} | {mode} | {impl} | {r['time_s']:.4f} | {dens} | {ideal:.4f} | {ratio} | {eff:.1f} | "
                  f"{r['extra_mem_mib']:.0f} |")
            out.append({"case": case, "mode": mode, "impl": impl, **r, "ideal_s": ideal})
    print(f"\nload average at end: {info['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
