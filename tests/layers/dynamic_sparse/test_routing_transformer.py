"""routing_transformer beyond the conformance contract: backends, balanced clusters, local heads, the EMA state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.layers.base import Call
from attnzoo.layers.cache import KVCache
from attnzoo.layers.dynamic_sparse.routing_transformer import cluster_lists, dedupe_keys
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create


def _double(**kw):
    torch.manual_seed(0)
    return create("routing_transformer", dim=32, n_heads=4, **kw).double()


@pytest.mark.parametrize("kw", [
    {"n_clusters": 3, "assignment": "argmax"},
    {"n_clusters": 3, "assignment": "balanced", "local_heads": 2, "local_window": 4},
    {"n_clusters": 4, "assignment": "balanced", "window": 7},
])
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference_forward_and_gradients(kw, causal):
    if causal and kw["assignment"] == "balanced":
        pytest.skip("balanced refuses causal calls (test_balanced_refuses_causal_calls)")
    m = _double(update_centroids=False, **kw)
    ref = _double(update_centroids=False, backend="reference", **kw)
    x = random_tokens(n=19).requires_grad_()
    want = ref(x, causal=causal)
    gx = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in ("gather", "sdpa", "auto"):
        m.backend = backend
        got = m(x, causal=causal)
        assert (got - want).abs().max() < 1e-12, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx).abs().max() < 1e-12, backend


def test_balanced_clusters_take_window_queries_and_keys_closest_to_their_centroid():
    m = _double(n_clusters=3, window=4).eval()
    x = random_tokens(n=10)
    q, k, _ = m.project(x, x)
    allow = m.route(q, k, None, Call(x=x, src=x)).dense(10, 10, False)  # [B, H, N, N]
    sq, sk = m.similarity(q), m.similarity(k)
    want = torch.zeros_like(allow)
    for c in range(3):
        qs = sq[..., c].topk(4, -1).indices
        ks = sk[..., c].topk(4, -1).indices
        qm = torch.zeros(2, 4, 10, dtype=torch.bool).scatter_(-1, qs, True)
        km = torch.zeros(2, 4, 10, dtype=torch.bool).scatter_(-1, ks, True)
        want |= qm.unsqueeze(-1) & km.unsqueeze(-2)
    assert torch.equal(allow, want)
    assert (allow.sum(-1) <= 3 * 4).all() and (allow.sum(-1) == 0).any()  # some query is in no cluster
    y = m(x)
    q_in_none = ~allow.any(-1)  # those queries' heads output zeros (before o_proj): check through capture
    m.capture = True
    m(x)
    z = m.captured["z"]
    assert (z.masked_select(q_in_none.unsqueeze(-1)) == 0).all()
    assert torch.isfinite(y).all()


def test_local_heads_attend_their_window():
    m = _double(n_clusters=2, assignment="argmax", local_heads=1, local_window=3).eval()
    x = random_tokens(n=9)
    q, k, _ = m.project(x, x)
    for causal, lo, hi in ((True, -2, 0), (False, -2, 2)):
        allow = m.route(q, k, None, Call(x=x, src=x, causal=causal)).dense(9, 9, causal)
        d = torch.arange(9).view(1, -1) - torch.arange(9).view(-1, 1)
        assert torch.equal(allow[:, 0], ((d >= lo) & (d <= hi)).expand(2, 9, 9))


def test_eval_and_frozen_leave_the_centroids_training_updates_them_deterministically():
    x = random_tokens(n=12)
    m = _double(n_clusters=3, decay=0.5).eval()
    before = m.centroids.clone()
    m(x)
    assert torch.equal(m.centroids, before)
    frozen = _double(n_clusters=3, decay=0.5, update_centroids=False).train()
    frozen(x)
    assert torch.equal(frozen.centroids, before)
    a, b = _double(n_clusters=3, decay=0.5).train(), _double(n_clusters=3, decay=0.5).train()
    a(x)
    b(x)
    assert not torch.equal(a.centroids, before) and torch.equal(a.centroids, b.centroids)


def test_padded_tokens_do_not_move_the_centroids():
    x = random_tokens(n=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 8:] = False
    x2 = torch.where(keep.unsqueeze(-1), x, 9 * random_tokens(n=12, seed=5))
    a, b = _double(n_clusters=3, decay=0.5).train(), _double(n_clusters=3, decay=0.5).train()
    a(x, mask=keep)
    b(x2, mask=keep)
    assert torch.equal(a.centroids, b.centroids)
    q, k, _ = _double(n_clusters=3).project(x, x)
    want = _double(n_clusters=3, decay=0.5).updated_centroids(q, k, keep, keep)
    torch.testing.assert_close(a.centroids, want, rtol=0, atol=1e-15)


def test_argmax_decoding_equals_the_full_forward_in_eval_mode():
    m = _double(n_clusters=3, assignment="argmax", local_heads=1, local_window=4).eval()
    x = random_tokens(n=13)
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(13)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_helpers():
    cl = torch.tensor([[[1, 0, 2, 1, 0, 1]]])  # cluster 2 = none (n_clusters=2)
    lists, counts = cluster_lists(cl, 2)
    assert lists.tolist() == [[[[1, 4, -1], [0, 3, 5]]]] and counts.tolist() == [[[2, 3]]]
    assert dedupe_keys(torch.tensor([[3, -1, 1, 3, 1]])).tolist() == [[-1, 1, -1, 3, -1]]


@pytest.mark.parametrize("kw,name", [
    ({"n_clusters": 0}, "n_clusters"),
    ({"assignment": "lsh"}, "assignment"),
    ({"window": 0}, "window"),
    ({"assignment": "argmax", "window": 3}, "window"),
    ({"decay": 1.5}, "decay"),
    ({"local_heads": 5}, "local_heads"),
    ({"local_window": 0}, "local_window"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        _double(**kw)


def test_bad_calls_are_refused_before_any_work():
    m = _double(n_clusters=2, window=20)
    with pytest.raises(ValueError, match="window"):
        m(random_tokens(n=12))
    with pytest.raises(ValueError, match="cache"):
        _double(n_clusters=2)(random_tokens(n=4), causal=True, cache=KVCache())
    assert F.normalize(m.centroids, dim=-1).shape == (4, 2, 8)


def test_clustered_form_counts_a_key_shared_by_two_clusters_once():
    """Balanced clusters overlap (a small window over few clusters): some query shares a key with two of its
    clusters, and the clustered form (auto) still equals the single softmax over the union (reference)."""
    from attnzoo.layers.dynamic_sparse.routing_transformer import shared_earlier

    m = _double(n_clusters=2, window=9, update_centroids=False).eval()
    ref = _double(n_clusters=2, window=9, update_centroids=False, backend="reference").eval()
    x = random_tokens(n=10)
    q, k, _ = m.project(x, x)
    qlists, klists, qclusters = m.clusters(q, k, None, Call(x=x, src=x))
    assert shared_earlier(qlists, klists, qclusters, 10, 2).any()
    assert (m(x) - ref(x)).abs().max() < 1e-12


def test_balanced_refuses_causal_calls_and_cab_says_so():
    from attnzoo.bench import cab

    x = random_tokens(n=12)
    with pytest.raises(ValueError, match="causal: assignment='balanced' picks each cluster's tokens over the whole "
                                         "call"):
        _double(n_clusters=2)(x, causal=True)
    assert _double(n_clusters=2).cab_not_applicable["CS"].startswith("assignment='balanced' refuses causal")
    assert _double(n_clusters=2, assignment="argmax").cab_not_applicable == {}
    res = cab.check("routing_transformer")  # the default refuses causal calls: CAB runs the test configuration
    assert res["CS"]["ok"] is True and "assignment='balanced' picks" in res["CS"]["detail"]
    res = cab.check("routing_transformer", mixer_kwargs={"assignment": "argmax"})
    assert res["CS"]["ok"] is True  # argmax reads no later token
