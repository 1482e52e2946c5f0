"""The SQLite results store: round trips, transactions, and files it must refuse to touch."""

from __future__ import annotations

import csv
import io
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from attnzoo.bench.store import ResultsStore, StoreError, environment, open_store

ENV = {"date": "2026-01-01T00:00:00+00:00", "device": "cpu", "torch": "x", "commit": "abc"}


def _add(store, mixer="mha", curves=((1, "train/loss", 2.0), (2, "train/loss", 1.0)), **kw):
    return store.add_run(kind="train", task="mqar(seq_len=64)", mixer=mixer, session="s1", env=ENV,
                         config={"lr": 1e-3, "mixer_kwargs": {"n_heads": 1}}, metrics={"accuracy": 0.5},
                         curves=curves, **kw)


def test_round_trip_list_show_export(tmp_path):
    path = tmp_path / "sub" / "results.sqlite"
    with open_store(path) as store:
        a = _add(store)
        b = store.add_run(kind="speed", session="s1", env=ENV, config={"lengths": [64]}, metrics={},
                          speed=[{"mixer": "mha", "n": 64, "mode": "fwd", "status": "ok", "time_s": 0.1,
                                  "peak_bytes": 10, "flops": 1e6, "ratio": 1.0, "detail": {"causal": True}},
                                 {"mixer": "mha", "n": 128, "mode": "fwd", "status": "oom", "detail": {}}])
    with open_store(path, create=False) as store:
        runs = store.runs()
        assert [r["id"] for r in runs] == [a, b] and runs[0]["config"]["mixer_kwargs"] == {"n_heads": 1}
        assert [r["id"] for r in store.runs(kind="train", mixer="mha")] == [a]
        shown = store.run(a)
        assert shown["curves"] == [(1, "train/loss", 2.0), (2, "train/loss", 1.0)] and shown["env"] == ENV
        speed = store.run(b)["speed"]
        assert [p["status"] for p in speed] == ["ok", "oom"] and speed[0]["detail"] == {"causal": True}
        assert store.sessions() == ["s1"]
        with pytest.raises(KeyError, match="no run with id 99"):
            store.run(99)
        buf = io.StringIO()
        assert store.export_csv(buf) == 1
        rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
        assert rows[0]["mixer"] == "mha" and rows[0]["metrics.accuracy"] == "0.5"
        assert rows[0]["config.mixer_kwargs"] == '{"n_heads": 1}'
        buf = io.StringIO()
        assert store.export_csv(buf, kind="speed") == 2
        assert "detail.causal" in buf.getvalue().splitlines()[0]


def test_missing_store_without_create(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.sqlite", create=False)
    assert not (tmp_path / "nope.sqlite").exists()


def test_exception_mid_write_leaves_no_rows(tmp_path):
    path = tmp_path / "r.sqlite"

    def curves():
        yield (1, "train/loss", 1.0)
        raise KeyboardInterrupt

    with open_store(path) as store:
        with pytest.raises(KeyboardInterrupt):
            _add(store, curves=curves())
        assert store.runs() == []
        _add(store)
        assert len(store.runs()) == 1


def test_killed_process_leaves_no_half_rows(tmp_path):
    path = tmp_path / "r.sqlite"
    with open_store(path) as store:
        _add(store)
    code = textwrap.dedent(f"""
        import os
        from attnzoo.bench.store import open_store
        def curves():
            yield (1, "train/loss", 1.0)
            os._exit(3)   # killed in the middle of the transaction
        store = open_store({str(path)!r})
        store.add_run(kind="train", config={{}}, metrics={{}}, env={{}}, curves=curves())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    with open_store(path) as store:
        runs = store.runs()
        assert len(runs) == 1
        assert store._conn.execute("SELECT COUNT(*) FROM curves").fetchone()[0] == 2


@pytest.mark.parametrize("content", [b"", b"hello, not a database\n", b"x" * 5000])
def test_foreign_file_is_never_touched(tmp_path, content):
    path = tmp_path / "results.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not an attnzoo results store"):
        open_store(path)
    assert path.read_bytes() == content


def test_other_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another application"):
        open_store(path)
    assert path.read_bytes() == before


def test_corrupt_store_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    with open_store(path) as store:
        for i in range(30):
            _add(store, mixer=f"m{i}", curves=[(s, "train/loss", float(s)) for s in range(200)])
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4096 * 2: 4096 * 6] = b"\xa5" * (4096 * 4)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        open_store(path)
    assert path.read_bytes() == bytes(data)


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(StoreError, match="is a directory"):
        ResultsStore(tmp_path)


def test_environment_fields():
    env = environment()
    for key in ("date", "machine", "cpu", "device", "torch", "attnzoo", "python", "commit"):
        assert key in env
