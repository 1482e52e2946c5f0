"""Section-5 mixers (linear-recurrent family) beyond the conformance suite.

Float64, fresh random inputs: every form of every entry gives the same outputs and the same
parameter gradients (decay and gate parameters included) for any chunk size; decoding with a
fixed-size state, segment by segment, equals one pass; catalogue properties.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import attnzoo
from attnzoo.layers.linear_recurrent._common import FeatureMap
from attnzoo.layers.linear_recurrent.lightning import Lightning, lightning_decay
from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention
from attnzoo.layers.recurrent import RecurrentState, ShortConv

TOL = {"atol": 1e-10, "rtol": 1e-10}
FAMILY = [s.slug for s in attnzoo.list(family="linear-recurrent")]
FORM_ENTRIES = [s.slug for s in attnzoo.list(family="linear-recurrent") if s.reference_kwargs.get("form") == "parallel"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(slug: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = attnzoo.spec(slug)
    return attnzoo.create(slug, **{**spec.test_kwargs, **kw}).double()


def _x(request, b=2, n=13, c=32) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("slug", FORM_ENTRIES)
def test_forms_agree_forward_and_parameter_gradients(slug, request):
    x = _x(request)
    dout = torch.randn_like(x)
    ref = None
    for form, chunk in [("parallel", 64), ("recurrent", 64), ("chunked", 1), ("chunked", 4), ("chunked", 64)]:
        m = _build(slug, form=form, chunk_size=chunk)
        xi = x.clone().requires_grad_()
        y = m(xi, causal="causal" in attnzoo.spec(slug).supports)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * dout).sum(), [xi, *params])
        if ref is None:
            ref = (y, grads)
            continue
        torch.testing.assert_close(y, ref[0], **TOL, msg=lambda s, f=form, c=chunk: f"{slug} {f}/{c}: {s}")
        for (name, _), g, g_ref in zip([("x", None), *m.named_parameters()], grads, ref[1]):
            torch.testing.assert_close(g, g_ref, **TOL,
                                       msg=lambda s, f=form, c=chunk, n=name: f"{slug} {f}/{c} d{n}: {s}")


@pytest.mark.parametrize("slug", [s for s in FAMILY if "decoding" in attnzoo.spec(s).supports])
def test_state_decoding_segments_equal_one_pass_with_constant_state_size(slug, request):
    m = _build(slug)
    x = _x(request, n=23)
    full = m(x, causal=True)
    state, outs, start, sizes = RecurrentState(), [], 0, []
    for length in (6, 1, 1, 9, 1, 5):
        outs.append(m(x[:, start:start + length], causal=True, cache=state))
        start += length
        sizes.append(state.nbytes())
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    assert state.position == 23
    if attnzoo.spec(slug).complexity == "O(N)":
        assert len(set(sizes)) == 1, f"{slug}: state size changed while decoding: {sizes}"


def test_lightning_decay_schedule_and_learnable_decay(request):
    lam = lightning_decay(8, layer_idx=2, n_layers=5)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(lam, torch.exp(-slopes * (1 - 2 / 4 + 1e-5)), **TOL)
    assert lightning_decay(4, 3, 4).min() > 1 - 1e-5  # the last layer barely decays
    m = Lightning(32, 4, learn_decay=True, chunk_size=4).double()
    torch.testing.assert_close(m.head_log_decay().exp(), lightning_decay(4), rtol=1e-6, atol=0)
    m(_x(request)).pow(2).sum().backward()
    assert m.decay_logit.grad is not None and m.decay_logit.grad.abs().min() > 0
    with pytest.raises(ValueError, match="learn_decay"):
        Lightning(32, 4, decay=1.0, learn_decay=True)
    with pytest.raises(ValueError, match="decay"):
        Lightning(32, 4, decay=[0.5, 1.5, 0.9, 0.9])


def test_linear_attention_feature_maps_and_modes(request):
    x, ctx = _x(request), _x(request, n=7)
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
    x = _x(request)
    y = m(x, causal=True)
    with torch.no_grad():
        m.q_proj.weight.mul_(2)
        m.q_proj.bias.mul_(2)
    torch.testing.assert_close(m(x, causal=True), y, **TOL)


def test_short_conv_is_causal_and_resumable(request):
    conv = ShortConv(6, 4).double()
    x = _x(request, c=6)
    y, prev = conv(x)
    y2, _ = conv(torch.cat([x[:, :5], torch.randn_like(x[:, 5:])], 1))
    torch.testing.assert_close(y2[:, :5], y[:, :5], **TOL)
    a, p = conv(x[:, :7])
    b, p = conv(x[:, 7:], p)
    torch.testing.assert_close(torch.cat([a, b], 1), y, **TOL)
    torch.testing.assert_close(p, prev, **TOL)


def test_errors():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(32, 4, feature_map="cosine")
    with pytest.raises(ValueError, match="form"):
        attnzoo.create("delta_net", dim=32, form="fast")
    with pytest.raises(ValueError, match="gate"):
        attnzoo.create("delta_net", dim=32, gate="vector")
    m = attnzoo.create("lightning", dim=32, n_heads=4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="context"):
        m(x, context=x)
    with pytest.raises(ValueError, match="cache"):
        m(x, cache={})
    assert attnzoo.spec("gated_delta_net").slug == "delta_net"
    assert attnzoo.create("gated_delta_net", dim=32).gate == "scalar"


def test_inline_is_not_scale_invariant_but_normalised_linear_attention_is(request):
    from attnzoo.layers.linear_recurrent.inline_attention import InLineAttention

    x = _x(request)
    outs = {}
    for name, cls in (("inline", InLineAttention), ("normalised", LinearAttention)):
        kw = {"feature_map": "relu"} if name == "inline" else {"feature_map": "relu", "eps": 0.0}
        torch.manual_seed(0)
        m = cls(32, 4, **kw).double()
        with torch.no_grad():
            m.q_proj.bias.fill_(3.0)  # nonzero ReLU features on every query row
        y = m(x)
        with torch.no_grad():
            m.q_proj.weight.mul_(2)
            m.q_proj.bias.mul_(2)
        outs[name] = (y, m(x))
    torch.testing.assert_close(outs["normalised"][1], outs["normalised"][0], **TOL)
    assert (outs["inline"][1] - outs["inline"][0]).abs().max() > 1e-3


def test_agent_attention_pooling_and_padding(request):
    from attnzoo.layers.linear_recurrent._common import pool_matrix

    p = pool_matrix(10, 4, None, torch.float64, "cpu")
    x = _x(request, b=1, n=10, c=3)
    torch.testing.assert_close(p @ x, torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2),
                               **TOL)
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    pk = pool_matrix(10, 4, keep, torch.float64, "cpu")
    assert (pk[0, :, 7:] == 0).all() and torch.allclose(pk[0, :3].sum(-1), torch.ones(3, dtype=torch.float64))
    assert (pk[0, 3] == 0).all()  # the last bin is all padding


@pytest.mark.parametrize("composition", ["mal", "mag"])
def test_neural_memory_compositions_decode(composition, request):
    m = _build("neural_memory", composition=composition, window=4)
    x = _x(request, n=15)
    full = m(x, causal=True)
    state, outs = RecurrentState(), []
    for a, b in ((0, 6), (6, 7), (7, 15)):
        outs.append(m(x[:, a:b], causal=True, cache=state))
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_neural_memory_presets_chunks_and_errors(request):
    x = _x(request)
    for preset in ("titans", "moneta", "yaad", "memora"):
        y = _build("neural_memory", preset=preset)(x)
        assert torch.isfinite(y).all()
    assert attnzoo.create("titans", dim=32).memory == "mlp"
    # the chunk size is part of the model: mini-batch gradients differ from sequential ones
    y1, y4 = _build("neural_memory", chunk_size=1)(x), _build("neural_memory", chunk_size=4)(x)
    assert (y1 - y4).abs().max() > 1e-6
    with pytest.raises(ValueError, match="n_persistent"):
        attnzoo.create("neural_memory", dim=32, composition="mac", n_persistent=0)
    with pytest.raises(ValueError, match="lr"):
        attnzoo.create("neural_memory", dim=32, lr=False)


# ------------------------------------------------------------------ neural memory: memory as context
def _mac(seed: int = 0, **kw) -> torch.nn.Module:
    return _build("neural_memory", seed, composition="mac", n_persistent=3, **kw)


def _mac_reference(m, x: torch.Tensor) -> torch.Tensor:
    """MAC written out segment by segment with an explicit softmax over [persistent, h, segment].

    Shares the layer's sub-modules (projections, memory read and write) but builds the
    context, its causal mask and the attention independently of the layer's code.
    """
    from attnzoo.layers.linear_recurrent.neural_memory import memory_update, read
    from attnzoo.layers.recurrent import merge_heads

    b, n, _ = x.shape
    a, size = m.attn, m.chunk_size
    st = m.initial_state(b, x.dtype)
    outs = []
    for s in range(0, n, size):
        xs = x[:, s:s + size]
        n_s = xs.shape[1]
        st = {**st, "M0": st["M"]}
        q_mem = m.qkv(xs)[0]
        h = m.o_proj(merge_heads(m.norm(read([w.unsqueeze(2).expand(-1, -1, n_s, -1, -1) for w in st["M0"]],
                                             q_mem))))
        ctx = torch.cat([m.persistent.unsqueeze(0).expand(b, -1, -1), h, xs], 1)
        q = a.split(a.q_proj(xs), a.n_heads)
        k, v = a.split(a.k_proj(ctx), a.n_heads), a.split(a.v_proj(ctx), a.n_heads)
        n_p = m.persistent.shape[0]
        allowed = torch.zeros(n_s, n_p + 2 * n_s, dtype=torch.bool)
        for i in range(n_s):
            allowed[i, :n_p] = True  # persistent tokens: always
            allowed[i, n_p:n_p + i + 1] = True  # read-outs h_j, j <= i
            allowed[i, n_p + n_s:n_p + n_s + i + 1] = True  # segment tokens x_j, j <= i
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        y = a.o_proj(merge_heads(scores.masked_fill(~allowed, -math.inf).softmax(-1) @ v))
        qy, ky, vy = m.qkv(y)
        gates = [m._gate(name, y) for name in ("lr", "momentum", "retention")]
        read_y, st = memory_update(qy, ky, vy, *gates, torch.ones_like(gates[0]), st, loss=m.loss, p=m.p,
                                   delta=m.delta)
        outs.append(y * torch.sigmoid(m.o_proj(merge_heads(m.norm(read_y)))))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_neural_memory_mac_matches_segmentwise_reference(memory, request):
    """N = 11 with chunk_size 4: two full segments and a partial one (chunk boundaries)."""
    m = _mac(memory=memory)
    x = _x(request, n=11)
    y = m(x, causal=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, _mac_reference(m, x), **TOL)
    # the memory carries information across segments: the last segment depends on the first one
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (m(x2, causal=True)[:, 8:] - y[:, 8:]).abs().max() > 1e-8


def test_neural_memory_mac_every_parameter_gets_a_gradient(request):
    m = _mac(preset="titans")
    x = _x(request, n=10).requires_grad_()
    m(x, causal=True).pow(2).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing}"
    assert m.persistent.grad.abs().min() > 0 and torch.isfinite(x.grad).all()


def test_neural_memory_mac_is_causal(request):
    m = _mac()
    x = _x(request, n=13)
    y = m(x, causal=True)
    for t in (0, 2, 3, 4, 7, 11):  # inside segments and on their last / first tokens
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = m(x2, causal=True)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-6


def test_neural_memory_mac_padding(request):
    m = _mac(preset="titans")
    x = _x(request, n=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 9:] = False  # trailing padding inside the last segment
    keep[1, 3:6] = False  # padding across a segment boundary, real tokens after it
    y = m(x, mask=keep, causal=True)
    assert (y[~keep] == 0).all()
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 5)
    torch.testing.assert_close(m(x2, mask=keep, causal=True)[keep], y[keep], rtol=0, atol=1e-12)
    # trailing padding = the shorter sequence
    torch.testing.assert_close(y[:1, :9], m(x[:1, :9], causal=True), **TOL)
    # padded tokens are skipped by the attention and the memory, but keep their positions
    full = m(x, causal=True)
    assert (y[1, 6:] - full[1, 6:]).abs().max() > 1e-6
    # every token padded: zeros and finite gradients
    xg = x.clone().requires_grad_()
    none = m(xg, mask=torch.zeros_like(keep), causal=True)
    assert (none == 0).all()
    none.sum().backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("chunks", [[1] * 11, [4, 1, 3, 2, 1], [3, 5, 0, 3], [11]])
def test_neural_memory_mac_decode_equals_full_forward(chunks, request):
    m = _mac(preset="titans")
    x = _x(request, n=11)
    full = m(x, causal=True)
    for cache in (RecurrentState(), attnzoo.layers.KVCache()):
        outs, start = [], 0
        for c in chunks:
            outs.append(m(x[:, start:start + c], causal=True, cache=cache))
            start += c
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        assert cache.position == 11
    # padding while decoding, token by token
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 2:5] = False
    want, cache = m(x, mask=keep, causal=True), RecurrentState()
    got = torch.cat([m(x[:, t:t + 1], mask=keep[:, t:t + 1], causal=True, cache=cache) for t in range(11)], 1)
    torch.testing.assert_close(got, want, **TOL)


def test_token_routed_hybrid_router_trains_and_cache_holds_softmax_tokens(request):
    m = _build("token_routed_hybrid", seed=1)
    x = _x(request) * 3
    m(x, causal=True).pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0
    routed = torch.sigmoid(m.router(x).squeeze(-1)) > 0.5
    assert 0 < int(routed.sum()) < routed.numel()  # a mixed routing in this test
    cache = RecurrentState()
    m(x[:1], causal=True, cache=cache)
    assert len(cache) == int(routed[0].sum())


def test_hybrid_stack_modes_decode(request):
    x = _x(request, n=11)
    for kw in ({"mode": "local+ssm", "n_layers": 2, "window": 3}, {"ratio": 2, "n_layers": 3, "linear": "lightning"},
               {"ratio": 1, "n_layers": 2, "linear": "neural_memory", "mlp_ratio": 2.0}):
        m = _build("hybrid_stack", **{"linear_kwargs": None, **kw})
        full = m(x, causal=True)
        state, outs = RecurrentState(), []
        for a, b in ((0, 4), (4, 5), (5, 11)):
            outs.append(m(x[:, a:b], causal=True, cache=state))
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    with pytest.raises(ValueError, match="linear"):
        attnzoo.create("hybrid_stack", dim=32, linear="agent_attention")
