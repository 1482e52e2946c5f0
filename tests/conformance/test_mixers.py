"""The conformance suite: every registered token mixer (and hosted score modifier) against one contract.

A new entry is checked the moment it is registered: nothing here names an entry.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers import KVCache
from tests.conformance._build import (
    build,
    build_pair,
    check_against_reference,
    check_every_parameter_gets_a_gradient,
    check_safetensors_round_trip,
    check_seeded,
    inputs,
    mixer_specs,
    pad_mask,
    supports,
)

SPECS = mixer_specs()
IDS = [s.slug for s in SPECS]


def by(what: str) -> list:
    return [pytest.param(s, id=s.slug) for s in SPECS if supports(s, what)]


def run(m, x, **kw):
    out = m(x, **kw)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_shape_dtype_finite(spec, dtype):
    m = build(spec).to(dtype)
    for scale in (1.0, 30.0) if dtype == torch.bfloat16 else (1.0,):
        x = inputs(dtype=dtype) * scale
        y = run(m, x)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.isfinite(y).all(), f"{spec.slug}: non-finite output in {dtype} at input scale {scale}"


def _modes(spec):
    modes = [{}]
    if supports(spec, "causal"):
        modes.append({"causal": True})
    if supports(spec, "padding"):
        modes.append({"mask": pad_mask()})
    return modes


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_matches_float64_reference(spec):
    m, ref = build_pair(spec)
    for kw in _modes(spec):
        check_against_reference(spec.slug, m, ref, run, inputs(seed=3), kw)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_parameter_gets_a_gradient(spec):
    kw = {"causal": True} if supports(spec, "causal") else {}
    check_every_parameter_gets_a_gradient(spec.slug, build(spec).double(),
                                          lambda m: run(m, inputs(dtype=torch.float64), **kw).pow(2).sum())


def _attributes(m) -> dict[tuple[str, str], int]:
    return {(name, k): id(v) for name, sub in m.named_modules() for k, v in vars(sub).items()
            if k not in getattr(sub, "last_call_outputs", ("captured",))}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_keeps_no_per_call_value_on_the_module(spec):
    """Per-call values travel in the hooks' Call argument: a forward leaves every attribute of every submodule."""
    m = build(spec).double()
    before = _attributes(m)
    for kw in _modes(spec):
        run(m, inputs(dtype=torch.float64), **kw)
    after = _attributes(m)
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})
    assert not changed, f"{spec.slug}: forward set {changed}"


@pytest.mark.parametrize("spec", by("causal"))
def test_causal_prefix(spec):
    m = build(spec).double()
    x = inputs(dtype=torch.float64)
    y = run(m, x, causal=True)
    for t in (0, 5, 10):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        torch.testing.assert_close(run(m, x2, causal=True)[:, : t + 1], y[:, : t + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", by("decoding"))
def test_cache_decoding_equals_full_forward(spec):
    m = build(spec).double()
    x = inputs(n=11, dtype=torch.float64)
    full = run(m, x, causal=True)
    for chunks in ([1] * 11, [4, 1, 3, 2, 1]):
        cache, outs, start = KVCache(), [], 0
        for c in chunks:
            outs.append(run(m, x[:, start:start + c], causal=True, cache=cache))
            start += c
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
        assert cache.position == 11


@pytest.mark.parametrize("spec", by("decoding"))
def test_cache_refuses_another_batch(spec):
    """A cache filled by a batch of 2 refuses a batch of 1 with an error naming it (a recurrent state of batch 2
    once broadcast silently over the smaller batch)."""
    m = build(spec).double()
    x = inputs(n=6, dtype=torch.float64)
    cache = KVCache()
    run(m, x[:, :4], causal=True, cache=cache)
    with pytest.raises(ValueError, match="^cache: holds"):
        run(m, x[:1, 4:], causal=True, cache=cache)


@pytest.mark.parametrize("spec", by("padding"))
def test_padding_invariance_and_fully_padded(spec):
    m = build(spec).double()
    x, keep = inputs(dtype=torch.float64), pad_mask()
    for kw in ({}, {"causal": True}) if supports(spec, "causal") else ({},):
        y = run(m, x, mask=keep, **kw)
        x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 5)
        y2 = run(m, x2, mask=keep, **kw)
        torch.testing.assert_close(y2[keep], y[keep], rtol=1e-10, atol=1e-12)
        assert (y[~keep] == 0).all()
    none = torch.zeros_like(keep)
    x = inputs(dtype=torch.float64).requires_grad_()
    y = run(m, x, mask=none)
    assert (y == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_batch_independence(spec):
    m = build(spec).double()
    x = inputs(b=3, dtype=torch.float64)
    y = run(m, x)
    torch.testing.assert_close(run(m, x[1:2]), y[1:2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_determinism_under_seed(spec):
    x = inputs()
    check_seeded(lambda seed: build(spec, seed=seed), lambda m: run(m, x))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_state_dict_safetensors_round_trip(spec):
    x = inputs()
    check_safetensors_round_trip(lambda seed: build(spec, seed=seed), lambda m: run(m, x))


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torch_compile_smoke(spec):
    torch.compiler.reset()  # each entry compiles from a clean state (state left by earlier compiles tripped Inductor)
    m = build(spec)
    x = inputs()
    eager = run(m, x)
    compiled = torch.compile(m)
    torch.testing.assert_close(run(compiled, x), eager, rtol=1e-4, atol=1e-5)


def _sequence_mixers(cross: bool) -> list:
    return [pytest.param(s, id=s.slug) for s in SPECS
            if s.input_kind == "sequence" and s.type == "mixer" and supports(s, "cross") == cross]


@pytest.mark.parametrize("spec", _sequence_mixers(cross=True))
def test_cross_attention_ignores_padded_context(spec):
    """A context of another length gives ``(B, N, C)``; padded context tokens do not reach the output."""
    m = build(spec).double()
    x, ctx = inputs(seed=1).double(), inputs(n=9, seed=2).double()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    y = run(m, x, context=ctx, context_mask=keep)
    assert y.shape == x.shape and torch.isfinite(y).all()
    ctx2 = torch.where(keep[..., None], ctx, 7 * inputs(n=9, seed=3).double())
    torch.testing.assert_close(run(m, x, context=ctx2, context_mask=keep), y)


@pytest.mark.parametrize("spec", _sequence_mixers(cross=False))
def test_mixers_without_cross_refuse_a_context(spec):
    """An entry whose spec does not list 'cross' refuses ``context`` with an error naming it."""
    m = build(spec)
    with pytest.raises((ValueError, TypeError), match="context"):
        run(m, inputs(), context=inputs(n=9, seed=2))
