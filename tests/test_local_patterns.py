"""Section 3 patterns (windows, grid groups, segments, shards, shifted groups, elastic windows, graphs)
and the tiled path of the blocksparse backend.

Definitions are checked against independent constructions (Swin's roll + region mask, MaxViT's
reshapes, explicit halo boxes); block layouts and tile plans for soundness (every allowed pair is
visited, each query once, no key twice in a tile); backends against the float64 reference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops.layout import EMPTY, FULL
from attnzoo.patterns import Shape


def dense(pattern, shape: Shape) -> torch.Tensor:
    return pattern.dense_mask(shape).expand(shape.batch, shape.heads, shape.n_q, shape.n_kv)


def coords(grid) -> torch.Tensor:
    return torch.tensor(list(itertools.product(*(range(g) for g in grid))))


# Definitions -------------------------------------------------------------------------------------


def swin_reference_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Swin's shifted-window attention written as Swin does it: roll(-shift), windows, region mask."""
    hh, ww = grid
    n = hh * ww
    idx = torch.arange(n).view(hh, ww)
    rolled = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(0, 1))  # rolled[p] = original token
    img = torch.zeros(hh, ww, dtype=torch.long)  # Swin's img_mask: region labels on the rolled map
    cnt = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0] or None), slice(-shift[0] or hh, None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1] or None), slice(-shift[1] or ww, None)):
            img[hs, ws] = cnt
            cnt += 1
    mask = torch.zeros(n, n, dtype=torch.bool)
    for wy in range(hh // window[0]):
        for wx in range(ww // window[1]):
            sl = (slice(wy * window[0], (wy + 1) * window[0]), slice(wx * window[1], (wx + 1) * window[1]))
            toks, regions = rolled[sl].flatten(), img[sl].flatten()
            same = regions.view(-1, 1) == regions.view(1, -1) if any(shift) else torch.ones(len(toks), len(toks),
                                                                                                dtype=torch.bool)
            mask[toks.view(-1, 1), toks.view(1, -1)] = same
    return mask


@pytest.mark.parametrize("grid, window, shift", [
    ((8, 8), (4, 4), (2, 2)), ((6, 8), (3, 4), (1, 2)), ((6, 9), (3, 3), (0, 1)), ((8, 8), (4, 4), (0, 0)),
], ids=str)
def test_window_partition_equals_swin_roll_and_region_mask(grid, window, shift):
    n = math.prod(grid)
    got = dense(P.WindowPartition(window, grid=grid, shift=shift), Shape(1, 1, n, n))[0, 0]
    assert torch.equal(got, swin_reference_mask(grid, window, shift))


def test_window_partition_shift_zero_is_unshifted_and_full_map_is_global():
    shape = Shape(1, 1, 48, 48)
    c = coords((6, 8))
    same = ((c.view(-1, 1, 2) // torch.tensor([3, 4])) == (c.view(1, -1, 2) // torch.tensor([3, 4]))).all(-1)
    assert torch.equal(dense(P.WindowPartition((3, 4), grid=(6, 8), shift=0), shape)[0, 0], same)
    assert torch.equal(dense(P.WindowPartition((6, 8), grid=(6, 8)), shape), dense(P.Full(), shape))
    assert torch.equal(dense(P.GridPartition((6, 8), grid=(6, 8)), shape), dense(P.Full(), shape))


@pytest.mark.parametrize("grid, window, halo", [
    ((6, 8), (2, 4), (1, 1)), ((9,), (3,), (2,)), ((4, 4, 6), (2, 2, 3), (1, 0, 2)),
], ids=str)
def test_halo_keys_are_the_window_box_grown_by_the_halo(grid, window, halo):
    n = math.prod(grid)
    got = dense(P.WindowPartition(window, grid=grid, halo=halo), Shape(1, 1, n, n))[0, 0]
    c = coords(grid)
    w, eta = torch.tensor(window), torch.tensor(halo)
    start = (c // w) * w
    lo, hi = (start - eta).view(-1, 1, len(grid)), (start + w - 1 + eta).view(-1, 1, len(grid))
    kc = c.view(1, -1, len(grid))
    assert torch.equal(got, ((kc >= lo) & (kc <= hi)).all(-1))


@pytest.mark.parametrize("grid, cells", [((6, 8), (3, 4)), ((8, 8), (2, 2)), ((12,), (4,)), ((4, 6, 4), (2, 3, 2))],
                         ids=str)
def test_grid_attention_is_block_attention_between_an_axis_permutation_and_its_inverse(grid, cells):
    """MaxViT: grid attention = block attention after mapping y = g*P + i to y' = i*G + g on every axis."""
    n = math.prod(grid)
    shape = Shape(1, 1, n, n)
    grid_mask = dense(P.GridPartition(cells, grid=grid), shape)[0, 0]
    block_mask = dense(P.WindowPartition(cells, grid=grid), shape)[0, 0]
    c = coords(grid)
    period = torch.tensor(grid) // torch.tensor(cells)
    permuted = (c % period) * torch.tensor(cells) + c // period
    strides = torch.tensor([math.prod(grid[a + 1:]) for a in range(len(grid))])
    perm = (permuted * strides).sum(-1)
    assert torch.equal(grid_mask, block_mask[perm][:, perm])


def test_head_sharded_shards_cover_every_key_and_stride_one_is_dense():
    shape = Shape(1, 8, 40, 40)
    mask = dense(P.HeadSharded(4), shape)[0]
    assert mask.any(0).all(), "the union over heads covers every (query, key)"
    for h in range(8):
        assert mask[h].float().mean() == pytest.approx(1 / 4, abs=0.05)
    assert torch.equal(dense(P.HeadSharded(1), shape), dense(P.Full(), shape))
    causal = dense(P.HeadSharded(4, causal=True), shape)
    assert not (causal & ~dense(P.Causal(), shape)).any()


def test_shifted_groups_sinks_causal_and_unshifted_is_segment_mask():
    shape = Shape(1, 4, 40, 40)
    m = dense(P.ShiftedGroups(8, n_sink=3), shape)[0]
    i = torch.arange(40)
    for h in range(4):
        assert m[h][:, 0].all(), "every query sees the first sink"
        assert m[h][3:, :3].all(), "every query sees every earlier sink"
    assert not (m & ~dense(P.Causal(), shape)[0]).any()
    assert not torch.equal(m[0], m[2]), "the second half of the heads uses shifted groups"
    plain = P.ShiftedGroups(8, n_sink=3, shift=False)
    seg = P.SegmentMask(i // 8, global_keys=3, causal=True)
    assert torch.equal(dense(plain, shape), dense(seg, shape))
    # shifted heads: groups start at group // 2
    shifted = dense(P.ShiftedGroups(8, shift=True, causal=False), shape)[0, 3]
    assert torch.equal(shifted, dense(P.SegmentMask((i + 4) // 8), Shape(1, 1, 40, 40))[0, 0])


def test_segment_mask_globals_and_causal():
    ids = torch.tensor([0] * 5 + [1] * 6 + [2] * 4)
    gk = torch.zeros(15, dtype=torch.bool)
    gk[:2] = True
    gq = torch.zeros(15, dtype=torch.bool)
    gq[-2:] = True
    m = dense(P.SegmentMask(ids, global_keys=gk, global_queries=gq), Shape(1, 1, 15, 15))[0, 0]
    want = (ids.view(-1, 1) == ids.view(1, -1)) | gk.view(1, -1) | gq.view(-1, 1)
    assert torch.equal(m, want)
    assert torch.equal(dense(P.SegmentMask(ids, global_keys=2), Shape(1, 1, 15, 15))[0, 0],
                       (ids.view(-1, 1) == ids.view(1, -1)) | gk.view(1, -1))
    c = dense(P.SegmentMask(ids, causal=True), Shape(1, 1, 6, 15))[0, 0]  # last 6 queries against 15 keys
    i = torch.arange(9, 15).view(-1, 1)
    assert torch.equal(c, (ids[9:].view(-1, 1) == ids.view(1, -1)) & (torch.arange(15).view(1, -1) <= i))
    assert torch.equal(P.SegmentMask.from_lengths([5, 6, 4]).ids, ids)


def test_elastic_window_spans_follow_the_rule_and_cover_at_length():
    pat = P.ElasticWindow([2.0, 4.0], [0.25, 0.0], n_sink=1)
    assert pat.spans(8) == (4, 4) and pat.spans(40) == (12, 4) and pat.spans(400) == (102, 4)
    for n in (8, 40):
        shape = Shape(1, 2, n, n)
        want = dense(P.SlidingWindow(list(pat.spans(n)), causal=True, n_sink=1), shape)
        assert torch.equal(dense(pat, shape), want)
    big = P.ElasticWindow([100.0], [1.0])
    assert torch.equal(dense(big, Shape(1, 1, 30, 30)), dense(P.Causal(), Shape(1, 1, 30, 30)))


def test_adjacency_from_edges():
    edges = torch.tensor([[0, 0, 1, 3], [1, 2, 2, 0]])
    pat = P.Adjacency.from_edges(edges, 4)
    m = dense(pat, Shape(1, 1, 4, 4))[0, 0]
    assert m.sum() == 4 and m[0, 1] and m[3, 0] and not m[1, 0]


# Layouts and tile plans ----------------------------------------------------------------------------

PATTERNS = {
    "swin": (P.WindowPartition((3, 4), grid=(6, 8)), 48, 48),
    "swin_shift": (P.WindowPartition((3, 4), grid=(6, 8), shift=(1, 2)), 48, 48),
    "swin_shift_halo": (P.WindowPartition((3, 4), grid=(6, 8), shift=(2, 1), halo=(1, 2)), 48, 48),
    "halo_1d": (P.WindowPartition(4, halo=3), 48, 48),
    # the wrapped window's two pieces have overlapping halos (2 halo > extent - window)
    "swin_shift_halo_overlap": (P.WindowPartition((6, 4), grid=(6, 8), shift=(1, 2), halo=(1, 1)), 48, 48),
    "halo_shift_1d_overlap": (P.WindowPartition(16, shift=3, halo=17), 48, 48),
    "swin_3d": (P.WindowPartition((1, 2, 3), grid=(2, 4, 6), shift=(0, 1, 1)), 48, 48),
    "grid": (P.GridPartition((3, 4), grid=(6, 8)), 48, 48),
    "grid_3d": (P.GridPartition((2, 2, 2), grid=(2, 4, 6)), 48, 48),
    "segments_global": (P.SegmentMask(torch.arange(48) // 7, global_keys=3, global_queries=torch.arange(48) > 44),
                        48, 48),
    "segments_causal_cache": (P.SegmentMask(torch.arange(48) // 7, causal=True), 20, 48),
    "segments_per_batch": (P.SegmentMask(torch.stack([torch.arange(48) // 5, torch.arange(48) // 12])), 48, 48),
    "head_sharded": (P.HeadSharded(3), 48, 48),
    "head_sharded_causal_cache": (P.HeadSharded(4, causal=True, offsets=[1, 3]), 20, 48),
    "shifted_groups": (P.ShiftedGroups(8, n_sink=2), 48, 48),
    "shifted_groups_cache": (P.ShiftedGroups(8, n_sink=2, causal=True), 20, 48),
    "elastic": (P.ElasticWindow([2, 3], [0.1, 0.5], n_sink=1), 48, 48),
    "elastic_cache": (P.ElasticWindow([2, 3], [0.1, 0.5], n_sink=1), 20, 48),
    "adjacency": (P.Adjacency(torch.rand(48, 48, generator=torch.Generator().manual_seed(0)) < 0.2), 48, 48),
    "adjacency_batch": (P.Adjacency(torch.rand(2, 30, 48, generator=torch.Generator().manual_seed(1)) < 0.2), 30,
                        48),
    "window_sym": (P.SlidingWindow(5), 48, 48),
    "window_heads_sink_cache": (P.SlidingWindow([3, 11], causal=True, n_sink=3), 20, 48),
    "nbhd_2d": (P.Neighborhood((3, 5), grid=(6, 8)), 48, 48),
    "nbhd_2d_dilated_causal": (P.Neighborhood(3, dilation=(2, 1), causal=(False, True), grid=(6, 8)), 48, 48),
    "nbhd_2d_stride": (P.Neighborhood((3, 4), stride=(3, 2), grid=(6, 8)), 48, 48),
    "nbhd_3d": (P.Neighborhood((2, 3, 3), dilation=(1, 1, 2), grid=(2, 4, 6)), 48, 48),
    "nbhd_and_padding": (P.Neighborhood(3, grid=(6, 8)) & P.KeyPadding(torch.rand(2, 48) < 0.6), 48, 48),
}


@pytest.mark.parametrize("blocks", [(16, 16), (7, 24)], ids=str)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_block_layout_is_sound(name, blocks):
    pattern, n, m = PATTERNS[name]
    shape = Shape(2, 4, n, m)
    bq, bk = blocks
    st = pattern.block_layout(shape, bq, bk).state.expand(2, 4, -1, -1).long()
    per_elem = st.repeat_interleave(bq, 2)[:, :, :n].repeat_interleave(bk, 3)[..., :m]
    mask = dense(pattern, shape)
    assert not (mask & (per_elem == EMPTY)).any(), "an allowed pair lies in a block marked EMPTY"
    assert not (~mask & (per_elem == FULL)).any(), "a block marked FULL has a forbidden pair"
    assert pattern.density(shape) == mask.double().mean().item()


@pytest.mark.parametrize("name", [k for k, (p, n, m) in PATTERNS.items() if p.tile_plan(Shape(2, 4, n, m)) is not None])
def test_tile_plan_is_sound(name):
    pattern, n, m = PATTERNS[name]
    shape = Shape(2, 4, n, m)
    plan = pattern.tile_plan(shape)
    mask = dense(pattern, shape).any(0).any(0)
    q_idx, kv_idx = plan.q_index, plan.kv_index
    real_q = q_idx[q_idx >= 0]
    assert real_q.unique().numel() == real_q.numel(), "a query is in two tiles"
    cover = torch.zeros(n, m, dtype=torch.bool)
    for qi, ki in zip(q_idx, kv_idx):
        keys = ki[ki >= 0]
        assert keys.unique().numel() == keys.numel(), "a key is twice in one tile"
        cover[qi[qi >= 0].view(-1, 1), keys.view(1, -1)] = True
    assert not (mask & ~cover).any(), "an allowed pair is outside its query's tile"
    if plan.strided is not None:
        start, step = plan.strided
        want = start + step * torch.arange(plan.tiles).view(-1, 1) + torch.arange(kv_idx.shape[1])
        assert torch.equal(kv_idx, torch.where((want >= 0) & (want < m), want, -1))


def test_tile_plans_are_window_shaped():
    """Swin and MaxViT plans are permutations (one window per tile, no extra key); 1-D bands are strided."""
    swin = P.WindowPartition((4, 4), grid=(16, 16)).tile_plan(Shape(1, 1, 256, 256))
    assert swin.q_index.shape == (16, 16) and torch.equal(swin.q_index, swin.kv_index)
    grid = P.GridPartition((4, 4), grid=(16, 16)).tile_plan(Shape(1, 1, 256, 256))
    assert grid.q_index.shape == (16, 16) and torch.equal(grid.q_index, grid.kv_index)
    band = P.SlidingWindow(256, causal=True).tile_plan(Shape(1, 1, 4096, 4096))
    assert band.strided is not None and band.kv_index.shape[1] == band.q_index.shape[1] + 255
    na = P.Neighborhood(7, grid=(64, 64)).tile_plan(Shape(1, 1, 4096, 4096))
    a_b = na.q_index.shape[1]
    assert 4 <= a_b <= 64 and na.kv_index.shape[1] <= (math.isqrt(a_b) + 6) ** 2 + 8


@pytest.mark.parametrize("make", [lambda n: P.SlidingWindow(64, causal=True), lambda n: P.Neighborhood(7),
                                  lambda n: P.Neighborhood((5, 5), grid=(n // 64, 64)),
                                  lambda n: P.WindowPartition((8, 8), grid=(n // 64, 64))], ids=["window", "na1d",
                                                                                                 "na2d", "swin"])
def test_tiled_work_is_linear_in_n(make):
    pairs = [make(n).tile_plan(Shape(1, 1, n, n)).computed_pairs / n for n in (2048, 8192)]
    assert pairs[1] <= pairs[0] * 1.05


# Backends against the float64 reference ------------------------------------------------------------


def _mod(name: str, shape: Shape, rng: torch.Generator):
    if name == "none":
        return None, ()
    if name == "alibi":
        return P.ALiBi(shape.heads), ()
    rpb = P.RelativePositionBias(shape.heads, max_distance=64).double()
    with torch.no_grad():
        rpb.table.copy_(torch.randn(shape.heads, 2 * 64 + 1, generator=rng, dtype=torch.float64))
    return rpb, (rpb.table,)


@pytest.mark.parametrize("backend, mod", [("blocksparse", "none"), ("blocksparse-torch", "none"),
                                          ("blocksparse", "alibi"), ("blocksparse", "rpb_grad"), ("sdpa", "none")])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_backends_match_reference(name, backend, mod, qkv, randn, fwd_bwd, tol, rng, request):
    """blocksparse: its compiled tile kernels where they apply (no score modifier, D and D_v multiples of 8
    in float64); blocksparse-torch: the same calls on its PyTorch tile path."""
    if backend == "blocksparse-torch":
        request.getfixturevalue("no_tile_kernel")
        backend = "blocksparse"
    pattern, n, m = PATTERNS[name]
    shape = Shape(2, 4, n, m)
    score_mod, extra = _mod(mod, shape, rng)
    q, k, v = qkv(2, 4, 2, n, m, 8, 6 if mod == "alibi" else 8)  # D_v != D runs the unfused forward
    dout = randn(2, 4, n, v.shape[-1])
    want_lse = backend == "blocksparse"
    kw = dict(pattern=pattern, score_mod=score_mod)
    ref = fwd_bwd("reference", q, k, v, dout=dout, extra=extra, return_lse=True, **kw)
    got = fwd_bwd(backend, q, k, v, dout=dout, extra=extra, return_lse=want_lse, **kw)
    torch.testing.assert_close(got[0], ref[0], **tol)
    if want_lse:
        torch.testing.assert_close(got[1], ref[1], **tol)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_fused_and_unfused_forward_agree(dtype, monkeypatch, no_tile_kernel):
    """The fused (flash kernel) forward of the PyTorch tiled path equals its unfused forward."""
    from attnzoo.ops.backends import blocksparse_tiles as bs

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 96, 16, generator=g, dtype=dtype) for _ in range(3))
    pats = [P.SlidingWindow(9, causal=True, n_sink=2), P.Neighborhood(3, dilation=2, grid=(8, 12)),
            P.WindowPartition((4, 4), grid=(8, 12), shift=(2, 2)), P.GridPartition((2, 3), grid=(8, 12))]
    for pat in pats:
        fused = attnzoo.attention(q, k[:, :2], v[:, :2], pattern=pat, backend="blocksparse", return_lse=True)
        with monkeypatch.context() as patch:
            patch.setattr(bs, "_fusable", lambda *a: False)
            plain = attnzoo.attention(q, k[:, :2], v[:, :2], pattern=pat, backend="blocksparse", return_lse=True)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(fused[0], plain[0], **tol)
        torch.testing.assert_close(fused[1], plain[1], **tol)



@pytest.mark.parametrize("pat, fused_path", [(P.WindowPartition((4, 4), grid=(8, 12)), True),
                                             (P.GridPartition((2, 3), grid=(8, 12)), True),
                                             (P.WindowPartition((4, 4), grid=(8, 12), shift=(2, 2)), False)], ids=str)
def test_tiled_fused_backward_of_permuted_plans(pat, fused_path, monkeypatch, no_tile_kernel):
    """Permuted block-diagonal plans (not shifted windows) take the fused CPU flash backward; both backwards equal
    the float64 reference (GQA, gradients of q, k, v)."""
    from attnzoo.ops.backends import blocksparse_tiles as bs

    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(2, h, 96, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    calls = []
    fused_backward = bs._fused_tile_backward
    monkeypatch.setattr(bs, "_fused_tile_backward", lambda *a: calls.append(1) or fused_backward(*a))

    def grads(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attnzoo.attention(*leaves, pattern=pat, backend=backend)
        return torch.autograd.grad(out, leaves, do)

    fused = grads("blocksparse")
    assert bool(calls) == fused_path
    monkeypatch.setattr(bs, "_fused_backward_ok", lambda *a: False)
    plain = grads("blocksparse")
    ref = grads("reference")
    for f, p_, r in zip(fused, plain, ref):
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(p_, r, rtol=1e-10, atol=1e-10)


# Bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, match", [
    (lambda: P.WindowPartition(5, grid=(12, 12)), r"window: window 5 does not divide the grid extent 12 on axis 0"),
    (lambda: P.WindowPartition((4, 16), grid=(12, 12)), r"window: window 16 is larger than the grid extent 12 on axis"),
    (lambda: P.WindowPartition(4, grid=(12, 12), shift=4), r"shift: shift 4 must be smaller than the window 4"),
    (lambda: P.WindowPartition(4, grid=(12, 12, 4, 4)), r"grid: expected 1, 2 or 3 axes"),
    (lambda: P.GridPartition(5, grid=(10, 12)), r"cells: 5 grid cells do not divide the grid extent 12 on axis 1"),
    (lambda: P.Neighborhood(9, grid=(8, 16)), r"kernel_size: 9 is larger than the grid extent 8 on axis 0"),
    (lambda: P.Neighborhood(3, stride=4, grid=(8, 16)), r"stride: stride 4 is larger than kernel_size 3 on axis 0"),
    (lambda: P.Neighborhood(3, dilation=(3, 1), grid=(8, 16)),
     r"dilation: dilation 3 on axis 0 \(extent 8\) leaves groups of 2 positions, fewer than kernel_size 3"),
    (lambda: P.HeadSharded(0), r"stride: expected a positive int, got 0"),
    (lambda: P.ElasticWindow([1.0], [0.1, 0.2]), r"alpha, beta: expected equal"),
    (lambda: P.SegmentMask(torch.rand(5)), r"ids: expected integer segment ids"),
    (lambda: P.Adjacency(torch.ones(3, 3)), r"adj: expected a bool tensor"),
], ids=lambda x: "" if callable(x) else x[:30])
def test_bad_pattern_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("pattern, n, match", [
    (P.WindowPartition(4, grid=(8, 8)), 60, r"WindowPartition: grid \(8, 8\) has 64 tokens but n_q=60, n_kv=60"),
    (P.Neighborhood(3, grid=(8, 8)), 63, r"Neighborhood: grid \(8, 8\) has 64 tokens but n_q=63"),
    (P.GridPartition(2, grid=(4, 4)), 15, r"GridPartition: grid \(4, 4\) has 16 tokens but n_q=15"),
    (P.WindowPartition(4), 30, r"window: window 4 does not divide the grid extent 30 on axis 0"),
    (P.Neighborhood(5, dilation=3), 12, r"dilation: dilation 3 on axis 0 \(extent 12\) leaves groups of 4 positions"),
    (P.SegmentMask([0, 0, 1]), 4, r"SegmentMask: ids cover 3 tokens but the problem has n_q=4, n_kv=4"),
    (P.ShiftedGroups(4), 8, r"even head count, got heads=3"),
    (P.Adjacency(torch.ones(5, 5, dtype=torch.bool)), 4, r"adj: expected shape \[4, 4\], got \[5, 5\]"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_pattern_shape_mismatch_names_values(pattern, n, match):
    q = torch.zeros(1, 3, n, 8)
    with pytest.raises(ValueError, match=match):
        attnzoo.attention(q, q, q, pattern=pattern)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [
    lambda: attnzoo.patterns.WindowPartition((4, 4), grid=(8, 8), shift=(2, 2)),
    lambda: attnzoo.patterns.GridPartition((2, 4), grid=(8, 8)),
    lambda: attnzoo.patterns.Neighborhood((3, 5), dilation=(2, 1), grid=(8, 8)),
    lambda: attnzoo.patterns.SegmentMask(torch.arange(64) // 10, global_keys=2, causal=True),
    lambda: attnzoo.patterns.ShiftedGroups(8, n_sink=2),
    lambda: attnzoo.patterns.HeadSharded(4, causal=True),
], ids=["swin", "grid", "nbhd", "segments", "shifted", "sharded"])
def test_flex_cpu_forward_matches_reference(pattern):
    """FlexAttention (compiled, CPU inference) runs every new pattern's mask_mod."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(3))
    pat = pattern()
    got = attnzoo.attention(q, k, v, pattern=pat, backend="flex")
    want = attnzoo.attention(q.double(), k.double(), v.double(), pattern=pat, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
