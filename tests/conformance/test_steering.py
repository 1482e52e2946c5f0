"""The conformance suite for ``steering`` entries: each wraps a small host language model.

A steering entry is built as ``create(slug, host, **test_kwargs)`` and called like the host
(``tokens [B, N] -> logits [B, N, V]``); outputs are compared as log-distributions
(``log_softmax``), since a steered model may return any logits of the same distribution.
Nothing here names an entry; the entry's own exact reductions (its neutral setting
reproducing the host, ...) run in ``test_reductions.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.conformance._build import build_steered, pad_mask, steering_specs, supports, tokens

SPECS = steering_specs()
IDS = [s.slug for s in SPECS]


def by(what: str) -> list:
    return [pytest.param(s, id=s.slug) for s in SPECS if supports(s, what)]


def logp(y: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(y.double(), -1)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_steering_shape_dtype_finite(spec, dtype):
    steered, host = build_steered(spec)
    steered.to(dtype)
    t = tokens()
    for scale in (1.0, 30.0) if dtype == torch.bfloat16 else (1.0,):
        with torch.no_grad():
            host.head.weight.mul_(scale)  # large-magnitude logits
        y = steered(t)
        assert y.shape == (*t.shape, host.vocab) and y.dtype == dtype
        assert torch.isfinite(y).all(), f"{spec.slug}: non-finite output in {dtype} at logit scale {scale}"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_steering_matches_float64_reference(spec):
    steered, _ = build_steered(spec)
    ref, ref_host = build_steered(spec, seed=1, reference=True)
    ref.load_state_dict(steered.state_dict())
    ref.double()
    t = tokens(seed=3)
    modes = [{}] + ([{"mask": pad_mask()}] if supports(spec, "padding") else [])
    for kw in modes:
        torch.testing.assert_close(logp(steered(t, **kw)), logp(ref(t, **kw)), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_steering_leaves_host_unchanged(spec):
    steered, host = build_steered(spec)
    steered.double()
    t = tokens()
    before = host(t)
    state = {k: v.clone() for k, v in host.state_dict().items()}
    steered(t)
    torch.testing.assert_close(host(t), before, rtol=0, atol=0)
    for k, v in host.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=f"{spec.slug} changed the host's {k}")


@pytest.mark.parametrize("spec", by("causal"))
def test_steering_causal_prefix(spec):
    steered, _ = build_steered(spec)
    steered.double()
    t = tokens()
    y = steered(t)
    for i in (0, 5, 10):
        t2 = t.clone()
        t2[:, i + 1:] = (t2[:, i + 1:] + 7) % 64
        torch.testing.assert_close(steered(t2)[:, : i + 1], y[:, : i + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", by("padding"))
def test_steering_padding_invariance(spec):
    steered, _ = build_steered(spec)
    steered.double()
    t, keep = tokens(), pad_mask()
    y = steered(t, mask=keep)
    t2 = torch.where(keep, t, (t + 11) % 64)
    torch.testing.assert_close(steered(t2, mask=keep)[keep], y[keep], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_steering_batch_independence_and_seed(spec):
    steered, _ = build_steered(spec)
    steered.double()
    t = tokens(b=3)
    y = steered(t)
    torch.testing.assert_close(steered(t[1:2]), y[1:2], rtol=1e-10, atol=1e-12)
    again, _ = build_steered(spec)
    torch.testing.assert_close(again.double()(t), y, rtol=0, atol=0)
