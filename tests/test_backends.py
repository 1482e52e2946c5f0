"""Every backend agrees with ``backend="reference"`` in float64: forward, log-sum-exp and gradients.

Covered: every pattern and score modifier, GQA (H_kv = H, H/2, 1), cross attention with a KV-cache
offset, value head dim != query head dim, batch > 1, sequence lengths that are not multiples of
the block size (64 on CPU) and, with 16-token blocks, layouts of many blocks. Fully masked
query rows return exact zeros with zero query gradients on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops import native
from attnzoo.patterns import Shape

B, H = 2, 4
# "blocksparse16": the blocksparse backend with 16-token blocks (many blocks at small N).
BACKENDS = ["sdpa", "blocksparse", "blocksparse16"]


def _resolve(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "blocksparse16":
        request.getfixturevalue("small_block")
        return "blocksparse"
    return backend


def _rand_bool(g: torch.Generator, *shape: int, p: float = 0.7) -> torch.Tensor:
    return torch.rand(*shape, generator=g) < p


def _sorted_ids(g: torch.Generator, b: int, n: int, docs: int) -> torch.Tensor:
    """Non-decreasing document ids ``[b, n]`` with random boundaries."""
    cuts = torch.rand(b, n, generator=g) < docs / n
    cuts[:, 0] = False
    return torch.cumsum(cuts.long(), dim=-1)


def _padding(g: torch.Generator, b: int, m: int) -> torch.Tensor:
    """Random key padding; batch element 1 is fully padded (its rows see no key)."""
    mask = _rand_bool(g, b, m)
    mask[0, :3] = True
    mask[1] = False
    return mask


def _custom_empty_row(b, h, q, kv):
    # Per batch and head, with an empty row (q == 4) and sparse, irregular structure.
    return (((q * 7 + kv * 3 + b + 2 * h) % 5) != 0) & (q != 4)


# name -> (builder(generator, shape) -> pattern, N, M)
PatternBuilder = Callable[[torch.Generator, Shape], Any]
PATTERN_CASES: dict[str, tuple[PatternBuilder, int, int]] = {
    "none": (lambda g, s: None, 37, 37),
    "full": (lambda g, s: P.Full(), 37, 37),
    "causal": (lambda g, s: P.Causal(), 37, 37),
    "causal_kv_cache": (lambda g, s: P.Causal(), 13, 37),
    "causal_offset_pos": (lambda g, s: P.Causal(offset=5), 37, 37),
    "causal_offset_neg": (lambda g, s: P.Causal(offset=-3), 37, 37),
    "causal_long_queries": (lambda g, s: P.Causal(offset=0), 37, 20),
    "window": (lambda g, s: P.SlidingWindow(5), 37, 37),
    "window_causal_sink": (lambda g, s: P.SlidingWindow(6, causal=True, n_sink=3), 37, 37),
    "window_per_head_2": (lambda g, s: P.SlidingWindow([2, 9], causal=True), 37, 37),
    "window_per_head_4": (lambda g, s: P.SlidingWindow([1, 3, 8, 20]), 37, 37),
    "window_kv_cache": (lambda g, s: P.SlidingWindow(4, causal=True, n_sink=2), 11, 37),
    "dilated": (lambda g, s: P.DilatedWindow(3, 2), 37, 37),
    "dilated_causal": (lambda g, s: P.DilatedWindow(2, 3, causal=True), 37, 37),
    "nbhd_1d": (lambda g, s: P.Neighborhood(7), 37, 37),
    "nbhd_1d_dilated": (lambda g, s: P.Neighborhood(5, dilation=3), 37, 37),
    "nbhd_1d_stride": (lambda g, s: P.Neighborhood(6, stride=3), 37, 37),
    "nbhd_1d_causal": (lambda g, s: P.Neighborhood(5, causal=True), 37, 37),
    "nbhd_2d": (lambda g, s: P.Neighborhood((3, 5), grid=(5, 7)), 35, 35),
    "nbhd_2d_dilated": (lambda g, s: P.Neighborhood(3, dilation=2, grid=(6, 7)), 42, 42),
    "nbhd_2d_stride": (lambda g, s: P.Neighborhood(3, stride=(2, 3), grid=(6, 7)), 42, 42),
    "nbhd_2d_causal": (lambda g, s: P.Neighborhood(3, causal=(True, False), grid=(6, 7)), 42, 42),
    "nbhd_3d": (lambda g, s: P.Neighborhood((2, 2, 3), dilation=(1, 2, 1), grid=(3, 4, 5)), 60, 60),
    "document": (lambda g, s: P.Document([10, 0, 17, 10]), 37, 37),
    "document_ids": (lambda g, s: P.Document.from_ids(_sorted_ids(g, s.batch, s.n_q, 4)), 37, 37),
    "document_causal": (lambda g, s: P.Document([20, 17]) & P.Causal(), 37, 37),
    "prefix_lm": (lambda g, s: P.PrefixLM(7), 37, 37),
    "prefix_lm_per_batch": (lambda g, s: P.PrefixLM(torch.tensor([0, 20])), 37, 37),
    "global_or_window": (lambda g, s: P.GlobalTokens(3) | P.SlidingWindow(2), 37, 37),
    "key_padding": (lambda g, s: P.KeyPadding(_padding(g, s.batch, s.n_kv)), 37, 37),
    "key_padding_causal": (lambda g, s: P.Causal() & P.KeyPadding(_padding(g, s.batch, s.n_kv)), 13, 37),
    "custom": (lambda g, s: P.Custom(_custom_empty_row), 37, 37),
    "not_causal": (lambda g, s: ~P.Causal(), 37, 37),
    "per_head": (
        lambda g, s: P.PerHead([P.Causal(), P.SlidingWindow(3), P.Full(), P.Document([20, 17])]), 37, 37,
    ),
    "composite": (
        lambda g, s: (P.SlidingWindow(4) | P.GlobalTokens(2)) & ~P.DilatedWindow(1, 5) & P.PrefixLM(3), 37, 37,
    ),
}


def _compare(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    fwd_bwd,
    tol,
    *,
    extra: tuple[torch.Tensor, ...] = (),
    **kwargs,
) -> None:
    """Out, lse (where the backend returns it) and all gradients equal the reference's."""
    want_lse = backend in ("blocksparse",)
    ref_out, ref_lse, ref_grads = fwd_bwd("reference", q, k, v, dout=dout, extra=extra, return_lse=True, **kwargs)
    out, lse, grads = fwd_bwd(backend, q, k, v, dout=dout, extra=extra, return_lse=want_lse, **kwargs)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, **tol)
    if want_lse:
        torch.testing.assert_close(lse, ref_lse, **tol)
    names = ["q", "k", "v", *(f"extra[{i}]" for i in range(len(extra)))]
    for name, got, want in zip(names, grads, ref_grads):
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_pattern_matches_reference(case, h_kv, backend, request, rng, qkv, randn, fwd_bwd, tol):
    build, n, m = PATTERN_CASES[case]
    pattern = build(rng, Shape(B, H, n, m))
    q, k, v = qkv(B, H, h_kv, n, m, 8, 5)
    dout = randn(B, H, n, 5)
    _compare(_resolve(backend, request), q, k, v, dout, fwd_bwd, tol, pattern=pattern)


# Score modifiers ------------------------------------------------------------------------------


@dataclass
class ModCase:
    score_mod: Any
    extra: tuple[torch.Tensor, ...] = ()
    additive: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


def _rpb_1d(randn, s: Shape) -> ModCase:
    rpb = P.RelativePositionBias(s.heads, max_distance=6).double()
    with torch.no_grad():
        rpb.table.copy_(randn(*rpb.table.shape))
    return ModCase(rpb, (rpb.table,))


def _alibi_grad(randn, s: Shape, offset: int | None = None) -> ModCase:
    slopes = (randn(s.heads).abs() * 0.3).requires_grad_()
    return ModCase(P.ALiBi(slopes, offset=offset), (slopes,))


def _bias(randn, s: Shape, b: int, h: int) -> ModCase:
    bias = randn(b, h, s.n_q, s.n_kv, requires_grad=True)
    return ModCase(P.Bias(bias), (bias,))


def _custom_tensors(randn, s: Shape) -> ModCase:
    w = randn(s.heads, requires_grad=True)
    fn = lambda score, b, h, q, kv: score * torch.exp(0.3 * w[h]) + 0.1 * w[h] * (q - kv).abs()
    return ModCase(P.CustomScore(fn, tensors=[w]), (w,), additive=False)


def _chain_additive(randn, s: Shape) -> ModCase:
    bias, rpb = _bias(randn, s, 1, s.heads), _rpb_1d(randn, s)
    return ModCase([bias.score_mod, rpb.score_mod], bias.extra + rpb.extra)


def _chain_softcap(randn, s: Shape) -> ModCase:
    alibi = _alibi_grad(randn, s)
    return ModCase([alibi.score_mod, P.SoftCap(2.0)], alibi.extra, additive=False)


MOD_CASES: dict[str, Callable[[Any, Shape], ModCase]] = {
    "alibi_heads": lambda r, s: ModCase(P.ALiBi(s.heads)),
    "alibi_grad": _alibi_grad,
    "alibi_offset": lambda r, s: _alibi_grad(r, s, offset=3),
    "softcap": lambda r, s: ModCase(P.SoftCap(1.5), additive=False, kwargs={"scale": 1.0}),
    "bias_full": lambda r, s: _bias(r, s, s.batch, s.heads),
    "bias_broadcast": lambda r, s: _bias(r, s, 1, 1),
    "bias_per_batch": lambda r, s: _bias(r, s, s.batch, 1),
    "rpb_1d": _rpb_1d,
    "callable": lambda r, s: ModCase(
        lambda score, b, h, q, kv: score * (1 + 0.25 * h) - 0.05 * (q - kv).abs(), additive=False
    ),
    "custom_tensors": _custom_tensors,
    "chain_additive": _chain_additive,
    "chain_softcap": _chain_softcap,
}

def _named_mod(name: str, randn, shape: Shape) -> ModCase:
    return ModCase(None) if name == "none" else MOD_CASES[name](randn, shape)


MOD_PATTERNS: dict[str, PatternBuilder] = {
    "none": lambda g, s: None,
    "causal": lambda g, s: P.Causal(),
    "window_global": lambda g, s: P.SlidingWindow(5, causal=True) | P.GlobalTokens(2),
    "padding": lambda g, s: P.KeyPadding(_padding(g, s.batch, s.n_kv)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "pattern, n, m",
    [("none", 37, 37), ("none", 13, 37), ("causal", 37, 37), ("causal", 13, 37), ("window_global", 37, 37),
     ("padding", 13, 37)],
)
@pytest.mark.parametrize("mod", list(MOD_CASES))
def test_score_mod_matches_reference(mod, pattern, n, m, backend, request, rng, qkv, randn, fwd_bwd, tol):
    shape = Shape(B, H, n, m)
    case = MOD_CASES[mod](randn, shape)
    pat = MOD_PATTERNS[pattern](rng, shape)
    q, k, v = qkv(B, H, 2, n, m, 6, 3)
    dout = randn(B, H, n, 3)
    kwargs = dict(pattern=pat, score_mod=case.score_mod, **case.kwargs)
    if backend == "sdpa" and not case.additive:
        with pytest.raises(ValueError, match="backend='sdpa'.*not additive"):
            attnzoo.attention(q, k, v, backend="sdpa", **kwargs)
        return
    _compare(_resolve(backend, request), q, k, v, dout, fwd_bwd, tol, extra=case.extra, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["none", "swin_window", "causal_rows"])
def test_relative_position_bias_2d_matches_reference(pattern, backend, request, randn, qkv, fwd_bwd, tol):
    """Swin-style 2-D relative-position bias on a 5 x 7 window, with its table's gradient."""
    rpb = P.RelativePositionBias(H, grid=(5, 7)).double()
    assert rpb.table.shape == (H, 9 * 13)
    with torch.no_grad():
        rpb.table.copy_(randn(*rpb.table.shape))
    pat = {
        "none": None,
        "swin_window": P.Neighborhood(3, grid=(5, 7)),
        "causal_rows": P.Neighborhood(3, causal=(True, False), grid=(5, 7)),
    }[pattern]
    q, k, v = qkv(B, H, 1, 35, 35, 4, 7)
    dout = randn(B, H, 35, 7)
    _compare(_resolve(backend, request), q, k, v, dout, fwd_bwd, tol, extra=(rpb.table,), pattern=pat, score_mod=rpb)


def test_relative_position_bias_2d_index():
    """The Swin index: ``(dy + Wh - 1) * (2 Ww - 1) + dx + Ww - 1`` over a row-major window."""
    rpb = P.RelativePositionBias(1, grid=(2, 3))
    shape = Shape(1, 1, 6, 6)
    q, kv = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    got = rpb.index(q, kv, shape)
    want = torch.empty(6, 6, dtype=torch.long)
    for i in range(6):
        for j in range(6):
            dy, dx = i // 3 - j // 3, i % 3 - j % 3
            want[i, j] = (dy + 1) * 5 + dx + 2
    assert torch.equal(got, want)
    assert int(got.max()) == rpb.table.shape[1] - 1 and int(got.min()) == 0


def test_relative_position_bias_1d_clips_distance(randn):
    rpb = P.RelativePositionBias(2, max_distance=3).double()
    with torch.no_grad():
        rpb.table.copy_(randn(2, 7))
    shape = Shape(1, 2, 4, 10)  # queries are the last 4 of 10 tokens
    score = torch.zeros((), dtype=torch.float64)
    h, q, kv = torch.arange(2).view(-1, 1, 1), torch.arange(4).view(1, -1, 1), torch.arange(10).view(1, 1, -1)
    got = rpb(score, None, h, q, kv, shape)
    rel = (kv - (q + 6)).clamp(-3, 3) + 3
    want = rpb.table.detach()[h, rel]
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


# Many blocks ----------------------------------------------------------------------------------

N_BIG = 100  # 7 blocks of 16 or 2 blocks of 64, the last one ragged


def _multiblock_padding(g: torch.Generator, b: int, m: int) -> torch.Tensor:
    mask = _rand_bool(g, b, m, p=0.5)
    mask[0, :40] = False  # whole key blocks empty for batch 0 only
    mask[0, 40] = True
    mask[1] = False
    return mask


MULTIBLOCK_CASES: dict[str, tuple[PatternBuilder, int, int]] = {
    "global_rows": (lambda g, s: P.GlobalTokens(3) | P.SlidingWindow(8, causal=True), N_BIG, N_BIG),
    "per_head_windows_sink": (lambda g, s: P.SlidingWindow([4, 30], causal=True, n_sink=5), N_BIG, N_BIG),
    "padding_empty_blocks": (lambda g, s: P.KeyPadding(_multiblock_padding(g, s.batch, s.n_kv)), N_BIG, N_BIG),
    "padding_causal_cache": (
        lambda g, s: P.Causal() & P.KeyPadding(_multiblock_padding(g, s.batch, s.n_kv)), 40, N_BIG,
    ),
    "documents": (lambda g, s: P.Document.from_ids(_sorted_ids(g, s.batch, s.n_q, 9)), N_BIG, N_BIG),
    "custom_empty_band": (
        lambda g, s: P.Custom(lambda b, h, q, kv: ((q - kv).abs() < 20 + 10 * h) & ((q < 20) | (q > 35))),
        N_BIG, N_BIG,
    ),
    "dilated": (lambda g, s: P.DilatedWindow(4, 7), N_BIG, N_BIG),
    "nbhd_2d_dilated": (lambda g, s: P.Neighborhood(5, dilation=(2, 1), grid=(10, 10)), N_BIG, N_BIG),
    "nbhd_3d_stride": (lambda g, s: P.Neighborhood(3, stride=(1, 3, 2), grid=(4, 5, 5)), N_BIG, N_BIG),
    "per_head": (
        lambda g, s: P.PerHead([P.Causal(), P.Neighborhood(9), P.SlidingWindow(2) | P.GlobalTokens(1), ~P.Causal()]),
        N_BIG, N_BIG,
    ),
    "prefix_per_batch": (lambda g, s: P.PrefixLM(torch.tensor([70, 3])) & P.SlidingWindow(40), N_BIG, N_BIG),
    "kv_cache_window": (lambda g, s: P.SlidingWindow(21, causal=True, n_sink=4), 33, N_BIG),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mod", ["none", "alibi_grad", "softcap"])
@pytest.mark.parametrize("case", list(MULTIBLOCK_CASES))
def test_multiblock_layouts_match_reference(case, mod, backend, request, rng, randn, qkv, fwd_bwd, tol):
    build, n, m = MULTIBLOCK_CASES[case]
    shape = Shape(B, H, n, m)
    pattern = build(rng, shape)
    mc = _named_mod(mod, randn, shape)
    q, k, v = qkv(B, H, 2, n, m, 4, 6)
    dout = randn(B, H, n, 6)
    kwargs = dict(pattern=pattern, score_mod=mc.score_mod, **mc.kwargs)
    if backend == "sdpa" and not mc.additive:
        with pytest.raises(ValueError, match="not additive"):
            attnzoo.attention(q, k, v, backend="sdpa", **kwargs)
        return
    _compare(_resolve(backend, request), q, k, v, dout, fwd_bwd, tol, extra=mc.extra, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS + ["gather", "auto"])
@pytest.mark.parametrize("layout", ["k", "v", "kv", "qkv"])
def test_non_contiguous_inputs_match_reference(layout, backend, request, randn, fwd_bwd, tol):
    """q / k / v given as ``[B, N, H, D]`` tensors transposed to ``[B, H, N, D]`` (what a mixer's projection
    gives), with M a whole number of blocks: blocksparse once viewed them as if contiguous."""
    if backend == "gather" and native.unavailable("gather") is not None:
        pytest.skip(native.unavailable("gather"))
    n, d = 128, 8
    pattern = P.SlidingWindow(5) if backend == "gather" else P.Causal()

    def make(name: str) -> torch.Tensor:
        if name in layout:
            return randn(B, n, H, d).transpose(1, 2).requires_grad_()
        return randn(B, H, n, d, requires_grad=True)

    q, k, v = make("q"), make("k"), make("v")
    assert not k.is_contiguous() or not v.is_contiguous() or not q.is_contiguous()
    _compare(_resolve(backend, request), q, k, v, randn(B, H, n, d), fwd_bwd, tol, pattern=pattern)


def test_blocksparse_layout_has_many_blocks(small_block):
    """Guard for the multi-block tests: block 16 really splits N=150 into 10 ragged blocks."""
    from attnzoo.ops.backends import BACKENDS as REGISTRY
    from attnzoo.ops.problem import make_problem

    q = torch.zeros(1, 1, N_BIG, 4, dtype=torch.float64)
    p = make_problem(q, q, q, pattern=P.SlidingWindow(8), score_mod=None, scale=None,
                     return_weights=False, return_lse=False)
    layout = REGISTRY["blocksparse"].layout(p)
    assert layout.block_q == 16 and layout.state.shape[-2:] == (7, 7)
    assert 0 < layout.active_fraction < 0.5


# Fully masked rows ----------------------------------------------------------------------------

EMPTY_ROW_CASES: dict[str, tuple[PatternBuilder, int, int]] = {
    "key_padding_batch": (lambda g, s: P.KeyPadding(_padding(g, s.batch, s.n_kv)), 37, 37),
    "document_padded": (
        lambda g, s: P.Document.from_ids(torch.tensor([[0] * 10 + [1] * 12 + [2] * 15, [0] * 20 + [1] * 17]))
        & P.KeyPadding(torch.tensor([[True] * 10 + [False] * 12 + [True] * 15, [True] * 37])),
        37, 37,
    ),
    "custom_empty_rows": (
        lambda g, s: P.Custom(lambda b, h, q, kv: (kv <= q) & (q % 5 != 2), per_batch=False, per_head=False), 37, 37,
    ),
    "causal_negative_offset": (lambda g, s: P.Causal(offset=-4), 37, 37),
    "not_causal": (lambda g, s: ~P.Causal(), 37, 37),
    "empty_heads": (lambda g, s: P.PerHead([P.Full(), P.Custom(lambda b, h, q, kv: (q >= 0) & (kv < 0))]), 37, 37),
}


@pytest.mark.parametrize("backend", ["reference", "auto", *BACKENDS])
@pytest.mark.parametrize("mod", ["none", "alibi_grad", "softcap"])
@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES))
def test_fully_masked_rows_are_zero(case, mod, backend, request, rng, randn, qkv, fwd_bwd, tol):
    build, n, m = EMPTY_ROW_CASES[case]
    shape = Shape(B, H, n, m)
    pattern = build(rng, shape)
    mc = _named_mod(mod, randn, shape)
    empty = ~pattern.dense_mask(shape).any(-1).expand(B, H, n)
    assert empty.any() and not empty.all(), "the case must have some, not only, empty rows"
    q, k, v = qkv(B, H, 2, n, m, 8, 5)
    dout = randn(B, H, n, 5)
    kwargs = dict(pattern=pattern, score_mod=mc.score_mod, **mc.kwargs)
    if backend == "sdpa" and not mc.additive:
        with pytest.raises(ValueError, match="not additive"):
            attnzoo.attention(q, k, v, backend="sdpa", **kwargs)
        return
    name = _resolve(backend, request)
    want_lse = name in ("reference", "blocksparse")
    out, lse, grads = fwd_bwd(name, q, k, v, dout=dout, extra=mc.extra, return_lse=want_lse, **kwargs)
    assert not torch.isnan(out).any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "fully masked rows must be exact zeros"
    for g in grads:
        assert torch.isfinite(g).all(), "gradients must be finite"
    dq = grads[0]
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty])), "fully masked rows get zero query gradients"
    if want_lse:
        assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    if name != "reference":
        _compare(name, q, k, v, dout, fwd_bwd, tol, extra=mc.extra, **kwargs)


def test_all_rows_masked(qkv, randn, fwd_bwd, request):
    """A pattern allowing nothing: zeros everywhere, zero gradients, on every backend."""
    pattern = P.Custom(lambda b, h, q, kv: (q < 0) & (kv >= 0), per_batch=False, per_head=False)
    q, k, v = qkv(B, H, 1, 20, 25, 4, 3)
    dout = randn(B, H, 20, 3)
    for name in ["reference", "sdpa", "blocksparse", "blocksparse16"]:
        out, _, grads = fwd_bwd(_resolve(name, request), q, k, v, dout=dout, pattern=pattern)
        assert torch.equal(out, torch.zeros_like(out)), name
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), name


# Weights, lse and float32 ---------------------------------------------------------------------


def test_reference_weights_and_lse_are_consistent(qkv):
    pattern = P.SlidingWindow(3, causal=True) & P.KeyPadding(_padding(torch.Generator().manual_seed(3), B, 29))
    q, k, v = qkv(B, H, 2, 29, 29, 6, 4, requires_grad=False)
    out, w, lse = attnzoo.attention(q, k, v, pattern=pattern, return_weights=True, return_lse=True)
    allowed = pattern.dense_mask(Shape(B, H, 29, 29)).expand(B, H, 29, 29)
    rows = allowed.any(-1)
    assert torch.equal(w[~allowed], torch.zeros_like(w[~allowed]))
    torch.testing.assert_close(w.sum(-1), rows.to(w.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, w @ v.repeat_interleave(2, dim=1), rtol=1e-12, atol=1e-12)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / 6**0.5
    want_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


# name -> (pattern, N): block-layout paths (none, key padding) and tile plans (strided band, gathered
# neighbourhood, permuted Swin windows, which the fused flash backward takes when the lse is not returned).
LSE_GRAD_CASES: dict[str, tuple[Callable[[], Any], int]] = {
    "none": (lambda: None, 37),
    "key_padding": (lambda: P.KeyPadding(_padding(torch.Generator().manual_seed(5), B, 37)), 37),
    "window": (lambda: P.SlidingWindow(5, causal=True), 37),
    "nbhd_2d": (lambda: P.Neighborhood(3, grid=(5, 8)), 40),
    "swin": (lambda: P.WindowPartition(4, grid=(8, 8)), 64),
    "maxvit_grid": (lambda: P.GridPartition(4, grid=(8, 8)), 64),
}


@pytest.mark.parametrize("backend", ["blocksparse", "blocksparse16"])
@pytest.mark.parametrize("only_lse", [False, True], ids=["out_and_lse", "only_lse"])
@pytest.mark.parametrize("case", list(LSE_GRAD_CASES))
def test_lse_gradient_matches_reference(case, only_lse, backend, request, qkv, randn, tol):
    """Gradients through the returned log-sum-exp (merging partial attentions trains through it) equal
    the reference's, with the output in the loss too or alone."""
    build, n = LSE_GRAD_CASES[case]
    q, k, v = qkv(B, H, 2, n, n, 8, 5)
    dout, dlse = randn(B, H, n, 5), randn(B, H, n)

    def grads(name: str) -> tuple[torch.Tensor, ...]:
        out, lse = attnzoo.attention(q, k, v, pattern=build(), backend=name, return_lse=True)
        loss = (lse.nan_to_num(neginf=0.0) * dlse).sum() + (0 if only_lse else (out * dout).sum())
        got = torch.autograd.grad(loss, (q, k, v), allow_unused=True)  # the lse does not depend on v
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(got, (q, k, v)))

    ref = grads("reference")
    assert ref[0].abs().max() > 0.1
    for name, got, want in zip("qkv", grads(_resolve(backend, request)), ref):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocksparse16"])
@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)], ids=str
)
def test_low_precision_close_to_float64_reference(dtype, atol, backend, request, qkv):
    q, k, v = qkv(B, H, 2, 50, 50, 16, 8, requires_grad=False)
    pattern = P.SlidingWindow(7, causal=True) | P.GlobalTokens(2)
    got = attnzoo.attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern=pattern, score_mod=P.ALiBi(H),
                            backend=_resolve(backend, request))
    assert got.dtype == dtype
    # Inputs rounded to dtype: compare with the float64 reference run on the rounded inputs.
    rounded = attnzoo.attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(),
                                pattern=pattern, score_mod=P.ALiBi(H), backend="reference")
    torch.testing.assert_close(got.double(), rounded, rtol=0, atol=atol)


# FlexAttention (forward only on CPU; compiles, so slow) -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, d",
    [
        (37, 32),
        pytest.param(
            40, 16,
            marks=pytest.mark.xfail(
                strict=True,
                reason="PyTorch 2.13's CPU FlexAttention kernel is wrong (or NaN) for head dim 16 when "
                "N % 16 == 8 (e.g. N = 24, 40, 56); attnzoo's Flex.why_not accepts such calls",
            ),
        ),
    ],
)
def test_flex_forward_matches_reference(n, d):
    # Start from empty Dynamo caches: past the recompile limit flex silently runs unfused in eager
    # mode, which would hide (or XPASS) the compiled kernel's behaviour.
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, n, d, generator=g)
    k, v = torch.randn(B, 2, n, d, generator=g), torch.randn(B, 2, n, d, generator=g)
    pattern = P.SlidingWindow(5, causal=True) | P.GlobalTokens(2)
    got = attnzoo.attention(q, k, v, pattern=pattern, score_mod=P.ALiBi(H), backend="flex")
    want = attnzoo.attention(q.double(), k.double(), v.double(), pattern=pattern, score_mod=P.ALiBi(H),
                             backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
