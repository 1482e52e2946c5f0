"""The command line a new user meets: fast start, one-line errors, help with defaults, quiet pipes."""

from __future__ import annotations

import argparse
import csv
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attnzoo
from attnzoo import cli
from attnzoo.bench.store import open_store
from attnzoo.cli import build_parser, main
from tests.helpers import unimplemented_slug

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _run(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnzoo", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or _env(), timeout=120, **kw)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh ATTNZOO_CACHE holding the registry snapshot (built here, in this process)."""
    from attnzoo.cli_index import load_index

    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path / "cache"))
    load_index()
    return tmp_path / "cache"


def test_help_list_and_info_do_not_import_torch(cache_dir):
    """`attnzoo --help`, `list`, `info` start without torch (its import alone takes seconds): the time they
    take is measured in benchmarks/RESULTS.md, this checks the reason they are fast."""
    code = ("import sys\nfrom attnzoo.cli import main\n"
            "for argv in (['--help'], ['list'], ['list', '--status'], ['info', 'mha'], ['info', 'hip'],\n"
            "             ['tour', '-h']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'attnzoo.bench.compare' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=_env(ATTNZOO_CACHE=str(cache_dir)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_registry_snapshot_matches_the_registry(cache_dir, capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [s.to_dict() for s in attnzoo.list()]
    assert main(["list", "--status", "--json"]) == 0
    from attnzoo.catalog import status_rows

    assert json.loads(capsys.readouterr().out) == status_rows()


def test_snapshot_is_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    from attnzoo import cli_index

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    before = cli_index.fingerprint(pkg)
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert cli_index.fingerprint(pkg) != before


def test_omp_wait_policy_is_passive_unless_set(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    main(["list", "--json"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    main(["list", "--json"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_omp_wait_policy_reaches_a_subprocess_torch(cache_dir):
    code = ("import os\nfrom attnzoo.cli import main\nmain(['list', '--json'])\nimport torch\n"
            "print('policy', os.environ['OMP_WAIT_POLICY'])")
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "policy PASSIVE"


def _walk(parser: argparse.ArgumentParser, prefix: str = "attnzoo"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, child in action.choices.items():
                if id(child) not in seen:
                    seen.add(id(child))
                    yield from _walk(child, f"{prefix} {name}")


def test_every_option_has_help_showing_its_default():
    parsers = list(_walk(build_parser()))
    assert len(parsers) > 12
    for prog, parser in parsers:
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{prog} {action.option_strings}: no help"
            if action.help is argparse.SUPPRESS:
                continue
            if action.default is not None and action.default is not False:
                default = action.default
                shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
                assert f"(default: {shown})" in " ".join(text.split()), f"{prog} {action.option_strings}"
            elif action.nargs != 0 and not action.required and not prog.startswith("attnzoo inspect"):
                # an option without a default says what happens without it (the viewer's outputs say so)
                assert "default" in action.help, f"{prog} {action.option_strings}: what happens without it?"


def test_every_command_describes_itself():
    for prog, parser in _walk(build_parser()):
        assert parser.description, prog


def test_lazy_and_full_parsers_list_the_same_commands():
    lazy = build_parser([])._subparsers._group_actions[0].choices
    full = build_parser()._subparsers._group_actions[0].choices
    assert set(lazy) == set(full) == set(cli.COMMANDS) | {"demo"}


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: attnzoo" in err and "compare" in err and "tour" in err
    proc = _run()
    assert proc.returncode == 2 and "usage: attnzoo" in proc.stderr


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--threads", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnzoo train: error: argument --threads")


def test_broken_pipe_ends_quietly(cache_dir):
    proc = subprocess.Popen([sys.executable, "-m", "attnzoo", "list", "--status"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=_env(ATTNZOO_CACHE=str(cache_dir)))
    proc.stdout.close()  # the reader is gone before the first write, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_BROKEN_PIPE
    assert err == "", err
    shell = subprocess.run("python -m attnzoo --help | head -1", shell=True, capture_output=True, text=True,
                           cwd=ROOT, env={**_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                           timeout=120)
    assert shell.stdout.startswith("usage: attnzoo") and shell.stderr == ""


def test_catalogued_but_unimplemented_slugs_say_so(capsys):
    slug = unimplemented_slug()
    assert main(["info", slug]) == 2
    err = capsys.readouterr().err
    assert "in the catalogue" in err and "not implemented yet" in err and err.count("\n") == 1
    with pytest.raises(KeyError, match="not implemented yet"):
        attnzoo.create(slug)


def test_unknown_slug_counts_agree_with_list(capsys):
    n = len(attnzoo.list())
    with pytest.raises(KeyError, match=f"all {n} entries") as e:
        attnzoo.spec("mhaa")
    assert "'mha'" in e.value.args[0]
    assert main(["info", "mhaa"]) == 2
    assert f"all {n} entries" in capsys.readouterr().err
    monkey_console = cli._rich_console
    try:
        cli._rich_console = lambda: None
        assert main(["list"]) == 0
    finally:
        cli._rich_console = monkey_console
    assert capsys.readouterr().out.startswith(f"attnzoo entries ({n};")


def test_info_renders_docstrings_without_markup(capsys):
    assert main(["info", "mha"]) == 0
    out = capsys.readouterr().out
    assert ":class:" not in out and "``" not in out and "Multi-head" in out


def test_plain_doc():
    from attnzoo.cli_index import plain_doc

    assert plain_doc(":class:`~a.b.C` and :func:`f` with ``x [B, N]`` and :mod:`the bench <attnzoo.bench>`") == (
        "C and f with x [B, N] and the bench")


def test_tour_is_also_demo_and_says_what_make_demo_runs(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "usage: attnzoo tour" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "attnzoo compare --preset quick" in " ".join(capsys.readouterr().out.split())


def _store(path: Path) -> None:
    env = {"date": "2026-01-01T00:00:00+00:00", "device": "cpu"}
    with open_store(path) as db:
        db.add_run(kind="train", task="mqar", mixer="mha", session="s", env=env, config={"dim": 64},
                   metrics={"metric": "accuracy", "accuracy": 0.5}, curves=[(1, "test/accuracy", 0.5)])
        db.add_run(kind="speed", session="s", env=env, config={"dim": 32}, metrics={"points": 2}, speed=[
            {"mixer": "mha", "n": 64, "mode": "fwd", "status": "ok", "time_s": 0.001, "peak_bytes": 2**20,
             "flops": 1e6, "ratio": 1.0, "detail": {}},
            {"mixer": "mha", "n": 128, "mode": "fwd", "status": "oom", "detail": {"error": "out of memory"}}])


def test_results_show_of_a_speed_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_rich_console", lambda: None)
    path = tmp_path / "r.sqlite"
    _store(path)
    assert main(["results", "show", "2", "--store", str(path)]) == 0
    out = capsys.readouterr().out
    assert "curves" not in out and "0 points" not in out
    assert "speed points of run 2 (2)" in out and "out of memory" in out and "1.00x" in out
    assert main(["results", "show", "1", "--store", str(path)]) == 0
    assert "1 points: test/accuracy" in capsys.readouterr().out


def test_results_export_every_kind_and_never_onto_the_store(tmp_path, capsys):
    path = tmp_path / "r.sqlite"
    _store(path)
    before = path.read_bytes()
    out = tmp_path / "all.csv"
    assert main(["results", "export", "--store", str(path), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["kind"] for r in rows] == ["train", "speed"] and rows[1]["metrics.points"] == "2"
    assert main(["results", "export", "--format", "json", "--store", str(path)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [len(r["speed"]) for r in runs] == [0, 2]
    for target in (path, tmp_path / "." / "r.sqlite"):
        assert main(["results", "export", "--store", str(path), "-o", str(target)]) == 2
        assert "would destroy the runs" in capsys.readouterr().err
    assert main(["results", "export", "--store", str(path), "-o", str(tmp_path / "no" / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".attnzoo-export")]


def test_counts_are_pluralised():
    from attnzoo.bench.compare import _count

    assert (_count(1, "task setting"), _count(2, "task setting"), _count(0, "mixer")) == (
        "1 task setting", "2 task settings", "0 mixers")


def test_induction_example_says_never(capsys):
    example = runpy.run_path(str(ROOT / "examples" / "induction_heads.py"), run_name="example")
    result = {"config": {"n_layers": 1, "seed": 0}, "seconds": 1.0, "thresholds": {"stripe": 0.4, "mul": 0.2},
              "curve": [{"step": s, "stripe": 0.1, "mul": 0.05, "head": (0, 1), "loss_first": 4.1,
                         "loss_second": 3.3} for s in (0, 100, 600)],
              "crossed_at": {"stripe": None, "mul": 100}}
    example["show"](result)
    out = capsys.readouterr().out
    assert "None" not in out and "stripe >= 0.4 never in 600 steps; mul >= 0.2 first at step 100" in out


def test_first_build_of_the_kernels_says_so_once(tmp_path, monkeypatch, capsys):
    from attnzoo.ops import native

    if native.unavailable("gather") is not None:
        pytest.skip(native.unavailable("gather"))
    built = native._library_path("gather", native.compiler())
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_errors", {})

    def fake_build(name, cxx, target):  # the real build takes seconds: copy the library built already
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(built, target)

    monkeypatch.setattr(native, "_build", fake_build)
    capsys.readouterr()
    assert native.unavailable("gather") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "building the compiled CPU kernels (gather)" in err
    assert native.unavailable("gather") is None and capsys.readouterr().err == ""


def test_tables_use_rich_on_a_terminal_and_plain_text_in_a_pipe(capsys, monkeypatch):
    pytest.importorskip("rich")
    assert main(["info", "gqa"]) == 0
    plain = capsys.readouterr().out
    assert plain.splitlines()[1].split() == ["field", "value"] and "│" not in plain
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["info", "gqa"]) == 0
    assert "│" in capsys.readouterr().out
