"""Context-parallel (ring) attention over 1, 2, 4 processes: time, per-process peak memory, bytes sent.

    python benchmarks/bench_ring.py                       # CPU: N=65536 causal over 1, 2, 4 processes (gloo)
    python benchmarks/bench_ring.py --n 16384 --repeats 3 # a smaller N
    python benchmarks/bench_ring.py --device cuda --n 131072 --procs 1 2 4 8   # GPU (NCCL, one GPU per process)

Every configuration starts ``P`` local processes (loopback only); each holds its shard ``[B, H, N/P, D]`` of q, k,
v and runs :func:`attnzoo.parallel.ring_attention` (forward; ``--backward`` adds the backward). Reported per
process: the median time over ``--repeats`` calls (the first call, which builds the pattern's block layouts, is
left out), the spread (min-max), the peak memory the call added (CPU: peak resident set size over the resident
size before the call, the kernel's high-water mark reset before each call, glibc's mmap threshold fixed at
64 KiB so that freed buffers leave the resident set; CUDA: ``max_memory_allocated`` over
the allocation before the call), and the bytes sent, against the minimum: the distinct keys/values of other
processes that some query of the process may see, counted exactly from the pattern. The sliding-window rows
repeat the measurement for several N: their bytes sent must not grow with N.

With ``--device cuda`` a configuration needs ``P`` GPUs (process ``r`` uses ``cuda:r``); larger ``P`` are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# Minimum traffic ---------------------------------------------------------------------------------------------
def _visible(kind: str, window: int, q_lo: int, q_hi: int, n: int) -> tuple[int, int]:
    """The keys ``[lo, hi)`` that some query in ``[q_lo, q_hi)`` may see."""
    if kind == "causal":
        return 0, q_hi
    return max(0, q_lo - window + 1), q_hi  # causal sliding window: i - window < j <= i


def minimum_bytes(kind: str, window: int, n: int, world: int, layout: str, per_token: int) -> list[int]:
    """Per sender: bytes of its keys/values that other processes need (each needed token once per receiver)."""
    import numpy as np

    from attnzoo.parallel.layout import segments

    seg = n // (world * (2 if layout == "zigzag" else 1))
    chunks = [segments(r, world, layout) for r in range(world)]
    out = []
    for s in range(world):
        total = 0
        for r in range(world):
            if r == s:
                continue
            need = np.zeros(n, dtype=bool)
            for a in chunks[r]:
                lo, hi = _visible(kind, window, a * seg, (a + 1) * seg, n)
                need[lo:hi] = True
            total += sum(int(need[c * seg:(c + 1) * seg].sum()) for c in chunks[s])
        out.append(total * per_token)
    return out


# Worker ------------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import attnzoo.patterns as P
    from attnzoo.parallel import reset_traffic, ring_attention, traffic

    cuda = args.device == "cuda"
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    dtype = torch.float16 if cuda else torch.float32
    pattern = P.Causal() if args.kind == "causal" else P.SlidingWindow(args.window, causal=True)
    n_local = args.n // world
    g = torch.Generator(device=device).manual_seed(rank)
    q, k, v = (torch.randn(args.batch, args.heads, n_local, args.dim, generator=g, device=device, dtype=dtype,
                           requires_grad=args.backward) for _ in range(3))

    def call():
        with torch.set_grad_enabled(args.backward):
            out = ring_attention(q, k, v, pattern=pattern, layout=args.layout)
            if args.backward:
                out.sum().backward()
        if cuda:
            torch.cuda.synchronize()

    call()  # builds the pattern's block layouts
    times, mems, sent = [], [], []
    hwm_ok = True
    for _ in range(args.repeats):
        for t in (q, k, v):
            t.grad = None
        dist.barrier()
        reset_traffic()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            hwm_ok = _reset_hwm() and hwm_ok
            before = _rss()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        mems.append((torch.cuda.max_memory_allocated() if cuda else _hwm()) - before)
        sent.append(traffic()["bytes_sent"])
        dist.barrier()
    row = {"rank": rank, "times": times, "peak_bytes": max(mems), "bytes_sent": sent[-1], "hwm_reset": hwm_ok}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


# Driver ------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, argv: list[str], timeout: float) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           # Every allocation of 64 KiB or more is its own mmap, returned on free: the resident set then follows
           # the live tensors (glibc's adaptive threshold would otherwise keep freed buffers resident for reuse,
           # and a call that reuses them would look free).
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", *argv], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for line in logs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"world {world} {argv}: no result; rank 0 log:\n{logs[0][-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--n", type=int, default=65536, help="sequence length of the causal rows (default: %(default)s)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layouts", nargs="*", default=["zigzag", "contiguous"],
                    help="layouts of the causal rows (none: no causal rows) (default: %(default)s)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--window-ns", type=int, nargs="*", default=[16384, 65536, 262144],
                    help="sequence lengths of the sliding-window rows (none: no such rows) (default: %(default)s)")
    ap.add_argument("--window-procs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="append one JSON row per configuration to this file")
    # worker-only
    ap.add_argument("--kind", default="causal")
    ap.add_argument("--layout", default="zigzag")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _harness import machine

    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        skipped = [p for p in args.procs if p > gpus]
        if skipped:
            print(f"# skipping P={skipped}: {gpus} GPU(s) here (NCCL needs one GPU per process)")
        args.procs = [p for p in args.procs if p <= gpus]
        window_procs = min(args.window_procs, gpus)
    else:
        window_procs = args.window_procs
    print("# " + json.dumps(machine()))
    elem = 2 if args.device == "cuda" else 4
    per_token = args.batch * args.heads * 2 * args.dim * elem
    configs = [("causal", args.n, p, layout) for layout in args.layouts for p in args.procs]
    configs += [("window", n, window_procs, "contiguous") for n in args.window_ns]
    print(f"{'pattern':>14} {'N':>7} {'layout':>10} {'P':>2} | {'time s (min-max)':>20} | "
          f"{'peak MiB/proc (max)':>19} | {'sent MiB/proc mean (max)':>24} | {'minimum mean (max)':>19}")
    for kind, n, world, layout in configs:
        if world > 1 and n % (world * 2):
            continue
        common = ["--device", args.device, "--n", str(n), "--batch", str(args.batch), "--heads", str(args.heads),
                  "--dim", str(args.dim), "--repeats", str(args.repeats), "--threads", str(args.threads),
                  "--kind", kind, "--layout", layout, "--window", str(args.window)]
        if args.backward:
            common.append("--backward")
        started = time.perf_counter()
        rows = run_config(world, common, args.timeout)
        wall = time.perf_counter() - started
        times = [max(r["times"][i] for r in rows) for i in range(args.repeats)]  # a call ends with its slowest rank
        peaks = [r["peak_bytes"] for r in rows]
        sent = [r["bytes_sent"] for r in rows]
        need = minimum_bytes(kind, args.window, n, world, layout, per_token)
        name = "causal" if kind == "causal" else f"window {args.window}"
        mib = 2.0 ** 20
        print(f"{name:>14} {n:>7} {layout:>10} {world:>2} | {statistics.median(times):8.2f} "
              f"({min(times):.2f}-{max(times):.2f}) | {statistics.mean(peaks) / mib:8.1f} ({max(peaks) / mib:7.1f}) | "
              f"{statistics.mean(sent) / mib:11.2f} ({max(sent) / mib:8.2f}) | "
              f"{statistics.mean(need) / mib:8.2f} ({max(need) / mib:7.2f})", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"pattern": name, "n": n, "layout": layout, "procs": world, "times_s": times,
                                    "peak_bytes": peaks, "bytes_sent": sent, "minimum_bytes": need,
                                    "backward": args.backward, "device": args.device, "heads": args.heads,
                                    "dim": args.dim, "batch": args.batch, "wall_s": wall,
                                    "hwm_reset": all(r["hwm_reset"] for r in rows)}) + "\n")


if __name__ == "__main__":
    main()
