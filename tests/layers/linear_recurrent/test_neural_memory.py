"""Tests of ``neural_memory`` beyond the conformance contract."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.layers.recurrent import RecurrentState
from tests.helpers import build_seeded, node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def _mac(seed: int = 0, **kw) -> torch.nn.Module:
    return build_seeded("neural_memory", seed, composition="mac", n_persistent=3, **kw)


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


@pytest.mark.parametrize("composition", ["mal", "mag"])
def test_neural_memory_compositions_decode(composition, request):
    m = build_seeded("neural_memory", composition=composition, window=4)
    x = node_tokens(request, n=15)
    full = m(x, causal=True)
    state, outs = RecurrentState(), []
    for a, b in ((0, 6), (6, 7), (7, 15)):
        outs.append(m(x[:, a:b], causal=True, cache=state))
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_neural_memory_presets_chunks_and_errors(request):
    x = node_tokens(request)
    for preset in ("titans", "moneta", "yaad", "memora"):
        y = build_seeded("neural_memory", preset=preset)(x)
        assert torch.isfinite(y).all()
    assert attnzoo.create("titans", dim=32).memory == "mlp"
    # the chunk size is part of the model: mini-batch gradients differ from sequential ones
    y1, y4 = build_seeded("neural_memory", chunk_size=1)(x), build_seeded("neural_memory", chunk_size=4)(x)
    assert (y1 - y4).abs().max() > 1e-6
    with pytest.raises(ValueError, match="n_persistent"):
        attnzoo.create("neural_memory", dim=32, composition="mac", n_persistent=0)
    with pytest.raises(ValueError, match="lr"):
        attnzoo.create("neural_memory", dim=32, lr=False)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_neural_memory_mac_matches_segmentwise_reference(memory, request):
    """N = 11 with chunk_size 4: two full segments and a partial one (chunk boundaries)."""
    m = _mac(memory=memory)
    x = node_tokens(request, n=11)
    y = m(x, causal=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, _mac_reference(m, x), **TOL)
    # the memory carries information across segments: the last segment depends on the first one
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (m(x2, causal=True)[:, 8:] - y[:, 8:]).abs().max() > 1e-8


def test_neural_memory_mac_every_parameter_gets_a_gradient(request):
    m = _mac(preset="titans")
    x = node_tokens(request, n=10).requires_grad_()
    m(x, causal=True).pow(2).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient for {missing}"
    assert m.persistent.grad.abs().min() > 0 and torch.isfinite(x.grad).all()


def test_neural_memory_mac_is_causal(request):
    m = _mac()
    x = node_tokens(request, n=13)
    y = m(x, causal=True)
    for t in (0, 2, 3, 4, 7, 11):  # inside segments and on their last / first tokens
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = m(x2, causal=True)
        torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-12)
        assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-6


def test_neural_memory_mac_padding(request):
    m = _mac(preset="titans")
    x = node_tokens(request, n=12)
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
    x = node_tokens(request, n=11)
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
