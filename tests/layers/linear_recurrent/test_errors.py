"""Errors of the linear-recurrent entries name the argument and the expected value."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention

pytestmark = pytest.mark.usefixtures("one_thread")


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
