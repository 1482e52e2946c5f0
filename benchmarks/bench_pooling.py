"""Poolers: ABMIL on packed bags (``cu_seqlens``, segment softmax) against the same bags padded to the longest,
and the overhead of ``attention_pool`` / ``query_pool`` over ``mean_pool``.

Run: ``python benchmarks/bench_pooling.py [--quick] [--threads 1] [--clock cpu|wall] [--device cpu|cuda]``.

Part 1 (ABMIL, gated, 512 features, attention width 128, float32, forward + backward of the sum
of the bag embeddings, gradients for the instances and the weights): one bag of 100,000 instances,
and 64 bags of 100-5,000 instances (lengths drawn uniformly and log-uniformly, seed 0) either packed
(``x [1, T, 512]`` with ``cu_seqlens``) or padded to the longest (``x [64, N_max, 512]`` with a mask).
Each (case, layout) runs in a fresh process so its peak memory is its own: the time is the median
of the repeats after a warm-up; the memory is the peak RSS (CPU) or the peak allocated CUDA memory
above what the process held before building the input. Part 2 runs the three poolers interleaved in
one process on the same padded batch and reports time ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median_time, peak_rss_bytes, run_isolated, sync  # noqa: E402

import attnzoo  # noqa: E402

DIM = 512


def lengths_for(case: str, quick: bool) -> list[int]:
    scale = 10 if quick else 1
    if case == "one_bag":
        return [100_000 // scale]
    g = torch.Generator().manual_seed(0)
    lo, hi = 100, 5_000 // scale
    if case == "64_uniform":
        return torch.randint(lo, hi + 1, (64,), generator=g).tolist()
    u = torch.rand(64, generator=g, dtype=torch.float64)
    return [int(round(math.exp(math.log(lo) + v * (math.log(hi) - math.log(lo))))) for v in u.tolist()]


def measure(case: str, layout: str, repeats: int, clock: str, device: str, quick: bool) -> dict:
    """One (case, layout) in this process: time and peak memory of ABMIL forward + backward."""
    lengths = lengths_for(case, quick)
    torch.manual_seed(0)
    model = attnzoo.create("abmil", dim=DIM, attn_dim=128).to(device)
    base = peak_rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    g = torch.Generator().manual_seed(1)
    total = sum(lengths)
    if layout == "packed":
        x = torch.randn(1, total, DIM, generator=g).to(device).requires_grad_()
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
        kw = {"cu_seqlens": cu}
    else:
        n = max(lengths)
        x = torch.zeros(len(lengths), n, DIM)
        mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
        x[mask] = torch.randn(total, DIM, generator=g)
        x = x.to(device).requires_grad_()
        kw = {"mask": mask.to(device)}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x, **kw).sum().backward()

    seconds = median_time(step, device, repeats, warmup=1, clock=clock)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()) - base
    return {"case": case, "layout": layout, "bags": len(lengths), "instances": total,
            "rows": int(x.shape[0] * x.shape[1]), "seconds": seconds, "peak_mib": peak / 2**20}


def overhead(repeats: int, clock: str, device: str, quick: bool) -> list[dict]:
    """attention_pool and query_pool against mean_pool on the same padded batch, interleaved rounds."""
    b, n = (16, 256) if quick else (64, 1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, DIM, generator=g).to(device)
    mask = (torch.arange(n)[None] < torch.randint(n // 4, n + 1, (b,), generator=g)[:, None]).to(device)
    torch.manual_seed(0)
    mods = {"mean_pool": attnzoo.create("mean_pool", dim=DIM),
            "attention_pool": attnzoo.create("attention_pool", dim=DIM, attn_dim=128),
            "query_pool": attnzoo.create("query_pool", dim=DIM, n_heads=8)}
    mods = {k: v.to(device) for k, v in mods.items()}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times: dict[str, list[float]] = {k: [] for k in mods}
        for _ in range(repeats):
            for name, m in mods.items():
                xi = x.clone().requires_grad_(mode == "fwd+bwd")

                def run(m=m, xi=xi, mode=mode) -> None:
                    y = m(xi, mask=mask)
                    if mode == "fwd+bwd":
                        y.sum().backward()
                times[name].append(median_time(run, device, 1, warmup=1, clock=clock))
        base = statistics.median(times["mean_pool"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"pooler": name, "mode": mode, "seconds": med, "vs_mean_pool": med / base,
                         "spread": (min(ts), max(ts)), "shape": (b, n, DIM)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10x smaller bags (a smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("CASE", "LAYOUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    clock = "wall" if a.device == "cuda" else a.clock
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.repeats, clock, a.device, a.quick)))
        return
    info = machine()
    print(f"machine: {info}; threads {a.threads}; clock {clock}; device {a.device}")
    print("\n| case | layout | bags | instances | rows computed | time (s) | peak memory (MiB) | padded / packed time "
          "| padded / packed memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in ("one_bag", "64_uniform", "64_loguniform"):
        res = {}
        for layout in ("packed", "padded"):
            args = ["--one", case, layout, "--threads", str(a.threads), "--clock", clock, "--device", a.device,
                    "--repeats", str(a.repeats)] + (["--quick"] if a.quick else [])
            res[layout] = run_isolated(__file__, args)
        for layout in ("packed", "padded"):
            r = res[layout]
            if "error" in r:
                print(f"| {case} | {layout} | error: {r['error']} |")
                continue
            ratio = ""
            if layout == "padded" and "error" not in res["packed"]:
                ratio = (f"{r['seconds'] / res['packed']['seconds']:.2f}x | "
                         f"{r['peak_mib'] / max(res['packed']['peak_mib'], 1e-9):.2f}x")
            else:
                ratio = " | "
            print(f"| {case} | {layout} | {r['bags']} | {r['instances']} | {r['rows']} | {r['seconds']:.3f} | "
                  f"{r['peak_mib']:.0f} | {ratio} |")
    start = time.perf_counter()
    rows = overhead(max(a.repeats, 5), clock, a.device, a.quick)
    sync(a.device)
    print(f"\nOverhead over mean_pool (padded batch {rows[0]['shape']}, interleaved, "
          f"{time.perf_counter() - start:.0f} s):\n")
    print("| pooler | mode | time (ms) | vs mean_pool | spread (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["spread"]
        print(f"| {r['pooler']} | {r['mode']} | {1e3 * r['seconds']:.2f} | {r['vs_mean_pool']:.2f}x | "
              f"{1e3 * lo:.2f}-{1e3 * hi:.2f} |")


if __name__ == "__main__":
    main()
