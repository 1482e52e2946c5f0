"""Tests of ``inline_attention`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention
from tests.helpers import node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_inline_is_not_scale_invariant_but_normalised_linear_attention_is(request):
    from attnzoo.layers.linear_recurrent.inline_attention import InLineAttention

    x = node_tokens(request)
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
