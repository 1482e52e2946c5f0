"""KVCache: appending without autograd writes into growing buffers; what it returns never changes afterwards."""

from __future__ import annotations

import torch

from attnzoo.layers.cache import KVCache
from attnzoo.registry import create


def _chunks(seed=0, sizes=(5, 1, 1, 3, 1, 1, 1, 7)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 6, generator=g)) for n in sizes]


def test_appends_equal_concatenation_and_earlier_views_keep_their_values():
    cache, seen = KVCache(), []
    with torch.no_grad():
        for k, v in _chunks():
            got_k, got_v, _ = cache.append(k, v)
            seen.append((got_k, got_v, got_k.clone(), got_v.clone()))
    ks, vs = zip(*_chunks())
    assert torch.equal(cache.k, torch.cat(ks, 2)) and torch.equal(cache.v, torch.cat(vs, 2))
    assert len(cache) == 20
    for got_k, got_v, was_k, was_v in seen:  # later appends wrote only past what each view covers
        assert torch.equal(got_k, was_k) and torch.equal(got_v, was_v)


def test_a_step_copies_only_its_new_entries_while_the_buffer_has_room():
    cache = KVCache()
    with torch.no_grad():
        for k, v in _chunks(sizes=(4, 1)):
            cache.append(k, v)  # the second append grows the buffer to 8 entries
        ptr = cache._k.data_ptr()
        for k, v in _chunks(seed=1, sizes=(1, 1, 1)):
            cache.append(k, v)
        assert cache._k.data_ptr() == ptr and len(cache) == 8
        assert cache.nbytes() == 2 * 3 * 8 * (4 + 6) * 4


def test_padding_masks_follow_the_buffers():
    cache = KVCache()
    with torch.no_grad():
        cache.append(*_chunks(sizes=(3,))[0])
        cache.append(*_chunks(sizes=(1,))[0])
        keep = torch.tensor([[True, False], [False, True]])
        _, _, got = cache.append(*_chunks(sizes=(2,))[0], keep=keep)
    want = torch.cat([torch.ones(2, 4, dtype=torch.bool), keep], 1)
    assert torch.equal(got, want) and torch.equal(cache.keep, want)


def test_decoding_with_autograd_still_concatenates_and_backpropagates():
    torch.manual_seed(0)
    m = create("mha", dim=16, n_heads=2).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    cache = KVCache()
    out = torch.cat([m(x[:, i:i + 1], causal=True, cache=cache) for i in range(6)], 1)
    want = m(x, causal=True)
    assert (out - want).abs().max() < 1e-12
    g1 = torch.autograd.grad(out.square().sum(), x)[0]
    g2 = torch.autograd.grad(want.square().sum(), x)[0]
    assert (g1 - g2).abs().max() < 1e-12
