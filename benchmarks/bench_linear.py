"""Chunked linear attention, Lightning and (gated) DeltaNet vs SDPA causal: time growth and crossover.

Run: ``python benchmarks/bench_linear.py [--n 1024 2048 4096 16384 65536] [--sdpa-max 16384]``.
CPU, float32, B=1, H=8, D=64, forward + backward (a random output gradient, not ``ones``:
an expanded gradient sends PyTorch's batched matmuls down a slow path). Each (method, N) runs
in a fresh process: the minimum time over 2-3 repeats after a warm-up (on a shared machine
other processes only add time; the median is kept in the JSON lines) and peak extra memory
(RSS high-water mark above the inputs). Methods (all in :mod:`attnzoo.ops.linear`, chunk 64):

- ``linear_attention``: causal, elu+1 feature map, normalised;
- ``lightning``: one decay per head (the Lightning schedule), unnormalised;
- ``delta_net``: gated delta rule, L2-normalised keys, per-token β and decay (WY chunked form);
- ``sdpa_causal``: ``F.scaled_dot_product_attention(is_causal=True)``, up to ``--sdpa-max``.

Prints a markdown table, the fitted exponent of time vs N (1 = linear) over N >= 4096, the
time ratio per 4x N, and the crossover N below which SDPA causal is faster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, peak_rss_bytes, run_isolated  # noqa: E402

from attnzoo.layers.linear_recurrent.lightning import lightning_decay  # noqa: E402
from attnzoo.ops.linear import delta_rule, linear_attention  # noqa: E402

METHODS = ("linear_attention", "lightning", "delta_net", "sdpa_causal")


def measure(method: str, n: int, heads: int, dim: int, chunk: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, heads, n, dim)
    beta_raw = torch.randn(1, heads, n, requires_grad=True)
    gate_raw = torch.randn(1, heads, n, requires_grad=True)
    log_lam = lightning_decay(heads).log().float()

    def forward() -> torch.Tensor:
        if method == "linear_attention":
            return linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, normalize=True, chunk_size=chunk)
        if method == "lightning":
            return linear_attention(q, k, v, log_decay=log_lam, scale=dim ** -0.5, chunk_size=chunk)
        if method == "delta_net":
            return delta_rule(q, F.normalize(k, dim=-1), v, torch.sigmoid(beta_raw), log_decay=F.logsigmoid(gate_raw),
                              scale=dim ** -0.5, chunk_size=chunk)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def step() -> None:
        forward().backward(dout)
        for t in (q, k, v, beta_raw, gate_raw):
            t.grad = None

    base = peak_rss_bytes()
    step()  # warm-up (also the first touch of every buffer)
    times = []
    for _ in range(2 if (method == "sdpa_causal" and n >= 8192) or n >= 65536 else 3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # The minimum: on a shared machine the other processes only ever add time.
    return {"method": method, "n": n, "time_s": min(times), "median_s": statistics.median(times),
            "peak_extra_mb": (peak_rss_bytes() - base) / 2**20}


def fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(N)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def crossover(lin: dict[int, float], sdpa: dict[int, float]) -> str:
    common = sorted(set(lin) & set(sdpa))
    faster = [n for n in common if lin[n] < sdpa[n]]
    if not faster:
        return "not reached at the measured N"
    first = faster[0]
    below = [n for n in common if n < first]
    if not below:
        return f"<= {first} (faster at every measured N)"
    lo = below[-1]
    # interpolate log(time ratio) linearly in log N between the last slower and first faster point
    r0, r1 = math.log(lin[lo] / sdpa[lo]), math.log(lin[first] / sdpa[first])
    x = math.exp(math.log(lo) + (math.log(first) - math.log(lo)) * r0 / (r0 - r1))
    return f"~{x:.0f} (between {lo} and {first})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 65536])
    ap.add_argument("--sdpa-max", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: stable timings on a shared machine; see RESULTS.md)")
    ap.add_argument("--reuse-memory", action="store_true",
                    help="raise glibc's mmap threshold in the measured processes, so freed large buffers are reused "
                         "instead of being returned to the OS and page-faulted in again on every allocation")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "N"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.heads, args.dim, args.chunk)))
        return
    if args.reuse_memory:  # inherited by the measuring subprocesses
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(2**34)
    info = machine()
    info["load_avg_1m"] = f"{os.getloadavg()[0]:.1f}"
    info["allocator"] = "glibc, mmap threshold raised" if args.reuse_memory else "glibc default"
    print("machine:", json.dumps(info))
    rows = []
    for n in args.n:
        for method in METHODS:
            if method == "sdpa_causal" and n > args.sdpa_max:
                continue
            res = run_isolated(__file__, ["--one", method, str(n), "--heads", str(args.heads), "--dim", str(args.dim),
                                          "--chunk", str(args.chunk), "--threads", str(args.threads)])
            res.setdefault("method", method)
            res.setdefault("n", n)
            rows.append(res)
            print(json.dumps(res), flush=True)
    times = {m: {r["n"]: r["time_s"] for r in rows if r["method"] == m and "time_s" in r} for m in METHODS}
    print(f"\nCPU fp32, B=1, H={args.heads}, D={args.dim}, chunk {args.chunk}, forward + backward "
          f"(load average at start {info['load_avg_1m']}, {info['threads']} threads, {info['allocator']})\n")
    print("| N | " + " | ".join(f"{m} (s)" for m in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for n in args.n:
        cells = [f"{times[m][n]:.3f}" if n in times[m] else "-" for m in METHODS]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| method | exponent of time vs N (N >= 4096) | time x per 4x N | crossover vs SDPA causal | peak extra MB "
          "at largest N |")
    print("|---|---|---|---|---|")
    for m in METHODS:
        pts = sorted((n, t) for n, t in times[m].items() if n >= 4096)
        exp = fit_exponent(pts)
        per4 = f"{4 ** exp:.2f}" if exp is not None else "-"
        cross = crossover(times[m], times["sdpa_causal"]) if m != "sdpa_causal" else "-"
        big = max((r for r in rows if r["method"] == m and "peak_extra_mb" in r), key=lambda r: r["n"], default=None)
        mem = f"{big['peak_extra_mb']:.0f} (N={big['n']})" if big else "-"
        exp_s = f"{exp:.2f}" if exp is not None else "-"
        print(f"| {m} | {exp_s} | {per4} | {cross} | {mem} |")


if __name__ == "__main__":
    main()
