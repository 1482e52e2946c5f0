"""Properties of patterns and score modifiers, checked against independent brute-force definitions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops.layout import EMPTY, FULL
from attnzoo.patterns import Shape


def dense(pattern: P.Pattern, shape: Shape) -> torch.Tensor:
    """The full ``[B, H, N, M]`` mask."""
    return pattern.dense_mask(shape).expand(shape.batch, shape.heads, shape.n_q, shape.n_kv)


# Windows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 37, 64, 130])
def test_sliding_window_covering_sequence_is_full_or_causal(n):
    shape = Shape(2, 3, n, n)
    for w in (n, n + 1, 3 * n):
        assert torch.equal(dense(P.SlidingWindow(w), shape), dense(P.Full(), shape))
        assert torch.equal(dense(P.SlidingWindow(w, causal=True), shape), dense(P.Causal(), shape))
    if n > 2:  # one less is not full
        assert not dense(P.SlidingWindow(n - 2), shape).all()
        assert not torch.equal(dense(P.SlidingWindow(n - 1, causal=True), shape), dense(P.Causal(), shape))


def test_sliding_window_matches_definition():
    n, m, w, sink = 9, 14, 3, 2
    shape = Shape(1, 1, n, m)
    off = m - n
    sym = dense(P.SlidingWindow(w, n_sink=sink), shape)[0, 0]
    cau = dense(P.SlidingWindow(w, causal=True, n_sink=sink), shape)[0, 0]
    for i, j in itertools.product(range(n), range(m)):
        d = i + off - j
        assert bool(sym[i, j]) == (abs(d) <= w or j < sink)
        assert bool(cau[i, j]) == (0 <= d < w or (j < sink and d >= 0))


def test_per_head_windows_use_head_groups():
    shape = Shape(1, 6, 20, 20)
    mask = dense(P.SlidingWindow([1, 4, 9], causal=True), shape)[0]
    for h, w in enumerate([1, 1, 4, 4, 9, 9]):
        assert torch.equal(mask[h], dense(P.SlidingWindow(w, causal=True), shape)[0, 0])


def test_dilated_window_matches_definition():
    n = 30
    shape = Shape(1, 1, n, n)
    sym = dense(P.DilatedWindow(3, 4), shape)[0, 0]
    cau = dense(P.DilatedWindow(3, 4, causal=True), shape)[0, 0]
    for i, j in itertools.product(range(n), range(n)):
        d = i - j
        assert bool(sym[i, j]) == (d % 4 == 0 and abs(d) <= 12)
        assert bool(cau[i, j]) == (d % 4 == 0 and 0 <= d < 12)
    assert torch.equal(dense(P.DilatedWindow(5, 1), shape), dense(P.SlidingWindow(5), shape))


def test_prefix_lm_and_global_tokens_match_definition():
    shape = Shape(2, 1, 12, 12)
    pre = dense(P.PrefixLM(torch.tensor([0, 5])), shape)[:, 0]
    glob = dense(P.GlobalTokens(2), shape)[0, 0]
    for i, j in itertools.product(range(12), range(12)):
        assert bool(pre[0, i, j]) == (j <= i)
        assert bool(pre[1, i, j]) == (j < 5 or j <= i)
        assert bool(glob[i, j]) == (i < 2 or j < 2)


def test_causal_offset_default_is_kv_cache():
    shape = Shape(1, 1, 3, 8)
    mask = dense(P.Causal(), shape)[0, 0]
    want = torch.tensor([[j <= i + 5 for j in range(8)] for i in range(3)])
    assert torch.equal(mask, want)
    top_left = torch.tensor([[j <= i for j in range(8)] for i in range(3)])
    assert torch.equal(dense(P.Causal(offset=0), shape)[0, 0], top_left)


# Neighborhood (NATTEN semantics) -------------------------------------------------------------


def natten_window_start(index: int, length: int, kernel: int, dilation: int) -> int:
    """NATTEN's ``get_window_start`` (odd kernels), transcribed from its CPU reference kernel."""
    nb = kernel // 2
    if dilation <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    ni = index - nb * dilation
    if ni < 0:
        return index % dilation
    if index + nb * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dilation
        return a + imodd - kernel * dilation
    return ni


def natten_axis_keys(x: int, length: int, kernel: int, dilation: int, causal: bool) -> set[int]:
    if causal:  # the window ends at the query and is cut at the start
        return {x - t * dilation for t in range(kernel) if x - t * dilation >= 0}
    start = natten_window_start(x, length, kernel, dilation)
    return {start + t * dilation for t in range(kernel)}


def natten_mask(grid, kernel, dilation, causal) -> torch.Tensor:
    n = math.prod(grid)
    coords = list(itertools.product(*(range(g) for g in grid)))
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        axes = [natten_axis_keys(x, g, k, d, c) for x, g, k, d, c in zip(qc, grid, kernel, dilation, causal)]
        for kc in itertools.product(*axes):
            mask[qi, int(torch.tensor(kc) @ torch.tensor([math.prod(grid[a + 1:]) for a in range(len(grid))]))] = True
    return mask


NATTEN_CASES = [
    ((23,), (7,), (1,), (False,)),
    ((23,), (5,), (3,), (False,)),
    ((23,), (3,), (4,), (False,)),
    ((17,), (5,), (2,), (True,)),
    ((6, 7), (3, 5), (1, 1), (False, False)),
    ((9, 8), (3, 3), (2, 2), (False, False)),
    ((6, 7), (3, 3), (1, 2), (True, False)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (False, False, False)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 1), (True, False, True)),
]


@pytest.mark.parametrize("grid, kernel, dilation, causal", NATTEN_CASES, ids=str)
def test_neighborhood_matches_natten(grid, kernel, dilation, causal):
    n = math.prod(grid)
    pattern = P.Neighborhood(kernel, dilation=dilation, causal=causal, grid=grid)
    got = dense(pattern, Shape(1, 1, n, n))[0, 0]
    assert torch.equal(got, natten_mask(grid, kernel, dilation, causal))


@pytest.mark.parametrize(
    "grid, kernel, dilation, stride",
    [
        ((23,), (7,), (1,), (1,)),
        ((23,), (4,), (3,), (1,)),
        ((23,), (6,), (1,), (3,)),
        ((8, 9), (3, 4), (2, 1), (1, 2)),
        ((9, 7), (5, 3), (1, 2), (5, 3)),
        ((4, 6, 5), (3, 3, 2), (1, 2, 2), (2, 1, 2)),
    ],
    ids=str,
)
def test_neighborhood_every_query_sees_kernel_keys_on_its_subgrid(grid, kernel, dilation, stride):
    n = math.prod(grid)
    mask = dense(P.Neighborhood(kernel, dilation=dilation, stride=stride, grid=grid), Shape(1, 1, n, n))[0, 0]
    assert torch.equal(mask.sum(-1), torch.full((n,), math.prod(kernel)))
    coords = torch.tensor(list(itertools.product(*(range(g) for g in grid))))  # [n, ndim]
    diff = coords.view(n, 1, -1) - coords.view(1, n, -1)
    congruent = (diff % torch.tensor(dilation) == 0).all(-1)
    assert not (mask & ~congruent).any(), "keys must be congruent to the query mod dilation on every axis"
    assert mask.diagonal().all(), "every query sees itself"
    # Per axis the window spans (kernel - 1) * dilation.
    reach = (diff.abs() <= (torch.tensor(kernel) - 1) * torch.tensor(dilation)).all(-1)
    assert not (mask & ~reach).any()


@pytest.mark.parametrize("grid", [(13,), (4, 6), (3, 4, 2)], ids=str)
def test_neighborhood_covering_grid_is_full(grid):
    n = math.prod(grid)
    shape = Shape(2, 2, n, n)
    pattern = P.Neighborhood(grid, grid=grid)
    assert torch.equal(dense(pattern, shape), dense(P.Full(), shape))
    layout = pattern.block_layout(shape, 4, 4)
    assert (layout.state == FULL).all()


@pytest.mark.parametrize("grid, kernel", [((12,), (4,)), ((6, 9), (3, 3)), ((4, 6, 4), (2, 3, 2))], ids=str)
def test_neighborhood_stride_equal_kernel_is_block_diagonal(grid, kernel):
    n = math.prod(grid)
    mask = dense(P.Neighborhood(kernel, stride=kernel, grid=grid), Shape(1, 1, n, n))[0, 0]
    coords = torch.tensor(list(itertools.product(*(range(g) for g in grid))))
    tile = coords // torch.tensor(kernel)
    same_tile = (tile.view(n, 1, -1) == tile.view(1, n, -1)).all(-1)
    assert torch.equal(mask, same_tile)


def test_neighborhood_1d_grid_defaults_to_sequence():
    shape = Shape(1, 1, 15, 15)
    assert torch.equal(dense(P.Neighborhood(5), shape), dense(P.Neighborhood(5, grid=15), shape))


# Composition -----------------------------------------------------------------------------------

SHAPE = Shape(2, 4, 29, 29)


def _patterns():
    g = torch.Generator().manual_seed(11)
    pad = torch.rand(2, 29, generator=g) < 0.6
    pad[1] = False
    return {
        "full": P.Full(),
        "causal": P.Causal(),
        "causal_off": P.Causal(offset=-2),
        "window": P.SlidingWindow(3),
        "window_heads": P.SlidingWindow([1, 5], causal=True, n_sink=2),
        "dilated": P.DilatedWindow(2, 3),
        "nbhd": P.Neighborhood(5, dilation=2),
        "document": P.Document([7, 0, 15, 7]),
        "doc_ids": P.Document.from_ids(torch.tensor([[0] * 10 + [1] * 19, [0] * 3 + [2] * 26])),
        "prefix": P.PrefixLM(torch.tensor([4, 11])),
        "global": P.GlobalTokens(2),
        "padding": P.KeyPadding(pad),
        "custom": P.Custom(lambda b, h, q, kv: (q * 3 + kv * (b + 1) + h) % 4 == 0),
        "per_head": P.PerHead([P.Causal(), P.SlidingWindow(2)]),
        "not": ~P.Causal(),
    }


PATTERNS = _patterns()
PAIRS = [("causal", "window"), ("padding", "document"), ("custom", "window_heads"), ("nbhd", "prefix"),
         ("global", "doc_ids"), ("per_head", "dilated"), ("not", "padding")]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_and_full_or_not(name):
    p = PATTERNS[name]
    mask = dense(p, SHAPE)
    assert torch.equal(dense(p & P.Full(), SHAPE), mask)
    assert torch.equal(dense(P.Full() & p, SHAPE), mask)
    assert dense(p | ~p, SHAPE).all()
    assert not dense(p & ~p, SHAPE).any()
    assert torch.equal(dense(~p, SHAPE), ~mask)
    assert torch.equal(dense(~~p, SHAPE), mask)


@pytest.mark.parametrize("a, b", PAIRS)
def test_de_morgan(a, b):
    pa, pb = PATTERNS[a], PATTERNS[b]
    ma, mb = dense(pa, SHAPE), dense(pb, SHAPE)
    assert torch.equal(dense(pa & pb, SHAPE), ma & mb)
    assert torch.equal(dense(pa | pb, SHAPE), ma | mb)
    assert torch.equal(dense(~(pa | pb), SHAPE), dense(~pa & ~pb, SHAPE))
    assert torch.equal(dense(~(pa & pb), SHAPE), dense(~pa | ~pb, SHAPE))


def test_per_head_assigns_head_groups():
    shape = Shape(1, 6, 16, 16)
    parts = [P.Causal(), P.SlidingWindow(2), P.Full()]
    mask = dense(P.PerHead(parts), shape)[0]
    for h in range(6):
        assert torch.equal(mask[h], dense(parts[h // 2], shape)[0, 0])


# Density and block layouts ---------------------------------------------------------------------

def _layout_cases():
    for name, p in PATTERNS.items():
        yield pytest.param(p, SHAPE, id=f"{name}-29x29")
    big = {
        "window_big": P.SlidingWindow(17, causal=True, n_sink=3),
        "window_heads_big": P.SlidingWindow([3, 40, 7, 90]),
        "dilated_big": P.DilatedWindow(6, 9, causal=True),
        "nbhd_2d": P.Neighborhood((3, 5), dilation=(2, 1), grid=(10, 13)),
        "nbhd_3d_stride": P.Neighborhood((3, 2, 4), stride=(3, 1, 2), grid=(5, 2, 13)),
        "nbhd_1d_stride": P.Neighborhood(9, stride=4, causal=False),
        "nbhd_1d_causal": P.Neighborhood(9, causal=True),
        "documents": P.Document([40, 1, 0, 60, 29]),
        "doc_causal_global": (P.Document([50, 80]) & P.Causal()) | P.GlobalTokens(5),
        "custom_band": P.Custom(lambda b, h, q, kv: ((q - kv).abs() < 10 * (h + 1)) & (q % 33 != 5)),
        "not_window": ~P.SlidingWindow(20),
        "per_head_mixed": P.PerHead([P.Causal(), P.Custom(lambda b, h, q, kv: kv % 7 == q % 7, per_batch=False)]),
        "prefix_window": P.PrefixLM(torch.tensor([64, 65])) & P.SlidingWindow(30),
    }
    for name, p in big.items():
        yield pytest.param(p, Shape(2, 4, 130, 130), id=f"{name}-130x130")
    cross = {
        "causal": P.Causal(),
        "causal_neg": P.Causal(offset=-10),
        "window_cache": P.SlidingWindow(12, causal=True, n_sink=2),
        "window_sym_cache": P.SlidingWindow([5, 50]),
        "dilated_cache": P.DilatedWindow(4, 5),
        "prefix_cache": P.PrefixLM(20),
        "global_cache": P.GlobalTokens(70),
        "padding_causal": P.KeyPadding(torch.rand(2, 130, generator=torch.Generator().manual_seed(2)) < 0.1)
        & P.Causal(),
        "custom": P.Custom(lambda b, h, q, kv: (kv // 16 + q) % 5 == b),
    }
    for name, p in cross.items():
        yield pytest.param(p, Shape(2, 4, 45, 130), id=f"{name}-45x130")


@pytest.mark.parametrize("pattern, shape", list(_layout_cases()))
def test_density_is_exact(pattern, shape):
    want = dense(pattern, shape).double().mean().item()
    assert pattern.density(shape) == want
    assert pattern.density(shape) == want  # cached value is the same


@pytest.mark.parametrize("blocks", [(16, 16), (8, 24), (64, 64), (128, 7)], ids=str)
@pytest.mark.parametrize("pattern, shape", list(_layout_cases()))
def test_block_layout_is_sound(pattern, shape, blocks):
    """Every allowed pair lies in a visited block; blocks marked FULL are all-allowed; buckets agree."""
    bq, bk = blocks
    layout = pattern.block_layout(shape, bq, bk)
    nqb, nkb = math.ceil(shape.n_q / bq), math.ceil(shape.n_kv / bk)
    assert layout.state.shape[-2:] == (nqb, nkb)
    assert layout.state.shape[0] in (1, shape.batch) and layout.state.shape[1] in (1, shape.heads)
    state = layout.state.expand(shape.batch, shape.heads, nqb, nkb).long()
    per_elem = state.repeat_interleave(bq, 2)[:, :, : shape.n_q].repeat_interleave(bk, 3)[..., : shape.n_kv]
    mask = dense(pattern, shape)
    assert not (mask & (per_elem == EMPTY)).any(), "an allowed pair lies in a block marked EMPTY"
    assert not (~mask & (per_elem == FULL)).any(), "a block marked FULL has a forbidden pair"
    # Buckets: each query block once, visiting exactly the blocks active for some batch/head.
    active = (state != EMPTY).flatten(0, 1).any(0)
    full = (state == FULL).flatten(0, 1).all(0)
    seen = torch.zeros(nqb, dtype=torch.long)
    for bucket in layout.buckets:
        for row, qb in enumerate(bucket.q_blocks.tolist()):
            seen[qb] += 1
            kbs = bucket.kv_blocks[row][bucket.valid[row]].tolist()
            assert sorted(kbs) == torch.nonzero(active[qb]).flatten().tolist()
            assert torch.equal(bucket.full[row][bucket.valid[row]], full[qb, kbs])
            assert not bucket.full[row][~bucket.valid[row]].any()
    assert torch.equal(seen, active.any(-1).long())


def test_block_layout_is_tight_for_simple_patterns():
    """Bounds are not just sound: a causal layout marks exactly the lower block triangle."""
    shape = Shape(1, 1, 64, 64)
    st = P.Causal().block_layout(shape, 16, 16).state[0, 0]
    idx = torch.arange(4)
    assert torch.equal(st == EMPTY, idx.view(1, -1) > idx.view(-1, 1))
    assert torch.equal(st == FULL, idx.view(1, -1) < idx.view(-1, 1))
    window = P.SlidingWindow(16, causal=True).block_layout(Shape(1, 1, 256, 256), 16, 16)
    assert window.active_fraction == pytest.approx(31 / 256)


# Attention-level properties --------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocksparse", "auto"])
@pytest.mark.parametrize("n, m", [(37, 37), (11, 37)])
def test_causality(backend, n, m, qkv, monkeypatch):
    """With Causal, output i does not change when keys/values after position i + offset change."""
    from attnzoo.ops.backends import BACKENDS

    monkeypatch.setattr(BACKENDS["blocksparse"], "block", 16)
    q, k, v = qkv(2, 4, 2, n, m, 8, 5, requires_grad=False)
    off = m - n
    base = attnzoo.attention(q, k, v, pattern=P.Causal(), backend=backend)
    for i in (0, 5, n - 2):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, i + off + 1:] = k2[:, :, i + off + 1:] * 10 + 5
        v2[:, :, i + off + 1:] = v2[:, :, i + off + 1:] * 10 + 5
        out = attnzoo.attention(q, k2, v2, pattern=P.Causal(), backend=backend)
        torch.testing.assert_close(out[:, :, : i + 1], base[:, :, : i + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, :, i + 1:], base[:, :, i + 1:]), "later rows must see the change"


@pytest.mark.parametrize("pattern_name", ["none", "padding", "causal_padding", "window"])
def test_merge_partials_over_key_partition(pattern_name, qkv, rng):
    """Attention over disjoint key subsets, merged with their lse, equals attention over all keys."""
    b, h, n, m = 2, 4, 23, 41
    q, k, v = qkv(b, h, 2, n, m, 6, 5, requires_grad=False)
    part = torch.randint(0, 3, (m,), generator=rng)
    part[:3] = torch.tensor([0, 1, 2])
    pad = torch.rand(b, m, generator=rng) < 0.7
    base = {
        "none": None,
        "padding": P.KeyPadding(pad),
        "causal_padding": P.Causal() & P.KeyPadding(pad),
        "window": P.SlidingWindow(4, causal=True),
    }[pattern_name]
    want, want_lse = attnzoo.attention(q, k, v, pattern=base, backend="reference", return_lse=True)
    for backend in ("reference", "blocksparse"):
        outs, lses = [], []
        for i in range(3):
            keep = (part == i).expand(b, m)
            sub = P.KeyPadding(keep.clone()) if base is None else base & P.KeyPadding(keep.clone())
            o, lse = attnzoo.attention(q, k, v, pattern=sub, backend=backend, return_lse=True)
            outs.append(o)
            lses.append(lse)
        out, lse = attnzoo.merge_partials(outs, lses)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    # Without a pattern: slice the keys themselves.
    if base is None:
        outs, lses = [], []
        for i in range(3):
            idx = torch.nonzero(part == i).flatten()
            o, lse = attnzoo.attention(q, k[:, :, idx], v[:, :, idx], return_lse=True)
            outs.append(o)
            lses.append(lse)
        out, lse = attnzoo.merge_partials(outs, lses)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_merge_partials_rows_masked_everywhere_stay_zero():
    out = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    lse = torch.tensor([[[0.0, float("-inf"), 1.0]]], dtype=torch.float64)
    ninf = torch.full_like(lse, float("-inf"))
    merged, merged_lse = attnzoo.merge_partials([out * 0, out * 2, out], [ninf, lse, ninf])
    assert torch.equal(merged[0, 0, 1], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(merged[0, 0, 0], torch.full((2,), 2.0, dtype=torch.float64))
    assert torch.equal(merged_lse, lse)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blocksparse"])
def test_key_permutation_invariance(backend, qkv, rng):
    q, k, v = qkv(2, 4, 1, 19, 53, 8, 3, requires_grad=False)
    perm = torch.randperm(53, generator=rng)
    assert not torch.equal(perm, torch.arange(53))
    a = attnzoo.attention(q, k, v, backend=backend)
    b = attnzoo.attention(q, k[:, :, perm], v[:, :, perm], backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sdpa_hint():
    square, cache, tall = Shape(1, 1, 8, 8), Shape(1, 1, 4, 8), Shape(1, 1, 8, 4)
    assert P.Full().sdpa_hint(cache) == "full"
    assert P.Causal().sdpa_hint(square) == "causal"
    assert P.Causal().sdpa_hint(cache) is None  # bottom-right aligned: offset 4
    assert P.Causal().sdpa_hint(tall) is None  # offset -4
    assert P.Causal(offset=0).sdpa_hint(cache) == "causal"
    assert P.Causal(offset=1).sdpa_hint(square) is None
    for p in (P.SlidingWindow(3), P.KeyPadding(torch.ones(1, 8, dtype=torch.bool)), ~P.Causal(), P.Document([8])):
        assert p.sdpa_hint(square) is None


def test_alibi_slopes():
    f64 = {"dtype": torch.float64}  # built in float64: each call rounds them once to its own dtype
    torch.testing.assert_close(P.alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)], **f64), rtol=0,
                               atol=0)
    torch.testing.assert_close(P.alibi_slopes(16), torch.tensor([2.0 ** (-i / 2) for i in range(1, 17)], **f64))
    # Not a power of two: the 4-head slopes, then every other 8-head slope (the paper's rule).
    want6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(P.alibi_slopes(6), torch.tensor(want6, **f64), rtol=0, atol=0)
    assert torch.equal(P.ALiBi(8).slopes, P.alibi_slopes(8))


def test_alibi_and_softcap_values():
    shape = Shape(1, 2, 3, 5)
    score = torch.randn(1, 2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 40
    h, q, kv = torch.arange(2).view(1, -1, 1, 1), torch.arange(3).view(1, 1, -1, 1), torch.arange(5).view(1, 1, 1, -1)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    got = P.ALiBi(slopes)(score, None, h, q, kv, shape)
    want = score - slopes.view(1, 2, 1, 1) * (q + 2 - kv).abs()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    capped = P.SoftCap(10.0)(score, None, h, q, kv, shape)
    torch.testing.assert_close(capped, 10 * torch.tanh(score / 10), rtol=0, atol=0)
    assert capped.abs().max() < 10


def test_document_from_lengths_matches_ids():
    shape = Shape(2, 1, 12, 12)
    ids = torch.tensor([0] * 3 + [2] * 4 + [3] * 5)
    a = dense(P.Document([3, 0, 4, 5]), shape)
    b = dense(P.Document.from_ids(ids), shape)
    c = dense(P.Document.from_ids(ids.expand(2, 12).clone()), shape)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a[0, 0], ids.view(-1, 1) == ids.view(1, -1))


def test_key_padding_mask():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    got = dense(P.KeyPadding(mask), Shape(2, 3, 4, 3))
    assert torch.equal(got, mask.view(2, 1, 1, 3).expand(2, 3, 4, 3))


def test_mask_mod_matches_dense_mask():
    """The FlexAttention view of a pattern is the same rule as its dense mask."""
    b, h = torch.arange(2).view(-1, 1, 1, 1), torch.arange(4).view(1, -1, 1, 1)
    q, kv = torch.arange(29).view(1, 1, -1, 1), torch.arange(29).view(1, 1, 1, -1)
    for name, p in PATTERNS.items():
        got = torch.broadcast_to(p.mask_mod(SHAPE)(b, h, q, kv), (2, 4, 29, 29))
        assert torch.equal(got, dense(p, SHAPE)), name
