"""The README runs as written.

Every ```python block runs in a fresh process (``PYTHONPATH`` = the repository, an empty working
folder). Every command line of a ```bash block runs, in order, in one working folder (so ``attnzoo
results`` reads what ``attnzoo train`` stored), except those marked ``(long job)`` or ``(not run)``:
those are parsed, and their arguments checked up to where the work would start.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_RUN = re.compile(r"\((long job|not run)")


def python_blocks(text: str = README) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def command_lines(text: str = README) -> list[str]:
    lines = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.S | re.M):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return lines


def _command(line: str) -> list[str]:
    """The words before the comment."""
    return shlex.split(line, comments=True)


def test_the_readme_has_blocks_to_run():
    assert len(python_blocks()) >= 5 and len(command_lines()) >= 10
    assert any(not NOT_RUN.search(line) for line in command_lines())


def test_every_python_block_runs_in_a_fresh_process(tmp_path):
    """The blocks run two at a time (two cores); each is a fresh process in its own empty folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    pending = list(enumerate(python_blocks()))
    running: list[tuple[int, subprocess.Popen, float]] = []
    failures = []
    while pending or running:
        while pending and len(running) < 2:
            i, code = pending.pop(0)
            folder = tmp_path / f"block{i}"
            folder.mkdir()
            (folder / "block.py").write_text(code)
            proc = subprocess.Popen([sys.executable, "block.py"], cwd=folder, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((i, proc, time.monotonic()))
        i, proc, started = running.pop(0)
        try:
            out, _ = proc.communicate(timeout=max(1.0, 600 - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            failures.append(f"block {i} ran past 600 s:\n{python_blocks()[i]}")
            continue
        if proc.returncode != 0:
            failures.append(f"block {i} (exit {proc.returncode}):\n{python_blocks()[i]}\n--- output ---\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)


class WorkStarted(BaseException):  # noqa: N818  (a signal: no handler of the CLI catches it)
    pass


def _no_work(monkeypatch):
    import attnzoo
    import attnzoo.bench.cab
    import attnzoo.bench.compare
    import attnzoo.bench.report
    import attnzoo.bench.speed
    import attnzoo.bench.train
    import attnzoo.demo
    import attnzoo.inspect.viewer

    def work(*args, **kwargs):
        raise WorkStarted

    for module, name in ((attnzoo.bench.train, "train"), (attnzoo.bench.speed, "run_speed"),
                         (attnzoo.bench.compare, "open_store"), (attnzoo.bench.cab, "check"),
                         (attnzoo.bench.report, "build_report"), (attnzoo.demo, "run_demo"),
                         (attnzoo.inspect.viewer, "inspect_model"), (attnzoo, "explain"),
                         (attnzoo.bench.compare, "estimate_wall_s")):  # the timing probe trains
        monkeypatch.setattr(module, name, work)


def _check_long(words: list[str], monkeypatch) -> None:
    """A line not run: its target exists and its arguments parse and pass the checks made before work."""
    if words[0] == "make":
        assert re.search(rf"^{re.escape(words[1])}:", (ROOT / "Makefile").read_text(), re.M), words
        return
    if words[0] == "python":
        assert (ROOT / words[1]).is_file(), words
        return
    if words[0] == "torchrun":
        words = ["attnzoo", *words[words.index("attnzoo") + 1:]]
    assert words[0] == "attnzoo", f"unknown program in {words}"
    from attnzoo.cli import main

    with monkeypatch.context() as m:
        _no_work(m)
        try:
            code = main(words[1:])
        except WorkStarted:
            return
        except SystemExit as e:
            code = e.code
    assert code == 0, f"{shlex.join(words)} exits {code} before any work"


def test_every_command_line_runs_or_is_a_long_job(tmp_path, monkeypatch, capsys):
    from attnzoo.cli import main

    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in command_lines():
        words = _command(line)
        if NOT_RUN.search(line):
            _check_long(words, monkeypatch)
            continue
        assert words[0] == "attnzoo", f"{line!r}: only attnzoo commands run here; mark others (long job)"
        capsys.readouterr()
        code = main(words[1:])
        captured = capsys.readouterr()
        assert code == 0, f"{line!r} exits {code}:\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
        ran += 1
    assert ran >= 8
    assert (tmp_path / "runs.csv").is_file() and (tmp_path / "attnzoo-results" / "report" / "report.html").is_file()


@pytest.mark.parametrize("text, expected", [
    ("a\n```python\nx = 1\n```\nb\n```bash\nattnzoo list   # all\n# a comment\n```\n",
     (["x = 1\n"], ["attnzoo list   # all"])),
])
def test_block_extraction(text, expected):
    assert (python_blocks(text), command_lines(text)) == expected
    assert _command(command_lines(text)[0]) == ["attnzoo", "list"]
