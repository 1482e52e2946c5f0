"""channel_self_attention: a C_g x C_g map whatever N; the ReLU map has exact zeros and unnormalised rows."""

from __future__ import annotations

import torch

import attnzoo


def test_map_size_does_not_depend_on_n_and_relu_zeros():
    torch.manual_seed(0)
    m = attnzoo.create("channel_self_attention", dim=16, groups=4, act="relu").double()
    for n in (3, 17, 64):
        a = m.attention_map(torch.randn(2, n, 16, dtype=torch.float64))
        assert a.shape == (2, 4, 4, 4)
        assert (a >= 0).all() and (a == 0).any()
    soft = attnzoo.create("channel_self_attention", dim=16, groups=4).double()
    a = soft.attention_map(torch.randn(2, 9, 16, dtype=torch.float64))
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 4, dtype=torch.float64))
