"""Bad inputs to the library (not the CLI) give a clear error naming the argument, before any work; constants are
built in the call's dtype."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.bench.models import build_mixer, mixer_kwargs_for, mixer_slugs


def _qkv(*shape: int, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("shape, match", [((1, 1, 8, 0), "head dims"), ((0, 1, 8, 4), "batch"),
                                          ((1, 0, 8, 4), "heads|one head")])
def test_attention_refuses_empty_dimensions(shape, match):
    q, k, v = _qkv(*shape)
    with pytest.raises(ValueError, match=match):
        attnzoo.attention(q, k, v)


def test_attention_refuses_zero_value_dim():
    q, k = _qkv(1, 1, 8, 4)[:2]
    with pytest.raises(ValueError, match="D_v=0"):
        attnzoo.attention(q, k, torch.randn(1, 1, 8, 0, dtype=torch.float64))


def test_check_finite_covers_the_score_modifier():
    q, k, v = _qkv(1, 2, 8, 4)
    for bad in (float("inf"), float("nan")):
        bias = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
        bias[0, 1, 3, 4] = bad
        with pytest.raises(ValueError, match="bias: holds"):
            attnzoo.attention(q, k, v, score_mod=P.Bias(bias), check_finite=True)
    masked = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    masked[..., 0] = float("-inf")  # -inf masks a pair: allowed
    attnzoo.attention(q, k, v, score_mod=P.Bias(masked), check_finite=True)
    slopes = torch.tensor([0.5, float("inf")], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-finite"):
        attnzoo.attention(q, k, v, score_mod=[P.ALiBi(slopes), P.SoftCap(5.0)], check_finite=True)


@pytest.mark.parametrize("heads", [3, 8, 12, 16, 24])
def test_alibi_is_exact_in_float64(heads):
    """Slopes kept in float64: a float64 call matches the paper's formula to rounding (they were float32: ~4e-8 off
    for 12 or 16 heads)."""
    n = 32
    q, k, v = _qkv(1, heads, n, 8)
    got = attnzoo.attention(q, k, v, score_mod=P.ALiBi(heads), backend="reference")
    closest = 2 ** math.floor(math.log2(heads))
    ratio = 2 ** (-8 / closest)
    slopes = [ratio ** (i + 1) for i in range(closest)]
    slopes += [(2 ** (-4 / closest)) ** (2 * i + 1) for i in range(heads - closest)]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None]).abs().double()
    bias = -torch.tensor(slopes, dtype=torch.float64)[:, None, None] * dist
    want = attnzoo.attention(q, k, v, score_mod=P.Bias(bias[None]), backend="reference")
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-14)
    assert P.alibi_slopes(heads).dtype == torch.float64
    f32 = attnzoo.attention(q.float(), k.float(), v.float(), score_mod=P.ALiBi(heads), backend="reference")
    assert f32.dtype == torch.float32


def _mixers() -> list[str]:
    return [s for s in mixer_slugs() if attnzoo.spec(s).slug == s]


@pytest.mark.parametrize("case", ["float64", "int64", "N=0", "B=0"])
def test_every_mixer_names_x_for_bad_input(case):
    """Every registered mixer refuses empty, integer or wrongly-typed input with an error naming ``x`` (no raw
    RuntimeError from inside the module)."""
    x = {"float64": torch.randn(2, 16, 32, dtype=torch.float64), "int64": torch.ones(2, 16, 32, dtype=torch.long),
         "N=0": torch.randn(2, 0, 32), "B=0": torch.randn(0, 16, 32)}[case]
    failures = []
    for slug in _mixers():
        try:
            module = build_mixer(slug, 32, **mixer_kwargs_for(slug, n_heads=2))
        except (ValueError, TypeError):
            continue
        if not any(p.dtype.is_floating_point for p in module.parameters()) and case == "float64":
            continue  # nothing to disagree with
        try:
            with torch.no_grad():
                module(x)
        except (ValueError, TypeError) as e:
            if not str(e).startswith("x:"):
                failures.append(f"{slug}: {e}")
        except Exception as e:  # noqa: BLE001 - collected and reported
            failures.append(f"{slug}: raw {type(e).__name__}: {e}")
        else:
            failures.append(f"{slug}: accepted {case}")
    assert not failures, "\n".join(failures)


def test_mixer_input_check_spares_autocast():
    m = attnzoo.create("mha", dim=16, n_heads=2)
    x = torch.randn(1, 4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).shape == (1, 4, 16)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        m(x)


def test_capture_refuses_a_negative_budget():
    from attnzoo.inspect import capture

    model = torch.nn.Linear(2, 2)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            capture(model, torch.zeros(1, 2), max_bytes=bad)
