"""Where ``auto`` should switch from ``gather`` to the tiles of ``blocksparse`` on CPU.

Run: ``python benchmarks/bench_gather_vs_tiles.py [--threads 1] [--repeats 3]``. For 1-D windows and
neighbourhoods (N=8192) and 2-D neighbourhoods (64x64 grid) of growing key counts, H=8, D=64, float32:
forward and forward+backward of ``backend="gather"`` and ``backend="blocksparse"`` (the compiled tile
kernels), measured in one process, alternating call by call (the machine's speed drifts; alternating
exposes both to the same drift), the minimum of ``--repeats`` process-CPU times. Prints one markdown row
per pattern with the backend ``auto`` picks with and without a backward, so that the bounds in
``attnzoo/ops/backends/gather.py`` can be checked against the measured winner.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import patterns as P  # noqa: E402

H, D = 8, 64
BACKENDS = ("gather", "blocksparse")


def cases() -> list[tuple[str, int, object]]:
    out: list[tuple[str, int, object]] = []
    for w in (128, 160, 192, 224, 256):
        out.append((f"causal window {w}", 8192, P.SlidingWindow(w, causal=True)))
    for k in (129, 161, 193, 225, 255):
        out.append((f"1-D neighbourhood {k}", 8192, P.Neighborhood(k)))
    for k in (13, 15, 17, 19, 21, 27):
        out.append((f"2-D neighbourhood {k}x{k} on 64x64", 4096, P.Neighborhood(k, grid=(64, 64))))
    return out


def one_call(q, k, v, pattern, backend: str, grad: torch.Tensor | None) -> float:
    start = time.process_time()
    if grad is None:
        with torch.no_grad():
            attnzoo.attention(q, k, v, pattern=pattern, backend=backend)
    else:
        attnzoo.attention(q, k, v, pattern=pattern, backend=backend).backward(grad)
        q.grad = k.grad = v.grad = None
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", machine())
    print("\n| pattern | gather fwd / fwd+bwd (ms) | tiles fwd / fwd+bwd (ms) | auto fwd / fwd+bwd |")
    print("|---|---|---|---|")
    for name, n, pattern in cases():
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, requires_grad=True) for _ in range(3))
        grad = torch.randn(1, H, n, D)
        best = {}
        for mode in ("fwd", "fwd+bwd"):
            times: dict[str, list[float]] = {b: [] for b in BACKENDS}
            for backend in BACKENDS:  # warm-up: tables, tile plans, kernel builds
                one_call(q, k, v, pattern, backend, grad if mode == "fwd+bwd" else None)
            for _ in range(args.repeats):
                for backend in BACKENDS:
                    times[backend].append(one_call(q, k, v, pattern, backend, grad if mode == "fwd+bwd" else None))
            best[mode] = {b: 1000 * min(t) for b, t in times.items()}
        with torch.no_grad():
            auto_fwd = attnzoo.explain(q.detach(), k.detach(), v.detach(), pattern=pattern).backend
        auto_train = attnzoo.explain(q, k, v, pattern=pattern).backend
        cells = [f"{best['fwd'][b]:.0f} / {best['fwd+bwd'][b]:.0f}" for b in BACKENDS]
        print(f"| {name} | {cells[0]} | {cells[1]} | {auto_fwd} / {auto_train} |", flush=True)


if __name__ == "__main__":
    main()
