"""hip beyond the conformance contract: the search itself, backends, padding, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.base import Call
from attnzoo.layers.dynamic_sparse.hip import hierarchical_top_k, visible_keys
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create
from tests.helpers import assert_backends_equal_reference


def _double(**kw):
    torch.manual_seed(0)
    return create("hip", dim=32, n_heads=4, **kw).double()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("representative,query_block", [("first", 1), ("middle", 1), ("first", 4)])
def test_every_backend_equals_the_reference(causal, representative, query_block):
    m = _double(top_k=4, representative=representative, query_block=query_block)
    ref = _double(top_k=4, representative=representative, query_block=query_block, backend="reference")
    x = random_tokens(n=23).requires_grad_()
    assert_backends_equal_reference(m, ref, x, causal)


def test_monotone_scores_find_the_exact_top_k():
    """Scores increasing along the keys: halving by the first key keeps the right halves, i.e. the last k keys."""
    n, kk = 37, 5
    q = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    k = torch.stack([torch.arange(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)], -1).view(1, 1, n, 2)
    kept, count = visible_keys(1, None, n, False, q.device)
    got = hierarchical_top_k(q, k, kept, count, kk)
    assert sorted(got.flatten().tolist()) == list(range(n - kk, n))


def test_padded_keys_are_never_selected_and_counts_follow_the_kept_keys():
    m = _double(top_k=3)
    x = random_tokens(n=10)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 2:5] = False
    keep[1, 7:] = False
    for causal in (False, True):
        q, k, _ = m.project(x, x)
        keys = m.route(q, k, keep, Call(x=x, src=x, causal=causal)).index
        for b in range(2):
            sel = keys[b][keys[b] >= 0]
            assert keep[b][sel].all()
        cnt = keep.cumsum(1) if causal else keep.sum(1, keepdim=True).expand(-1, 10)
        assert torch.equal((keys >= 0).sum(-1), cnt.clamp(max=3).unsqueeze(1).expand(-1, 4, -1))


def test_rounds_are_logarithmic():
    """The search halves chunks: ceil(log2(ceil(T / k))) rounds score 2k keys each, so O(k log T) per query."""
    calls = []
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    for n in (64, 1024):
        k = torch.randn(1, 1, n, 4, dtype=torch.float64)
        orig = torch.Tensor.topk
        count = [0]

        def counting(self, *a, _orig=orig, _count=count, **kw):
            _count[0] += 1
            return _orig(self, *a, **kw)

        torch.Tensor.topk = counting
        try:
            kept, cnt = visible_keys(1, None, n, False, q.device)
            hierarchical_top_k(q, k, kept, cnt, 4)
        finally:
            torch.Tensor.topk = orig
        calls.append(count[0])
    assert calls == [4, 8]  # log2(64 / 4), log2(1024 / 4)


@pytest.mark.parametrize("kw,name", [({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"),
                                     ({"representative": "last"}, "representative")])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        create("hip", dim=32, n_heads=4, **kw)


def test_chunked_search_equals_one_pass(monkeypatch):
    import attnzoo.layers.dynamic_sparse.hip as hip

    m = _double(top_k=3)
    x = random_tokens(n=19)
    q, k, _ = m.project(x, x)
    call = Call(x=x, src=x, causal=True)
    whole = m.route(q, k, None, call).index
    monkeypatch.setattr(hip, "SEARCH_CHUNK_ELEMENTS", 1)
    assert torch.equal(m.route(q, k, None, call).index, whole)


def test_top_k_above_the_keys_of_a_call_is_refused_before_any_work():
    import attnzoo

    m = attnzoo.create("hip", dim=32, n_heads=4, top_k=8)
    with pytest.raises(ValueError, match=r"top_k: expected at most 7 \(the keys of this call\), got 8"):
        m(torch.randn(2, 7, 32))
    assert m(torch.randn(2, 8, 32)).shape == (2, 8, 32)


def _naive_block_search(q, k, n_seen, top_k, members):
    """HiP's halving search for one head and one block of queries, written out with Python lists: chunks of the
    first ``n_seen`` keys, each half scored by the best ``q·k_first`` over the block's queries ``members``."""
    kk = min(top_k, n_seen)
    chunks = [(j * n_seen // kk, (j + 1) * n_seen // kk) for j in range(kk)]
    while any(hi - lo > 1 for lo, hi in chunks):
        halves = []
        for lo, hi in chunks:
            mid = lo + (hi - lo + 1) // 2
            halves += [(lo, mid), (mid, hi)]
        scored = [(max(float(q[i] @ k[lo]) for i in members) if hi > lo else float("-inf"), j)
                  for j, (lo, hi) in enumerate(halves)]
        best = sorted(scored, key=lambda t: -t[0])[:kk]
        chunks = [halves[j] for _, j in sorted(best, key=lambda t: -t[0])]
    return sorted(lo for lo, hi in chunks if hi > lo)


@pytest.mark.parametrize("causal", [False, True])
def test_query_blocks_search_together_and_share_their_keys(causal):
    n, block, top_k = 22, 4, 3
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, n, 8, generator=g,
                                                                                   dtype=torch.float64)
    kept, count = visible_keys(n, None, n, causal, q.device)
    got = hierarchical_top_k(q, k, kept, count, top_k, query_block=block)
    assert got.shape == (1, 2, -(-n // block), top_k)
    for h in range(2):
        for j in range(got.shape[2]):
            members = list(range(j * block, min(n, (j + 1) * block)))
            n_seen = members[-1] + 1 if causal else n
            want = _naive_block_search(q[0, h], k[0, h], n_seen, top_k, members)
            assert sorted(got[0, h, j].tolist()) == want


@pytest.mark.parametrize("causal", [False, True])
def test_query_blocks_with_top_k_at_least_t_are_mha(causal):
    from attnzoo.layers.testing import mha_from

    x = random_tokens(n=23)
    everything = _double(top_k=23, query_block=4)  # every block keeps all its keys
    assert (everything(x, causal=causal) - mha_from(everything)(x, causal=causal)).abs().max() < 1e-12


def test_query_block_is_checked():
    with pytest.raises(ValueError, match="query_block: expected an integer >= 1, got 0"):
        create("hip", dim=32, n_heads=4, query_block=0)
