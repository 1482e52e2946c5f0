"""Query routings of the routed-attention op (mixture-of-heads' gather dispatch): every backend against the float64
reference built from the routing's dense mask, forward and gradients; bad routings refused; explain covers them."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.routed import Routing, gather_pays, gather_routes, query_routing_mask
from attnzoo.patterns.routed import explain_routed, routed_attention


def _case(seed: int = 0, b: int = 2, r: int = 3, n: int = 11, m: int = 11, d: int = 8):
    """A query routing of ``n`` queries over ``r`` routes (route 0 of batch 0 empty), routed queries ``[b, r, C, d]``
    and keys ``[b, r, m, d]`` (``m > n``: cached keys before the queries; ``m < n``: cross attention)."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(b, n, r, generator=g) < 0.4
    sel[0, :, 0] = False  # a route nobody picked
    idx, valid, counts = gather_routes(sel)
    routing = Routing("queries", torch.where(valid, idx, torch.full_like(idx, -1)), n_queries=n)
    q = torch.randn(b, r, idx.shape[-1], d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, r, m, d, generator=g, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(b, m, dtype=torch.bool)
    keep[1, m - 3:] = False
    keep[0, :2] = False
    return sel, valid, counts, routing, q, k, v, keep


def _grads(out, inputs):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * w).sum(), inputs, retain_graph=True)


def test_gather_routes_lists_each_routes_tokens_in_order():
    sel, valid, counts, routing, *_ = _case()
    assert torch.equal(counts, sel.sum(1))
    for b in range(sel.shape[0]):
        for r in range(sel.shape[2]):
            want = torch.nonzero(sel[b, :, r]).flatten()
            assert torch.equal(routing.index[b, r][valid[b, r]], want)
            assert (routing.index[b, r][~valid[b, r]] == -1).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("backend,chunk,m", [("gather", 1, 11), ("gather", 2, 15), ("gather", None, 11),
                                             ("auto", 3, 7), ("sdpa", None, 15), ("blocksparse", None, 11)])
def test_query_routing_backends_equal_reference_with_gradients(causal, padded, backend, chunk, m):
    if causal and m < 11:
        m = 11 + 4  # causal calls have the queries last among the keys
    _, valid, _, routing, q, k, v, keep = _case(seed=1, m=m)
    kp = keep if padded else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = routed_attention(q, k, v, routing, causal=causal, keep=kp, backend="reference")
    out = routed_attention(q, k, v, routing, causal=causal, keep=kp, backend=backend, chunk=chunk)
    assert (out - ref).abs().max() < 1e-12
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert (a - b).abs().max() < 1e-12
    assert (out[~valid] == 0).all() and (out[0, 0] == 0).all()  # empty slots and the empty route: zeros
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert (gq[~valid] == 0).all()


def test_query_routing_in_float32():
    _, valid, _, routing, q, k, v, keep = _case(seed=2, n=40, m=40, d=32)
    ref = routed_attention(q, k, v, routing, causal=True, keep=keep, backend="reference")
    out = routed_attention(q.float(), k.float(), v.float(), routing, causal=True, keep=keep, chunk=8)
    assert out.dtype == torch.float32 and (out.double() - ref).abs().max() < 1e-5


@pytest.mark.slow
def test_query_routing_on_flex_forward():
    """flex on CPU: forward only in float32, compiled per shape (seconds); on CUDA see benchmarks/gpu_session.sh."""
    _, valid, _, routing, q, k, v, keep = _case(seed=2, n=40, m=40, d=32)
    ref = routed_attention(q, k, v, routing, causal=True, keep=keep, backend="reference")
    flex = routed_attention(q.float(), k.float(), v.float(), routing, causal=True, keep=keep, backend="flex")
    assert (flex.double() - ref).abs().max() < 1e-5


def test_reference_is_a_softmax_under_the_routings_dense_mask():
    _, valid, _, routing, q, k, v, _ = _case(seed=3, m=14)
    allow = query_routing_mask(routing.index, 11, 14, causal=True)
    for b, r, c in ((1, 1, 0), (1, 2, valid[1, 2].sum() - 1)):
        i = int(routing.index[b, r, c])
        assert allow[b, r, c].tolist() == [j <= i + 3 for j in range(14)]
    s = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allow, float("-inf"))
    want = torch.nan_to_num(torch.softmax(s, -1)) @ v
    got = routed_attention(q, k, v, routing, causal=True, backend="reference")
    assert (got - want).abs().max() < 1e-12
    assert torch.equal(routing.dense(5, 14, True), allow)


def test_routing_everything_is_dense_attention():
    n = 9
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    routing = Routing("queries", torch.arange(n).expand(1, 2, n).contiguous(), n_queries=n)
    s = q @ k.transpose(-1, -2) / 8 ** 0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for is_causal, want in ((False, torch.softmax(s, -1) @ v),
                            (True, torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v)):
        assert (routed_attention(q, k, v, routing, causal=is_causal, chunk=4) - want).abs().max() < 1e-12


def test_bad_query_routings_are_refused():
    _, _, _, routing, q, k, v, keep = _case()
    c = q.shape[2]
    bad = [
        (lambda: Routing("tokens", routing.index, n_queries=11), "kind"),
        (lambda: Routing("queries", routing.index), "n_queries"),
        (lambda: Routing("keys", routing.index, n_queries=11), "n_queries"),
        (lambda: routed_attention(q, k, v, Routing("queries", routing.index.int(), n_queries=11)), "queries"),
        (lambda: routed_attention(q, k, v, Routing("queries", routing.index[..., :-1], n_queries=11)),
         rf"queries: expected an int64 tensor \[2, 3, {c}\]"),
        (lambda: routed_attention(q, k, v, Routing("queries", routing.index, n_queries=5)), r"\[-1, 5\)"),
        (lambda: routed_attention(q, k, v, Routing("queries", routing.index, n_queries=-1)), "n_queries"),
        (lambda: routed_attention(q, k, v, Routing("queries", torch.zeros_like(routing.index), n_queries=11)),
         "twice"),
        (lambda: routed_attention(q, k, v, routing.index), "routing"),
        (lambda: routed_attention(q, k[:, :2], v[:, :2], routing), "q, k, v"),
        (lambda: routed_attention(q, k, v, routing, keep=keep[:, :5]), r"keep: expected a bool tensor \[2, 11\]"),
        (lambda: routed_attention(q, k, v, routing, chunk=0), "chunk"),
        (lambda: routed_attention(q, k, v, routing, backend="nope"), "backend"),
        (lambda: explain_routed(q, k, v, routing, backend="nope"), "backend"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()


def test_explain_says_how_a_query_routing_runs():
    _, _, _, routing, q, k, v, keep = _case()
    text = explain_routed(q, k, v, routing, causal=True, keep=keep, chunk=4)
    assert text.startswith("backend: gather (query routing") and "4 slots per chunk" in text and "flex" in text
    assert explain_routed(q, k, v, routing, backend="sdpa").startswith("backend: sdpa (attnzoo.attention's sdpa")
    assert explain_routed(q, k, v, routing, backend="reference").startswith("backend: reference")


def test_gather_pays_only_for_sparse_routes_on_long_calls():
    assert gather_pays(0.25, 512) and not gather_pays(0.5, 512) and not gather_pays(0.25, 64)


@pytest.mark.parametrize("causal", [False, True])
def test_query_pattern_block_bounds_are_sound(causal):
    """QueryRouted's block layout (what blocksparse skips, what flex's block mask marks full) never drops an
    allowed pair and calls a tile full only when every pair in it is allowed."""
    from attnzoo.ops.layout import FULL
    from attnzoo.patterns.base import Shape
    from attnzoo.patterns.routed import QueryRouted

    _, _, _, routing, *_ = _case(seed=5, n=60, r=2)
    c = routing.index.shape[-1]
    shape = Shape(2, 2, c, 70)
    pat = QueryRouted(routing.index, 70 - 60, causal)
    layout = pat.block_layout(shape, 8, 16)
    dense = pat.dense_mask(shape)
    assert torch.equal(dense, query_routing_mask(routing.index, 60, 70, causal))
    pq, pk = -c % 8, -70 % 16
    tiles = torch.nn.functional.pad(dense, (0, pk, 0, pq)).view(2, 2, (c + pq) // 8, 8, (70 + pk) // 16, 16)
    assert not (tiles.any(-1).any(-2) & (layout.state == 0)).any()
    full = torch.nn.functional.pad(dense, (0, pk, 0, pq), value=True).view(tiles.shape).all(-1).all(-2)
    assert not ((layout.state == FULL) & ~full).any()
    assert (layout.state != 0).sum() < layout.state.numel()  # something is skipped
