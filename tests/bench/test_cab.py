"""The CAB contract: declared patterns are run; a mixer that leaks the future fails CS."""

from __future__ import annotations

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
