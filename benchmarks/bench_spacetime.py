"""Space-time attention: divided (space, then time) against joint, on video tokens (T=16, 32x32 by default).

Run on CPU: ``python benchmarks/bench_spacetime.py [--frames 16] [--side 32] [--rounds 5] [--threads 1]
[--clock cpu|wall]``. One ``factorized_spacetime`` module per mode (same weights: the joint mode's
attention is the divided mode's spatial layer), same input, forward only (no grad), the two modes
interleaved round by round; prints the median, min and max of each and the ratio of medians as a
Markdown table. The default clock is the process CPU time with one torch thread (stable on a
shared machine); ``--clock wall`` gives wall time.
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

import attnzoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    divided = attnzoo.create("factorized_spacetime", dim=args.dim, n_heads=args.heads, mode="divided",
                             backend=args.backend).eval()
    joint = attnzoo.create("factorized_spacetime", dim=args.dim, n_heads=args.heads, mode="joint",
                           backend=args.backend).eval()
    joint.spatial.load_state_dict(divided.spatial.state_dict())
    x = torch.randn(1, args.frames, args.side, args.side, args.dim)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"divided": [], "joint": []}
    with torch.no_grad():
        for m in (divided, joint):  # warm-up
            m(x)
        for _ in range(args.rounds):
            for name, m in (("divided", divided), ("joint", joint)):
                start = timer()
                m(x)
                times[name].append(timer() - start)
    info = machine()
    print(f"machine: {info}  clock: {args.clock}, {args.threads} thread(s), backend {args.backend}")
    print(f"video (T, H, W) = ({args.frames}, {args.side}, {args.side}), {args.frames * args.side ** 2} tokens, "
          f"dim {args.dim}, {args.heads} heads, batch 1, forward, {args.rounds} interleaved rounds\n")
    print("| mode | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")
    ratio = statistics.median(times["joint"]) / statistics.median(times["divided"])
    print(f"\njoint / divided (ratio of medians): {ratio:.1f}x")


if __name__ == "__main__":
    main()
