"""A fuzz over every subcommand and option of the ``attnzoo`` command line.

Every option that takes a value gets bad values (negative, zero, huge, NaN, infinite, the wrong type,
unknown names, unwritable paths). Each must end with exit status 2 and ONE error line before any
work starts: the functions that do the work (training, sweeps, model loading, ...) are replaced by
one that raises :class:`WorkStarted`, so a value that gets through is seen. The few values that are
valid for an option (``--seed 0``, a huge ``--max-steps``) are listed in :data:`VALID`; reaching the
work with them is right. The CLI runs in-process (fast); a handful of cases run as real processes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.cli import build_parser, main
from tests.helpers import unimplemented_slug

ROOT = Path(__file__).resolve().parents[2]
HUGE = "1" + "0" * 22  # 1e22, as an integer
NOT_A_NUMBER = ("nan", "inf", "-inf", "abc", "1e400", "2**70")


class WorkStarted(BaseException):  # noqa: N818  (a signal, not an error: no handler of the CLI catches it)
    pass


def _work(*args, **kwargs):
    raise WorkStarted


@pytest.fixture
def no_work(monkeypatch):
    """Replace every function that starts work by one raising WorkStarted."""
    import attnzoo
    import attnzoo.bench.cab
    import attnzoo.bench.compare
    import attnzoo.bench.report
    import attnzoo.bench.speed
    import attnzoo.bench.train
    import attnzoo.demo
    import attnzoo.inspect.viewer

    for module, name in ((attnzoo.bench.train, "train"), (attnzoo.bench.speed, "run_speed"),
                         (attnzoo.bench.compare, "open_store"),  # compare checks everything before opening it
                         (attnzoo.bench.cab, "check"), (attnzoo.bench.report, "build_report"),
                         (attnzoo.demo, "run_demo"), (attnzoo.inspect.viewer, "inspect_model"), (attnzoo, "explain")):
        monkeypatch.setattr(module, name, _work)


@pytest.fixture
def places(tmp_path):
    from attnzoo.bench.store import open_store

    store = tmp_path / "store.sqlite"
    with open_store(store) as db:
        db.add_run(kind="train", task="mqar", mixer="mha", session="s", config={"dim": 64},
                   metrics={"metric": "accuracy", "accuracy": 0.5}, env={})
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    return {"store": str(store), "dir": str(tmp_path), "out": str(tmp_path / "out.html"),
            "bad_files": [str(tmp_path), str(tmp_path / "missing" / "x.out"), str(a_file / "x.out")],
            "bad_stores": [str(tmp_path), str(a_file / "x.sqlite")],  # a store's missing folders are created
            "bad_folders": [str(a_file), str(a_file / "x")]}


def _base(places) -> dict[str, list[str]]:
    """A valid command line per (sub)command; each case changes one option."""
    s = places["store"]
    return {
        "list": ["list"], "info": ["info", "mha"], "explain": ["explain"], "tour": ["tour"],
        # --no-estimate: the estimate times real training steps, and on a loaded machine refuses a long run
        "compare": ["compare", "--no-report", "--no-speed", "--no-estimate", "--store", s, "--no-progress"],
        "train": ["train", "--store", s, "--no-progress"],
        "bench speed": ["bench", "speed", "--store", s, "--lengths", "32", "--no-progress"],
        "bench cab": ["bench", "cab", "--mixers", "mha"],
        "results list": ["results", "list", "--store", s],
        "results show": ["results", "show", "1", "--store", s],
        "results export": ["results", "export", "--store", s],
        "report": ["report", "--store", s, "--out", places["dir"] + "/rep"],
        "inspect": ["inspect", "minilm", "--text", "hi", "--html", places["out"]],
    }


# (command, option, value) that are valid: reaching the work with them is right.
VALID = {
    ("train", "--seed", "0"), ("compare", "--seeds", "0"), ("compare", "--time-budget", "0"),
    ("bench speed", "--warmup", "0"),
    ("train", "--max-steps", HUGE), ("train", "--epochs", HUGE), ("train", "--eval-every", HUGE),
    ("compare", "--max-steps", HUGE), ("compare", "--epochs", HUGE), ("compare", "--time-budget", HUGE),
    ("bench speed", "--max-seconds", HUGE), ("explain", "--window", HUGE),
    # the speed sweep records lengths that cannot fit as oom / skipped; --no-speed leaves them unused
    ("compare", "--lengths", HUGE),
    ("inspect", "--layer", "0"), ("inspect", "--head", "0"),
    # grid and kernel of --pattern neighborhood, unused by the base line's window pattern
    ("explain", "--grid", HUGE), ("explain", "--kernel", HUGE),
}


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, child in action.choices.items():
                if id(child) in seen or name == "demo":
                    continue
                seen.add(id(child))
                sub = [a for a in child._actions if isinstance(a, argparse._SubParsersAction)]
                if sub:
                    yield from _commands(child, (*prefix, name))
                else:
                    yield " ".join((*prefix, name)), child


def _bad_values(command: str, action: argparse.Action, places) -> list[str]:
    opt = action.option_strings[0] if action.option_strings else action.dest
    if action.choices is not None:
        return ["not-a-choice", "-1"]
    kind = getattr(action.type, "__name__", "")
    if kind in ("integer", "int", "threads_int"):
        return ["-1", "0", HUGE, "1.5", *NOT_A_NUMBER]
    if kind in ("number", "float"):
        return ["-5", "0", HUGE, *NOT_A_NUMBER]
    if opt in ("--output", "--html", "--png"):
        return list(places["bad_files"])
    if opt == "--store":
        return list(places["bad_stores"])
    if opt == "--out":
        return list(places["bad_folders"])
    if opt in ("--mixer", "--mixers") and not command.startswith("results"):
        return ["no_such_mixer", unimplemented_slug(), ""]
    if opt == "--device":
        import torch

        return ["tpu", "cuda:99", "mps"] + ([] if torch.cuda.is_available() else ["cuda"])
    if opt in ("--task-arg", "--mixer-arg"):
        return ["noequals", "seq_len=-5", "seq_len=1e400", "no_such_option=1"]
    if opt in ("--family", "--type"):
        return ["nope"]
    if opt == "slug":
        return ["nope", unimplemented_slug()]
    if opt == "--text":
        return ["word " * 2000]
    return []


def _cases(places) -> list[tuple[str, str, str, list[str]]]:
    base = _base(places)
    cases = []
    for command, parser in _commands(build_parser()):
        argv = base[command]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0 or action.help == argparse.SUPPRESS:
                continue
            opt = action.option_strings[0] if action.option_strings else action.dest
            for value in _bad_values(command, action, places):
                if action.option_strings:
                    # replace the option when the base line sets it, else add it
                    line = list(argv)
                    if opt in line:
                        i = line.index(opt)
                        end = i + 1
                        while end < len(line) and not line[end].startswith("--"):
                            end += 1
                        line[i:end] = []
                    extra = [opt, value] if action.nargs != 2 else [opt, value, "4"]
                    cases.append((command, opt, value, line + extra))
                else:  # a positional: info SLUG, results show ID, inspect MODEL
                    n = len(command.split())
                    line = list(argv)
                    line[n] = value
                    cases.append((command, opt, value, line))
    cases += [(c, "", "", [*c.split(), "--no-such-option"]) for c in base]
    cases += [("", "", "", []), ("", "", "", ["no-such-command"]), ("", "", "", ["bench"]),
              ("", "", "", ["results"])]
    return cases


def _outcome(argv, capsys) -> tuple[str, int | None, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except WorkStarted:
        return "work", None, capsys.readouterr().err
    except SystemExit as e:
        code = e.code
    return "exit", code, capsys.readouterr().err


def test_every_bad_value_is_one_error_line_before_any_work(no_work, places, capsys, record_property):
    failures, accepted, tried = [], [], 0
    for command, opt, value, argv in _cases(places):
        tried += 1
        kind, code, err = _outcome(argv, capsys)
        if (command, opt, value) in VALID:
            accepted.append((command, opt, value))
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        if kind == "work":
            failures.append(f"{argv!r}: accepted, work started")
        elif code != 2 or "Traceback" in err:
            failures.append(f"{argv!r}: exit {code}, stderr {err[-300:]!r}")
        elif argv and (len(lines) != 1 or "error:" not in lines[0]):
            failures.append(f"{argv!r}: {len(lines)} lines on stderr: {err[-300:]!r}")
    record_property("cli_cases", tried)
    print(f"CLI fuzz: {tried} cases, {len(accepted)} valid values among them")
    assert tried > 400
    assert not failures, f"{len(failures)} of {tried} cases:\n" + "\n".join(failures[:40])


def test_the_valid_values_do_reach_the_work(no_work, places, capsys):
    """The fuzz's accepted values (and each base line) start work: the stubs stand where the work is."""
    base = _base(places)
    for command in ("train", "compare", "bench speed", "bench cab", "tour", "explain", "inspect", "report"):
        assert _outcome(base[command], capsys)[0] == "work", command


_SLOW = pytest.mark.slow  # these import torch: seconds each on a shared CPU


@pytest.mark.parametrize("argv", [
    ["train", "--threads", "-1"], ["compare", "--time-budget", "nan"], [],
    ["train", "--n-train", "10000000000", "--no-store"],
    pytest.param(["train", "--seed", str(2**70)], marks=_SLOW), pytest.param(["train", "--lr", "1e308"], marks=_SLOW),
    pytest.param(["compare", "--time-budget", "-5"], marks=_SLOW),
    pytest.param(["train", "--dim", "1000000", "--no-store"], marks=_SLOW),
    pytest.param(["bench", "speed", "--batch", HUGE], marks=_SLOW),
    pytest.param(["train", "--device", "cuda:99", "--no-store"], marks=_SLOW),
])
def test_real_processes_end_with_one_line(argv, tmp_path):
    """A few cases as the user runs them: a separate process, before any work (seconds, not a hang)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ATTNZOO_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "attnzoo", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    if argv:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "attnzoo-results").exists()  # nothing stored
