"""Tests of ``rope`` beyond the conformance contract."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers import MultiHeadAttention, RotaryEmbedding


def test_rope_matches_complex_rotation():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    out = RotaryEmbedding(8, base=100.0)(q, q, q_offset=3)[0]
    c = torch.complex(q[..., :4], q[..., 4:])
    pos = torch.arange(3, 8, dtype=torch.float64).view(-1, 1)
    freq = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rot = c * torch.exp(1j * pos * freq)
    torch.testing.assert_close(out, torch.cat([rot.real, rot.imag], -1), rtol=1e-12, atol=1e-12)


def test_rope_partial_and_scaling():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    r = RotaryEmbedding(8, rotary_dim=4, scaling=2.0)
    out = r(q, q, q_offset=5)[0]
    torch.testing.assert_close(out[..., 4:], q[..., 4:])
    torch.testing.assert_close(out, RotaryEmbedding(8, rotary_dim=4)(q, q, q_pos=torch.arange(5, 9) / 2.0)[0])


def test_rope_batched_offsets():
    q = torch.randn(2, 1, 3, 8, dtype=torch.float64)
    r = RotaryEmbedding(8)
    out = r(q, q, q_offset=torch.tensor([0, 4]))[0]
    torch.testing.assert_close(out[1:], r(q[1:], q[1:], q_offset=4)[0])


def test_rope_in_mha_option():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, rope=attnzoo.create("rope", head_dim=8, base=500.0)).double()
    assert isinstance(m.qk_transform, RotaryEmbedding) and m.qk_transform.base == 500.0
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    plain = MultiHeadAttention(32, 4).double()
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x, causal=True), plain(x, causal=True))
    torch.testing.assert_close(m(x, causal=True)[:, 0], plain(x, causal=True)[:, 0])  # one key: no rotation effect
