"""Start-up time of the ``attnzoo`` command line: ``--help``, ``list``, ``info mha``, each in a fresh process.

    python benchmarks/bench_cli_startup.py [--repeats 7] [--baseline PATH]

``--baseline PATH`` times another checkout too (e.g. an export of an older commit:
``git archive COMMIT | tar -x -C /tmp/old``), alternating with this one so both see the same load.
``python -c "import torch"`` is timed alongside as the reference cost the fast commands avoid. The
registry snapshot of ``list`` / ``info`` is built once before timing (it is cached across runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["list"], ["info", "mha"])


def _time(cmd: list[str], root: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default: 7)")
    ap.add_argument("--baseline", type=Path, help="another checkout to time alongside (default: none)")
    args = ap.parse_args()
    roots = {"this": ROOT, **({"baseline": args.baseline} if args.baseline else {})}
    for root in roots.values():  # warm the registry snapshot and the file cache
        for c in COMMANDS:
            _time([sys.executable, "-m", "attnzoo", *c], root)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        times.setdefault(("-", "import torch"), []).append(_time([sys.executable, "-c", "import torch"], ROOT))
        for name, root in roots.items():
            for c in COMMANDS:
                times.setdefault((name, " ".join(c)), []).append(_time([sys.executable, "-m", "attnzoo", *c], root))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"{'checkout':>9} {'command':>14} {'median s':>9} {'min':>6} {'max':>6}")
    for (name, c), ts in times.items():
        print(f"{name:>9} {c:>14} {statistics.median(ts):>9.3f} {min(ts):>6.3f} {max(ts):>6.3f}")


if __name__ == "__main__":
    main()
