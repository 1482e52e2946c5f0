"""Tests of ``lightning`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.linear_recurrent.lightning import Lightning, lightning_decay
from tests.helpers import node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_lightning_decay_schedule_and_learnable_decay(request):
    lam = lightning_decay(8, layer_idx=2, n_layers=5)
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(lam, torch.exp(-slopes * (1 - 2 / 4 + 1e-5)), **TOL)
    assert lightning_decay(4, 3, 4).min() > 1 - 1e-5  # the last layer barely decays
    m = Lightning(32, 4, learn_decay=True, chunk_size=4).double()
    torch.testing.assert_close(m.head_log_decay().exp(), lightning_decay(4), rtol=1e-6, atol=0)
    m(node_tokens(request)).pow(2).sum().backward()
    assert m.decay_logit.grad is not None and m.decay_logit.grad.abs().min() > 0
    with pytest.raises(ValueError, match="learn_decay"):
        Lightning(32, 4, decay=1.0, learn_decay=True)
    with pytest.raises(ValueError, match="decay"):
        Lightning(32, 4, decay=[0.5, 1.5, 0.9, 0.9])
