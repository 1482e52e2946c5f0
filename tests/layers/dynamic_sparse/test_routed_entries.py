"""moba, topk_attention, block_sparse beyond the conformance contract: backends, weights from mha, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.testing import mha_from, random_tokens
from attnzoo.registry import create


def _double(slug, **kw):
    torch.manual_seed(0)
    return create(slug, dim=32, n_heads=4, **kw).double()


@pytest.mark.parametrize("slug,kw,backends", [
    ("moba", {"block_size": 4, "top_k": 2}, ("gather", "blocksparse", "sdpa")),
    ("topk_attention", {"top_k": 3}, ("gather", "sdpa")),
    ("block_sparse", {"block_size": 4, "layout": torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
                      < 0.5}, ("gather", "blocksparse", "sdpa")),
])
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference(slug, kw, backends, causal):
    m = _double(slug, **kw)
    x = random_tokens(n=23).double().requires_grad_()
    ref = create(slug, dim=32, n_heads=4, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    want = ref(x, causal=causal)
    gx_want = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in backends:
        m.backend = backend
        got = m(x, causal=causal)
        assert (got - want).abs().max() < 1e-12, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx_want).abs().max() < 1e-12, backend


def test_weights_move_from_and_to_mha():
    m = _double("moba", block_size=4, top_k=2)
    d = mha_from(m)
    m2 = _double("moba", block_size=4, top_k=2)
    m2.load_state_dict(d.state_dict(), strict=True)
    assert set(m.state_dict()) == set(d.state_dict())
    x = random_tokens(n=9).double()
    assert torch.equal(m2(x), m(x))


def test_moba_decoding_equals_the_full_forward_over_many_blocks():
    from attnzoo.layers.cache import KVCache

    m = _double("moba", block_size=3, top_k=2)
    x = random_tokens(n=14).double()
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(14)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_topk_memory_of_the_routing_is_n_by_k():
    m = _double("topk_attention", top_k=5)
    x = random_tokens(n=40).double()
    q, k, _ = m.project(x, x)
    r = m.route(q, k, None, None)
    assert r.kind == "keys" and tuple(r.index.shape) == (2, 4, 40, 5)


@pytest.mark.parametrize("slug,kw,name", [
    ("moba", {"top_k": 0}, "top_k"),
    ("moba", {"block_size": 0}, "block_size"),
    ("topk_attention", {"top_k": -1}, "top_k"),
    ("topk_attention", {"scorer": "learned"}, "scorer"),
    ("block_sparse", {"layout": torch.ones(3, 3)}, "layout"),
    ("block_sparse", {"layout": torch.ones(3, 2, 2, dtype=torch.bool)}, "layout"),
])
def test_bad_arguments_name_themselves(slug, kw, name):
    with pytest.raises(ValueError, match=name):
        create(slug, dim=32, n_heads=4, **kw)


def test_refused_base_arguments():
    with pytest.raises(TypeError, match="pattern"):
        create("moba", dim=32, n_heads=4, pattern=object())
    from attnzoo.layers.dynamic_sparse.moba import MoBA

    with pytest.raises(ValueError, match="pattern"):
        MoBA(32, 4, pattern=object())


def test_block_sparse_layout_too_small_is_refused():
    m = _double("block_sparse", block_size=4, layout=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout"):
        m(random_tokens(n=12).double())


@pytest.mark.parametrize("slug,kw,n,available", [
    ("moba", {"block_size": 4, "top_k": 4}, 12, 3),
    ("moba", {"block_size": 5, "top_k": 4}, 12, 3),
    ("topk_attention", {"top_k": 13}, 12, 12),
])
def test_top_k_above_the_call_is_refused_before_any_work(slug, kw, n, available, monkeypatch):
    m = _double(slug, **kw)
    projected = []
    monkeypatch.setattr(m, "project", lambda *a, **k: projected.append(1))
    for causal in (False, True):
        with pytest.raises(ValueError, match=rf"top_k: expected at most {available} .*got {kw['top_k']}"):
            m(random_tokens(n=n).double(), causal=causal)
    assert not projected


def test_top_k_equal_to_the_call_is_accepted():
    assert create("moba", dim=32, n_heads=4, block_size=4, top_k=3)(random_tokens(n=12).float()).shape == (2, 12, 32)
    assert create("topk_attention", dim=32, n_heads=4, top_k=12)(random_tokens(n=12).float()).shape == (2, 12, 32)
