"""landmark beyond the conformance contract: the grouped softmax, retrieval, decoding, landmark insertion, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.cache import KVCache
from attnzoo.layers.dynamic_sparse.landmark import drop_landmarks, insert_landmarks, landmark_mask
from attnzoo.layers.testing import random_tokens
from attnzoo.registry import create


def _landmark(**kw):
    torch.manual_seed(0)
    args = {"block_size": 3, **kw}
    return create("landmark", dim=32, n_heads=4, **args).double()


@pytest.mark.parametrize("kw", [{}, {"top_k": 1, "window": 1}, {"top_k": 2}])
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference(kw, causal):
    m = _landmark(**kw)
    ref = _landmark(backend="reference", **kw)
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=21).double().requires_grad_()
    want = ref(x, causal=causal)
    gx_want = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in ("auto", "gather", "sdpa"):  # retrieval: gathered blocks (auto, gather) or the dense form
        m.backend = backend
        got = m(x, causal=causal)
        assert (got - want).abs().max() < 1e-12, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx_want).abs().max() < 1e-12, backend


@pytest.mark.parametrize("kw", [{}, {"top_k": 1, "window": 1}])
def test_decoding_equals_the_full_forward(kw):
    m = _landmark(**kw)
    x = random_tokens(n=15).double()
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(15)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_weights_follow_the_grouped_softmax():
    m = _landmark()
    x = random_tokens(n=16).double()
    _, w = m(x, causal=True, return_weights=True)
    lm = landmark_mask(16, 3)
    assert (w[..., lm] == 0).all()  # landmarks carry no value
    assert ((w.sum(-1) - 1).abs() < 1e-12).all()  # one distribution per query
    assert (w.triu(1) == 0).all()  # causal


def test_retrieval_keeps_the_blocks_of_highest_landmark_score():
    m = _landmark(top_k=1)
    x = random_tokens(n=16).double()
    q, k, _ = m.project(x, x)
    from attnzoo.layers.base import Call

    blocks = m.route(q, k, None, Call(x=x, src=x, causal=True)).index  # [B, H, N, nb]
    i = 14  # block 3: candidates 0, 1, 2
    score = torch.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, [3, 7, 11]])
    best = score.argmax(-1)
    want = torch.zeros(2, 4, 4, dtype=torch.bool)
    want.scatter_(-1, best.unsqueeze(-1), True)
    want[..., 3] = True
    assert torch.equal(blocks[:, :, i], want)


def test_insert_and_drop_landmarks():
    x = random_tokens(n=7)
    lm = torch.full((32,), 9.0)
    y = insert_landmarks(x, lm, 3)
    assert y.shape == (2, 9, 32)
    assert (y[:, landmark_mask(9, 3)] == 9.0).all()
    assert torch.equal(drop_landmarks(y, 3), x)


def test_gathered_retrieval_with_padding_equals_the_reference():
    m = _landmark(top_k=2)
    ref = _landmark(top_k=2, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=21).double()
    keep = torch.ones(2, 21, dtype=torch.bool)
    keep[0, 5:9] = False
    keep[1, 18:] = False
    for causal in (False, True):
        assert (m(x, causal=causal, mask=keep) - ref(x, causal=causal, mask=keep)).abs().max() < 1e-12


def test_padding_a_landmark_hides_its_block():
    m = _landmark()
    x = random_tokens(n=12).double()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[:, 3] = False  # block 0's landmark
    _, w = m(x, causal=True, mask=keep, return_weights=True)
    assert (w[:, :, 4:, :4] == 0).all()


@pytest.mark.parametrize("kw,name", [
    ({"top_k": 0}, "top_k"),
    ({"block_size": 0}, "block_size"),
    ({"window": -1}, "window"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        _landmark(**kw)


def test_bad_calls_name_their_argument():
    x = random_tokens(n=8).double()
    with pytest.raises(ValueError,
                       match=r"top_k: expected at most 2 \(the blocks of 3 \+ 1 landmark of this call\), got 3"):
        _landmark(top_k=3)(x)
    with pytest.raises(ValueError, match="landmark"):
        insert_landmarks(x, torch.zeros(3), 2)
    with pytest.raises(ValueError, match="context"):
        _landmark()(x, context=x)
