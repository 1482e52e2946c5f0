"""The compiled tile kernels of blocksparse's tiled path (``tile_native``) against the float64 reference.

Forward, log-sum-exp and gradients (through the output and the lse) for every kind of tile plan:
permuted windows (Swin, MaxViT grid), masked windows (shifted Swin, halo), neighbourhood tiles in 1-D
to 3-D with dilation, band tiles of sliding windows; GQA; D_v != D; float32 with D = 64. Plus the cases
the kernels must say no to, and queries in no tile / rows with no key.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops import native
from attnzoo.ops.backends import tile_native
from attnzoo.patterns.grid_bias import GridRelativeBias

needs_kernels = pytest.mark.skipif(native.unavailable("tiles") is not None,
                                   reason=f"tile kernels unavailable: {native.unavailable('tiles')}")

# name -> (pattern, N)
PLANS = {
    "swin": (P.WindowPartition((4, 4), grid=(8, 12)), 96),
    "swin_shift": (P.WindowPartition((4, 4), grid=(8, 12), shift=(2, 2)), 96),
    "swin_halo": (P.WindowPartition(4, grid=(8, 8), halo=1), 64),
    "maxvit_grid": (P.GridPartition((2, 3), grid=(8, 12)), 96),
    "nbhd_1d": (P.Neighborhood(7), 70),
    "nbhd_2d_dilated": (P.Neighborhood(3, dilation=2, grid=(8, 12)), 96),
    "nbhd_2d_causal": (P.Neighborhood(3, causal=(True, False), grid=(6, 7)), 42),
    "nbhd_3d": (P.Neighborhood((2, 2, 3), grid=(3, 4, 5)), 60),
    "window_sink": (P.SlidingWindow(9, causal=True, n_sink=2), 100),
}


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that reach the compiled forward."""
    calls: list[int] = []
    forward = tile_native.tile_forward
    monkeypatch.setattr(tile_native, "tile_forward", lambda *a: calls.append(1) or forward(*a))
    return calls


def _grads(backend, q, k, v, pattern, dout, dlse, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = attnzoo.attention(*leaves, pattern=pattern, backend=backend, scale=scale, return_lse=True)
    loss = (out * dout).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves))


@needs_kernels
@pytest.mark.parametrize("h_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", list(PLANS))
def test_matches_reference_float64(name, h_kv, randn, kernel_calls, tol):
    pattern, n = PLANS[name]
    q, k, v = randn(2, 4, n, 8), randn(2, h_kv, n, 8), randn(2, h_kv, n, 16)
    dout, dlse = randn(2, 4, n, 16), randn(2, 4, n)
    got = _grads("blocksparse", q, k, v, pattern, dout, dlse)
    assert kernel_calls, "the compiled tile kernel did not run"
    want = _grads("reference", q, k, v, pattern, dout, dlse)
    for label, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, label=label: f"{label}: {m}")


# name -> (pattern, relative-position bias (heads 4), grid)
BIASED = {
    "swin": (P.WindowPartition((4, 4), grid=(8, 12)), GridRelativeBias(4, (4, 4)), (8, 12)),
    "swin_shift": (P.WindowPartition(4, grid=(8, 8), shift=2), GridRelativeBias(4, (4, 4)), (8, 8)),
    "maxvit_grid": (P.GridPartition((2, 3), grid=(8, 12)), GridRelativeBias(4, (2, 3), step=(4, 4)), (8, 12)),
    "nbhd_2d_dilated": (P.Neighborhood(3, dilation=2, grid=(8, 12)), GridRelativeBias(4, (3, 3), step=2), (8, 12)),
}


@needs_kernels
@pytest.mark.parametrize("h_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", list(BIASED))
def test_relative_position_bias_matches_reference(name, h_kv, randn, kernel_calls, tol):
    """The bias is added in the kernels and its table's gradient summed over batch and tiles."""
    pattern, rpb, grid = BIASED[name]
    n = grid[0] * grid[1]
    rpb = rpb.double()
    with torch.no_grad():
        rpb.table.copy_(randn(*rpb.table.shape))
    mod = rpb.at(grid)
    q, k, v = randn(2, 4, n, 8), randn(2, h_kv, n, 8), randn(2, h_kv, n, 8)
    dout, dlse = randn(2, 4, n, 8), randn(2, 4, n)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        rpb.table.grad = None
        out, lse = attnzoo.attention(*leaves, pattern=pattern, score_mod=mod, backend=backend, return_lse=True)
        loss = (out * dout).sum() + (lse * dlse).sum()
        loss.backward()
        return out.detach(), lse.detach(), *(t.grad for t in leaves), rpb.table.grad.clone()

    got = run("blocksparse")
    assert kernel_calls, "the compiled tile kernel did not run"
    want = run("reference")
    assert want[-1].abs().max() > 0.1
    for label, g, w in zip(["out", "lse", "dq", "dk", "dv", "dtable"], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, label=label: f"{label}: {m}")


def _keep(n: int) -> torch.Tensor:
    """Key padding for two batch elements: the first keeps a random 70% of its keys, the second none."""
    keep = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) < 0.7
    keep[1] = False
    return keep


@needs_kernels
@pytest.mark.parametrize("name", ["swin", "swin_shift", "maxvit_grid", "nbhd_2d_dilated", "window_sink"])
def test_key_padding_matches_reference(name, randn, kernel_calls, tol):
    """Key padding (per batch element) on top of a tile plan: the kernels hide the padded keys; rows that see no
    key (the fully padded element) give zeros, lse -inf and zero gradients."""
    pattern, n = PLANS[name]
    padded = pattern & P.KeyPadding(_keep(n))
    q, k, v = randn(2, 4, n, 8), randn(2, 2, n, 8), randn(2, 2, n, 8)
    dout, dlse = randn(2, 4, n, 8), randn(2, 4, n)
    got = _grads("blocksparse", q, k, v, padded, dout, dlse)
    assert kernel_calls, "the compiled tile kernel did not run"
    assert torch.equal(got[0][1], torch.zeros_like(got[0][1])) and torch.isneginf(got[1][1]).all()
    want = _grads("reference", q, k, v, padded, dout, dlse)
    for label, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, label=label: f"{label}: {m}")


@needs_kernels
@pytest.mark.parametrize("name", ["window_sink", "nbhd_1d", "swin"])
def test_alibi_matches_reference(name, randn, kernel_calls, tol):
    """ALiBi is read at the distance of each pair; its learnable slopes get their gradient through the table."""
    pattern, n = PLANS[name]
    slopes = (torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1).requires_grad_()
    mod = P.ALiBi(slopes)
    q, k, v = randn(2, 4, n, 8), randn(2, 2, n, 8), randn(2, 2, n, 8)
    dout, dlse = randn(2, 4, n, 8), randn(2, 4, n)

    def run(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = attnzoo.attention(*leaves, pattern=pattern, score_mod=mod, backend=backend, return_lse=True)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), [*leaves, slopes])
        return out.detach(), lse.detach(), *grads

    got = run("blocksparse")
    assert kernel_calls, "the compiled tile kernel did not run"
    want = run("reference")
    for label, g, w in zip(["out", "lse", "dq", "dk", "dv", "dslopes"], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, label=label: f"{label}: {m}")


@needs_kernels
@pytest.mark.parametrize("name", ["swin", "swin_shift", "nbhd_2d_dilated", "window_sink"])
def test_matches_reference_float32(name, kernel_calls):
    pattern, n = PLANS[name]
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(1, 2, n, 64, generator=g) for _ in range(4))
    dlse = torch.randn(1, 2, n, generator=g)
    got = _grads("blocksparse", q, k, v, pattern, dout, dlse)
    assert kernel_calls
    want = _grads("reference", *(t.double() for t in (q, k, v)), pattern, dout.double(), dlse.double())
    for label, gt, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(gt.double(), w, rtol=1e-4, atol=2e-5, msg=lambda m, label=label: f"{label}: {m}")


@needs_kernels
def test_forward_without_grad_matches_reference(randn, kernel_calls, tol):
    pattern, n = PLANS["swin_shift"]
    q, k, v = randn(1, 2, n, 16), randn(1, 2, n, 16), randn(1, 2, n, 16)
    with torch.no_grad():
        got = attnzoo.attention(q, k, v, pattern=pattern, backend="blocksparse")
    assert kernel_calls
    torch.testing.assert_close(got, attnzoo.attention(q, k, v, pattern=pattern, backend="reference"), **tol)


@needs_kernels
@pytest.mark.parametrize("name", ["swin", "nbhd_2d_dilated"])  # keys in one tile / in several
def test_thread_count_does_not_change_results(name, randn):
    """Parallel over tiles (disjoint keys) or over heads (shared keys): bitwise the same as one thread."""
    pattern, n = PLANS[name]
    q, k, v, dout = randn(1, 2, n, 8), randn(1, 1, n, 8), randn(1, 1, n, 8), randn(1, 2, n, 8)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(_grads("blocksparse", q, k, v, pattern, dout, torch.zeros(1, 2, n, dtype=q.dtype)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _hand_plan(n: int, d: int) -> tuple[tile_native.PlanArrays, torch.Tensor]:
    """Two tiles over ``n`` tokens: queries 0..3 see keys 0..7 with query 2 masked out entirely; queries
    4..7 see keys 4..11; queries from 8 on are in no tile. Returns the arrays and the dense allowed mask."""
    q_idx = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32)
    kv_idx = torch.tensor([list(range(8)), list(range(4, 12))], dtype=torch.int32)
    mask = torch.zeros(2, 4, 8, dtype=torch.float64)
    mask[0, 2] = float("-inf")
    mask[1, :, 0] = float("-inf")  # key 4 hidden from the second tile
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:4, :8] = True
    allowed[2] = False
    allowed[4:8, 5:12] = True
    return tile_native.PlanArrays(q_idx, kv_idx, mask, covers_all=False, keys_disjoint=False), allowed


@needs_kernels
def test_uncovered_queries_and_empty_rows_are_zero(randn, tol):
    """Queries in no tile and rows that see no key: out 0, lse -inf, zero gradients; the rest equals the
    reference with the same dense mask."""
    n, d = 12, 8
    arrays, allowed = _hand_plan(n, d)
    q, k, v = randn(1, 2, n, d), randn(1, 2, n, d), randn(1, 2, n, d)
    out, lse = tile_native.tile_forward(q, k, v, arrays, 0.3)
    dout, dlse = randn(1, 2, n, d), randn(1, 2, n)
    dq, dk, dv = tile_native.tile_backward(q, k, v, arrays, 0.3, out, lse, dout, dlse)
    empty = ~allowed.any(-1)
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    pattern = P.Custom(lambda b, h, qi, ki: allowed[qi, ki], per_batch=False, per_head=False)
    want = _grads("reference", q, k, v, pattern, dout, dlse, scale=0.3)
    for label, g, w in zip(["out", "lse", "dq", "dk", "dv"], (out, lse.nan_to_num(neginf=0.0), dq, dk, dv),
                           (want[0], want[1].nan_to_num(neginf=0.0), *want[2:])):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, label=label: f"{label}: {m}")


def _tiles(pattern, q, k, score_mod=None):
    from attnzoo.ops.backends import BACKENDS
    from attnzoo.ops.problem import make_problem

    p = make_problem(q, k, k, pattern=pattern, score_mod=score_mod, scale=None, return_weights=False,
                     return_lse=False)
    return BACKENDS["blocksparse"].tiles(p)


@pytest.mark.parametrize("case, match", [
    ("head_dim", "multiples of 16 for torch.float32, got D=24"),
    ("half", "float32 and float64, got torch.bfloat16"),
    ("score_mod", "score_mod SoftCap is not supported by the compiled tile kernels (it takes additive per-head"),
    ("per_head", "per-batch or per-head mask other than key padding"),
])
def test_why_not_names_the_reason(case, match):
    d = 24 if case == "head_dim" else 16
    pattern = P.WindowPartition(4, grid=(8, 8))
    if case == "per_head":
        pattern = pattern & P.Custom(lambda b, h, qi, ki: (qi + h) % 3 != ki % 3, per_batch=False, per_head=True)
    q = torch.randn(2, 2, 64, d)
    tiles = _tiles(pattern, q, q, score_mod=P.SoftCap(30.0) if case == "score_mod" else None)
    assert tiles is not None
    if case == "half":
        q = q.bfloat16()
    assert match in tile_native.why_not(tiles, q, q)


def test_blocksparse_falls_back_to_the_torch_tile_path(randn, kernel_calls, tol):
    """D_v = 5 is not a multiple of the vector width: the PyTorch tile path runs, and is exact."""
    pattern, n = PLANS["swin"]
    q, k, v = randn(1, 2, n, 8), randn(1, 2, n, 8), randn(1, 2, n, 5)
    got = attnzoo.attention(q, k, v, pattern=pattern, backend="blocksparse")
    assert not kernel_calls
    torch.testing.assert_close(got, attnzoo.attention(q, k, v, pattern=pattern, backend="reference"), **tol)


@needs_kernels
def test_explain_says_which_tile_path_runs():
    q = torch.randn(1, 2, 64, 16)
    expl = attnzoo.explain(q, q, q, pattern=P.WindowPartition(4, grid=(8, 8)))
    assert expl.backend == "blocksparse"
    assert "compiled tile kernel" in str(expl)
    q5 = torch.randn(1, 2, 64, 20)
    assert "multiples of 16" in str(attnzoo.explain(q5, q5, q5, pattern=P.WindowPartition(4, grid=(8, 8))))


def test_plan_arrays_cover_a_partition():
    q = torch.randn(1, 2, 64, 16)
    arrays = tile_native.plan_arrays(_tiles(P.WindowPartition(4, grid=(8, 8)), q, q), torch.float32)
    assert arrays.covers_all and arrays.keys_disjoint and arrays.mask is None
    overlapping = tile_native.plan_arrays(_tiles(P.Neighborhood(3, grid=(8, 8)), q, q), torch.float32)
    assert overlapping.covers_all and not overlapping.keys_disjoint
    assert sorted(arrays.q_idx.flatten().tolist()) == list(range(64))
