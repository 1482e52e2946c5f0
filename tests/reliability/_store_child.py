"""A child process for the store fault tests: writes (or reads) runs until it is done or killed.

It loads ``attnzoo/bench/store.py`` on its own (the module needs only the standard library), so that a child
starts in milliseconds instead of importing torch. Usage::

    python _store_child.py write STORE WRITER RUNS CURVES     # RUNS runs of CURVES curve points each
    python _store_child.py chain DIR CURVES                   # new stores DIR/s0.sqlite, s1.sqlite, ... forever
    python _store_child.py read STORE SECONDS CURVES          # read and check runs for SECONDS, holding transactions
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

_STORE_PY = Path(__file__).resolve().parents[2] / "attnzoo" / "bench" / "store.py"


def load_store():
    spec = importlib.util.spec_from_file_location("attnzoo_store_under_test", _STORE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curves(n: int, tag: int) -> list[tuple[int, str, float]]:
    return [(step, "train/loss", float(tag + step)) for step in range(n)]


def _ready() -> None:
    print("ready", flush=True)  # the parent times its kill -9 from here


def write(store_mod, path: str, writer: int, runs: int, curves: int) -> None:
    with store_mod.open_store(path) as db:
        _ready()
        for seq in range(runs):
            db.add_run(kind="train", config={"writer": writer, "seq": seq}, env={},
                       metrics={"writer": writer, "seq": seq, "curves": curves},
                       task="t", mixer=f"w{writer}", curves=_curves(curves, seq))


def chain(store_mod, directory: str, curves: int) -> None:
    i = 0
    _ready()
    while True:
        with store_mod.open_store(Path(directory) / f"s{i}.sqlite") as db:
            db.add_run(kind="train", config={}, env={}, metrics={"curves": curves}, curves=_curves(curves, i))
        i += 1


def read(store_mod, path: str, seconds: float, curves: int) -> None:
    import sqlite3

    deadline = time.monotonic() + seconds
    reads = 0
    while time.monotonic() < deadline:
        if not Path(path).exists():  # the writers have not created it yet
            time.sleep(0.01)
            continue
        with store_mod.open_store(path, readonly=True) as db:
            for run in db.runs():
                full = db.run(run["id"])
                if len(full["curves"]) != run["metrics"]["curves"]:
                    raise SystemExit(f"run {run['id']} is partial: {len(full['curves'])} curve points")
            conn = sqlite3.connect(path, timeout=60)  # a reader holding a transaction while the writers commit
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM curves").fetchone()
            time.sleep(0.05)
            conn.execute("COMMIT")
            conn.close()
        reads += 1
    print(f"reads {reads}")


def main() -> None:
    store_mod = load_store()
    what, args = sys.argv[1], sys.argv[2:]
    if what == "write":
        write(store_mod, args[0], int(args[1]), int(args[2]), int(args[3]))
    elif what == "chain":
        chain(store_mod, args[0], int(args[1]))
    elif what == "read":
        read(store_mod, args[0], float(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown action {what!r}")


if __name__ == "__main__":
    main()
