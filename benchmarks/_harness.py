"""Shared timing and memory helpers for the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1, clock: str = "wall") -> float:
    """Median time of ``fn`` in seconds, warm-up excluded, device synchronised.

    ``clock="cpu"``: process CPU time instead of wall time (CPU only; with one thread it is
    stable on a machine shared with other jobs, where wall time is not).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock: expected 'wall' or 'cpu', got {clock!r}")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = timer()
        fn()
        sync(device)
        times.append(timer() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict[str, str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_isolated(script: str, args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter so peak memory is its own; returns its JSON line."""
    # torch imports numpy, whose OpenBLAS thread pool no measurement uses; one thread keeps its idle spinning
    # out of the process CPU time that --clock cpu reads.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err[:200]}
    return json.loads(lines[-1])
