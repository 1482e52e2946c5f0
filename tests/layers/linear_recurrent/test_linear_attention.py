"""Tests of ``linear_attention`` beyond the conformance contract."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.layers.linear_recurrent._common import FeatureMap
from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention
from attnzoo.layers.recurrent import RecurrentState
from tests.helpers import node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_attention_feature_maps_and_modes(request):
    x, ctx = node_tokens(request), node_tokens(request, n=7)
    for fmap in ("identity", "elu", "relu", "silu", "performer", "taylor"):
        m = LinearAttention(32, 4, feature_map=fmap, normalize=fmap != "identity", chunk_size=4,
                            feature_dim=4 if fmap == "taylor" else None).double()
        for kw in ({}, {"causal": True}, {"context": ctx}):
            assert torch.isfinite(m(x, **kw)).all()
    assert FeatureMap("taylor", 1, 16).out_dim == 153  # Based, feature_dim 16
    # non-causal decoding: each chunk sees every earlier token and its whole chunk
    m = LinearAttention(32, 4).double()
    state = RecurrentState()
    a, b = m(x[:, :5], cache=state), m(x[:, 5:], cache=state)
    torch.testing.assert_close(a, m(x[:, :5]), **TOL)
    k = m.features(m.k_proj(x).view(2, 13, 4, 8).transpose(1, 2))
    v = m.v_proj(x).view(2, 13, 4, 8).transpose(1, 2)
    q = m.features(m.q_proj(x[:, 5:]).view(2, 8, 4, 8).transpose(1, 2))
    w = q @ k.transpose(-1, -2)  # the second chunk's queries see all 13 keys
    want = m.o_proj(((w @ v) / (w.sum(-1, keepdim=True) + m.eps)).transpose(1, 2).reshape(2, 8, 32))
    torch.testing.assert_close(b, want, **TOL)
    with pytest.raises(ValueError, match="context"):
        m(x, context=ctx, causal=True)


def test_performer_features_estimate_the_softmax_kernel():
    g = torch.Generator().manual_seed(0)
    d = 8
    q, k = (torch.randn(1, 1, 5, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    torch.manual_seed(0)
    fm = FeatureMap("performer", 1, d, n_features=16384).double()
    est = fm(q) @ fm(k).transpose(-1, -2)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d))
    assert ((est - exact).abs() / exact).max() < 0.08  # ~3 standard errors at 16384 features
    before = fm.omega.clone()
    fm.redraw()
    assert not torch.equal(before, fm.omega)


def test_normalised_linear_attention_is_scale_invariant_in_q_with_relu(request):
    """φ = relu is positively homogeneous: normalised outputs for q and 2q agree (eps = 0)."""
    m = LinearAttention(32, 4, feature_map="relu", eps=0.0).double()
    with torch.no_grad():  # keep every query row's features nonzero (eps = 0 would divide 0 by 0)
        m.q_proj.bias.fill_(3.0)
    x = node_tokens(request)
    y = m(x, causal=True)
    with torch.no_grad():
        m.q_proj.weight.mul_(2)
        m.q_proj.bias.mul_(2)
    torch.testing.assert_close(m(x, causal=True), y, **TOL)
