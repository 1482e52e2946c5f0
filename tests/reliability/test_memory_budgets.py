"""Memory budgets bound the peak, measured: the reference backend (``return_weights``) under
``limits.max_weights_bytes``, layouts of patterns without bounds under ``limits.max_layout_elements``, the speed
sweep's inputs under the free memory. Work that cannot fit is refused before it starts, with the figure."""

from __future__ import annotations

import time

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.bench import speed as S
from attnzoo.bench.speed import SpeedConfig, _PeakMemory, run_speed
from attnzoo.ops.backends.reference import peak_bytes
from attnzoo.ops.config import limits
from attnzoo.ops.problem import make_problem

CPU = torch.device("cpu")


def _measure(fn) -> tuple[int, object]:
    with _PeakMemory(CPU) as mem:
        result = fn()
    if mem.peak is None:
        pytest.skip("no peak-memory counter on this system (/proc/self/clear_refs)")
    return mem.peak, result


CASES = {
    "full": dict(pattern=None, score_mod=None),
    "window": dict(pattern=P.SlidingWindow(64), score_mod=None),
    "window+alibi": dict(pattern=P.SlidingWindow(64, causal=True), score_mod=P.ALiBi(4)),
    "padding+bias": dict(pattern=P.KeyPadding(torch.ones(1, 1536, dtype=torch.bool)),
                         score_mod=P.Bias(torch.zeros(1, 1, 1536, 1536))),
}


def peak_ratio(case: str, grad: bool = False, n: int = 1536) -> float:
    """Run ``return_weights`` with the budget set to exactly the estimated peak; return measured peak / budget."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 32, requires_grad=grad) for _ in range(3))
    kw = CASES[case]
    budget = peak_bytes(make_problem(q, k, v, return_weights=True, return_lse=False, scale=None, **kw))

    def run():
        out, w = attnzoo.attention(q, k, v, return_weights=True, **kw)
        if grad:
            (out.sum() + w.sum()).backward()
        return w

    old = limits.max_weights_bytes
    limits.max_weights_bytes = budget
    try:
        peak, _ = _measure(run)
    finally:
        limits.max_weights_bytes = old
    return peak / budget


@pytest.mark.parametrize("case", list(CASES))
def test_return_weights_peak_stays_under_the_budget(case, one_thread):
    ratio = peak_ratio(case)
    assert ratio <= 1.0, f"measured peak is {ratio:.2f} x the budget"


def test_return_weights_with_gradients_peak_stays_under_the_budget(one_thread):
    ratio = peak_ratio("window+alibi", grad=True, n=1024)
    assert ratio <= 1.0, f"measured peak is {ratio:.2f} x the budget"


def test_over_budget_is_refused_before_work_with_the_figure(monkeypatch):
    q = torch.randn(1, 8, 23000, 16)
    monkeypatch.setattr(limits, "max_weights_bytes", 2 << 30)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"needs about \d+\.\d\d GiB at its peak.*max_weights_bytes = 2\.00 GiB"):
        attnzoo.attention(q, q, q, pattern=P.SlidingWindow(256), return_weights=True)
    assert time.perf_counter() - t0 < 5


def test_chunked_reference_matches_the_dense_one(monkeypatch):
    """The no-gradient path (chunks of rows) equals the dense path with gradients, weights and lse included."""
    from attnzoo.ops.backends import reference

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4 * 3 * 40)  # 3 rows per chunk: many chunks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.rand(2, 40, generator=g) > 0.3
    keep[1] = False  # rows that see nothing
    for pat, mod in ((P.SlidingWindow(5) & P.KeyPadding(keep), P.ALiBi(4)), (P.Causal(), None), (None, P.SoftCap(2.0))):
        fast = attnzoo.attention(q, k, v, pattern=pat, score_mod=mod, backend="reference", return_weights=True,
                                 return_lse=True)
        dense = attnzoo.attention(*(t.clone().requires_grad_() for t in (q, k, v)), pattern=pat, score_mod=mod,
                                  backend="reference", return_weights=True, return_lse=True)
        for a, b in zip(fast, dense):
            torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-12)


def test_layout_of_a_pattern_without_bounds_is_refused_before_work():
    """``explain`` with a Custom pattern at N=200000 ran for minutes, then died on an allocation."""
    q = torch.randn(1, 8, 200_000, 1).expand(1, 8, 200_000, 64)
    pat = P.Custom(lambda b, h, qi, kv: (qi - kv).abs() < 100)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"3\.2e\+11 evaluations.*max_layout_elements"):
        attnzoo.explain(q, q, q, pattern=pat)
    assert time.perf_counter() - t0 < 5
    small = torch.randn(1, 2, 256, 16)
    assert attnzoo.explain(small, small, small, pattern=pat).backend in ("sdpa", "blocksparse")


def test_speed_inputs_that_cannot_fit_are_oom_and_the_sweep_goes_on():
    """``bench speed --lengths 256 100000000``: the N=256 points are measured, the huge length is recorded as oom."""
    cfg = SpeedConfig(mixers=["mha"], lengths=[32, 10**11], dim=16, n_heads=2, repeats=1, warmup=0)
    points = run_speed(cfg, progress=False)
    status = {(p["mixer"], p["n"], p["mode"]): p for p in points}
    assert all(status[(m, 32, mode)]["status"] == "ok" for m in ("sdpa_dense", "mha") for mode in cfg.modes)
    huge = [p for p in points if p["n"] == 10**11]
    assert len(huge) == 4 and all(p["status"] == "oom" and "GiB" in p["detail"]["reason"] for p in huge)


def test_speed_input_allocation_failure_is_oom(monkeypatch):
    real = torch.randn

    def failing(*shape, **kw):
        if shape and shape[1] == 4096:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        return real(*shape, **kw)

    monkeypatch.setattr(S, "_available_bytes", lambda device: None)
    monkeypatch.setattr(torch, "randn", failing)
    points = run_speed(SpeedConfig(mixers=["mha"], lengths=[32, 4096], dim=16, n_heads=2, repeats=1, warmup=0),
                       progress=False)
    by_n = {p["n"]: p["status"] for p in points if p["mode"] == "fwd"}
    assert by_n == {32: "ok", 4096: "oom"}
