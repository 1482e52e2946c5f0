"""pyramid_sparse beyond the conformance contract: backends, level assignment, weights, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.dynamic_sparse.pyramid_sparse import pyramid_attention
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create


def _qkv(n=15, m=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, 8, generator=g, dtype=torch.float64).requires_grad_() for length in (n, m, m)]


@pytest.mark.parametrize("with_keep", [False, True])
def test_every_backend_equals_the_reference_forward_and_gradients(with_keep):
    q, k, v = _qkv()
    levels = torch.randint(-1, 3, (2, 3, 4, 5), generator=torch.Generator().manual_seed(1))
    levels[0, 0, 1] = -1  # a query block that sees nothing returns zeros
    keep = None
    if with_keep:
        keep = torch.ones(2, 18, dtype=torch.bool)
        keep[0, 5:11] = False
        keep[1, 16:] = False
    want = pyramid_attention(q, k, v, levels, block_size=4, keep=keep, backend="reference")
    assert (want[0, 0, 4:8] == 0).all()
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    for backend in ("gather", "sdpa"):
        got = pyramid_attention(q, k, v, levels, block_size=4, keep=keep, backend=backend)
        assert (got - want).abs().max() < 1e-12, backend
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), gw, strict=True):
            assert (a - b).abs().max() < 1e-12, backend


def test_token_weights_reproduce_the_output():
    q, k, v = _qkv()
    levels = torch.randint(0, 3, (2, 3, 4, 5), generator=torch.Generator().manual_seed(2))
    out, w = pyramid_attention(q, k, v, levels, block_size=4, return_weights=True)
    assert (w @ v.double() - out).abs().max() < 1e-12
    assert (w.sum(-1) - 1).abs().max() < 1e-12


def test_levels_per_query_block_follow_the_budget():
    torch.manual_seed(0)
    m = create("pyramid_sparse", dim=32, n_heads=4, block_size=4, level_blocks=(1, 2, 1)).double()
    x = random_tokens(n=24)  # 6 blocks: 1 at level 0, 2 at level 1, 1 at level 2, 2 dropped
    q, k, _ = m.project(x, x)
    levels = m.assign_levels(q, k, None, None)
    for level, count in ((0, 1), (1, 2), (2, 1), (-1, 2)):
        assert ((levels == level).sum(-1) == count).all()
    # the most important block (q̄·k̄) is at level 0
    qbar, kbar = q.view(2, 4, 6, 4, 8).mean(3), k.view(2, 4, 6, 4, 8).mean(3)
    best = (qbar @ kbar.transpose(-1, -2)).argmax(-1, keepdim=True)
    assert (levels.gather(-1, best) == 0).all()


def test_module_backends_agree_and_reach_every_projection():
    torch.manual_seed(0)
    kw = {"dim": 32, "n_heads": 4, "block_size": 4, "level_blocks": (1, 1, 1)}
    m = create("pyramid_sparse", **kw).double()
    ref = create("pyramid_sparse", backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=22).requires_grad_()
    want = ref(x)
    gx = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in ("auto", "gather", "sdpa"):
        m.backend = backend
        got = m(x)
        assert (got - want).abs().max() < 1e-12
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx).abs().max() < 1e-12


@pytest.mark.parametrize("kw,name", [
    ({"level_blocks": ()}, "level_blocks"), ({"level_blocks": (0, 2)}, "level_blocks"),
    ({"level_blocks": (1, -1)}, "level_blocks"), ({"block_size": 6, "level_blocks": (1, 1, 1)}, "block_size"),
    ({"block_size": 0}, "block_size"), ({"n_kv_heads": 2}, "n_kv_heads"), ({"backend": "blocksparse"}, "backend"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        create("pyramid_sparse", dim=32, n_heads=4, **kw)


def test_causal_and_bad_levels_are_refused():
    m = create("pyramid_sparse", dim=32, n_heads=4, block_size=4)
    with pytest.raises(ValueError, match="causal"):
        m(random_tokens(n=8).float(), causal=True)
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match="levels"):
        pyramid_attention(q, k, v, torch.zeros(2, 3, 2, 3, dtype=torch.int64), block_size=4)
    with pytest.raises(ValueError, match="levels"):
        pyramid_attention(q, k, v, torch.full((2, 3, 2, 2), 3, dtype=torch.int64), block_size=4)
