"""The shared recurrent machinery of attnzoo.layers.recurrent."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.recurrent import ShortConv
from tests.helpers import node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_conv_is_causal_and_resumable(request):
    conv = ShortConv(6, 4).double()
    x = node_tokens(request, c=6)
    y, prev = conv(x)
    y2, _ = conv(torch.cat([x[:, :5], torch.randn_like(x[:, 5:])], 1))
    torch.testing.assert_close(y2[:, :5], y[:, :5], **TOL)
    a, p = conv(x[:, :7])
    b, p = conv(x[:, 7:], p)
    torch.testing.assert_close(torch.cat([a, b], 1), y, **TOL)
    torch.testing.assert_close(p, prev, **TOL)
