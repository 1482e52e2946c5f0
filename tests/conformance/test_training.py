"""The conformance suite for training-time entries (declared capability ``training``).

Such an entry's module provides ``training_loss(loss_fn)``: the objective to backpropagate
with the technique active (e.g. an adversarial second pass). Checked in its host like any
hosted entry: float32 default backend against the float64 reference, values and gradients.
"""

from __future__ import annotations

import pytest
import torch

from tests.conformance._build import build_with_entry, inputs, pad_mask, supports, training_specs

SPECS = training_specs()


def _pair(spec):
    m, entry = build_with_entry(spec)
    ref, ref_entry = build_with_entry(spec, seed=1, reference=True)
    ref.load_state_dict(m.state_dict())
    return (m.float(), entry.float()), (ref.double(), ref_entry.double())


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.slug) for s in SPECS])
def test_training_loss_matches_float64_reference(spec):
    (m, entry), (ref, ref_entry) = _pair(spec)
    kw = {"causal": True} if supports(spec, "causal") else {}
    if supports(spec, "padding"):
        kw["mask"] = pad_mask()
    x = inputs(seed=4)
    target = inputs(seed=5)

    def objective(module, ent, dtype):
        xx = x.to(dtype)
        loss = ent.training_loss(lambda: ((module(xx, **kw) - target.to(dtype)) ** 2).sum())
        loss.backward()
        return loss

    loss = objective(m, entry, torch.float32)
    loss_ref = objective(ref, ref_entry, torch.float64)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-4, atol=1e-4)
    for (name, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{spec.slug}: bad gradient for {name}"
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=1e-3,
                                   msg=lambda s, name=name: f"{spec.slug} grad of {name}: {s}")
