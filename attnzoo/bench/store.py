"""The results store: every benchmark run in an embedded SQLite database.

Default path ``./attnzoo-results/results.sqlite`` (``--store PATH`` on the command line). A run
is written in one transaction (its row, its per-step curves and its speed points together), so
an interrupted run leaves no half-written rows: an exception rolls the transaction back, and a
killed process leaves a journal SQLite rolls back on the next open. The file carries an
``application_id``; a file that is not SQLite, is another application's database, or is
corrupt gives a :class:`StoreError` and is never written to.

Each run records its configuration, metrics, curves and the environment: machine, device, torch
and Python versions, the attnzoo version and git commit, and the date (UTC).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import platform
import sqlite3
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STORE", "ResultsStore", "StoreError", "environment", "open_store"]

DEFAULT_STORE = Path("attnzoo-results") / "results.sqlite"
APPLICATION_ID = 0x41545A52  # "ATZR"
SCHEMA_VERSION = 1
_HEADER = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    session TEXT,
    created TEXT NOT NULL,
    task TEXT,
    mixer TEXT,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    env TEXT NOT NULL
);
CREATE TABLE curves (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL
);
CREATE TABLE speed (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    mixer TEXT NOT NULL,
    n INTEGER NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    time_s REAL,
    peak_bytes INTEGER,
    flops REAL,
    ratio REAL,
    detail TEXT
);
CREATE INDEX curves_run ON curves(run_id);
CREATE INDEX speed_run ON speed(run_id);
"""

SPEED_COLUMNS = ("mixer", "n", "mode", "status", "time_s", "peak_bytes", "flops", "ratio", "detail")


class StoreError(RuntimeError):
    """The results store cannot be used (not SQLite, another application's file, corrupt, newer schema)."""


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """Machine, device, versions, commit and date of a run."""
    import torch

    import attnzoo

    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "attnzoo": attnzoo.__version__,
        "commit": _git_commit(), "device": dev,
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    else:
        env["device_name"] = env["cpu"]
    return env


class ResultsStore:
    """An open results store. Use :func:`open_store` (or the class) as a context manager."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE, *, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists():
            self._conn = self._open_existing()
        elif not create:
            raise StoreError(f"results store {str(self.path)!r} does not exist")
        else:
            self._conn = self._create()
        self._conn.execute("PRAGMA foreign_keys = ON")

    # Opening ----------------------------------------------------------------------------------
    def _open_existing(self) -> sqlite3.Connection:
        p = self.path
        if p.is_dir():
            raise StoreError(f"results store {str(p)!r} is a directory; give a file path "
                             f"(e.g. {str(p / 'results.sqlite')!r})")
        with p.open("rb") as f:
            head = f.read(len(_HEADER))
        if head != _HEADER:
            raise StoreError(f"{str(p)!r} is not an attnzoo results store (not an SQLite database); "
                             "it was left untouched; pass another path with --store")
        try:
            conn = sqlite3.connect(f"file:{p.resolve().as_posix()}?mode=rw", uri=True, isolation_level=None)
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app != APPLICATION_ID:
                conn.close()
                raise StoreError(f"{str(p)!r} is an SQLite database of another application (application_id "
                                 f"{app:#x}, expected {APPLICATION_ID:#x}); it was left untouched")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{str(p)!r} is corrupt ({e}); it was left untouched; move it away or pass another "
                             "path with --store") from None
        if check != "ok":
            conn.close()
            raise StoreError(f"{str(p)!r} is corrupt (integrity check: {check}); it was left untouched")
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{str(p)!r} was written by a newer attnzoo (schema {version} > {SCHEMA_VERSION})")
        return conn

    def _create(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "x" fails if another process created the file in between: never overwrite a file.
        try:
            with self.path.open("xb"):
                pass
        except FileExistsError:
            return self._open_existing()
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            if self.path.stat().st_size == 0:  # our own empty file: leave nothing behind
                self.path.unlink()
            raise
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # Writing ----------------------------------------------------------------------------------
    def add_run(self, *, kind: str, config: dict[str, Any], metrics: dict[str, Any], env: dict[str, Any] | None = None,
                task: str | None = None, mixer: str | None = None, session: str | None = None,
                curves: Iterable[tuple[int, str, float]] = (), speed: Iterable[dict[str, Any]] = ()) -> int:
        """Insert one run with its curves and speed points in a single transaction; returns its id."""
        env = env if env is not None else environment()
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (kind, session, created, task, mixer, config, metrics, env) VALUES (?,?,?,?,?,?,?,?)",
                (kind, session, env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 task, mixer, json.dumps(config, default=str), json.dumps(metrics, default=str),
                 json.dumps(env, default=str)),
            )
            run_id = int(cur.lastrowid)
            for step, name, value in curves:
                conn.execute("INSERT INTO curves (run_id, step, name, value) VALUES (?,?,?,?)",
                             (run_id, int(step), str(name), None if value is None else float(value)))
            for row in speed:
                conn.execute(
                    "INSERT INTO speed (run_id, " + ", ".join(SPEED_COLUMNS) + ") VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (run_id, *[row.get(c) for c in SPEED_COLUMNS[:-1]], json.dumps(row.get("detail") or {})),
                )
        return run_id

    # Reading ----------------------------------------------------------------------------------
    @staticmethod
    def _row(r: sqlite3.Row | tuple) -> dict[str, Any]:
        rid, kind, session, created, task, mixer, config, metrics, env = r
        return {"id": rid, "kind": kind, "session": session, "created": created, "task": task, "mixer": mixer,
                "config": json.loads(config), "metrics": json.loads(metrics), "env": json.loads(env)}

    def runs(self, *, kind: str | None = None, session: str | None = None, task: str | None = None,
             mixer: str | None = None) -> list[dict[str, Any]]:
        """Runs (oldest first), optionally filtered."""
        where, args = [], []
        for col, val in (("kind", kind), ("session", session), ("task", task), ("mixer", mixer)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT id, kind, session, created, task, mixer, config, metrics, env FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._row(r) for r in self._conn.execute(sql + " ORDER BY id", args)]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run with its ``curves`` and ``speed`` points; ``KeyError`` if there is none."""
        r = self._conn.execute("SELECT id, kind, session, created, task, mixer, config, metrics, env FROM runs "
                               "WHERE id = ?", (run_id,)).fetchone()
        if r is None:
            raise KeyError(f"no run with id {run_id} in {str(self.path)!r}")
        out = self._row(r)
        out["curves"] = [tuple(c) for c in self._conn.execute(
            "SELECT step, name, value FROM curves WHERE run_id = ? ORDER BY name, step", (run_id,))]
        out["speed"] = self.speed_points(run_id)
        return out

    def speed_points(self, run_id: int | None = None, *, session: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT s.run_id, " + ", ".join(f"s.{c}" for c in SPEED_COLUMNS) + " FROM speed s JOIN runs r ON " \
              "r.id = s.run_id"
        args: list[Any] = []
        if run_id is not None:
            sql += " WHERE s.run_id = ?"
            args.append(run_id)
        elif session is not None:
            sql += " WHERE r.session = ?"
            args.append(session)
        out = []
        for row in self._conn.execute(sql + " ORDER BY s.run_id, s.rowid", args):
            d = dict(zip(("run_id", *SPEED_COLUMNS), row))
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def sessions(self) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT session FROM runs WHERE session IS NOT NULL GROUP BY session ORDER BY MAX(id)")]

    def export_csv(self, out: io.TextIOBase | Any, *, kind: str = "train") -> int:
        """Write runs of ``kind`` (``train``: one row per run; ``speed``: one row per speed point) as CSV."""
        if kind == "speed":
            rows = []
            for p in self.speed_points():
                d = {k: v for k, v in p.items() if k != "detail"}
                d.update({f"detail.{k}": v for k, v in p["detail"].items()})
                rows.append(d)
        elif kind == "train":
            rows = []
            for r in self.runs(kind="train"):
                d = {k: r[k] for k in ("id", "session", "created", "task", "mixer")}
                d.update({f"config.{k}": _cell(v) for k, v in r["config"].items()})
                d.update({f"metrics.{k}": _cell(v) for k, v in r["metrics"].items()})
                d.update({f"env.{k}": _cell(v) for k, v in r["env"].items()})
                rows.append(d)
        else:
            raise ValueError(f"kind: expected 'train' or 'speed', got {kind!r}")
        columns: list[str] = []
        for d in rows:
            columns += [c for c in d if c not in columns]
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return len(rows)


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v


def open_store(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> ResultsStore:
    """Open (and create, unless ``create=False``) the store at ``path`` (default :data:`DEFAULT_STORE`)."""
    return ResultsStore(DEFAULT_STORE if path is None else path, create=create)
