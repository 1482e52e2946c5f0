"""Tests of ``mha`` beyond the conformance contract."""

from __future__ import annotations

import torch

from attnzoo import patterns as P
from attnzoo.layers import KVCache, MultiHeadAttention
from attnzoo.layers.testing import random_tokens
from tests.helpers import seeded_mha


def test_mha_matches_manual_formula():
    m = seeded_mha()
    x = random_tokens(n=10)
    q, k, v = (MultiHeadAttention.split(p(x), 4) for p in (m.q_proj, m.k_proj, m.v_proj))
    a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    torch.testing.assert_close(m(x), m.o_proj(MultiHeadAttention.merge(a @ v)), rtol=1e-12, atol=1e-12)


def test_head_dim_decoupled_and_single_head():
    m = MultiHeadAttention(32, 1, head_dim=32).double()
    assert m.q_proj.out_features == 32 and m(random_tokens(n=10)).shape == (2, 10, 32)
    m = MultiHeadAttention(32, 2, head_dim=64).double()
    assert m.q_proj.out_features == 128 and m(random_tokens(n=10)).shape == (2, 10, 32)


def test_head_mask_scales_heads_before_wo():
    m = seeded_mha(bias=False)
    x = random_tokens(n=10)
    m.capture = True
    m(x)
    z = m.captured["z"]
    xi = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    want = m.o_proj(MultiHeadAttention.merge(z * xi.view(1, -1, 1, 1)))
    torch.testing.assert_close(m(x, head_mask=xi), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, head_mask=xi.expand(2, 4)), want, rtol=1e-12, atol=1e-12)


def test_return_weights_and_capture():
    m = seeded_mha()
    y, w = m(random_tokens(n=10), causal=True, return_weights=True)
    assert w.shape == (2, 4, 10, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10, dtype=torch.float64))
    assert (w.triu(1) == 0).all()
    torch.testing.assert_close(y, m(random_tokens(n=10), causal=True))


def test_cross_attention_with_context_mask():
    m = MultiHeadAttention(32, 4, context_dim=16).double()
    x, ctx = random_tokens(n=10), torch.randn(2, 7, 16, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[:, 5:] = False
    y = m(x, context=ctx, context_mask=keep)
    torch.testing.assert_close(y, m(x, context=ctx[:, :5]), rtol=1e-12, atol=1e-12)


def test_pattern_and_score_mod_passthrough():
    m = seeded_mha(score_mod=P.ALiBi(4), pattern=P.SlidingWindow(3, causal=True))
    x = random_tokens(n=10)
    ref = seeded_mha(score_mod=P.ALiBi(4), pattern=P.SlidingWindow(3, causal=True), backend="reference")
    torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(m(x), seeded_mha()(x))


def test_cache_with_rope_and_padding():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, rope=True).double()
    x, keep = random_tokens(n=8), torch.ones(2, 8, dtype=torch.bool)
    keep[0, 3] = False
    full = m(x, causal=True, mask=keep)
    cache = KVCache()
    outs = [m(x[:, t:t + 1], causal=True, cache=cache, mask=keep[:, t:t + 1]) for t in range(8)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
