"""Features of the dense mixers beyond the conformance contract: options, capture, cache, bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.layers import GatedAttention, KVCache, MultiHeadAttention
from attnzoo.layers.dense_multihead._common import copy_mha


def _x(b=2, n=10, c=32, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mha(**kw):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, **kw).double()


def test_mha_matches_manual_formula():
    m = _mha()
    x = _x()
    q, k, v = (MultiHeadAttention.split(p(x), 4) for p in (m.q_proj, m.k_proj, m.v_proj))
    a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    torch.testing.assert_close(m(x), m.o_proj(MultiHeadAttention.merge(a @ v)), rtol=1e-12, atol=1e-12)


def test_head_dim_decoupled_and_single_head():
    m = MultiHeadAttention(32, 1, head_dim=32).double()
    assert m.q_proj.out_features == 32 and m(_x()).shape == (2, 10, 32)
    m = MultiHeadAttention(32, 2, head_dim=64).double()
    assert m.q_proj.out_features == 128 and m(_x()).shape == (2, 10, 32)


def test_head_mask_scales_heads_before_wo():
    m = _mha(bias=False)
    x = _x()
    m.capture = True
    m(x)
    z = m.captured["z"]
    xi = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    want = m.o_proj(MultiHeadAttention.merge(z * xi.view(1, -1, 1, 1)))
    torch.testing.assert_close(m(x, head_mask=xi), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, head_mask=xi.expand(2, 4)), want, rtol=1e-12, atol=1e-12)


def test_return_weights_and_capture():
    m = _mha()
    y, w = m(_x(), causal=True, return_weights=True)
    assert w.shape == (2, 4, 10, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10, dtype=torch.float64))
    assert (w.triu(1) == 0).all()
    torch.testing.assert_close(y, m(_x(), causal=True))


def test_cross_attention_with_context_mask():
    m = MultiHeadAttention(32, 4, context_dim=16).double()
    x, ctx = _x(), torch.randn(2, 7, 16, dtype=torch.float64)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[:, 5:] = False
    y = m(x, context=ctx, context_mask=keep)
    torch.testing.assert_close(y, m(x, context=ctx[:, :5]), rtol=1e-12, atol=1e-12)


def test_pattern_and_score_mod_passthrough():
    m = _mha(score_mod=P.ALiBi(4), pattern=P.SlidingWindow(3, causal=True))
    x = _x()
    ref = _mha(score_mod=P.ALiBi(4), pattern=P.SlidingWindow(3, causal=True), backend="reference")
    torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(m(x), _mha()(x))


@pytest.mark.parametrize("n_sink", [0, 2])
def test_sliding_window_cache_is_bounded(n_sink):
    window = 4
    m = _mha(pattern=P.SlidingWindow(window, causal=True, n_sink=n_sink))
    x = _x(n=30)
    full = m(x, causal=True)
    cache, outs = KVCache(), []
    for t in range(30):
        outs.append(m(x[:, t:t + 1], causal=True, cache=cache))
        assert len(cache) <= window + n_sink
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    assert cache.nbytes() == 2 * 2 * 4 * (window + n_sink) * 8 * 8


def test_gqa_cache_holds_kv_heads_only():
    m = attnzoo.create("mqa", dim=32, n_heads=4).double()
    cache = KVCache()
    m(_x(), causal=True, cache=cache)
    assert cache.k.shape == (2, 1, 10, 8)


def test_cache_with_rope_and_padding():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, rope=True).double()
    x, keep = _x(n=8), torch.ones(2, 8, dtype=torch.bool)
    keep[0, 3] = False
    full = m(x, causal=True, mask=keep)
    cache = KVCache()
    outs = [m(x[:, t:t + 1], causal=True, cache=cache, mask=keep[:, t:t + 1]) for t in range(8)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_gated_output_norm_bounded():
    torch.manual_seed(0)
    for gran in ("elementwise", "headwise"):
        g = GatedAttention(32, 4, granularity=gran).double()
        x = _x()
        g.capture = True
        g(x)
        gated = g.captured["z"]
        m = MultiHeadAttention(32, 4).double()
        copy_mha(g, m)
        m.capture = True
        m(x)
        assert (gated.norm(dim=-1) <= m.captured["z"].norm(dim=-1) + 1e-12).all()


def test_moh_gates_and_aux_loss():
    m = attnzoo.create("moh", dim=32, n_heads=4, n_shared=1, top_k=2).double()
    y = m(_x())
    assert m.aux_loss.requires_grad and torch.isfinite(m.aux_loss)
    (y.sum() + m.aux_loss).backward()


@pytest.mark.parametrize(
    ("slug", "kwargs", "needle"),
    [
        ("mha", {"dim": 30, "n_heads": 4}, "dim"),
        ("mha", {"dim": 32, "n_heads": 0}, "n_heads"),
        ("gqa", {"dim": 32, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ("gated_attention", {"dim": 32, "n_heads": 4, "granularity": "rowwise"}, "granularity"),
        ("moh", {"dim": 32, "n_heads": 4, "n_shared": 1, "top_k": 4}, "top_k"),
        ("moh", {"dim": 32, "n_heads": 4, "router": "nope"}, "router"),
        ("shsa", {"dim": 32, "ratio": 0.5}, "ratio"),
        ("cascaded_group_attention", {"dim": 30, "n_heads": 4}, "dim"),
        ("context_broadcast", {"dim": 32, "alpha": 2.0}, "alpha"),
        ("rope", {"head_dim": 8, "rotary_dim": 3}, "rotary_dim"),
        ("relative_position_bias", {"heads": 4, "max_distance": 0}, "max_distance"),
        ("hilo", {"dim": 32, "n_heads": 2, "head_dim": 8}, "head_dim"),
        ("lightning", {"dim": 8, "n_heads": 2, "layer_idx": 3, "n_layers": 2}, "layer_idx"),
        ("selective_ssm", {"dim": 8, "dt_min": 0.0}, "dt_min"),
        ("selective_ssm", {"dim": 8, "dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
        ("cope", {"head_dim": 8, "init_std": -1.0}, "init_std"),
        ("relative_position_bias", {"heads": 4, "init_std": -1.0}, "init_std"),
    ],
)
def test_bad_constructor_arguments(slug, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        attnzoo.create(slug, **kwargs)


def test_sliding_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        attnzoo.create("mha", dim=32, n_heads=4, pattern=P.SlidingWindow(0))


def test_bad_forward_inputs():
    m = attnzoo.create("mha", dim=32, n_heads=4)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mask"):
        m(torch.randn(2, 5, 32), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        attnzoo.create("reversed_attention", dim=32, n_heads=4)(torch.randn(1, 3, 32), causal=True)


@pytest.mark.parametrize("slug", ["mha", "tensor_attention", "linear_attention"])
def test_context_and_masks_are_checked_up_front(slug):
    """Wrong context widths and context / padding masks raise a ValueError naming the argument, whatever the
    mixer does with them later (an all-True mask of the wrong shape was once dropped silently)."""
    m = attnzoo.create(slug, dim=32, n_heads=4)
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"^mask: expected a bool tensor \[2, 4\]"):
        m(x, mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^mask: expected a bool tensor \[2, 4\]"):
        m(x, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"^context_mask: expected a bool tensor \[2, 5\], got torch.bool \[7\]"):
        m(x, context=ctx, context_mask=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^context_mask: given without a context"):
        m(x, context_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^context: expected a tensor \[2, M, 32\]"):
        m(x, context=torch.randn(2, 5, 40))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    assert m(x, context=ctx, context_mask=keep).shape == (2, 4, 32)


@pytest.mark.parametrize("slug", ["mha", "gqa", "swin_window", "neighborhood"])
def test_unknown_backend_fails_at_construction(slug):
    kw = dict(attnzoo.spec(slug).test_kwargs, backend="flash")
    with pytest.raises(ValueError, match=r"^backend: expected one of \['auto', 'reference'"):
        attnzoo.create(slug, **kw)


@pytest.mark.parametrize(("slug", "kwargs", "needle"), [
    ("agent_attention", {"dim": 8, "n_heads": 1, "n_agents": 8, "dwc_kernel": 2}, "dwc_kernel"),
    ("inline_attention", {"dim": 8, "n_heads": 2, "local": True, "local_kernel": 4}, "local_kernel"),
])
def test_even_depthwise_kernels_are_refused(slug, kwargs, needle):
    """'same' padding of an even kernel gave N + 1 outputs (silently, for N = 1)."""
    with pytest.raises(ValueError, match=f"^{needle}: expected an odd kernel size"):
        attnzoo.create(slug, **kwargs)


def test_decoupled_qk_with_its_own_width_needs_qk_source():
    m = attnzoo.create("deconstructed_attention", dim=8, n_heads=4, mode="decoupled_qk", qk_dim=5)
    with pytest.raises(ValueError, match="^qk_source: mode='decoupled_qk' with qk_dim=5 != dim=8"):
        m(torch.randn(2, 7, 8))
    assert m(torch.randn(2, 7, 8), qk_source=torch.randn(2, 7, 5)).shape == (2, 7, 8)

