"""Tests of ``attention_adversarial`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo


def test_adversarial_training_step_trains_and_leaves_module_idle():
    adv = attnzoo.create("attention_adversarial", eps=0.5)
    torch.manual_seed(0)
    m = attnzoo.create("mha", dim=32, n_heads=4, score_mod=adv)
    x = torch.randn(2, 6, 32)
    loss = adv.training_loss(lambda: m(x, causal=True).pow(2).sum())
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    plain = attnzoo.create("mha", dim=32, n_heads=4)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x))  # outside training_loss the modifier adds nothing
    with pytest.raises(RuntimeError, match="no attention call"):
        adv.training_loss(lambda: x.sum())
