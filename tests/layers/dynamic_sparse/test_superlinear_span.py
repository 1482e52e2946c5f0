"""superlinear_span beyond the conformance contract: the gated (authors') form, backends, anchors, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.cache import KVCache
from attnzoo.layers.dynamic_sparse.superlinear_span import span_anchors, span_length
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create
from tests.helpers import assert_backends_equal_reference


def _double(**kw):
    torch.manual_seed(0)
    return create("superlinear_span", dim=32, n_heads=4, **kw).double()


def test_anchors_and_span_lengths():
    pos = torch.tensor([0, 3, 8, 15])
    assert span_anchors(pos).tolist() == [[0, -1, -1, -1], [3, 0, -1, -1], [8, 5, 0, -1], [15, 12, 7, 0]]
    assert span_length(pos).tolist() == [2, 4, 6, 8]


@pytest.mark.parametrize("combine", ["union", "gated"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference(combine, causal):
    m = _double(top_k=2, combine=combine)
    ref = _double(top_k=2, combine=combine, backend="reference")
    x = random_tokens(n=21).requires_grad_()
    assert_backends_equal_reference(m, ref, x, causal)


def test_gated_search_is_trained_by_the_gate():
    m = _double(top_k=2, combine="gated")
    m(random_tokens(n=16), causal=True).square().sum().backward()
    assert m.search_proj.weight.grad is not None and m.search_proj.weight.grad.abs().sum() > 0


def test_gated_one_span_per_query_is_its_span_attention():
    """top_k = 1: the gate is 1, the output is attention over the single selected span."""
    m = _double(top_k=1, combine="gated")
    x = random_tokens(n=12)
    out, w = m(x, causal=True, return_weights=True)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 12, dtype=torch.float64))
    assert (w.triu(1) == 0).all()
    z = w @ m.split(m.v_proj(x), 4)
    assert (m.output(z, x) - out).abs().max() < 1e-12


def test_gated_decoding_equals_the_full_forward():
    m = _double(top_k=2, combine="gated")
    x = random_tokens(n=13)
    full = m(x, causal=True)
    cache = KVCache()
    steps = torch.cat([m(x[:, i:i + 1], causal=True, cache=cache) for i in range(13)], 1)
    assert (steps - full).abs().max() < 1e-12


def test_gated_padding_never_reaches_kept_outputs():
    m = _double(top_k=2, combine="gated")
    x = random_tokens(n=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 3:6] = False
    y = m(x, mask=keep, causal=True)
    x2 = torch.where(keep.unsqueeze(-1), x, 9 * random_tokens(n=12, seed=4))
    assert (m(x2, mask=keep, causal=True) - y)[keep].abs().max() < 1e-12


def test_union_routing_is_within_the_selected_spans():
    """Each query attends at most top_k spans of ceil(2 sqrt(p + 1)) + 1 keys (the O(L^{3/2}) budget)."""
    m = _double(top_k=2)
    x = random_tokens(n=40)
    q, k, _ = m.project(x, x)
    from attnzoo.layers.base import Call

    keys = m.route(q, k, None, Call(x=x, src=x, causal=True)).index
    budget = 2 * (span_length(torch.arange(40)) + 1)
    assert ((keys >= 0).sum(-1) <= budget.view(1, 1, -1)).all()


@pytest.mark.parametrize("kw,name", [({"top_k": 0}, "top_k"), ({"combine": "sum"}, "combine"),
                                     ({"combine": "gated", "rope": True}, "rope")])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        create("superlinear_span", dim=32, n_heads=4, **kw)


def test_chunked_search_equals_one_pass(monkeypatch):
    import attnzoo.layers.dynamic_sparse.superlinear_span as sl
    from attnzoo.layers.base import Call

    m = _double(top_k=2)
    x = random_tokens(n=19)
    q, k, _ = m.project(x, x)
    call = Call(x=x, src=x, causal=True)
    whole = m.route(q, k, None, call).index
    monkeypatch.setattr(sl, "SEARCH_CHUNK_ELEMENTS", 1)
    assert torch.equal(m.route(q, k, None, call).index, whole)


def test_top_k_above_the_anchors_of_a_call_is_refused_before_any_work():
    import attnzoo

    m = attnzoo.create("superlinear_span", dim=32, n_heads=4, top_k=3)
    with pytest.raises(ValueError, match=r"top_k: expected at most 2 .*got 3"):
        m(torch.randn(2, 8, 32), causal=True)
    assert m(torch.randn(2, 9, 32), causal=True).shape == (2, 9, 32)
