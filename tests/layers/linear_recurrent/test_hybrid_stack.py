"""Tests of ``hybrid_stack`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.recurrent import RecurrentState
from tests.helpers import build_seeded, node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hybrid_stack_modes_decode(request):
    x = node_tokens(request, n=11)
    for kw in ({"mode": "local+ssm", "n_layers": 2, "window": 3}, {"ratio": 2, "n_layers": 3, "linear": "lightning"},
               {"ratio": 1, "n_layers": 2, "linear": "neural_memory", "mlp_ratio": 2.0}):
        m = build_seeded("hybrid_stack", **{"linear_kwargs": None, **kw})
        full = m(x, causal=True)
        state, outs = RecurrentState(), []
        for a, b in ((0, 4), (4, 5), (5, 11)):
            outs.append(m(x[:, a:b], causal=True, cache=state))
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    with pytest.raises(ValueError, match="linear"):
        attnzoo.create("hybrid_stack", dim=32, linear="agent_attention")
