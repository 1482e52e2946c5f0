"""Tests of ``token_routed_hybrid`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.recurrent import RecurrentState
from tests.helpers import build_seeded, node_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_routed_hybrid_router_trains_and_cache_holds_softmax_tokens(request):
    m = build_seeded("token_routed_hybrid", seed=1)
    x = node_tokens(request) * 3
    m(x, causal=True).pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0
    routed = torch.sigmoid(m.router(x).squeeze(-1)) > 0.5
    assert 0 < int(routed.sum()) < routed.numel()  # a mixed routing in this test
    cache = RecurrentState()
    m(x[:1], causal=True, cache=cache)
    assert len(cache) == int(routed[0].sum())
