"""The registry: create / list / spec, aliases, errors, and the catalogue status page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

import attnzoo
from attnzoo.registry import SUPPORTS, Spec

BENCH_ONLY_TYPES = ("mixer", "task")


def test_exports():
    assert callable(attnzoo.create) and callable(attnzoo.list) and callable(attnzoo.spec)
    assert attnzoo.Spec is Spec


def test_list_and_filters():
    specs = attnzoo.list()
    assert [s.slug for s in specs] == sorted(s.slug for s in specs)
    assert {"mha", "gqa", "gated_attention", "rope", "relative_position_bias", "moh"} <= {s.slug for s in specs}
    assert all(s.family == "positional" for s in attnzoo.list(family="positional"))
    assert all(s.type == "mixer" for s in attnzoo.list(type="mixer"))
    assert {s.slug for s in attnzoo.list(priority=1)} >= {"mha", "gqa", "rope"}


def test_spec_fields_are_consistent():
    catalog = {row["slug"]: row for row in _rows()}
    for s in attnzoo.list():
        if s.slug in catalog:
            row = catalog[s.slug]
            assert (s.family, s.type, s.priority) == (row["family"], row["type"], int(row["priority"])), s.slug
        else:  # only the bench's own entries may stand outside the catalogue: its baselines (Zoology's gated
            # convolutions, ...) and its tasks (the MIL and set tasks of the pooling comparison)
            assert s.family == "benchmark" and s.type in BENCH_ONLY_TYPES, f"{s.slug} is not a catalogue slug"
        assert s.supports <= set(SUPPORTS)
        assert s.reference and s.summary and s.papers
        json.dumps(s.to_dict())


def test_create_and_alias():
    m = attnzoo.create("mha", dim=32, n_heads=4)
    assert isinstance(m, nn.Module)
    mqa = attnzoo.create("mqa", dim=32, n_heads=4)
    assert mqa.n_kv_heads == 1
    assert attnzoo.spec("mqa").slug == "gqa"
    assert "mqa" in attnzoo.spec("gqa").aliases


def test_unknown_slug_lists_close_matches():
    with pytest.raises(KeyError, match="'mha'"):
        attnzoo.create("mhaa", dim=32)
    with pytest.raises(KeyError, match="gated_attention"):
        attnzoo.spec("gated_atention")


def test_unknown_kwargs_list_accepted_arguments():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['heads'\].*n_heads"):
        attnzoo.create("mha", dim=32, heads=4)
    with pytest.raises(TypeError, match="fixed by the alias"):
        attnzoo.create("mqa", dim=32, n_kv_heads=2)


def test_register_validates():
    from attnzoo.registry import register

    with pytest.raises(ValueError, match="type"):
        register("x", family="f", type="nope")
    with pytest.raises(ValueError, match="supports"):
        register("x", family="f", type="mixer", supports={"teleport"})
    with pytest.raises(ValueError, match="already registered"):
        register("mha", family="f", type="mixer")(lambda: nn.Identity())


def _rows():
    from attnzoo.catalog import load_rows

    return load_rows()


def test_catalog_status_is_up_to_date():
    from attnzoo.catalog import STATUS_PATH, render_status

    committed = Path(__file__).resolve().parents[1] / STATUS_PATH
    assert committed.read_text() == render_status(), "run `python -m attnzoo.catalog` to regenerate"


def test_bundled_rows_match_shared_catalogue():
    from attnzoo.catalog import BUNDLED_ROWS, SHARED_ROWS

    if not SHARED_ROWS.exists():
        pytest.skip("../shared/catalog/rows.tsv is not present")
    assert BUNDLED_ROWS.read_text() == SHARED_ROWS.read_text()


def test_cli_list_and_info(capsys):
    from attnzoo.cli import main

    assert main(["list", "--json", "--family", "positional"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {d["slug"] for d in out} == {s.slug for s in attnzoo.list(family="positional")}
    assert main(["list", "--type", "mixer"]) == 0
    assert "mha" in capsys.readouterr().out
    assert main(["list", "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert len(status) == 127 and any(r["implemented"] for r in status)
    assert main(["info", "gqa", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["mqa"]
    assert main(["info", "moh"]) == 0
    assert "drop_one" in capsys.readouterr().out
    assert main(["info", "mhaa"]) == 2
    assert "mha" in capsys.readouterr().err


def test_cli_plain_text_without_rich(capsys, monkeypatch):
    from attnzoo import cli

    monkeypatch.setattr(cli, "_rich_console", lambda: None)
    assert cli.main(["list", "--priority", "1"]) == 0
    out = capsys.readouterr().out
    assert "mha" in out and "summary" in out
    assert cli.main(["info", "rope"]) == 0
    assert "shift_invariant" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["explain", "--dim", "0"], ["explain", "--n", "-5"], ["demo", "--n", "0"],
                                  ["explain", "--pattern", "neighborhood", "--grid", "4", "4", "--kernel", "9"]])
def test_cli_bad_numbers_give_a_message_not_a_traceback(argv, capsys):
    from attnzoo.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err



def test_list_rejects_unknown_filters():
    with pytest.raises(ValueError, match=r"^type: expected one of \[.*'mixer'.*\], got 'nope'"):
        attnzoo.list(type="nope")
    with pytest.raises(ValueError, match=r"^family: expected one of"):
        attnzoo.list(family="nope")
    assert attnzoo.list(type="mixer") and all(s.type == "mixer" for s in attnzoo.list(type="mixer"))
