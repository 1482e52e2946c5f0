"""Mixture-of-heads: the gather dispatch (skip unselected heads) against the dense one (all heads x 0).

Run on CPU: ``python benchmarks/bench_moh.py [--quick] [--threads 1] [--clock cpu|wall]``.
Same module, same weights, same inputs; the two dispatches run interleaved in one process
(medians of the interleaved rounds), forward and forward+backward, non-causal and causal.
Prints a Markdown table.

The default clock is the process CPU time with one torch thread: on a shared machine
(other jobs running) it measures the work each dispatch does, where wall time measures
the load of the other jobs too. ``--clock wall`` gives wall time instead.

C/N is the largest fraction of tokens that picked one routed head in the call (the gather
pads every routed head to that count), so the attention work of the routed heads scales
with C/N instead of 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median_time  # noqa: E402

from attnzoo.layers.dense_multihead.moh import MixtureOfHeads  # noqa: E402

# (N, heads, n_shared, top_k); head_dim 64, batch 2
SETTINGS = [
    (256, 8, 2, 2),
    (1024, 8, 2, 2),
    (1024, 8, 2, 3),
    (1024, 8, 2, 4),
    (2048, 8, 2, 2),
    (2048, 16, 4, 3),
    (4096, 8, 2, 1),
]
QUICK = [(256, 8, 2, 2), (1024, 8, 2, 2)]


def _step(m: MixtureOfHeads, x: torch.Tensor, causal: bool, backward: bool):
    def run() -> None:
        if backward:
            m.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            m(xx, causal=causal).sum().backward()
        else:
            with torch.no_grad():
                m(x, causal=causal)

    return run


def cpu_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median process CPU time of ``fn`` in seconds (all threads of this process)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two small settings (smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--setting", action="append", default=[], metavar="N,HEADS,SHARED,TOP_K",
                    help="run only these settings (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine()
    clock = cpu_time if args.clock == "cpu" else (lambda fn, repeats: median_time(fn, "cpu", repeats=repeats))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"B=2, head_dim=64, float32, backend auto, {args.clock} time, {args.threads} torch thread(s); "
          "medians over interleaved rounds.\n")
    print("| N | heads | shared | top_k | C/N | causal | pass | dense (ms) | gather (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    settings = [tuple(int(v) for v in t.split(",")) for t in args.setting] or (QUICK if args.quick else SETTINGS)
    for n, heads, shared, top_k in settings:
        dim = heads * 64
        m = MixtureOfHeads(dim, heads, n_shared=shared, top_k=top_k)
        x = torch.randn(2, n, dim)
        with torch.no_grad():
            sel = m.route(x)[..., shared:] != 0
            frac = float(sel.sum(1).max()) / n
        for causal in (False, True):
            for backward in (False, True):
                times = {"dense": [], "gather": []}
                for _ in range(args.rounds):
                    for dispatch in ("dense", "gather"):
                        m.dispatch = dispatch
                        times[dispatch].append(clock(_step(m, x, causal, backward), repeats=3))
                dense, gather = (sorted(times[k])[len(times[k]) // 2] for k in ("dense", "gather"))
                print(f"| {n} | {heads} | {shared} | {top_k} | {frac:.2f} | {'yes' if causal else 'no'} | "
                      f"{'fwd+bwd' if backward else 'fwd'} | {dense * 1e3:.1f} | {gather * 1e3:.1f} | "
                      f"{dense / gather:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
