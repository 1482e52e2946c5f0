"""The ``gather`` backend (compiled per-query CPU kernels for key-table patterns).

Every case compares forward, log-sum-exp and gradients (including through the lse) with the
float64 reference on fresh random inputs; plus the key tables against the dense masks, the
dispatch rule and its reasons, thread-count determinism, rows with no key, half precision,
and the build itself (cache, disabled, no compiler).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops import native
from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.backends import gather as G
from attnzoo.ops.problem import make_problem
from attnzoo.patterns import Shape
from attnzoo.patterns.grid_bias import GridRelativeBias

needs_kernels = pytest.mark.skipif(native.unavailable("gather") is not None,
                                   reason=f"gather kernels unavailable: {native.unavailable('gather')}")

NBHD_CASES = {
    "1d": (lambda: P.Neighborhood(7), 37),
    "1d_dilated_stride": (lambda: P.Neighborhood(5, dilation=3, stride=2), 37),
    "1d_causal": (lambda: P.Neighborhood(5, causal=True), 37),
    "2d": (lambda: P.Neighborhood((3, 5), grid=(5, 7)), 35),
    "2d_dilated": (lambda: P.Neighborhood(3, dilation=2, grid=(6, 7)), 42),
    "2d_stride": (lambda: P.Neighborhood(3, stride=(2, 3), grid=(6, 7)), 42),
    "2d_causal_row": (lambda: P.Neighborhood(3, causal=(True, False), grid=(6, 7)), 42),
    "2d_full_grid": (lambda: P.Neighborhood((4, 5), grid=(4, 5)), 20),
    "3d": (lambda: P.Neighborhood((2, 2, 3), dilation=(1, 2, 1), grid=(3, 4, 5)), 60),
    "3d_causal_time": (lambda: P.Neighborhood((2, 3, 3), causal=(True, False, False), grid=(3, 4, 5)), 60),
}


def _dense_from_table(table: torch.Tensor, n_kv: int) -> torch.Tensor:
    dense = torch.zeros(table.shape[0], n_kv, dtype=torch.bool)
    rows = torch.arange(table.shape[0])[:, None].expand_as(table)
    ok = table >= 0
    dense[rows[ok], table[ok]] = True
    return dense


def _assert_table_is_pattern(pattern, shape: Shape) -> torch.Tensor:
    """The key table lists exactly the pairs of the pattern's dense mask, no key twice in a row."""
    table = pattern.key_table(shape)
    assert torch.equal(_dense_from_table(table, shape.n_kv), pattern.dense_mask(shape)[0, 0])
    for row in table:
        keys = row[row >= 0]
        assert keys.unique().numel() == keys.numel()
    return table


@pytest.mark.parametrize("case", list(NBHD_CASES))
def test_key_table_is_the_pattern(case):
    build, n = NBHD_CASES[case]
    pattern = build()
    table = _assert_table_is_pattern(pattern, Shape(1, 1, n, n))
    assert table.shape == (n, math.prod(pattern.kernel_size))


WINDOW_CASES = {
    "window": (lambda: P.SlidingWindow(5), 37, 37),
    "window_causal_sink": (lambda: P.SlidingWindow(6, causal=True, n_sink=3), 37, 37),
    "window_sym_sink": (lambda: P.SlidingWindow(3, n_sink=4), 20, 20),
    "window_sym_sinks_right_of_window": (lambda: P.SlidingWindow(1, n_sink=6), 20, 20),
    "window_sym_sinks_more_queries": (lambda: P.SlidingWindow(1, n_sink=3), 12, 9),  # negative offset
    "window_kv_cache": (lambda: P.SlidingWindow(4, causal=True, n_sink=2), 11, 37),
    "window_offset_empty_rows": (lambda: P.SlidingWindow(3, causal=True, offset=-5), 20, 20),
    "dilated": (lambda: P.DilatedWindow(3, 2), 37, 37),
    "dilated_causal": (lambda: P.DilatedWindow(2, 3, causal=True), 37, 37),
    "dilated_kv_cache": (lambda: P.DilatedWindow(2, 3, causal=True), 5, 30),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_window_key_tables_are_the_pattern(case):
    build, n, m = WINDOW_CASES[case]
    _assert_table_is_pattern(build(), Shape(1, 1, n, m))


@needs_kernels
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_gather_windows_match_reference(case, qkv, randn, tol):
    build, n, m = WINDOW_CASES[case]
    pattern = build()
    q, k, v = qkv(2, 4, 2, n, m, 8, 8)
    dout = randn(2, 4, n, 8)
    ref, got = (attnzoo.attention(q, k, v, pattern=pattern, backend=b) for b in ("reference", "gather"))
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, **tol)


def test_inverse_tables_list_every_pair_by_key():
    table = torch.tensor([[2, 0, -1], [2, 1, 0], [-1, -1, -1], [1, 2, -1]])
    t = G.build_tables(table, 4)
    assert t.table.shape == (4, 4) and t.table.dtype == torch.int32 and bool((t.table[:, 3] == -1).all())
    assert t.inv_off.tolist() == [0, 2, 4, 7, 7]  # key 3 is seen by no query
    flat = t.table.flatten()
    for j in range(4):
        pos = t.inv_pos[t.inv_off[j]:t.inv_off[j + 1]].long()
        assert bool((flat[pos] == j).all()) and pos.tolist() == sorted(pos.tolist())
        assert t.inv_q[t.inv_off[j]:t.inv_off[j + 1]].tolist() == (pos // 4).tolist()


def test_key_table_is_none_for_other_patterns():
    shape = Shape(2, 4, 16, 16)
    keep = torch.ones(2, 16, dtype=torch.bool)
    for pattern in (P.Causal(), P.SlidingWindow([2, 3], causal=True), P.Causal() & P.Document([8, 8]),
                    P.Neighborhood(3) & P.KeyPadding(keep)):
        assert pattern.key_table(shape) is None
    assert G.gather_form(P.Neighborhood(3) & P.PrefixLM(torch.tensor([2, 5])), shape) is None  # per batch, not padding
    assert G.gather_form(P.PerHead([P.Neighborhood(3)] * 4), shape) is None


COMPOSED_CASES = {
    "nbhd_and_causal": (lambda: P.Neighborhood(5) & P.Causal(), 23),
    "causal_and_window": (lambda: P.Causal() & P.SlidingWindow(4, n_sink=2), 23),
    "nbhd2d_and_custom": (lambda: P.Neighborhood(3, grid=(4, 6)) & P.Custom(
        lambda b, h, q, kv: (q + kv) % 3 != 0, per_batch=False, per_head=False), 24),
    "window_and_nbhd": (lambda: P.SlidingWindow(6) & P.Neighborhood(5), 23),
}


@pytest.mark.parametrize("case", list(COMPOSED_CASES))
def test_composed_key_tables_are_the_pattern(case):
    build, n = COMPOSED_CASES[case]
    _assert_table_is_pattern(build(), Shape(1, 1, n, n))


def test_compositions_rebuilt_per_call_reuse_tables():
    """Modules build ``user & Causal()`` on every call: the derived tables must not be rebuilt."""
    window, nbhd, shape = P.SlidingWindow(8, causal=True), P.Neighborhood(5), Shape(1, 2, 64, 64)
    assert (window & P.Causal()).key_table(shape) is window.key_table(shape)  # nothing to remove: the same table
    first = (nbhd & P.Causal()).key_table(shape)
    assert (nbhd & P.Causal()).key_table(shape) is first  # cached on the neighbourhood by Causal's value_key
    assert (nbhd & P.Causal(offset=2)).key_table(shape) is not first
    assert G.key_tables(nbhd & P.Causal(), shape) is G.key_tables(nbhd & P.Causal(), shape)


RPB_CASES = {
    "2d": (lambda: P.Neighborhood(3, grid=(6, 7)), lambda: GridRelativeBias(4, (3, 3)), (6, 7)),
    "2d_dilated_rect": (lambda: P.Neighborhood((3, 5), grid=(6, 7), dilation=(2, 1)),
                        lambda: GridRelativeBias(4, (3, 5), step=(2, 1)), (6, 7)),
    "2d_causal_rows": (lambda: P.Neighborhood(3, grid=(6, 7), causal=(True, False)),
                       lambda: GridRelativeBias(4, (3, 3)), (6, 7)),
    "3d": (lambda: P.Neighborhood((2, 3, 3), grid=(3, 4, 5)), lambda: GridRelativeBias(4, (2, 3, 3)), (3, 4, 5)),
}


@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("h_kv", [4, 2])
@pytest.mark.parametrize("case", list(RPB_CASES))
def test_gather_with_relative_position_bias_matches_reference(case, h_kv, padded, qkv, randn, tol):
    """Neighbourhoods with a learned relative-position bias: forward and gradients of q, k, v and the table."""
    build, build_rpb, grid = RPB_CASES[case]
    n = math.prod(grid)
    rpb = build_rpb().double()
    with torch.no_grad():
        rpb.table.copy_(randn(*rpb.table.shape))
    pattern = build() & P.KeyPadding(_padding(2, n)) if padded else build()
    mod = rpb.at(grid)
    q, k, v = qkv(2, 4, h_kv, n, n, 8, 8)
    dout = randn(2, 4, n, 8)
    assert attnzoo.explain(q, k, v, pattern=pattern, score_mod=mod).backend == "gather"
    results = []
    for backend in ("reference", "gather"):
        out = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v, rpb.table), dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv", "dtable"), results[1], results[0]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("keep", [True, False], ids=["kept-probs", "recomputed-probs"])
@pytest.mark.parametrize("dtype,d", [(torch.float64, 16), (torch.float32, 64)], ids=["f64-d16", "f32-d64"])
def test_backward_from_kept_or_recomputed_probabilities(keep, dtype, d, monkeypatch, qkv, randn):
    """The backward reads the forward's probabilities or recomputes them; both match the reference (bias,
    key padding with a fully padded element, GQA, gradients through the lse)."""
    monkeypatch.setattr(G, "KEEP_PROBS_KEYS_PER_DIM", 10**6 if keep else 0)
    backward, probs_given = G.gather_backward, []

    def spy(*args, **kwargs):
        probs_given.append(inspect.signature(backward).bind(*args, **kwargs).arguments.get("probs") is not None)
        return backward(*args, **kwargs)

    monkeypatch.setattr(G, "gather_backward", spy)
    grid, n = (6, 7), 42
    pattern = P.Neighborhood(3, grid=grid) & P.KeyPadding(_padding(3, n))
    rpb = GridRelativeBias(4, (3, 3)).double()
    with torch.no_grad():
        rpb.table.copy_(randn(*rpb.table.shape))
    q, k, v = qkv(3, 4, 2, n, n, d, d)
    dout, dlse = randn(3, 4, n, d), randn(3, 4, n)
    results = []
    for backend, module in (("reference", rpb), ("gather", copy.deepcopy(rpb).to(dtype))):
        args = [t if backend == "reference" else t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attnzoo.attention(*args, pattern=pattern, score_mod=module.at(grid), backend=backend,
                                     return_lse=True)
        finite = torch.isfinite(lse)
        loss = (out * dout.to(out.dtype)).sum() + (torch.where(finite, lse, 0) * dlse.to(lse.dtype)).sum()
        results.append((out, *torch.autograd.grad(loss, [*args, module.table])))
    assert probs_given == [keep]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("out", "dq", "dk", "dv", "dtable"), results[1], results[0]):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("build", [lambda: P.SlidingWindow(9, causal=True, n_sink=2),
                                   lambda: P.Neighborhood(3, grid=(6, 7)),
                                   lambda: P.Neighborhood(5) & P.KeyPadding(_padding(2, 42))],
                         ids=["window_sink", "nbhd_2d", "nbhd_1d_padded"])
def test_gather_with_alibi_matches_reference(build, qkv, randn, tol):
    """ALiBi reaches the kernels as a table read at each pair's distance: forward and gradients of q, k, v and
    the learnable slopes."""
    slopes = (torch.rand(4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.1).requires_grad_()
    mod, pattern = P.ALiBi(slopes), build()
    q, k, v = qkv(2, 4, 2, 42, 42, 8, 8)
    dout = randn(2, 4, 42, 8)
    assert attnzoo.explain(q, k, v, pattern=pattern, score_mod=mod).backend == "gather"
    results = []
    for backend in ("reference", "gather"):
        out = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v, slopes), dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv", "dslopes"), results[1], results[0]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
def test_relative_position_bias_in_float32():
    torch.manual_seed(0)
    rpb = GridRelativeBias(4, (3, 3), init_std=1.0)
    mod, pattern = rpb.at((8, 8)), P.Neighborhood(3, grid=(8, 8))
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
    got = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend="gather")
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, rpb.table)]
    for t in (q, k, v, rpb.table):
        t.grad = None
    ref = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend="reference")
    ref.square().sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, t in zip(grads, (q, k, v, rpb.table)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


def _padding(b: int, n: int) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n - 5:] = False  # trailing padding
    keep[1, ::3] = False  # scattered holes
    if b > 2:
        keep[2] = False  # a fully padded element: every row is zero
    return keep


@needs_kernels
@pytest.mark.parametrize("case", ["nbhd_and_causal", "causal_and_window", "nbhd2d_and_custom"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_with_key_padding_matches_reference(case, dtype, qkv, randn):
    build, n = COMPOSED_CASES[case]
    keep = _padding(3, n)
    pattern = build() & P.KeyPadding(keep)
    assert G.gather_form(pattern, Shape(3, 4, n, n)) is not None
    q, k, v = qkv(3, 4, 2, n, n, 16, 16)
    dout, dlse = randn(3, 4, n, 16), randn(3, 4, n)
    results = []
    for backend in ("reference", "gather"):
        args = [t if backend == "reference" else t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = attnzoo.attention(*args, pattern=pattern, backend=backend, return_lse=True)
        finite = torch.isfinite(lse)
        loss = (out * dout.to(out.dtype)).sum() + (torch.where(finite, lse, 0) * dlse.to(lse.dtype)).sum()
        results.append((out, torch.where(finite, lse, 0), *torch.autograd.grad(loss, args)))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(results[1][0][2], torch.zeros_like(results[1][0][2]))  # fully padded element
    assert not results[1][3][:, :, ~keep[0]][0].any()  # padded keys get no dk


@needs_kernels
def test_modules_with_padding_and_causal_run_on_gather():
    q = torch.zeros(2, 4, 256, 16)
    keep = torch.ones(2, 256, dtype=torch.bool)
    keep[1, 200:] = False
    pattern = P.SlidingWindow(16, causal=True) & P.Causal() & P.KeyPadding(keep)
    expl = attnzoo.explain(q, q, q, pattern=pattern)
    assert expl.backend == "gather", str(expl)
    grid = P.Neighborhood(7, grid=(16, 16)) & P.KeyPadding(keep)
    expl = attnzoo.explain(q, q, q, pattern=grid)
    assert expl.backend == "gather" and "49 keys per query" in expl.reasons["blocksparse"]


@needs_kernels
@pytest.mark.parametrize("h_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(NBHD_CASES))
def test_gather_matches_reference(case, h_kv, qkv, randn, tol):
    build, n = NBHD_CASES[case]
    pattern = build()
    q, k, v = qkv(2, 4, h_kv, n, n, 8, 8)
    dout, dlse = randn(2, 4, n, 8), randn(2, 4, n)
    results = []
    for backend in ("reference", "gather"):
        out, lse = attnzoo.attention(q, k, v, pattern=pattern, backend=backend, return_lse=True)
        loss = (out * dout).sum() + (lse * dlse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v))))
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results[1], results[0]):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
@pytest.mark.parametrize("d", [16, 32, 48, 64, 128])
def test_gather_head_dims(d, qkv, randn, tol):
    """The kernels are specialised for D = 32, 64, 128; other sizes take the generic loop."""
    pattern = P.Neighborhood((3, 3), grid=(5, 6))
    q, k, v = qkv(1, 2, 2, 30, 30, d, d)
    dout = randn(1, 2, 30, d)
    ref, got = (attnzoo.attention(q, k, v, pattern=pattern, backend=b) for b in ("reference", "gather"))
    torch.testing.assert_close(got, ref, **tol)
    g_ref, g_got = (torch.autograd.grad(o, (q, k, v), dout) for o in (ref, got))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, **tol)


@needs_kernels
@pytest.mark.parametrize("d", [32, 64, 128, 40])
@pytest.mark.parametrize("case", ["2d", "3d_causal_time", "window_kv_cache", "window_offset_empty_rows"])
def test_float32_matches_float64_reference(case, d, qkv, randn):
    """float32 runs the vectorised path (D a multiple of 8 among 32 / 64 / 128: 4-lane vectors, polynomial
    exp) or the plain loops (D = 40); both within float32 rounding of the float64 reference."""
    build, n, m = NBHD_CASES[case] + (None,) if case in NBHD_CASES else WINDOW_CASES[case]
    m = m or n
    pattern = build()
    q, k, v = (t.detach() for t in qkv(2, 4, 2, n, m, d, d))
    dout = randn(2, 4, n, d)
    ref = attnzoo.attention(*(t.requires_grad_() for t in (q, k, v)), pattern=pattern, backend="reference")
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    low = [t.detach().float().requires_grad_() for t in (q, k, v)]
    got = attnzoo.attention(*low, pattern=pattern, backend="gather")
    got_grads = torch.autograd.grad(got, low, dout.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", got_grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda msg, name=name: f"d{name}: {msg}")


@needs_kernels
@pytest.mark.parametrize("d", [32, 64, 128])
def test_float32_inputs_off_vector_alignment(d, randn):
    """Contiguous views that start 4 bytes into their storage (not 16- or 32-byte aligned): the vector
    loads of the kernels must not assume alignment."""
    n = 16 * 16
    pattern = P.Neighborhood(5, grid=(16, 16))
    ref_in = [randn(1, 2, n, d) for _ in range(3)]
    low = []
    for t in ref_in:
        storage = torch.empty(1 + t.numel())
        view = storage[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        low.append(view.requires_grad_())
    dout = randn(1, 2, n, d)
    ref = attnzoo.attention(*(t.requires_grad_() for t in ref_in), pattern=pattern, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    got = attnzoo.attention(*low, pattern=pattern, backend="gather")
    got_grads = torch.autograd.grad(got, low, dout.float())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_rows_without_keys_are_zero_with_zero_gradients(qkv):
    """A table row of -1 only (no key): zeros, lse = -inf, zero gradients, never NaN."""
    q, k, v = (t.detach() for t in qkv(1, 2, 1, 6, 6, 8, 8))
    table = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1], [2, 3, 4, -1],
                          [-1, -1, -1, -1], [5, 0, -1, -1], [1, -1, -1, -1]], dtype=torch.int32)
    tables = G.build_tables(table, 6)
    out, lse, _ = G.gather_forward(q.contiguous(), k.contiguous(), v.contiguous(), tables, 0.3)
    assert torch.equal(out[:, :, [1, 3]], torch.zeros_like(out[:, :, [1, 3]]))
    assert torch.isneginf(lse[:, :, [1, 3]]).all() and torch.isfinite(lse[:, :, [0, 2, 4, 5]]).all()
    dout = torch.randn_like(out)
    dq, dk, dv = G.gather_backward(q.contiguous(), k.contiguous(), v.contiguous(), tables, lse, out, dout, 0.3)
    assert torch.equal(dq[:, :, [1, 3]], torch.zeros_like(dq[:, :, [1, 3]]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    # The same rows through the dense reference with the equivalent mask.
    mask = _dense_from_table(table.long(), 6)
    pattern = P.Custom(lambda b, h, qi, ki: mask[qi, ki])
    ref = attnzoo.attention(q, k, v, pattern=pattern, scale=0.3, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_result_does_not_depend_on_the_thread_count(qkv, randn):
    pattern = P.Neighborhood(3, grid=(6, 7))
    q, k, v = qkv(2, 4, 2, 42, 42, 16, 16)
    dout = randn(2, 4, 42, 16)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = attnzoo.attention(q, k, v, pattern=pattern, backend="gather")
            runs.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)],
                         ids=str)
def test_low_precision_close_to_reference(dtype, atol, qkv):
    pattern = P.Neighborhood((3, 3), grid=(6, 7))
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 42, 42, 16, 16))
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = attnzoo.attention(*low, pattern=pattern, backend="gather")
    assert got.dtype == dtype
    got.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in low)
    ref = attnzoo.attention(*(t.to(dtype).double() for t in (q, k, v)), pattern=pattern, backend="reference")
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=atol)


# Dispatch ---------------------------------------------------------------------------------


def _problem(pattern, n, d=16, dv=None, device="cpu", **kw):
    q = torch.zeros(1, 2, n, d, device=device)
    v = torch.zeros(1, 2, n, dv or d, device=device)
    return make_problem(q, q, v, pattern=pattern, score_mod=kw.get("score_mod"), scale=None,
                        return_weights=kw.get("return_weights", False), return_lse=False)


@needs_kernels
def test_auto_uses_gather_for_small_neighbourhoods_on_cpu():
    q = torch.zeros(1, 2, 64 * 64, 16)
    expl = attnzoo.explain(q, q, q, pattern=P.Neighborhood(7, grid=(64, 64)))
    assert expl.backend == "gather"
    assert "49 keys per query" in expl.reasons["blocksparse"]
    q1 = torch.zeros(1, 2, 512, 16)
    for pattern in (P.Neighborhood(31), P.SlidingWindow(128, causal=True), P.SlidingWindow(16, n_sink=4),
                    P.DilatedWindow(8, 3)):
        assert attnzoo.explain(q1, q1, q1, pattern=pattern).backend == "gather", pattern
    q2 = torch.zeros(1, 2, 4096, 16)
    expl = attnzoo.explain(q2, q2, q2, pattern=P.SlidingWindow(160, causal=True))  # at the 1-D bound
    assert expl.backend == "gather" and "160 keys per query" in expl.reasons["blocksparse"]


@needs_kernels
def test_auto_bounds_follow_the_tile_path_and_the_backward():
    """gather gives way to the tiles sooner when the compiled tile kernels take the call (1-D: above 160 keys)
    and, on grids, when a backward follows (above 400); against the PyTorch tile path it keeps 256 / 768."""
    window = P.SlidingWindow(256, causal=True)
    q = torch.zeros(1, 2, 4096, 16)
    expl = attnzoo.explain(q, q, q, pattern=window)
    assert expl.backend == "blocksparse" and expl.path.startswith("its tile plan on the compiled tile kernel")
    assert "256 keys per query: above 160 the compiled tile kernels are cheaper" in expl.reasons["gather"]
    odd = torch.zeros(1, 2, 4096, 24)  # D=24: no compiled tile kernel for float32
    assert attnzoo.explain(odd, odd, odd, pattern=window).backend == "gather"
    expl = attnzoo.explain(odd, odd, odd, pattern=P.SlidingWindow(257, causal=True))
    assert expl.backend == "blocksparse" and "above 256 the tiled blocksparse path is" in expl.reasons["gather"]

    nbhd = P.Neighborhood(21, grid=(64, 64))  # 441 keys
    q = torch.zeros(1, 2, 64 * 64, 16)
    assert attnzoo.explain(q, q, q, pattern=nbhd).backend == "gather"
    qg = q.clone().requires_grad_()
    expl = attnzoo.explain(qg, qg, qg, pattern=nbhd)
    assert expl.backend == "blocksparse" and "above 400 with a backward" in expl.reasons["gather"]
    assert attnzoo.explain(qg, qg, qg, pattern=P.Neighborhood(19, grid=(64, 64))).backend == "gather"  # 361
    odd = torch.zeros(1, 2, 64 * 64, 24, requires_grad=True)
    assert attnzoo.explain(odd, odd, odd, pattern=nbhd).backend == "gather"


@needs_kernels
def test_auto_leaves_dense_key_lists_to_the_dense_paths():
    """A key list covering half of the keys or more goes to SDPA with a mask or tiles, not per-query loops."""
    q = torch.zeros(1, 2, 64, 16)
    expl = attnzoo.explain(q, q, q, pattern=P.Neighborhood(7, grid=(8, 8)))  # 49 of 64 keys
    assert expl.backend != "gather" and "49 keys per query out of 64" in expl.reasons["gather"]
    q = torch.zeros(1, 2, 256, 16)
    assert attnzoo.explain(q, q, q, pattern=P.Neighborhood(7, grid=(16, 16))).backend == "gather"  # 49 of 256


@needs_kernels
def test_auto_keeps_tiles_for_large_neighbourhoods():
    q = torch.zeros(1, 2, 128 * 128, 16)
    expl = attnzoo.explain(q, q, q, pattern=P.Neighborhood(29, grid=(128, 128)))  # 841 keys
    assert expl.backend == "blocksparse"
    assert "841 keys per query: above 768" in expl.reasons["gather"]
    q1 = torch.zeros(1, 2, 1024, 16)
    expl = attnzoo.explain(q1, q1, q1, pattern=P.Neighborhood(257))
    assert expl.backend == "blocksparse" and "above 160" in expl.reasons["gather"]
    out = attnzoo.attention(q1, q1, q1, pattern=P.Neighborhood(257), backend="gather")  # explicit still runs
    assert out.shape == q1.shape


def test_cli_explain_neighborhood(capsys):
    from attnzoo.cli import main

    assert main(["explain", "--pattern", "neighborhood", "--grid", "32", "32", "--kernel", "5", "--grad"]) == 0
    text = capsys.readouterr().out
    expected = "backend: gather" if native.unavailable("gather") is None else "not gather:"
    assert expected in text and "not blocksparse:" in text


def test_why_not_names_the_obstacle():
    gather, nbhd = BACKENDS["gather"], P.Neighborhood(3, grid=(4, 4))
    assert "full attention" in gather.why_not(_problem(None, 16))
    assert "Causal has no per-query key table" in gather.why_not(_problem(P.Causal(), 16))
    assert "never materialises" in gather.why_not(_problem(nbhd, 16, return_weights=True))
    assert "D_v == D" in gather.why_not(_problem(nbhd, 16, dv=8))
    assert "score_mod SoftCap is not supported" in gather.why_not(_problem(nbhd, 16, score_mod=P.SoftCap(30.0)))
    alibi = _problem(nbhd, 16, score_mod=P.ALiBi(2))  # a table read at the pair's distance: only the build can stop it
    assert gather.why_not(alibi) == native.unavailable("gather")
    assert "CPU tensors, got device meta" in gather.why_not(_problem(nbhd, 16, device="meta"))


def test_int32_pair_index_limit_is_explained(monkeypatch):
    gather = BACKENDS["gather"]
    monkeypatch.setattr(gather, "keys_per_query", lambda p: 2**27)
    reason = gather.why_not(_problem(P.Neighborhood(3, grid=(4, 4)), 16))
    assert reason is not None and "int32" in reason and str(16 * 2**27) in reason


def test_disabled_kernels_are_explained(monkeypatch):
    monkeypatch.setenv(native.ENV_DISABLE, "0")
    q = torch.zeros(1, 2, 32 * 32, 16)
    expl = attnzoo.explain(q, q, q, pattern=P.Neighborhood(3, grid=(32, 32)))
    assert expl.backend == "blocksparse"
    assert "disabled (ATTNZOO_NATIVE=0)" in expl.reasons["gather"]
    with pytest.raises(ValueError, match="backend='gather' cannot run this call: attnzoo's compiled CPU kernels"):
        attnzoo.attention(q, q, q, pattern=P.Neighborhood(3, grid=(32, 32)), backend="gather")


def test_missing_compiler_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.reset()
    try:
        reason = native.unavailable("gather")
        assert reason is not None and "no C++ compiler found" in reason and "$CXX" in reason
        with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
            native.load("gather")
    finally:
        native.reset()


@pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")
def test_build_failure_is_explained(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setitem(native._SOURCES, "broken", bad)
    try:
        reason = native.unavailable("broken")
        assert reason is not None and "building attnzoo's C++ kernels failed" in reason and "bad.cpp" in reason
        assert not list((tmp_path / "cache").rglob("*.so"))  # no partial library left behind
    finally:
        native.reset()


def test_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(native.ENV_CACHE, str(blocker))
    path = native.cache_dir()
    assert path.is_dir() and not str(path).startswith(str(blocker))


@needs_kernels
def test_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    native.reset()
    try:
        assert native.unavailable("gather") is None
        built = list(tmp_path.rglob("*.so"))
        assert len(built) == 1 and built[0].parent.parent == native.cache_dir()
        mtime = built[0].stat().st_mtime_ns
        native.reset()
        assert native.unavailable("gather") is None  # loaded from the cache, not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        native.reset()
