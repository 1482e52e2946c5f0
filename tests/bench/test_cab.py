"""The CAB contract: declared patterns are run; a mixer that leaks the future fails CS."""

from __future__ import annotations

import pytest

import attnzoo
from attnzoo.bench import cab
from attnzoo.cli import main


def test_mha_passes_all_four_patterns():
    res = cab.check("mha")
    assert list(res) == ["NS", "CS", "NC", "CC"]
    assert all(r["declared"] and r["ok"] for r in res.values())
    assert res["CS"]["error"] < 1e-10 and "incremental decoding" in res["CS"]["detail"]


def test_undeclared_patterns_are_not_run():
    res = cab.check("reversed_attention")
    assert res["NS"]["ok"] and [res[p]["ok"] for p in ("CS", "NC", "CC")] == [None, None, None]
    assert cab.declared_patterns("reversed_attention") == ["NS"]


def test_a_mixer_that_leaks_the_future_fails_cs(monkeypatch):
    class Leaky(attnzoo.layers.MultiHeadAttention):
        def forward(self, x, *, causal=False, **kw):
            return super().forward(x, causal=False, **kw)  # ignores causal

    monkeypatch.setattr(cab, "build_mixer", lambda slug, dim, **kw: Leaky(dim, 4))
    res = cab.check("mha")
    assert res["NS"]["ok"] and not res["CS"]["ok"] and res["CS"]["error"] > 1e-4


def test_registry_entry_and_cli(capsys):
    contract = attnzoo.create("cab")
    assert contract.check("gqa")["CC"]["ok"]
    assert main(["bench", "cab", "--mixers", "mha", "reversed_attention"]) == 0
    out = capsys.readouterr().out
    assert "pass" in out and "reversed_attention" in out


def test_grid_and_segment_mixers_get_inputs_they_can_take():
    """Windows that divide N, segment ids: the mixers that failed on CAB's default inputs."""
    for slug in ("dilated_neighborhood", "multi_axis", "neighborhood", "swin_window", "segment_mask"):
        res = cab.check(slug)
        assert all(r["ok"] or r["applicable"] is False for r in res.values() if r["declared"]), (slug, res)
    swin = cab.check("swin_window")["CS"]
    assert swin["ok"] and "prefixes it takes (4, 8 of 12)" in swin["detail"] and "test configuration" in swin["detail"]
    assert cab.check("segment_mask")["NS"]["ok"]


def test_length_dependent_windows_are_not_applicable_with_the_reason():
    cs = cab.check("neighborhood")["CS"]
    assert cs["applicable"] is False and cs["ok"] is None
    assert "no output reads a later token (0.0e+00)" in cs["detail"] and "depends on the length N" in cs["detail"]


def test_cli_lists_not_applicable_and_full_failure_text(capsys, monkeypatch):
    assert main(["bench", "cab", "--mixers", "neighborhood", "swin_window"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "not applicable:" in out and "neighborhood CS: no output reads a later token" in out
    assert "0 failure(s)" in out
    long = "ValueError: " + "x" * 300 + " END"
    monkeypatch.setattr(cab, "check", lambda slug: {
        p: {"declared": True, "applicable": True, "ok": p != "CS", "error": None, "detail": long if p == "CS" else ""}
        for p in cab.CAB_PATTERNS})
    assert main(["bench", "cab", "--mixers", "mha"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and f"mha CS: {long}" in out


@pytest.mark.slow
def test_every_registered_mixer_passes_or_is_not_applicable(capsys):
    assert main(["bench", "cab"]) == 0, capsys.readouterr().out


def test_a_mixer_names_the_cab_patterns_its_contract_does_not_fit():
    from attnzoo.bench import cab

    res = cab.check("dcal")
    assert res["NS"]["ok"] is True
    assert res["NC"]["applicable"] is False and res["NC"]["ok"] is None and "only in training" in res["NC"]["detail"]
