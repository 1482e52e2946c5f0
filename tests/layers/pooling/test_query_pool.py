"""query_pool: every query source and variant on padded and packed bags; Efficient Probing's size."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from tests.layers.pooling._bags import bags

CONFIGS = [{"n_queries": 3}, {"query_source": "mean", "n_queries": 2}, {"query_source": "cls"},
           {"query_source": "external", "n_queries": 2}, {"variant": "ep", "n_queries": 4}, {"topk": 3, "n_queries": 2},
           {"mlp_ratio": 2.0, "out_proj": False}, {"include_query_in_kv": True, "n_queries": 2},
           {"include_query_in_kv": True, "query_source": "external", "n_queries": 2, "topk": 3},
           {"include_query_in_kv": True, "query_source": "mean"}]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_packed_equals_padded_and_padding_invariant(kw):
    torch.manual_seed(0)
    m = attnzoo.create("query_pool", dim=16, n_heads=2, **kw).double()
    x, mask, packed, cu = bags()
    q = torch.randn(4, 2, 16, dtype=torch.float64) if kw.get("query_source") == "external" else None
    y = m(x, mask=mask, query=q)
    x2 = torch.where(mask[..., None], x, 100 * torch.randn_like(x))
    torch.testing.assert_close(m(x2, mask=mask, query=q), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(packed, cu_seqlens=cu, query=q), y, rtol=1e-12, atol=1e-12)


def test_topk_keeps_k_tokens_per_query():
    torch.manual_seed(0)
    m = attnzoo.create("query_pool", dim=16, n_heads=2, topk=3).double()
    x, mask, _, _ = bags()
    _, a = m(x, mask=mask, return_weights=True)
    nonzero = (a > 0).sum(1)
    assert (nonzero == torch.minimum(mask.sum(1), torch.tensor(3))[:, None, None]).all()


def test_ep_parameter_count():
    m = attnzoo.create("query_pool", dim=16, variant="ep", n_queries=4, out_dim=8)
    assert sum(p.numel() for p in m.parameters()) == 4 * 16 + 16 * 8
    assert m(torch.randn(2, 5, 16)).shape == (2, 8)


def test_bad_input():
    m = attnzoo.create("query_pool", dim=16, n_heads=2, query_source="external", n_queries=2)
    with pytest.raises(ValueError, match=r"query: expected a tensor \[2, 2, 16\], got \[2, 1, 16\]"):
        m(torch.randn(2, 5, 16), query=torch.randn(2, 1, 16))
    with pytest.raises(ValueError, match="query: only used with query_source='external'"):
        attnzoo.create("query_pool", dim=16)(torch.randn(2, 5, 16), query=torch.randn(2, 1, 16))
    with pytest.raises(ValueError, match="n_queries: must divide out_dim=16, got 3"):
        attnzoo.create("query_pool", dim=16, variant="ep", n_queries=3)


def test_include_query_in_kv_weights_and_empty_bags():
    torch.manual_seed(0)
    m = attnzoo.create("query_pool", dim=16, n_heads=2, n_queries=2, include_query_in_kv=True).double()
    x, mask, packed, cu = bags()
    _, a = m(x, mask=mask, return_weights=True)
    share = a.sum(1)                                          # the tokens' share; the rest is on the queries
    assert ((share > 0) & (share < 1)).all() and (a[~mask] == 0).all()
    empty = mask.clone()
    empty[1] = False
    y = m(x, mask=empty)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="include_query_in_kv: query_source='cls' takes its query from the bag"):
        attnzoo.create("query_pool", dim=16, query_source="cls", include_query_in_kv=True)
    with pytest.raises(ValueError, match="include_query_in_kv: variant='ep' has no key projection"):
        attnzoo.create("query_pool", dim=16, variant="ep", include_query_in_kv=True)
