"""Bad input fails early with ValueError/TypeError whose message names the offending argument."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P


def _t(*shape, dtype=torch.float64, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


Q = _t(2, 4, 10, 8)
K = _t(2, 2, 10, 8)
V = _t(2, 2, 10, 6)


@pytest.mark.parametrize(
    "q, k, v, exc, match",
    [
        (_t(4, 10, 8), K, V, ValueError, r"^q: expected a 4-D tensor"),
        (Q, _t(2, 2, 10, 8, 1), V, ValueError, r"^k: expected a 4-D tensor"),
        (Q, K, _t(2, 10, 6), ValueError, r"^v: expected a 4-D tensor"),
        ([[1.0]], K, V, ValueError, r"^q: expected a 4-D tensor.*list"),
        (Q, _t(3, 2, 10, 8), V, ValueError, r"^k, v: expected batch size 2"),
        (Q, K, _t(1, 2, 10, 6), ValueError, r"^k, v: expected batch size 2"),
        (Q, K, _t(2, 1, 10, 6), ValueError, r"^v: expected 2 heads"),
        (Q, _t(2, 3, 10, 8), _t(2, 3, 10, 6), ValueError, r"^k: key/value heads must divide query heads.*H=4.*H_kv=3"),
        (Q, _t(2, 2, 10, 7), V, ValueError, r"^k: expected head dim 8"),
        (Q, K, _t(2, 2, 9, 6), ValueError, r"^v: expected 10 tokens"),
        (_t(2, 4, 0, 8), K, V, ValueError, r"at least one token"),
        (Q, _t(2, 2, 0, 8), _t(2, 2, 0, 6), ValueError, r"at least one token"),
        (_t(2, 4, 10, 8, dtype=torch.int64), K, V, TypeError, r"^q: expected a floating dtype"),
        (Q, _t(2, 2, 10, 8, dtype=torch.int32), V, TypeError, r"^k: expected"),
        (Q, K, _t(2, 2, 10, 6, dtype=torch.bool), TypeError, r"^v: expected"),
        (Q, _t(2, 2, 10, 8, dtype=torch.float32), V, TypeError, r"^k: expected dtype torch.float64"),
        (Q, K, _t(2, 2, 10, 6, dtype=torch.float16), TypeError, r"^v: expected dtype torch.float64"),
        (Q, _t(2, 2, 10, 8, device="meta"), V, ValueError, r"^k: expected device cpu"),
        (Q, K, _t(2, 2, 10, 6, device="meta"), ValueError, r"^v: expected device cpu"),
    ],
    ids=[
        "q-ndim", "k-ndim", "v-ndim", "q-not-tensor", "k-batch", "v-batch", "v-heads", "heads-not-divisible",
        "k-head-dim", "v-tokens", "empty-q", "empty-kv", "q-int", "k-int", "v-bool", "k-dtype", "v-dtype",
        "k-device", "v-device",
    ],
)
def test_bad_tensors(q, k, v, exc, match):
    with pytest.raises(exc, match=match):
        attnzoo.attention(q, k, v)
    with pytest.raises(exc, match=match):
        attnzoo.explain(q, k, v)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocksparse", "auto"])
def test_check_finite(backend):
    q, k, v = _t(1, 2, 6, 4), _t(1, 2, 6, 4), _t(1, 2, 6, 4)
    attnzoo.attention(q, k, v, check_finite=True, backend=backend)
    for name, t, bad in (("q", q, float("nan")), ("k", k, float("inf")), ("v", v, float("-inf"))):
        t[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=rf"^{name}: contains 1 non-finite value"):
            attnzoo.attention(q, k, v, check_finite=True, backend=backend)
        t[0, 1, 2, 3] = 0.0


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"^backend: expected one of .*'blocksparse'.*got 'cuda'"):
        attnzoo.attention(Q, K, V, backend="cuda")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True, torch.tensor(0.5)])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"^scale: expected a finite float"):
        attnzoo.attention(Q, K, V, scale=scale)


def test_bad_pattern_and_score_mod_types():
    with pytest.raises(TypeError, match=r"^pattern: expected an attnzoo Pattern"):
        attnzoo.attention(Q, K, V, pattern=torch.ones(10, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"^score_mod: expected a ScoreMod"):
        attnzoo.attention(Q, K, V, score_mod=3.0)
    with pytest.raises(TypeError, match=r"^other: expected an attnzoo Pattern"):
        P.Causal() & torch.ones(3)
    with pytest.raises(TypeError, match=r"^other: expected an attnzoo Pattern"):
        P.Causal() | "causal"
    with pytest.raises(TypeError, match=r"^mask_mod: expected a callable"):
        P.Custom("kv <= q")
    with pytest.raises(TypeError, match=r"^score_mod: expected a callable"):
        P.CustomScore(None)
    with pytest.raises(TypeError, match=r"^patterns\[1\]: expected an attnzoo Pattern"):
        P.PerHead([P.Causal(), None])


# Patterns that do not fit the problem ----------------------------------------------------------


def _qkv(b=2, h=4, h_kv=2, n=10, m=10):
    return _t(b, h, n, 8), _t(b, h_kv, m, 8), _t(b, h_kv, m, 8)


@pytest.mark.parametrize(
    "pattern, shape, match",
    [
        (P.KeyPadding(torch.ones(2, 9, dtype=torch.bool)), {}, r"^mask: expected shape \[2, 10\], got \[2, 9\]"),
        (P.KeyPadding(torch.ones(3, 10, dtype=torch.bool)), {}, r"^mask: expected shape \[2, 10\]"),
        (P.KeyPadding(torch.ones(2, 12, dtype=torch.bool)), dict(m=10, n=12), r"^mask: expected shape \[2, 10\]"),
        (P.Neighborhood(3, grid=(3, 4)), {}, r"^Neighborhood: grid \(3, 4\) has 12 tokens but n_q=10"),
        (P.Neighborhood(3), dict(n=10, m=12), r"^Neighborhood: .*n_q=10, n_kv=12"),
        (P.Neighborhood(11), {}, r"^kernel_size: 11 is larger than the grid extent 10"),
        (P.Neighborhood(4, dilation=3), {}, r"^dilation: dilation 3 .*fewer than kernel_size 4"),
        (P.SlidingWindow([1, 2, 3]), {}, r"^window: 3 per-head windows must divide the number of heads"),
        (P.PerHead([P.Causal()] * 3), {}, r"^patterns: 3 per-head patterns must divide the number of heads"),
        (P.Document([4, 4]), {}, r"^Document: ids cover 8 tokens"),
        (P.Document([5, 5]), dict(n=5, m=10), r"^Document: .*n_q=5, n_kv=10"),
        (P.Document.from_ids(torch.zeros(3, 10, dtype=torch.long)), {}, r"^Document: ids have batch 3, expected 2"),
        (P.PrefixLM(torch.tensor([1, 2, 3])), {}, r"^prefix_len: expected shape \[2\]"),
        (P.Causal() & P.Neighborhood(3, grid=(3, 3)), {}, r"^Neighborhood: grid"),
        (~P.KeyPadding(torch.ones(2, 3, dtype=torch.bool)), {}, r"^mask: expected shape"),
    ],
    ids=[
        "padding-len", "padding-batch", "padding-is-kv-length", "nbhd-grid", "nbhd-cross", "nbhd-kernel-seq",
        "nbhd-dilation-seq", "window-heads", "perhead-heads", "doc-len", "doc-cross", "doc-ids-batch",
        "prefix-batch", "and-checks", "not-checks",
    ],
)
def test_pattern_shape_mismatch(pattern, shape, match):
    q, k, v = _qkv(**shape)
    for backend in ("auto", "reference", "blocksparse"):
        with pytest.raises(ValueError, match=match):
            attnzoo.attention(q, k, v, pattern=pattern, backend=backend)
    with pytest.raises(ValueError, match=match):
        attnzoo.explain(q, k, v, pattern=pattern)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: P.KeyPadding(torch.ones(2, 10)), r"^mask: expected a bool tensor \[B, n_kv\], got torch.float32"),
        (lambda: P.KeyPadding(torch.ones(10, dtype=torch.bool)), r"^mask: expected a bool tensor"),
        (lambda: P.KeyPadding([[True]]), r"^mask: expected a bool tensor.*list"),
        (lambda: P.Neighborhood(5, grid=(3, 4)), r"^kernel_size: 5 is larger than the grid extent 3"),
        (lambda: P.Neighborhood((3, 9), grid=(8, 8)), r"^kernel_size: 9 is larger than the grid extent 8 on axis 1"),
        (lambda: P.Neighborhood(3, stride=4), r"^stride: stride 4 is larger than kernel_size 3"),
        (lambda: P.Neighborhood((3, 3), stride=(1, 5)), r"^stride: .*on axis 1"),
        (lambda: P.Neighborhood(3, stride=2, causal=True), r"^stride: causal axes need stride 1"),
        (lambda: P.Neighborhood(3, dilation=4, grid=(10,)), r"^dilation: dilation 4 on axis 0 \(extent 10\)"),
        (lambda: P.Neighborhood(3, dilation=(1, 3), grid=(8, 8)), r"^dilation: dilation 3 on axis 1"),
        (lambda: P.Neighborhood(0), r"^kernel_size: expected a positive int"),
        (lambda: P.Neighborhood((3, 3), dilation=(1, 1, 1)), r"^dilation: expected a positive int or 2"),
        (lambda: P.Neighborhood((3, 3, 3, 3)), r"^grid: expected 1, 2 or 3 axes, got 4"),
        (lambda: P.Neighborhood(3, causal=(True, False)), r"^causal: expected a bool or 1 bools"),
        (lambda: P.SlidingWindow(0), r"^window: expected a positive integer, got 0"),
        (lambda: P.SlidingWindow([4, -1]), r"^window\[1\]: expected a positive integer"),
        (lambda: P.SlidingWindow([]), r"^window: expected a positive integer or a non-empty list"),
        (lambda: P.SlidingWindow(2.5), r"^window: expected a positive integer"),
        (lambda: P.SlidingWindow(True), r"^window: expected a positive integer"),
        (lambda: P.SlidingWindow(3, n_sink=-1), r"^n_sink: expected a non-negative integer"),
        (lambda: P.DilatedWindow(3, 0), r"^dilation: expected a positive integer"),
        (lambda: P.DilatedWindow(0, 2), r"^window: expected a positive integer"),
        (lambda: P.Causal(offset=1.5), r"^offset: expected an int or None"),
        (lambda: P.GlobalTokens(-1), r"^n: expected a non-negative integer"),
        (lambda: P.PrefixLM(-2), r"^prefix_len: expected a non-negative integer"),
        (lambda: P.PrefixLM(torch.tensor([1.5, 2.0])), r"^prefix_len: expected an int or an integer tensor"),
        (lambda: P.Document([[3, 4]]), r"^lengths: expected a non-empty 1-D list"),
        (lambda: P.Document([3, -1]), r"^lengths: expected a non-empty 1-D list"),
        (lambda: P.Document([]), r"^lengths: expected a non-empty 1-D list"),
        (lambda: P.Document.from_ids(torch.tensor([0, 1, 0])), r"^ids: document ids must be non-decreasing"),
        (lambda: P.Document.from_ids(torch.tensor([0.0, 1.0])), r"^ids: expected an integer tensor"),
        (lambda: P.Document.from_ids(torch.zeros(1, 2, 3, dtype=torch.long)), r"^ids: expected an integer tensor"),
        (lambda: P.PerHead([]), r"^patterns: expected at least one pattern"),
        (lambda: P.SoftCap(0.0), r"^cap: expected a positive float"),
        (lambda: P.SoftCap(-3.0), r"^cap: expected a positive float"),
        (lambda: P.ALiBi(torch.ones(2, 2)), r"^slopes: expected a 1-D tensor"),
        (lambda: P.ALiBi(0), r"^heads: expected a positive integer"),
        (lambda: P.alibi_slopes(-4), r"^heads: expected a positive integer"),
        (lambda: P.Bias(torch.ones(3, 3)), r"^bias: expected a float tensor"),
        (lambda: P.Bias(torch.ones(1, 1, 3, 3, dtype=torch.long)), r"^bias: expected a float tensor"),
        (lambda: P.RelativePositionBias(0), r"^heads: expected a positive int"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "score_mod, match",
    [
        (P.ALiBi(3), r"^slopes: expected 4 slopes \(one per head\), got 3"),
        (P.Bias(torch.zeros(1, 4, 10, 9, dtype=torch.float64)), r"^bias: expected shape \[2\|1, 4\|1, 10, 10\]"),
        (P.Bias(torch.zeros(3, 1, 10, 10, dtype=torch.float64)), r"^bias: expected shape"),
        (P.Bias(torch.zeros(1, 2, 10, 10, dtype=torch.float64)), r"^bias: expected shape"),
        (P.RelativePositionBias(2), r"^RelativePositionBias: built for heads=2, got 4"),
        (P.RelativePositionBias(4, grid=(3, 3)), r"^RelativePositionBias: grid \(3, 3\) needs 9 tokens, got n_q=10"),
        ([P.SoftCap(1.0), P.ALiBi(2)], r"^slopes: expected 4 slopes"),
    ],
    ids=["alibi-heads", "bias-kv", "bias-batch", "bias-heads", "rpb-heads", "rpb-grid", "chain"],
)
def test_score_mod_shape_mismatch(score_mod, match):
    q, k, v = _qkv()
    for backend in ("auto", "reference", "sdpa", "blocksparse"):
        with pytest.raises(ValueError, match=match):
            attnzoo.attention(q, k, v, score_mod=score_mod, backend=backend)


def test_merge_partials_bad_arguments():
    o, lse = _t(1, 1, 3, 2), _t(1, 1, 3)
    with pytest.raises(ValueError, match=r"^outs, lses: expected equal non-zero counts, got 2 and 1"):
        attnzoo.merge_partials([o, o], [lse])
    with pytest.raises(ValueError, match=r"^outs, lses: expected equal non-zero counts, got 0 and 0"):
        attnzoo.merge_partials([], [])


def test_custom_score_mod_that_changes_the_dtype():
    """A captured float64 tensor promotes float32 scores: a TypeError naming score_mod and both dtypes."""
    w = torch.randn(2, dtype=torch.float64)
    mod = P.CustomScore(lambda s, b, h, q, kv: s + w[h], tensors=[w])
    q = torch.randn(1, 2, 5, 8)
    for backend in ("reference", "blocksparse"):
        with pytest.raises(TypeError, match=r"^score_mod: .* dtype torch\.float32, got torch\.float64"):
            attnzoo.attention(q, q, q, score_mod=mod, backend=backend)
    ok = P.CustomScore(lambda s, b, h, q, kv: s + w.float()[h], tensors=[w])
    assert attnzoo.attention(q, q, q, score_mod=ok, backend="blocksparse").dtype == torch.float32
