"""`attnzoo compare`, `train`, `bench speed`, `results` and `report`: end to end on tiny settings."""

from __future__ import annotations

import csv
import io
import json

import pytest

from attnzoo.bench.compare import get_preset, resolve_mixers, run_compare
from attnzoo.bench.report import build_report, leaderboard
from attnzoo.bench.store import open_store
from attnzoo.cli import main

TINY = {"max_steps": 4, "n_train": 64, "n_test": 32, "eval_every": 2, "lengths": [32]}


def test_compare_end_to_end(tmp_path, capsys):
    store = tmp_path / "r.sqlite"
    res = run_compare("quick", mixers=["mha", "gated_attention"], store=store, out=tmp_path / "rep", overrides=TINY,
                      progress=False, log=lambda s: None)
    with open_store(store, create=False) as db:
        runs = db.runs(session=res.session)
        train = [r for r in runs if r["kind"] == "train"]
        assert len(train) == 4 and {r["mixer"] for r in train} == {"mha", "gated_attention"}
        assert {r["task"] for r in train} == {"mqar(seq_len=64, num_kv_pairs=4)"}
        assert all(r["config"]["preset"] == "quick" and r["env"]["torch"] for r in train)
        points = db.speed_points(session=res.session)
        assert {p["mixer"] for p in points} == {"sdpa_dense", "mha", "gated_attention"}
        assert {p["n"] for p in points} == {32}
    cols, rows = res.leaderboard
    assert cols[1] == "mechanism" and {r[1] for r in rows} == {"mha", "gated_attention"}
    html = res.report.read_text()
    assert "Leaderboard" in html and "data:image/png;base64," in html
    assert (tmp_path / "rep" / "accuracy.png").exists() and (tmp_path / "rep" / "speed_time.png").exists()


def test_compare_checks_everything_before_training(tmp_path):
    store = tmp_path / "r.sqlite"
    with pytest.raises(ValueError, match=r"reversed_attention.*missing \['causal'\]"):
        run_compare("quick", mixers=["mha", "reversed_attention"], store=store, overrides=TINY, progress=False)
    with pytest.raises(ValueError, match=r"'gqa' cannot be built at width 64.*n_kv_heads: must divide n_heads=1"):
        run_compare("quick", mixers=["mha", "gqa"], store=store, overrides=TINY, progress=False)
    with pytest.raises(ValueError, match="valid presets: quick, zoology, zoology-cpu, full, pooling"):
        run_compare("fast", store=store)
    with pytest.raises(ValueError, match="seq_lens"):
        run_compare("quick", store=store, overrides={"seq_lens": [512]})
    assert not store.exists()
    store.write_text("not a database")
    with pytest.raises(Exception, match="not an attnzoo results store"):
        run_compare("quick", mixers=["mha"], store=store, overrides=TINY, progress=False, log=lambda s: None)
    assert store.read_text() == "not a database"


def test_a_failing_run_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    import attnzoo.bench.compare as C

    real = C.train

    def flaky(task, cfg, **kw):
        if cfg.mixer == "gated_attention":
            raise FloatingPointError("the loss became nan at step 3")
        return real(task, cfg, **kw)

    monkeypatch.setattr(C, "train", flaky)
    store = tmp_path / "r.sqlite"
    res = run_compare("quick", mixers=["gated_attention", "mha"], store=store, overrides={**TINY, "seq_lens": [64]},
                      speed=False, report=False, progress=False, log=lambda s: None)
    assert any("gated_attention" in n and "nan" in n for n in res.notes)
    with open_store(store, create=False) as db:
        runs = {r["mixer"]: r for r in db.runs()}
    assert runs["gated_attention"]["metrics"]["error"].startswith("FloatingPointError")
    assert runs["mha"]["metrics"]["accuracy"] is not None
    assert [r[1] for r in res.leaderboard[1]] == ["mha"]


def test_default_mixers_are_the_registered_candidates():
    chosen, notes = resolve_mixers(get_preset("quick"), None)
    assert chosen[0] == "mha"
    import attnzoo.bench.models as M

    usable = set(M.mixer_slugs())
    for m in ("base_conv", "sliding_window", "linear_attention"):
        assert (m in chosen) == (m in usable) or any(n.startswith(m) for n in notes)


def test_zoology_preset_is_figure_2():
    p = get_preset("zoology")
    assert [(s.task.seq_len, s.task.num_kv_pairs, s.batch_size) for s in p.settings] == [
        (64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)]
    assert p.dims == [64, 128, 256, 512] and p.lrs == [1e-4, 4.64e-4, 2.15e-3, 1e-2]
    assert all(s.epochs == 64 and s.n_train == 100_000 and s.n_test == 3_000 for s in p.settings)
    assert all(not s.task.random_non_queries for s in p.settings) and p.n_layers == 2


def _fake_store(path):
    env = {"date": "2026-01-01T00:00:00+00:00", "device": "cpu<&>", "torch": "2.x"}
    with open_store(path) as db:
        for mixer, acc in (("mha", 0.99), ("<script>alert(1)</script>", 0.3)):
            for dim in (64, 128):
                for lr in (1e-3, 1e-2):
                    db.add_run(kind="train", task="mqar(<b>x</b>)", mixer=mixer, session="s", env=env,
                               config={"dim": dim, "lr": lr}, metrics={"metric": "accuracy", "accuracy": acc * lr * 100
                                                                       if lr == 1e-2 else acc / 2},
                               curves=[(1, "test/accuracy", 0.1), (2, "test/accuracy", acc)])
        db.add_run(kind="speed", session="s", env=env, config={}, metrics={}, speed=[
            {"mixer": m, "n": n, "mode": "fwd+bwd", "status": "ok", "time_s": t * n, "peak_bytes": 1000 * n,
             "flops": 1e6, "ratio": t / 0.01, "detail": {"memory_ratio": 1.0}}
            for m, t in (("sdpa_dense", 0.01), ("mha", 0.005), ("<script>alert(1)</script>", 0.02)) for n in (64, 128)
        ] + [{"mixer": "mha", "n": 256, "mode": "fwd+bwd", "status": "oom", "detail": {"error": "<oom>"}}])


def test_report_escapes_and_leaderboard(tmp_path):
    path = tmp_path / "r.sqlite"
    _fake_store(path)
    with open_store(path) as db:
        html = build_report(db, tmp_path / "out").read_text()
        cols, rows = leaderboard(db.runs(kind="train"), db.speed_points())
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>x</b>" not in html and "&lt;oom&gt;" in html and "cpu&lt;&amp;&gt;" in html
    assert cols == ["#", "mechanism", "mqar(<b>x</b>)", "mean acc (learned tasks)", "fwd+bwd vs SDPA causal",
                    "memory vs SDPA causal", "at N", "train time per run (s)"]
    assert rows[0][1] == "mha" and rows[0][2] == "0.990" and rows[0][4] == "0.50x" and rows[0][6] == "128"
    assert rows[1][2] == "0.300"
    for png in ("accuracy.png", "curves.png", "speed_time.png", "speed_memory.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_results_and_report(tmp_path, capsys):
    path = tmp_path / "r.sqlite"
    _fake_store(path)
    assert main(["results", "list", "--store", str(path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 9
    assert main(["results", "list", "--store", str(path), "--kind", "speed"]) == 0
    assert "speed" in capsys.readouterr().out
    assert main(["results", "show", "1", "--store", str(path)]) == 0
    assert "metrics.accuracy" in capsys.readouterr().out
    assert main(["results", "show", "9", "--store", str(path)]) == 0
    assert "oom" in capsys.readouterr().out
    assert main(["results", "export", "--store", str(path)]) == 0  # every kind, one row per run, CSV
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 9 and rows[0]["config.dim"] == "64"
    assert [r["kind"] for r in rows].count("train") == 8 and [r["kind"] for r in rows].count("speed") == 1
    assert main(["results", "export", "--kind", "train", "--store", str(path)]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 8
    assert main(["results", "export", "--format", "json", "--store", str(path)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert {r["kind"] for r in runs} == {"train", "speed"} and any(r["speed"] for r in runs)
    out = tmp_path / "speed.csv"
    assert main(["results", "export", "--csv", "--kind", "speed", "--store", str(path), "-o", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 7
    assert main(["report", "--store", str(path), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").exists()
    capsys.readouterr()
    assert main(["results", "show", "99", "--store", str(path)]) == 2
    assert "no run with id 99" in capsys.readouterr().err
    assert main(["report", "--store", str(path), "--session", "nope"]) == 2
    assert "stored sessions: s" in capsys.readouterr().err


def test_cli_refuses_missing_and_foreign_stores(tmp_path, capsys):
    assert main(["results", "list", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00\x01 precious data")
    assert main(["results", "list", "--store", str(bad)]) == 2
    assert "not an attnzoo results store" in capsys.readouterr().err
    assert main(["bench", "speed", "--mixers", "mha", "--lengths", "32", "--store", str(bad), "--no-progress"]) == 2
    assert bad.read_bytes() == b"\x00\x01 precious data"


def test_cli_train_and_speed(tmp_path, capsys):
    path = tmp_path / "r.sqlite"
    assert main(["train", "--task", "mqar", "--task-arg", "seq_len=16", "--task-arg", "num_kv_pairs=2",
                 "--task-arg", "vocab_size=64", "--mixer", "mha", "--mixer-arg", "n_heads=2", "--dim", "32",
                 "--max-steps", "3", "--n-train", "64", "--n-test", "16", "--store", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mqar(seq_len=16, num_kv_pairs=2)" in out and "stored as run 1" in out
    assert main(["bench", "speed", "--mixers", "mha", "gqa", "--lengths", "32", "--dim", "32", "--heads", "2",
                 "--repeats", "1", "--store", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sdpa_dense" in out and "gqa" in out and "stored as run 2" in out
    assert main(["train", "--task", "mqar", "--task-arg", "pairs=2", "--no-store"]) == 2
    assert "valid options: seq_len" in capsys.readouterr().err
    assert main(["train", "--mixer", "reversed_attention", "--no-store"]) == 2
    assert "missing ['causal']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--task", "mqr"])
    assert "invalid choice: 'mqr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--preset", "fast"])
    assert "choose from 'quick', 'zoology', 'zoology-cpu', 'full', 'pooling'" in capsys.readouterr().err


def test_efficiency_length_cab_fit_and_measured():
    from attnzoo.bench.report import efficiency_length, measured_crossover

    ns = [1000, 2000, 4000, 8000, 16000]
    pts = [{"mixer": m, "n": n, "mode": "fwd", "status": "ok", "time_s": t(n), "peak_bytes": None}
           for m, t in (("sdpa_dense", lambda n: 1e-8 * n * n), ("lin", lambda n: 1e-4 * n)) for n in ns]
    assert efficiency_length(pts, "lin") == pytest.approx(10_000, rel=1e-6)
    assert measured_crossover(pts, "lin") == 16000
    assert efficiency_length(pts, "lin", key="peak_bytes") is None
    always = [dict(p, time_s=p["time_s"] / 1e3) if p["mixer"] == "lin" else p for p in pts]
    assert efficiency_length(always, "lin") == pytest.approx(10.0) and measured_crossover(always, "lin") == 1000


def test_report_takes_a_run_without_a_mixer(tmp_path):
    """A training run added through the API without a mixer does not break the report (it crashed sorting)."""
    path = tmp_path / "r.sqlite"
    _fake_store(path)
    with open_store(path) as db:
        db.add_run(kind="train", task="mqar(x)", session="s", env={"date": "2026-01-01T00:00:00+00:00"},
                   config={"dim": 64}, metrics={"metric": "accuracy", "accuracy": 0.5})
        assert build_report(db, tmp_path / "out").exists()


def _run(task: str, mixer: str, acc: float, seed: int = 0) -> dict:
    return {"task": task, "mixer": mixer, "config": {"dim": 64, "lr": 1e-3, "seed": seed},
            "metrics": {"metric": "accuracy", "accuracy": acc, "higher_is_better": True}}


def test_leaderboard_shows_spread_over_seeds_and_does_not_rank_an_unlearned_task():
    runs = [_run("mqar(64)", "mha", 0.98, 0), _run("mqar(64)", "mha", 0.94, 1),
            _run("mqar(64)", "base_conv", 0.30, 0), _run("mqar(64)", "base_conv", 0.20, 1),
            _run("mqar(128)", "mha", 0.03, 0), _run("mqar(128)", "base_conv", 0.01, 0)]
    cols, rows = leaderboard(runs, [])
    assert cols[2] == "mqar(64)" and cols[3] == "mqar(128) (not learned in budget)"
    assert rows[0][:3] == ["1", "mha", "0.960 ± 0.028"] and rows[0][4] == "0.960"  # mqar(128) not in the mean
    assert rows[1][:3] == ["2", "base_conv", "0.250 ± 0.071"]


def test_leaderboard_ranks_nothing_when_nothing_learned():
    cols, rows = leaderboard([_run("mqar(128)", "mha", 0.03), _run("mqar(128)", "lightning", 0.001)], [])
    assert cols[2].endswith("(not learned in budget)")
    assert [r[0] for r in rows] == ["-", "-"] and all(r[3] == "" for r in rows)


def test_report_labels_extrapolated_fits_and_writes_booleans_as_words(tmp_path):
    from attnzoo.bench.report import _fit_cell

    assert _fit_cell(11_600_000.0, [256, 1024, 16384]) == "11600000 (extrapolated; measured to 16384)"
    assert _fit_cell(3000.0, [256, 1024, 16384]) == "3000"
    assert _fit_cell(0.0, [256, 1024]) == "< 256" and _fit_cell(None, [256]) == ""
    path = tmp_path / "r.sqlite"
    with open_store(path) as db:
        env = {"date": "2026-01-01T00:00:00+00:00"}
        db.add_run(kind="train", task="mqar(x)", mixer="mha", session="s", env=env, config={"dim": 64, "lr": 1e-3},
                   metrics={"metric": "accuracy", "accuracy": 0.99, "stopped_early": True, "stopped_by_time": False})
        db.add_run(kind="speed", session="s", env=env, config={}, metrics={}, speed=[
            {"mixer": m, "n": n, "mode": "fwd", "status": "ok", "time_s": t(n), "peak_bytes": None, "flops": None,
             "ratio": t(n) / (1e-8 * n * n), "detail": {}}
            for m, t in (("sdpa_dense", lambda n: 1e-8 * n * n), ("lin", lambda n: 1e-3 * n))
            for n in (256, 512, 1024)])
        html = build_report(db, tmp_path / "out").read_text()
    training = html[html.index("<h2>Training runs</h2>"):html.index("<h2>Speed and memory</h2>")]
    assert "<td>yes</td><td>no</td>" in training and "True" not in training and "False" not in training
    cab = html[html.index("<h2>Efficiency length (CAB)</h2>"):]
    assert "100000 (extrapolated; measured to 1024)" in cab and "<th>time fwd: measured</th>" in cab


def test_accuracy_plot_has_seed_error_bars_and_axis_labels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from attnzoo.bench import report

    seen = {"errorbar": [], "ylabel": []}
    runs = [dict(_run("mqar(64)", "mha", acc, seed), id=i) for i, (acc, seed) in enumerate(((0.98, 0), (0.94, 1)))]
    plt = report._plt()
    real_subplots = plt.subplots

    def spy_subplots(*a, **k):
        fig, axes = real_subplots(*a, **k)
        for ax in axes.flat:
            eb, yl = ax.errorbar, ax.set_ylabel
            ax.errorbar = lambda *a, eb=eb, **k: (seen["errorbar"].append(k.get("yerr")), eb(*a, **k))[1]
            ax.set_ylabel = lambda t, yl=yl, **k: (seen["ylabel"].append(t), yl(t, **k))[1]
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy_subplots)
    assert report._accuracy_figure(plt, runs)[:4] == b"\x89PNG"
    assert seen["errorbar"] == [[pytest.approx(0.0283, abs=1e-4)]]
    curves = {i: [(1, "test/accuracy", 0.5), (2, "test/accuracy", 0.9)] for i in (0, 1)}
    assert report._curves_figure(plt, runs, curves)[:4] == b"\x89PNG"
    assert seen["ylabel"] == ["test accuracy (mean ± sd over seeds)", "test accuracy"]
    plt.close("all")
