"""``backend="auto"`` and ``explain``: which backend runs, why the others do not, and budgets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops import native
from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.config import limits

ALL = set(BACKENDS)


def _zeros(b, h, n, d, requires_grad=False, dtype=torch.float32):
    return torch.zeros(b, h, n, d, dtype=dtype, requires_grad=requires_grad)


def _check_reasons(expl) -> None:
    """Every backend but the chosen one has a non-empty reason."""
    assert set(expl.reasons) == ALL - {expl.backend}
    assert all(isinstance(r, str) and r for r in expl.reasons.values())
    text = str(expl)
    assert f"backend: {expl.backend}" in text
    for name in expl.reasons:
        assert f"not {name}:" in text


def test_explain_return_weights_is_reference():
    q = _zeros(1, 2, 10, 4)
    expl = attnzoo.explain(q, q, q, pattern=P.Causal(), return_weights=True)
    assert expl.backend == "reference"
    _check_reasons(expl)
    assert "weights" in expl.reasons["sdpa"] and "weights" in expl.reasons["blocksparse"]


@pytest.mark.parametrize(
    "pattern",
    [None, P.Full(), P.Causal(), P.Causal(offset=0)],
    ids=["none", "full", "causal", "causal_offset0"],
)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_explain_sdpa_for_full_and_causal(pattern, requires_grad):
    q = _zeros(2, 4, 300, 8, requires_grad)
    expl = attnzoo.explain(q, q, q, pattern=pattern)
    assert expl.backend == "sdpa"
    _check_reasons(expl)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_explain_blocksparse_for_sparse_window(requires_grad):
    q = _zeros(1, 2, 16384, 32, requires_grad)  # head dim 32: flex is only turned down for CPU reasons
    k = _zeros(1, 1, 16384, 32, requires_grad)
    expl = attnzoo.explain(q, k, k, pattern=P.SlidingWindow(512, causal=True))
    assert expl.backend == "blocksparse"
    assert expl.tile_fraction is not None and expl.tile_fraction < 0.05
    _check_reasons(expl)
    assert "tiles are active" in expl.reasons["sdpa"]
    if native.unavailable("gather") is None:
        bound = 160 if native.unavailable("tiles") is None else 256
        assert f"512 keys per query: above {bound}" in expl.reasons["gather"]
    if requires_grad:
        assert "no CPU backward" in expl.reasons["flex"]
    else:
        assert "compiles" in expl.reasons["flex"]


def test_explain_dense_pattern_prefers_sdpa_mask():
    q = _zeros(1, 2, 256, 8)
    expl = attnzoo.explain(q, q, q, pattern=P.SlidingWindow(200))
    assert expl.backend == "sdpa"
    assert expl.tile_fraction is not None and expl.tile_fraction >= 0.5
    assert "dense masked kernel is cheaper" in expl.reasons["blocksparse"]


def test_explain_non_additive_mod_and_lse_avoid_sdpa():
    q = _zeros(1, 2, 64, 8)
    expl = attnzoo.explain(q, q, q, score_mod=P.SoftCap(5.0))
    assert expl.backend == "blocksparse" and "not additive" in expl.reasons["sdpa"]
    expl = attnzoo.explain(q, q, q, return_lse=True)
    assert expl.backend == "blocksparse" and "log-sum-exp" in expl.reasons["sdpa"]
    _check_reasons(expl)


def test_auto_runs_the_explained_backend(monkeypatch):
    """``auto`` executes exactly the backend ``explain`` names."""
    calls = []
    for name, backend in BACKENDS.items():
        orig = backend.run
        monkeypatch.setattr(backend, "run", lambda p, orig=orig, name=name: calls.append(name) or orig(p))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 100, 8, generator=g, dtype=torch.float64)
    for kw in (dict(), dict(pattern=P.SlidingWindow(3)), dict(return_weights=True), dict(return_lse=True)):
        calls.clear()
        attnzoo.attention(q, q, q, **kw)
        assert calls == [attnzoo.explain(q, q, q, **kw).backend]


def test_sdpa_mask_budget_falls_back_to_blocksparse(monkeypatch):
    q = _zeros(1, 2, 128, 8)
    pattern = P.SlidingWindow(100)  # dense enough for a masked SDPA
    assert attnzoo.explain(q, q, q, pattern=pattern).backend == "sdpa"
    monkeypatch.setattr(limits, "max_mask_bytes", 1000)
    expl = attnzoo.explain(q, q, q, pattern=pattern)
    assert expl.backend == "blocksparse" and "max_mask_bytes" in expl.reasons["sdpa"]
    with pytest.raises(ValueError, match=r"backend='sdpa'.*max_mask_bytes"):
        attnzoo.attention(q, q, q, pattern=pattern, backend="sdpa")


@pytest.mark.parametrize(
    "backend, kwargs, needs_grad, match",
    [
        ("sdpa", dict(score_mod=P.SoftCap(2.0)), False, "not additive"),
        ("sdpa", dict(return_lse=True), False, "log-sum-exp"),
        ("sdpa", dict(return_weights=True), False, "weights"),
        ("blocksparse", dict(return_weights=True), False, "never materialises"),
        ("flex", dict(), True, "no CPU backward"),
        ("flex", dict(return_weights=True), False, "weights"),
    ],
    ids=["sdpa-softcap", "sdpa-lse", "sdpa-weights", "blocksparse-weights", "flex-grad", "flex-weights"],
)
def test_explicit_backend_that_cannot_run_raises(backend, kwargs, needs_grad, match):
    q = _zeros(1, 2, 16, 16, needs_grad)
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this call: .*{match}"):
        attnzoo.attention(q, q, q, backend=backend, **kwargs)


def test_return_weights_over_budget(monkeypatch):
    q = _zeros(1, 3, 41, 4, dtype=torch.float64)
    monkeypatch.setattr(limits, "max_weights_bytes", 1000)
    with pytest.raises(ValueError, match=r"return_weights.*max_weights_bytes"):
        attnzoo.attention(q, q, q, return_weights=True)
    with pytest.raises(ValueError, match=r"return_weights.*max_weights_bytes"):
        attnzoo.explain(q, q, q, return_weights=True)
    with pytest.raises(ValueError, match=r"backend='reference'.*max_weights_bytes"):
        attnzoo.attention(q, q, q, backend="reference")
    # Without weights, auto still runs (not on the reference).
    assert attnzoo.explain(q, q, q).backend == "sdpa"
    assert attnzoo.attention(q, q, q).shape == (1, 3, 41, 4)


def test_limits_lowered_after_a_call_still_apply(monkeypatch):
    """A budget lowered after a call is honoured by the next identical call (no stale dispatch)."""
    q = _zeros(1, 2, 43, 4, dtype=torch.float64)
    out, w = attnzoo.attention(q, q, q, return_weights=True)
    assert w.shape == (1, 2, 43, 43)
    monkeypatch.setattr(limits, "max_weights_bytes", 1000)
    with pytest.raises(ValueError, match=r"return_weights.*max_weights_bytes"):
        attnzoo.attention(q, q, q, return_weights=True)
    pattern = P.SlidingWindow(40)
    assert attnzoo.attention(q, q, q, pattern=pattern, backend="sdpa").shape == (1, 2, 43, 4)
    monkeypatch.setattr(limits, "max_mask_bytes", 100)
    with pytest.raises(ValueError, match=r"backend='sdpa'.*max_mask_bytes"):
        attnzoo.attention(q, q, q, pattern=pattern, backend="sdpa")


def test_return_tuple_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    out = attnzoo.attention(q, q, v)
    assert isinstance(out, torch.Tensor)
    o1, w = attnzoo.attention(q, q, v, return_weights=True)
    o2, lse = attnzoo.attention(q, q, v, return_lse=True)
    o3, w3, lse3 = attnzoo.attention(q, q, v, return_weights=True, return_lse=True)
    assert w.shape == (1, 2, 9, 9) and lse.shape == (1, 2, 9)
    for o in (o1, o2, o3):
        torch.testing.assert_close(o, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w3, w, rtol=0, atol=0)
    torch.testing.assert_close(lse3, lse, rtol=1e-12, atol=1e-12)


# Shape fuzzing ---------------------------------------------------------------------------------

PATTERN_KINDS = [
    "none", "full", "causal", "causal_offset", "window", "window_causal_sink", "window_per_head", "dilated",
    "prefix", "global_or_window", "padding", "padding_and_causal", "document", "neighborhood", "not_causal",
    "custom",
]


def _fuzz_pattern(kind: str, g: torch.Generator, b: int, h: int, n: int, m: int, draw):
    if kind in ("document", "neighborhood"):
        assert n == m
    if kind == "none":
        return None
    if kind == "full":
        return P.Full()
    if kind == "causal":
        return P.Causal()
    if kind == "causal_offset":
        return P.Causal(offset=draw(st.integers(-n, m)))
    if kind == "window":
        return P.SlidingWindow(draw(st.integers(1, 2 * max(n, m))))
    if kind == "window_causal_sink":
        return P.SlidingWindow(draw(st.integers(1, 40)), causal=True, n_sink=draw(st.integers(0, 5)))
    if kind == "window_per_head":
        return P.SlidingWindow([draw(st.integers(1, 30)) for _ in range(h)], causal=draw(st.booleans()))
    if kind == "dilated":
        return P.DilatedWindow(draw(st.integers(1, 6)), draw(st.integers(1, 5)), causal=draw(st.booleans()))
    if kind == "prefix":
        return P.PrefixLM(draw(st.integers(0, m)))
    if kind == "global_or_window":
        return P.GlobalTokens(draw(st.integers(0, 4))) | P.SlidingWindow(draw(st.integers(1, 10)))
    if kind in ("padding", "padding_and_causal"):
        mask = torch.rand(b, m, generator=g) < draw(st.floats(0.0, 1.0))
        pad = P.KeyPadding(mask)
        return pad if kind == "padding" else pad & P.Causal()
    if kind == "document":
        cuts = torch.rand(n, generator=g) < 0.1
        return P.Document.from_ids(torch.cumsum(cuts.long(), 0))
    if kind == "neighborhood":
        return P.Neighborhood(draw(st.integers(1, n)), causal=draw(st.booleans()))
    if kind == "not_causal":
        return ~P.Causal()
    if kind == "custom":
        return P.Custom(lambda b_, h_, q, kv: (q * 5 + kv * 3 + b_ + h_) % 3 != 0)
    raise AssertionError(kind)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_auto_fuzz_shapes_match_reference(data):
    draw = data.draw
    b = draw(st.integers(1, 3), label="B")
    h_kv = draw(st.integers(1, 3), label="H_kv")
    h = h_kv * draw(st.integers(1, 3), label="groups")
    kind = draw(st.sampled_from(PATTERN_KINDS), label="pattern")
    n = draw(st.integers(1, 90), label="N")
    m = n if kind in ("document", "neighborhood") else draw(st.integers(1, 90), label="M")
    d, d_v = draw(st.integers(1, 12), label="D"), draw(st.integers(1, 12), label="D_v")
    mod = draw(st.sampled_from(["none", "alibi", "softcap"]), label="score_mod")
    block = draw(st.sampled_from([None, 8, 16]), label="block")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    pattern = _fuzz_pattern(kind, g, b, h, n, m, draw)
    score_mod = {"none": None, "alibi": P.ALiBi(h), "softcap": P.SoftCap(3.0)}[mod]
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, m, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, m, d_v, generator=g, dtype=torch.float64)
    backend = BACKENDS["blocksparse"]
    saved = backend.block
    backend.block = block
    try:
        out = attnzoo.attention(q, k, v, pattern=pattern, score_mod=score_mod)
        want = attnzoo.attention(q, k, v, pattern=pattern, score_mod=score_mod, backend="reference")
    finally:
        backend.block = saved
    assert out.shape == (b, h, n, d_v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
