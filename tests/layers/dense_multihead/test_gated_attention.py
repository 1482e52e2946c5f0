"""Tests of ``gated_attention`` beyond the conformance contract."""

from __future__ import annotations

import torch

from attnzoo.layers import GatedAttention, MultiHeadAttention
from attnzoo.layers.base import load_shared
from attnzoo.layers.testing import random_tokens


def test_gated_output_norm_bounded():
    torch.manual_seed(0)
    for gran in ("elementwise", "headwise"):
        g = GatedAttention(32, 4, granularity=gran).double()
        x = random_tokens(n=10)
        g.capture = True
        g(x)
        gated = g.captured["z"]
        m = MultiHeadAttention(32, 4).double()
        load_shared(g, m)
        m.capture = True
        m(x)
        assert (gated.norm(dim=-1) <= m.captured["z"].norm(dim=-1) + 1e-12).all()
