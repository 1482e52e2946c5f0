"""bi_level_routing beyond the conformance contract: backends, DHSA chunks, LCE, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers.base import Call
from attnzoo.layers.dynamic_sparse.bi_level_routing import adaptive_chunks, region_members
from attnzoo.layers.testing import mha_from, random_grid, random_tokens
from attnzoo.registry import create


def _double(**kw):
    torch.manual_seed(0)
    return create("bi_level_routing", dim=32, n_heads=4, **kw).double()


@pytest.mark.parametrize("kw,x", [
    ({"regions": (3, 2), "top_k": 2}, random_grid(grid=(6, 8))),
    ({"regions": 4, "top_k": 2, "chunking": "adaptive", "rep": "mean_sqrt_len", "per_head_routing": True},
     random_tokens(n=17)),
])
def test_every_backend_equals_the_reference_forward_and_gradients(kw, x):
    m = _double(**kw)
    ref = _double(backend="reference", **kw)
    x = x.clone().requires_grad_()
    want = ref(x)
    gx = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in ("gather", "sdpa", "auto"):
        m.backend = backend
        got = m(x)
        assert (got - want).abs().max() < 1e-12, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx).abs().max() < 1e-12, backend


def test_routing_drops_regions_and_keeps_k_regions_per_query_region():
    m = _double(regions=(3, 2), top_k=2)
    x = random_grid(grid=(6, 8))
    flat = x.reshape(2, -1, 32)
    q, k, _ = m.project(flat, flat)
    allow = m.route(q, k, None, Call(x=flat, src=flat, extra={"grid": (6, 8)})).dense(48, 48, False)
    assert (allow.sum(-1) == 2 * 8).all()  # 2 routed regions of 2 x 4 tokens each
    assert not torch.allclose(m(x), mha_from(m)(flat).reshape(x.shape))


def test_adaptive_chunks_cut_at_the_least_similar_neighbours():
    k = torch.zeros(1, 1, 7, 2, dtype=torch.float64)
    k[..., :3, 0] = 1.0  # tokens 0-2 point one way, 3-4 another, 5-6 a third
    k[..., 3:5, 1] = 1.0
    k[..., 5:, 0] = -1.0
    assert adaptive_chunks(k, None, 3).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    keep = torch.ones(1, 7, dtype=torch.bool)
    keep[0, 5:] = False  # pairs with padding are never preferred
    assert adaptive_chunks(k, keep, 2).tolist() == [[0, 0, 0, 1, 1, 1, 1]]
    assert region_members(torch.tensor([[0, 0, 0, 1, 1, 2, 2]]), 3).tolist() == [[[0, 1, 2], [3, 4, -1], [5, 6, -1]]]


def test_dhsa_scores_chunks_by_mean_times_sqrt_length():
    m = _double(regions=3, top_k=1, chunking="adaptive", rep="mean_sqrt_len")
    x = random_tokens(n=11)
    q, k, _ = m.project(x, x)
    rid = adaptive_chunks(k, None, 3)
    allow = m.route(q, k, None, Call(x=x, src=x)).dense(11, 11, False)
    for b in range(2):
        reps = []
        for t in (q[b], k[b]):
            reps.append(torch.stack([t[:, rid[b] == r].mean(1) * (rid[b] == r).sum().sqrt() for r in range(3)], 1))
        best = torch.einsum("hrd,hsd->rs", *reps).argmax(-1)  # [R]: the routed chunk of each chunk
        assert torch.equal(allow[b, 0], best[rid[b]].view(-1, 1) == rid[b].view(1, -1))


def test_lce_is_a_depthwise_convolution_of_v_added_before_o_proj():
    m = _double(regions=2, top_k=4, lce=3)  # every region: dense attention plus LCE
    x = random_grid(grid=(4, 6))
    flat = x.reshape(2, -1, 32)
    v = m.v_proj(flat)  # [B, N, C]
    conv = F.conv2d(v.transpose(1, 2).reshape(2, 32, 4, 6), m.lce.weight, m.lce.bias, padding=1, groups=32)
    dense = mha_from(m)
    q, k, vv = dense.project(flat, flat)
    z = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ vv
    want = m.o_proj(dense.merge(z) + conv.flatten(2).transpose(1, 2))
    torch.testing.assert_close(m(x), want.reshape(x.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw,x,name", [
    ({"top_k": 0}, None, "top_k"),
    ({"regions": 0}, None, "regions"),
    ({"rep": "max"}, None, "rep"),
    ({"lce": 4}, None, "lce"),
    ({"chunking": "adaptive", "regions": (2, 2)}, None, "regions"),
    ({"regions": 2, "top_k": 5}, random_grid(grid=(4, 4)), "top_k"),
    ({"regions": (4, 3), "top_k": 2}, random_grid(grid=(4, 4)), "extent"),
    ({"regions": 20, "top_k": 2, "chunking": "adaptive"}, random_tokens(n=12), "regions"),
    ({"regions": 2, "top_k": 1, "chunking": "adaptive"}, random_grid(grid=(4, 4)), "spatial axes"),
])
def test_bad_input_names_the_argument(kw, x, name):
    with pytest.raises(ValueError, match=name):
        m = _double(**kw)
        m(x)


def test_causal_cache_and_context_are_refused():
    m = _double(regions=2, top_k=1)
    x = random_tokens(n=8)
    with pytest.raises(ValueError, match="causal"):
        m(x, causal=True)
    with pytest.raises(ValueError, match="context"):
        m(x, context=x)


def test_region_gather_path_equals_the_reference_with_padding_and_variable_chunks():
    kw = {"regions": 4, "top_k": 2, "chunking": "adaptive", "rep": "mean_sqrt_len", "per_head_routing": True}
    m, ref = _double(**kw), _double(backend="reference", **kw)
    x = random_tokens(n=17).requires_grad_()
    keep = torch.ones(2, 17, dtype=torch.bool)
    keep[0, 11:] = False
    keep[1, 3] = False
    got, want = m(x, mask=keep), ref(x, mask=keep)
    assert (got - want).abs().max() < 1e-12
    g1, g2 = (torch.autograd.grad(y.square().sum(), x)[0] for y in (got, want))
    assert (g1 - g2).abs().max() < 1e-12


def test_top_k_above_the_regions_of_a_call_is_refused_before_any_work():
    m = _double(regions=2, top_k=5)
    with pytest.raises(ValueError, match=r"top_k: expected at most 4 \(the regions of this call\), got 5"):
        m(random_grid(grid=(4, 4)))
