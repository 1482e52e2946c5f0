"""The results store: every benchmark run in an embedded SQLite database.

Default path ``./attnzoo-results/results.sqlite`` (``--store PATH`` on the command line). A run
is written in one transaction (its row, its per-step curves and its speed points together), so
an interrupted run leaves no half-written rows: an exception rolls the transaction back, and a
killed process leaves a log SQLite ignores or rolls back on the next open. A new store is built
in a temporary file and linked into place whole. The store runs in write-ahead-log mode, so
readers and writers of several processes do not block each other; a writer waits for another
writer's lock (``timeout``, then retries) instead of losing its run. A run that still cannot be
written (the lock held past the timeout, a full disk) is kept in a file beside the store
(``<store>.pending/``, written through a temporary file) and goes into the store the next time
it is opened for writing, once (the StoreError says where it is). A store opened for writing
is checked to be writable when it is opened, before any work. The file carries an
``application_id``; a file that is not SQLite, is another application's database, or is
corrupt gives a :class:`StoreError` and is never written to; every SQLite error reaches the
caller as a :class:`StoreError` of one line naming the store.

Each run records its configuration, metrics, curves and the environment: machine, device, torch
and Python versions, the attnzoo version and git commit, and the date (UTC).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import io
import json
import os
import platform
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


DEFAULT_TIMEOUT_S = 120.0
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_UNWRITABLE = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH)


class StoreError(RuntimeError):
    """The results store cannot be used (not SQLite, another application's file, corrupt, newer schema,
    read-only, locked by another process for longer than the timeout); the message is one line naming it."""


def _code(e: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``e`` (``SQLITE_BUSY``...), or None."""
    code = getattr(e, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _default_mode(path: Path, like: Path | None = None) -> None:
    """Give a temporary file (created 0600) the permissions of ``like`` if it exists, else those of a new file."""
    try:
        mode = like.stat().st_mode & 0o7777 if like is not None and like.exists() else None
    except OSError:
        mode = None
    if mode is None:
        umask = os.umask(0o022)
        os.umask(umask)
        mode = 0o666 & ~umask
    with contextlib.suppress(OSError):
        path.chmod(mode)


def _remove_stale(directory: Path, prefix: str, suffix: str, keep: Path, age_s: float = 600.0) -> None:
    """Remove temporary files of creations killed long ago (a creation takes milliseconds)."""
    now = time.time()
    for leftover in directory.glob(f"{glob_escape(prefix)}*{suffix}*"):
        with contextlib.suppress(OSError):
            if leftover != keep and now - leftover.stat().st_mtime > age_s:
                leftover.unlink()


def _rollback(conn: sqlite3.Connection) -> None:
    """Leave no transaction open on ``conn`` (a failed ROLLBACK has nothing left to undo)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


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
    """An open results store. Use :func:`open_store` (or the class) as a context manager.

    ``readonly``: open for reading only (a read-only file or directory is fine); otherwise the store is
    checked to be writable when it is opened, before any work. ``timeout``: seconds an operation waits
    for another process's lock (then a :class:`StoreError` saying the store is locked; default
    :data:`DEFAULT_TIMEOUT_S`).
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE, *, create: bool = True, readonly: bool = False,
                 timeout: float | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 <= timeout < 1e6):
            raise ValueError(f"timeout: expected seconds in [0, 1e6), got {timeout!r}")
        self.timeout = float(timeout)
        try:
            if self.path.exists():
                self._conn = self._open_existing()
            elif not create or readonly:
                raise StoreError(f"results store {str(self.path)!r} does not exist")
            else:
                self._conn = self._create()
            if not readonly:
                self._prepare_writes()
            self._conn.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                self._store_kept_runs()
        except sqlite3.Error as e:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self._conn.close()
            raise self._error(e, "opening it") from None

    # Opening ----------------------------------------------------------------------------------
    def _connect(self, mode: str) -> sqlite3.Connection:
        uri = f"file:{quote(self.path.resolve().as_posix())}?mode={mode}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=self.timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _open_existing(self) -> sqlite3.Connection:
        p = self.path
        if p.is_dir():
            raise StoreError(f"results store {str(p)!r} is a directory; give a file path "
                             f"(e.g. {str(p / 'results.sqlite')!r})")
        try:
            with p.open("rb") as f:
                head = f.read(len(_HEADER))
        except OSError as e:
            raise StoreError(f"results store {str(p)!r} cannot be read: {e.strerror or e}") from None
        if head != _HEADER:
            raise StoreError(f"{str(p)!r} is not an attnzoo results store (not an SQLite database); "
                             "it was left untouched; pass another path with --store")
        conn = None
        try:
            conn = self._connect("ro" if self.readonly else "rw")
            try:
                app = conn.execute("PRAGMA application_id").fetchone()[0]
            except sqlite3.OperationalError as e:
                if not (self.readonly and _code(e) in _UNWRITABLE):
                    raise
                # a WAL store in a read-only directory: nobody can write it, so read it as immutable
                conn.close()
                conn = self._connect("ro&immutable=1")
                app = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app != APPLICATION_ID:
                conn.close()
                raise StoreError(f"{str(p)!r} is an SQLite database of another application (application_id "
                                 f"{app:#x}, expected {APPLICATION_ID:#x}); it was left untouched")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as e:
            if conn is not None:
                conn.close()
            if _code(e) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreError(f"{str(p)!r} is corrupt ({e}); it was left untouched; move it away or pass another "
                                 "path with --store") from None
            raise self._error(e, "opening it") from None
        if check != "ok":
            conn.close()
            raise StoreError(f"{str(p)!r} is corrupt (integrity check: {check.splitlines()[0]}); it was left "
                             "untouched")
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{str(p)!r} was written by a newer attnzoo (schema {version} > {SCHEMA_VERSION})")
        return conn

    def _create(self) -> sqlite3.Connection:
        """Build the store in a temporary file beside it, then link it into place: the path never holds a
        half-made store (a process killed meanwhile leaves only its temporary file), and of two processes
        creating the same path one wins and the other opens the winner's store."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".creating", dir=parent)
        except OSError as e:
            raise StoreError(f"results store {str(self.path)!r} cannot be created in {str(parent)!r}: "
                             f"{e.strerror or e}") from None
        os.close(fd)
        tmp = Path(tmp_name)
        _default_mode(tmp)
        _remove_stale(parent, f".{self.path.name}.", ".creating", keep=tmp)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    conn.execute(stmt)
                conn.execute("COMMIT")
            finally:
                conn.close()  # the last connection: its write-ahead log is checkpointed into the file and removed
            try:
                os.link(tmp, self.path)  # fails if the path exists: never replaces a file
            except FileExistsError:
                pass  # another process created it first: use theirs
            except OSError:  # no hard links on this file system
                if not self.path.exists():
                    os.replace(tmp, self.path)
        except OSError as e:
            raise StoreError(f"results store {str(self.path)!r} cannot be created: {e.strerror or e}") from None
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        return self._open_existing()

    def _prepare_writes(self) -> None:
        """Write-ahead logging (readers and writers do not block each other), and a proof that this process
        may write here: the write lock taken and released, before any work."""
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            with contextlib.suppress(sqlite3.OperationalError):  # busy: stays in rollback-journal mode, still safe
                conn.execute("PRAGMA journal_mode = WAL")
        self._begin()
        try:  # a real write (rolled back): a read-only file or directory only fails here, not at BEGIN
            conn.execute(f"PRAGMA user_version = {conn.execute('PRAGMA user_version').fetchone()[0]}")
            conn.execute("CREATE TABLE attnzoo_write_probe (x)")
        finally:
            _rollback(conn)

    def _begin(self) -> None:
        """``BEGIN IMMEDIATE`` (the write lock), retried until :attr:`timeout` while another process holds it."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if _code(e) not in _BUSY or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 0.25)

    def _error(self, e: sqlite3.Error, doing: str) -> StoreError:
        """One line naming the store and what went wrong."""
        where = f"results store {str(self.path)!r}"
        detail = " ".join(str(e).split())
        code = _code(e)
        if code in _BUSY:
            msg = (f"{where} is locked by another process (waited {self.timeout:g} s while {doing}: {detail}); "
                   "nothing was written; try again when the other process is done")
        elif code in _UNWRITABLE:
            msg = (f"{where} cannot be written ({detail}): the file or its directory is read-only; nothing was "
                   "run; make them writable or pass another path with --store")
        elif code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            msg = f"{where} is corrupt ({detail}); move it away or pass another path with --store"
        elif code == sqlite3.SQLITE_FULL:
            msg = f"{where}: the disk is full ({detail}) while {doing}; nothing was written"
        else:
            msg = f"{where}: {doing} failed: {detail}"
        return StoreError(msg)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, doing: str, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``body`` in one write transaction; committed whole or not at all. A lock held by another process
        is waited for (and the transaction retried) until :attr:`timeout`."""
        if self.readonly:
            raise StoreError(f"results store {str(self.path)!r} was opened read-only; {doing} needs it writable")
        conn = self._conn
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                self._begin()
                try:
                    result = body(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.OperationalError as e:
                if _code(e) not in _BUSY or time.monotonic() + delay > deadline:
                    raise self._error(e, doing) from None
            except sqlite3.Error as e:
                raise self._error(e, doing) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.25)

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        try:
            yield self._conn
        except sqlite3.Error as e:
            raise self._error(e, doing) from None

    # Writing ----------------------------------------------------------------------------------
    def add_run(self, *, kind: str, config: dict[str, Any], metrics: dict[str, Any], env: dict[str, Any] | None = None,
                task: str | None = None, mixer: str | None = None, session: str | None = None,
                curves: Iterable[tuple[int, str, float]] = (), speed: Iterable[dict[str, Any]] = ()) -> int:
        """Insert one run with its curves and speed points in a single transaction; returns its id."""
        env = env if env is not None else environment()
        row = (kind, session, env.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               task, mixer, json.dumps(config, default=str), json.dumps(metrics, default=str),
               json.dumps(env, default=str))
        curve_rows = [(int(step), str(name), None if value is None else float(value)) for step, name, value in curves]
        speed_rows = [(*[p.get(c) for c in SPEED_COLUMNS[:-1]], json.dumps(p.get("detail") or {})) for p in speed]
        try:
            return self._write(f"storing a {kind} run", lambda conn: _insert_run(conn, row, curve_rows, speed_rows))
        except StoreError as e:
            if self.readonly:
                raise
            kept = self._keep_run(row, curve_rows, speed_rows, e)
            raise StoreError(f"{e}; the run is kept in {str(kept)!r} and goes into the store the next time it is "
                             "opened for writing") from None

    # Runs that could not be written -----------------------------------------------------------
    def kept_dir(self) -> Path:
        """Where runs that could not be written wait for the next opening for writing."""
        return Path(f"{self.path}.pending")

    def _keep_run(self, row: tuple, curve_rows: list, speed_rows: list, error: StoreError) -> Path:
        """Write the run to a file of its own in :meth:`kept_dir` (a temporary file renamed into place), marked
        ``env.kept_as`` with that name so that it is stored once; a StoreError naming both failures otherwise."""
        folder = self.kept_dir()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        name = f"run-{stamp}-{os.getpid()}-{os.urandom(4).hex()}.json"
        env = json.loads(row[7])
        env["kept_as"] = name
        data = {"row": [*row[:7], json.dumps(env, default=str)], "curves": curve_rows, "speed": speed_rows}
        tmp = folder / f".{name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"{error}; keeping the run in {str(folder)!r} failed too ({exc.strerror or exc}); it is "
                             f"lost; its metrics: {row[6][:400]}") from None
        return folder / name

    def _store_kept_runs(self) -> None:
        """Store the runs :meth:`_keep_run` left in :meth:`kept_dir` (each once: a run already in the store,
        from an earlier opening killed before it removed the file, is not stored again), then remove them."""
        folder = self.kept_dir()
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("run-*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                row, curve_rows, speed_rows = tuple(data["row"]), data["curves"], data["speed"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: left where it is, for a person to look at
            marker = f'%"kept_as": {json.dumps(path.name)}%'
            self._write(f"storing the kept run {path.name}",
                        functools.partial(_insert_once, marker=marker, row=row, curve_rows=curve_rows,
                                          speed_rows=speed_rows))
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty

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
        with self._reading("listing runs") as conn:
            return [self._row(r) for r in conn.execute(sql + " ORDER BY id", args)]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run with its ``curves`` and ``speed`` points; ``KeyError`` if there is none."""
        with self._reading(f"reading run {run_id}") as conn:
            r = conn.execute("SELECT id, kind, session, created, task, mixer, config, metrics, env FROM runs "
                             "WHERE id = ?", (run_id,)).fetchone()
            if r is None:
                raise KeyError(f"no run with id {run_id} in {str(self.path)!r}")
            out = self._row(r)
            out["curves"] = [tuple(c) for c in conn.execute(
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
        with self._reading("reading speed points") as conn:
            rows = conn.execute(sql + " ORDER BY s.run_id, s.rowid", args).fetchall()
        for row in rows:
            d = dict(zip(("run_id", *SPEED_COLUMNS), row))
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def sessions(self) -> list[str]:
        with self._reading("listing sessions") as conn:
            return [r[0] for r in conn.execute(
                "SELECT session FROM runs WHERE session IS NOT NULL GROUP BY session ORDER BY MAX(id)")]

    def export_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Flat rows for export: one per run (every kind, or ``kind``), or for ``kind="speed"`` one per
        speed point; nested values (config, metrics, env, details) become ``part.key`` columns."""
        if kind not in (None, "train", "speed"):
            raise ValueError(f"kind: expected 'train', 'speed' or None (every kind), got {kind!r}")
        if kind == "speed":
            rows = []
            for p in self.speed_points():
                d = {k: v for k, v in p.items() if k != "detail"}
                d.update({f"detail.{k}": _cell(v) for k, v in (p.get("detail") or {}).items()})
                rows.append(d)
            return rows
        rows = []
        for r in self.runs(kind=kind):
            d = {k: r.get(k) for k in ("id", "kind", "session", "created", "task", "mixer")}
            for part in ("config", "metrics", "env"):
                d.update({f"{part}.{k}": _cell(v) for k, v in (r.get(part) or {}).items()})
            rows.append(d)
        return rows

    def export_csv(self, out: io.TextIOBase | Any, *, kind: str | None = "train") -> int:
        """Write :meth:`export_rows` of ``kind`` to ``out`` as CSV; returns the number of rows."""
        rows = self.export_rows(kind)
        columns: list[str] = []
        for d in rows:
            columns += [c for c in d if c not in columns]
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return len(rows)

    def refuse_as_output(self, path: str | os.PathLike[str], option: str = "--output") -> None:
        """``ValueError`` when ``path`` is this store (by any name: a link, another spelling) or one of its
        journal files: writing an output there would destroy the runs."""
        target = Path(path)
        for own in (self.path, *(Path(f"{self.path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
            same = own.exists() and target.exists() and os.path.samefile(own, target)
            if same or own.resolve() == target.resolve():
                raise ValueError(f"{option}: {str(target)!r} is the results store {str(self.path)!r}"
                                 f"{'' if own == self.path else ' (its journal)'}; writing there would destroy the "
                                 "runs; give another file")

    def export_file(self, path: str | os.PathLike[str], write: Callable[[Any], int]) -> int:
        """Run ``write(file)`` on a temporary file beside ``path``, renamed into place once complete (an
        interrupted export leaves ``path`` as it was); the store itself (or its journal files) and a
        directory are refused as ``path``. Returns what ``write`` returns."""
        target = Path(path)
        self.refuse_as_output(target)
        if target.is_dir():
            raise ValueError(f"--output: {str(target)!r} is a directory; give a file path")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent if
                                   str(target.parent) else ".")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                n = write(f)
            _default_mode(Path(tmp), like=target)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return n

    def export_csv_file(self, path: str | os.PathLike[str], *, kind: str | None = "train") -> int:
        """:meth:`export_csv` into ``path`` through :meth:`export_file`."""
        return self.export_file(path, lambda f: self.export_csv(f, kind=kind))


def _insert_run(conn: sqlite3.Connection, row: tuple, curve_rows: list, speed_rows: list) -> int:
    """Insert one run (its ``runs`` row, curve points and speed points) in the open transaction; returns its id."""
    cur = conn.execute(
        "INSERT INTO runs (kind, session, created, task, mixer, config, metrics, env) VALUES (?,?,?,?,?,?,?,?)", row)
    run_id = int(cur.lastrowid)
    conn.executemany("INSERT INTO curves (run_id, step, name, value) VALUES (?,?,?,?)",
                     [(run_id, *c) for c in curve_rows])
    columns = ", ".join(SPEED_COLUMNS)
    conn.executemany(f"INSERT INTO speed (run_id, {columns}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     [(run_id, *r) for r in speed_rows])
    return run_id


def _insert_once(conn: sqlite3.Connection, *, marker: str, row: tuple, curve_rows: list, speed_rows: list) -> None:
    """:func:`_insert_run` unless a run whose ``env`` matches ``marker`` (a LIKE pattern) is already stored."""
    if conn.execute("SELECT 1 FROM runs WHERE env LIKE ? LIMIT 1", (marker,)).fetchone() is None:
        _insert_run(conn, row, curve_rows, speed_rows)


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v


def open_store(path: str | os.PathLike[str] | None = None, *, create: bool = True, readonly: bool = False,
               timeout: float | None = None) -> ResultsStore:
    """Open (and create, unless ``create=False`` or ``readonly``) the store at ``path`` (default
    :data:`DEFAULT_STORE`); see :class:`ResultsStore`."""
    return ResultsStore(DEFAULT_STORE if path is None else path, create=create, readonly=readonly, timeout=timeout)
