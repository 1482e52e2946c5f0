"""The results store under faults: kill -9 at random points, concurrent writers and readers, read-only files and
directories, held locks, failed commits, racing creators, and an export aimed at the store itself."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attnzoo.bench.store import ResultsStore, StoreError, open_store
from attnzoo.cli import main

CHILD = Path(__file__).with_name("_store_child.py")


def _add(db: ResultsStore, seq: int = 0, curves: int = 3) -> int:
    return db.add_run(kind="train", task="t", mixer="mha", config={"seq": seq}, env={},
                      metrics={"seq": seq, "curves": curves},
                      curves=[(s, "train/loss", float(s)) for s in range(curves)])


def _check_complete(path: Path) -> list[dict]:
    """Every run in the store has all its curve points; the file passes SQLite's integrity check."""
    with open_store(path, readonly=True) as db:
        assert db._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = db.runs()
        counts = dict(db._conn.execute("SELECT run_id, COUNT(*) FROM curves GROUP BY run_id").fetchall())
    for r in runs:
        assert counts.get(r["id"], 0) == r["metrics"]["curves"], f"run {r['id']} is partial"
    assert set(counts) <= {r["id"] for r in runs}, "curve points without their run"
    return runs


def _child(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _writable(path: Path) -> bool:
    try:
        if path.is_dir():
            probe = path / ".write-probe"
            probe.touch()
            probe.unlink()
        else:
            with path.open("ab"):
                pass
    except OSError:
        return False
    return True


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` (a file or a directory) read-only for this process: permission bits, or for root (who ignores
    them) the immutable attribute; skips the test where neither holds."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if _writable(path) and shutil.which("chattr"):
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if _writable(path):
            pytest.skip("cannot make a path read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(mode & 0o7777)


# export onto the store ------------------------------------------------------------------------
def test_export_onto_the_store_is_refused(tmp_path, capsys):
    store = tmp_path / "S.sqlite"
    with open_store(store) as db:
        for i in range(3):
            _add(db, i)
    before = store.read_bytes()
    link = tmp_path / "link.sqlite"
    link.symlink_to(store)
    hard = tmp_path / "hard.sqlite"
    os.link(store, hard)
    for target in (store, link, hard, Path(f"{store}-wal")):
        capsys.readouterr()
        assert main(["results", "export", "--csv", "-o", str(target), "--store", str(store)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is the results store" in err, err
    assert store.read_bytes() == before
    assert len(_check_complete(store)) == 3
    out = tmp_path / "runs.csv"
    assert main(["results", "export", "--csv", "-o", str(out), "--store", str(store)]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_interrupted_export_leaves_the_old_file(tmp_path, monkeypatch):
    store, out = tmp_path / "S.sqlite", tmp_path / "runs.csv"
    out.write_text("old export\n")
    with open_store(store) as db:
        _add(db)

        def fail(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(db, "export_csv", fail)
        with pytest.raises(KeyboardInterrupt):
            db.export_csv_file(out)
    assert out.read_text() == "old export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.sqlite", "runs.csv"]


# read-only stores and directories -------------------------------------------------------------
def test_read_only_store_is_refused_before_work_and_still_readable(tmp_path, monkeypatch, capsys):
    store = tmp_path / "S.sqlite"
    with open_store(store) as db:
        _add(db)
    before = store.read_bytes()
    import attnzoo.bench.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("training started although the store cannot be written")

    monkeypatch.setattr(train_mod, "train", no_training)
    with read_only(store):
        with pytest.raises(StoreError, match="cannot be written"):
            open_store(store)
        assert main(["train", "--store", str(store), "--max-steps", "1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(store) in err and ("not writable" in err or "cannot be written" in
                                                                     err), err
        assert main(["results", "list", "--store", str(store)]) == 0
        with open_store(store, readonly=True) as db:
            assert len(db.runs()) == 1
    assert store.read_bytes() == before


def test_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    store = d / "S.sqlite"
    with open_store(store) as db:
        _add(db)
    with read_only(d):
        with pytest.raises(StoreError, match="cannot be created"):
            open_store(d / "new.sqlite")
        with pytest.raises(StoreError, match="cannot be written"):
            ResultsStore(store)
        with open_store(store, readonly=True) as db:
            assert len(db.runs()) == 1
    assert not (d / "new.sqlite").exists()
    assert len(_check_complete(store)) == 1


def test_readonly_store_refuses_writes_with_one_line(tmp_path):
    store = tmp_path / "S.sqlite"
    open_store(store).close()
    with open_store(store, readonly=True) as db, pytest.raises(StoreError, match="opened read-only"):
        _add(db)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.sqlite", readonly=True)


# locks ----------------------------------------------------------------------------------------
def test_a_held_write_lock_is_reported_as_a_lock(tmp_path):
    store = tmp_path / "S.sqlite"
    with open_store(store) as db:
        _add(db)
    other = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="locked by another process") as err:
            open_store(store, timeout=0.3)
        assert "corrupt" not in str(err.value) and "\n" not in str(err.value)
        assert time.monotonic() - t0 < 10
        with open_store(store, readonly=True) as db:  # readers are not blocked by a writer
            assert len(db.runs()) == 1
        release = threading.Timer(0.5, other.execute, ("ROLLBACK",))
        release.start()
        with open_store(store, timeout=60) as db:  # a writer waits for the lock instead of failing
            _add(db, 1)
        release.join()
    finally:
        other.close()
    assert len(_check_complete(store)) == 2


def test_a_run_the_locked_store_cannot_take_is_kept_and_stored_at_the_next_opening(tmp_path):
    store = tmp_path / "S.sqlite"
    with open_store(store) as db:
        _add(db)
    db = open_store(store, timeout=0.3)
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked by another process") as err:
            _add(db, 1, curves=7)
    finally:
        other.execute("ROLLBACK")
        other.close()
    message = str(err.value)
    kept = list(db.kept_dir().glob("run-*.json"))
    assert len(kept) == 1 and str(kept[0]) in message and "next time it is opened for writing" in message
    assert "\n" not in message
    db.close()
    with open_store(store, readonly=True) as ro:  # reading does not take it in
        assert len(ro.runs()) == 1 and kept[0].exists()
    saved = kept[0].read_bytes()
    with open_store(store) as db2:
        assert [r["metrics"]["seq"] for r in db2.runs()] == [0, 1]
        assert db2.runs()[1]["env"]["kept_as"] == kept[0].name
    assert not db.kept_dir().exists()
    # an opening killed after storing it but before removing the file: the next opening does not store it twice
    db.kept_dir().mkdir()
    kept[0].write_bytes(saved)
    with open_store(store) as db3:
        assert [r["metrics"]["seq"] for r in db3.runs()] == [0, 1]
    assert not kept[0].exists()
    assert len(_check_complete(store)) == 2


def test_a_run_that_cannot_be_kept_either_says_so(tmp_path):
    store = tmp_path / "S.sqlite"
    db = open_store(store, timeout=0.2)
    Path(f"{store}.pending").write_text("in the way")  # the folder cannot be made
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="failed too") as err:
            _add(db, 5)
    finally:
        other.execute("ROLLBACK")
        other.close()
        db.close()
    assert '"seq": 5' in str(err.value) and "\n" not in str(err.value)


def _legacy_store(path: Path) -> None:
    """A store in rollback-journal mode (as earlier versions made them)."""
    with open_store(path) as db:
        _add(db)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()


def test_exclusive_lock_on_a_legacy_store_is_a_lock_not_corruption(tmp_path):
    store = tmp_path / "S.sqlite"
    _legacy_store(store)
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        for readonly in (True, False):
            with pytest.raises(StoreError, match="locked by another process"):
                open_store(store, readonly=readonly, timeout=0.2)
    finally:
        other.execute("ROLLBACK")
        other.close()
    with open_store(store) as db:  # converted to write-ahead logging by the first writer
        assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cli_reports_a_locked_store_in_one_line(tmp_path, monkeypatch, capsys):
    import attnzoo.bench.store as store_mod

    store = tmp_path / "S.sqlite"
    _legacy_store(store)
    monkeypatch.setattr(store_mod, "DEFAULT_TIMEOUT_S", 0.2)
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        for argv in (["results", "list"], ["results", "show", "1"], ["report"],
                     ["bench", "speed", "--lengths", "16", "--dim", "8", "--no-progress"]):
            assert main([*argv, "--store", str(store)]) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and str(store) in err and "locked by another process" in err, err
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_failed_commit_is_rolled_back_and_the_store_stays_usable(tmp_path):
    """Rollback-journal mode with a reader holding a transaction: COMMIT cannot finish. The run is rolled back
    (no partial rows, the connection is not left in a transaction), reported as a lock, and storing it later works."""
    store = tmp_path / "S.sqlite"
    _legacy_store(store)
    reader = sqlite3.connect(store, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM runs").fetchone()
    try:
        db = open_store(store, timeout=0.3)  # the reader blocks the switch to WAL: stays in rollback mode
        assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        with pytest.raises(StoreError, match="locked by another process"):
            _add(db, 1, curves=50)
        assert not db._conn.in_transaction
    finally:
        reader.execute("COMMIT")
        reader.close()
    _add(db, 2, curves=50)
    db.close()
    runs = _check_complete(store)
    assert [r["metrics"]["seq"] for r in runs] == [0, 2]


# creation -------------------------------------------------------------------------------------
def test_racing_creators_never_leave_a_broken_store(tmp_path):
    """Threads creating the same new store at once: one creates it, the others open it; no 'not an SQLite
    database', no leftover temporary files, every run kept."""
    for trial in range(25):
        path = tmp_path / f"race{trial}" / "results.sqlite"
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def create(i: int, path: Path = path, barrier: threading.Barrier = barrier,
                   errors: list[BaseException] = errors) -> None:
            try:
                barrier.wait()
                with open_store(path) as db:
                    _add(db, i)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sorted(r["metrics"]["seq"] for r in _check_complete(path)) == [0, 1, 2, 3]
        assert [p.name for p in path.parent.iterdir() if "creating" in p.name] == []


def _kill_rounds(tmp_path: Path, rounds: int, seed: int) -> int:
    """Start a child that creates store after store (each with a run), kill -9 it at a random moment, check
    every store it left. Returns the number of kills survived (all, or the test fails)."""
    rnd = random.Random(seed)
    survived = created = 0
    for r in range(rounds):
        d = tmp_path / f"round{r}"
        d.mkdir(parents=True)
        proc = _child("chain", d, 40)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        for store in d.glob("s*.sqlite"):
            _check_complete(store)  # never "not an SQLite database", never a partial run
            created += 1
        survived += 1
    assert created >= rounds // 2, "the children were killed before creating stores: the test proved nothing"
    return survived


def _kill_writer_rounds(tmp_path: Path, rounds: int, seed: int) -> int:
    """Kill -9 a writer of one shared store at random moments; after each kill the store is intact and every run
    the writers finished is there."""
    rnd = random.Random(seed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = tmp_path / "shared.sqlite"
    open_store(store).close()
    stored = 0
    for r in range(rounds):
        proc = _child("write", store, r, 100_000, 30)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = len(_check_complete(store))
        assert now >= stored  # nothing committed is ever lost
        stored = now
    assert stored > 0, "the writers were killed before storing anything: the test proved nothing"
    return rounds


def test_kill_9_at_random_points(tmp_path):
    assert _kill_rounds(tmp_path / "create", 6, seed=1) == 6
    assert _kill_writer_rounds(tmp_path / "write", 6, seed=2) == 6


@pytest.mark.slow
def test_kill_9_at_random_points_many(tmp_path):
    assert _kill_rounds(tmp_path / "create", 60, seed=3) == 60
    assert _kill_writer_rounds(tmp_path / "write", 60, seed=4) == 60


# concurrency ----------------------------------------------------------------------------------
def concurrent_writers(path: Path, writers: int, runs: int, readers: int, curves: int = 10) -> dict[str, float]:
    """``writers`` processes storing ``runs`` runs each into one new store while ``readers`` processes read it;
    returns the figures (runs expected, stored, lost, seconds). Fails on any lost, duplicated or partial run."""
    t0 = time.monotonic()
    procs = [_child("write", path, w, runs, curves) for w in range(writers)]
    reading = [_child("read", path, 3.0, curves) for _ in range(readers)]
    failures = []
    for p in procs + reading:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            failures.append(err.strip().splitlines()[-1:] or [f"exit {p.returncode}"])
    stored = _check_complete(path)
    seen = sorted((r["metrics"]["writer"], r["metrics"]["seq"]) for r in stored)
    expected = [(w, s) for w in range(writers) for s in range(runs)]
    figures = {"writers": writers, "runs": writers * runs, "stored": len(stored),
               "lost": len(set(expected) - set(seen)), "seconds": time.monotonic() - t0}
    assert not failures, failures
    assert seen == expected, figures
    return figures


def test_eight_writers_and_readers_lose_nothing(tmp_path):
    figures = concurrent_writers(tmp_path / "S.sqlite", writers=8, runs=125, readers=2)
    assert figures["lost"] == 0 and figures["stored"] == 1000


@pytest.mark.slow
def test_eight_writers_and_readers_lose_nothing_long(tmp_path):
    figures = concurrent_writers(tmp_path / "S.sqlite", writers=8, runs=500, readers=4, curves=50)
    assert figures["lost"] == 0 and figures["stored"] == 4000


def test_files_of_creations_killed_long_ago_are_removed(tmp_path):
    """A creation killed by kill -9 leaves its temporary file; the next creation in that directory removes those
    older than ten minutes (a creation takes milliseconds), never a recent one (it may be in progress)."""
    stale, recent = tmp_path / ".r.sqlite.a1.creating", tmp_path / ".r.sqlite.b2.creating-wal"
    for p in (stale, recent):
        p.write_bytes(b"")
    os.utime(stale, (time.time() - 3600,) * 2)
    open_store(tmp_path / "r.sqlite").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [recent.name, "r.sqlite"]
