"""Tests of ``probabilistic_attention`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers import KVCache
from attnzoo.layers.testing import random_tokens


@pytest.mark.parametrize("cross", [False, True])
def test_probabilistic_em_steps_ignore_padding(cross):
    """The EM key update sees only unpadded queries and keys: padded content does not reach kept outputs."""
    torch.manual_seed(0)
    m = attnzoo.create("probabilistic_attention", dim=32, n_heads=4, em_steps=2).double()
    x = random_tokens(b=2, n=9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    keep[1, 2:4] = False
    noise = 5 * random_tokens(b=2, n=9, seed=3)
    if cross:
        ctx = random_tokens(b=2, n=7, seed=4)
        ctx_keep = torch.ones(2, 7, dtype=torch.bool)
        ctx_keep[0, 4:] = False
        y = m(x, mask=keep, context=ctx, context_mask=ctx_keep)
        ctx2 = torch.where(ctx_keep[..., None], ctx, 5 * random_tokens(b=2, n=7, seed=5))
        y2 = m(torch.where(keep[..., None], x, noise), mask=keep, context=ctx2, context_mask=ctx_keep)
    else:
        y = m(x, mask=keep)
        y2 = m(torch.where(keep[..., None], x, noise), mask=keep)
    torch.testing.assert_close(y[keep], y2[keep])
    assert torch.isfinite(y).all()
    m.em_steps = 0  # the key update is live: without it the output differs
    y0 = m(x, mask=keep, context=ctx, context_mask=ctx_keep) if cross else m(x, mask=keep)
    assert not torch.allclose(y0[keep], y[keep])


def test_probabilistic_em_steps_refuse_causal_and_cache():
    m = attnzoo.create("probabilistic_attention", dim=32, n_heads=4, em_steps=1).double()
    with pytest.raises(ValueError, match="em_steps: the EM key update averages over every query"):
        m(random_tokens(n=10), causal=True)
    with pytest.raises(ValueError, match="em_steps"):
        m(random_tokens(n=10), cache=KVCache())
    m0 = attnzoo.create("probabilistic_attention", dim=32, n_heads=4).double()
    assert m0(random_tokens(n=10), causal=True).shape == (2, 10, 32)


def test_probabilistic_propagation_moves_outputs_toward_annotations():
    torch.manual_seed(0)
    p = attnzoo.create("probabilistic_attention", dim=32, n_heads=4).double()
    x, t = random_tokens(n=10), random_tokens(n=10, seed=2)
    known = torch.zeros(2, 10, dtype=torch.bool)
    known[:, :5] = True
    base = p(x)
    moved = p.propagate(x, t, known, steps=5)
    assert not torch.allclose(moved, base)
    with pytest.raises(ValueError, match="targets"):
        p.propagate(x, t[..., :8], known)
