"""The per-call values of a forward (``layers.base.Call``): immutable, handed to the hooks, never on the module."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnzoo
from attnzoo.inspect import metrics as M
from attnzoo.layers.base import Call


def test_call_is_immutable_and_its_extra_read_only():
    x = torch.zeros(1, 3, 8)
    call = Call(x=x, src=x, extra={"grid": (3,)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.mask = None
    with pytest.raises(TypeError):
        call.extra["grid"] = (1, 3)
    assert dataclasses.replace(call, causal=True).extra["grid"] == (3,)


def test_hooks_see_the_call_of_their_forward():
    m = attnzoo.create("mha", dim=8, n_heads=2)
    seen = []
    inner = m.attend
    m.attend = lambda q, k, v, pattern, want, call=None: seen.append(call) or inner(q, k, v, pattern, want, call=call)
    x, keep = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    m(x, mask=keep, causal=True)
    (call,) = seen
    assert call.x is x and call.mask is keep and call.kv_keep is keep and call.causal


@pytest.mark.parametrize(("slug", "kw"), [("flashblock", {"dim": 8, "n_heads": 2, "block_size": 2}),
                                          ("segment_mask", {"dim": 8, "n_heads": 2, "segment_size": 2}),
                                          ("swin_window", {"dim": 8, "n_heads": 2, "window": 2})])
def test_concept_attention_refuses_layers_that_build_their_pattern_per_call(slug, kw):
    layer = attnzoo.create(slug, **kw).double()
    with pytest.raises(ValueError, match="pattern built per call"):
        M.concept_attention(layer, torch.zeros(1, 4, 8, dtype=torch.float64), torch.zeros(2, 8))
