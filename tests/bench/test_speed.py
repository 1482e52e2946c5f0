"""The speed sweep: points, ratios, FLOPs from pattern density, OOM and skipped points."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.bench import speed as S
from attnzoo.bench.speed import BASELINE, SpeedConfig, count_flops, run_speed


def _cfg(**kw):
    base = dict(mixers=["mha"], lengths=[32, 64], dim=32, n_heads=2, repeats=2, warmup=1)
    base.update(kw)
    return SpeedConfig(**base)


def test_sweep_points_and_ratios():
    points = run_speed(_cfg(), progress=False)
    assert len(points) == 2 * 2 * 2
    assert {(p["mixer"], p["n"], p["mode"]) for p in points} == {
        (m, n, mode) for m in (BASELINE, "mha") for n in (32, 64) for mode in ("fwd", "fwd+bwd")}
    for p in points:
        assert p["status"] == "ok" and p["time_s"] > 0 and p["flops"] > 0
        assert len(p["detail"]["times"]) == 2
        if p["mixer"] == BASELINE:
            assert p["ratio"] == 1.0 and p["detail"]["causal"]  # SDPA causal in a causal sweep
        else:
            assert p["ratio"] > 0 and p["detail"]["causal"]


def test_flops_use_the_pattern_density():
    b, n, c, h = 1, 64, 32, 2
    proj = 4 * 2 * b * n * c * c  # q, k, v, o projections (weights only; biases are not counted)
    dense = 2 * b * h * n * n * 2 * (c // h)
    m = attnzoo.create("mha", dim=c, n_heads=h)
    x = torch.randn(b, n, c)
    assert count_flops(lambda: m(x)) == pytest.approx(proj + dense)
    causal_density = (n + 1) / (2 * n)
    assert count_flops(lambda: m(x, causal=True)) == pytest.approx(proj + dense * causal_density)
    w = attnzoo.create("mha", dim=c, n_heads=h, pattern=P.SlidingWindow(8, causal=True))
    win = P.SlidingWindow(8, causal=True).density(attnzoo.ops.layout.Shape(b, h, n, n))
    assert count_flops(lambda: w(x)) == pytest.approx(proj + dense * win)
    assert attnzoo.ops.attention is not None  # the interception was undone
    import attnzoo.layers.base as base

    assert base.attention is attnzoo.ops.attention


def test_fwd_bwd_flops_are_three_forwards():
    points = run_speed(_cfg(lengths=[32], mixers=["mha"]), progress=False)
    by = {(p["mixer"], p["mode"]): p for p in points}
    assert by[("mha", "fwd+bwd")]["flops"] == pytest.approx(3 * by[("mha", "fwd")]["flops"])


def test_oom_is_recorded_and_the_sweep_continues(monkeypatch):
    real = S.measure

    def fake(module, x, **kw):
        if x.shape[1] == 64 and kw["mode"] == "fwd":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(module, x, **kw)

    monkeypatch.setattr(S, "measure", fake)
    points = run_speed(_cfg(mixers=["mha", "gqa"]), progress=False)
    status = {(p["mixer"], p["n"], p["mode"]): p["status"] for p in points}
    assert status[("mha", 64, "fwd")] == "oom" and status[("gqa", 64, "fwd")] == "oom"
    assert status[("mha", 64, "fwd+bwd")] == "ok" and status[("gqa", 32, "fwd")] == "ok"
    assert "out of memory" in next(p for p in points if p["status"] == "oom")["detail"]["error"]


def test_slow_points_are_skipped_with_a_reason():
    points = run_speed(_cfg(lengths=[16, 32, 64], max_seconds=1e-9, repeats=1), progress=False)
    for p in points:
        if p["n"] == 16:
            assert p["status"] == "ok"
        else:
            assert p["status"] == "skipped" and "predicted" in p["detail"]["reason"]


def test_sweep_budget_skips_the_rest():
    points = run_speed(_cfg(budget_s=0.0), progress=False)
    assert all(p["status"] == "skipped" and "budget" in p["detail"]["reason"] for p in points)


def test_bad_config():
    with pytest.raises(ValueError, match="valid modes"):
        SpeedConfig(modes=["bwd"])
    with pytest.raises(ValueError, match="unknown mixer"):
        SpeedConfig(mixers=["nope"])
    for kwargs, needle in [({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"mixers": []}, "mixers"),
                           ({"n_heads": 0}, "n_heads"), ({"dim": 30, "n_heads": 4}, "dim"),
                           ({"max_seconds": -1.0}, "max_seconds"), ({"memory_fraction": 0.0}, "memory_fraction")]:
        with pytest.raises(ValueError, match=f"^{needle}:"):
            SpeedConfig(**kwargs)


def test_explicit_filter_mixers_are_built_for_the_longest_length():
    """base_conv's filter has max_len taps (512 by default): a sweep past it sizes the filter, not errors."""
    points = run_speed(_cfg(mixers=["base_conv"], lengths=[16, 600], repeats=1), progress=False)
    mine = [p for p in points if p["mixer"] == "base_conv"]
    assert mine and all(p["status"] == "ok" for p in mine), mine
