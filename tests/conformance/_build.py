"""Building registered entries for the conformance suite, by their contract (:mod:`attnzoo.contracts`).

Token mixers are built from their spec (a hosted ``score_mod`` inside a host ``mha``);
``steering`` entries wrap a small host language model (:class:`TinyLM`); poolers and channel
modules are built from their spec and fed by the contract's input builders.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.contracts import (
    CHANNEL,
    DIM,
    HEADS,
    POOLER,
    STEERING,
    TOKEN_MIXER,
    VOCAB,
    build,
    build_entry,
    build_pair,
    channel_inputs,
    grid_inputs,
    grid_mask,
    inputs,
    pad_mask,
    pooler_inputs,
    specs_of,
    tokens,
)
from attnzoo.layers.lm import TinyLM
from attnzoo.registry import Spec

__all__ = [
    "DIM", "HEADS", "VOCAB", "build", "build_pair", "build_steered", "build_with_entry", "channel_inputs",
    "channel_specs", "check_against_reference", "grid_inputs", "grid_mask", "inputs", "mixer_specs", "pad_mask",
    "pooler_inputs", "pooler_specs", "steering_specs", "suite_slugs", "supports", "tokens", "training_specs",
    "check_every_parameter_gets_a_gradient", "check_safetensors_round_trip", "check_seeded", "registered_probes",
]


def mixer_specs() -> list[Spec]:
    """Every entry that can be checked as a token mixer (mixers, patterns' mixers, score_mods inside a host mha)."""
    return specs_of(TOKEN_MIXER)


def steering_specs() -> list[Spec]:
    """Every steering entry (checked as a wrapper of a host model)."""
    return specs_of(STEERING)


def pooler_specs() -> list[Spec]:
    """Every pooler ((B, N, C) + mask -> (B, C_out) or (B, K, C_out))."""
    return specs_of(POOLER)


def channel_specs() -> list[Spec]:
    """Every channel module ((B, C, H, W) -> the same shape)."""
    return specs_of(CHANNEL)


def suite_slugs() -> set[str]:
    """Slugs of every entry the conformance suite checks by its contract."""
    return {s.slug for s in [*mixer_specs(), *steering_specs(), *pooler_specs(), *channel_specs()]}


def training_specs() -> list[Spec]:
    """Entries that declare the ``training`` capability (``training_loss(loss_fn)``)."""
    return [s for s in mixer_specs() if "training" in s.supports]


def build_with_entry(spec: Spec, seed: int = 0, reference: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the module the suite runs, the entry's own module): equal for mixers, (host, modifier) otherwise."""
    return build_entry(spec, seed, reference)


def build_steered(spec: Spec, seed: int = 0, reference: bool = False) -> tuple[nn.Module, nn.Module]:
    """(steering wrapper, the host model it wraps); the host runs ``backend="reference"`` when ``reference``."""
    torch.manual_seed(seed)
    host = TinyLM(VOCAB, DIM, HEADS, 2, backend="reference" if reference else "auto")
    return attnzoo.create(spec.slug, host, **spec.test_kwargs), host


def built_eval(spec: Spec, **kw: Any) -> nn.Module:
    """Entry ``spec`` built by the contract's builder, in eval mode."""
    return build(spec, **kw).eval()


def first_output(m: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``m(x, **kw)``, or its first element when the module returns a tuple (output, weights, ...)."""
    out = m(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def supports(spec: Spec, what: str) -> bool:
    return what in spec.supports


def check_against_reference(slug: str, m: nn.Module, ref: nn.Module, run: Any, x: torch.Tensor,
                            kw: dict[str, Any]) -> None:
    """Float32 ``m`` vs its float64 reference ``ref`` on ``x``: output, input and parameter gradients."""
    x32, x64 = (x.detach().to(dt).clone().requires_grad_() for dt in (torch.float32, torch.float64))
    y, y_ref = run(m, x32, **kw), run(ref, x64, **kw)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=2e-5, msg=lambda s: f"{slug} {kw}: {s}")
    g = torch.randn_like(y_ref)
    y.backward(g.float())
    y_ref.backward(g)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-3, atol=1e-4)
    for (name, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is not None or p_ref.grad is not None:
            torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=1e-4,
                                       msg=lambda s, name=name: f"{slug} grad of {name}: {s}")
    m.zero_grad()
    ref.zero_grad()


def check_every_parameter_gets_a_gradient(slug: str, m: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> None:
    """``loss(m).backward()`` reaches every trainable parameter of ``m`` (skips a module without any), except those
    whose names start with a prefix of ``m.trained_by_own_loss`` (a learned router trained by its own objective,
    e.g. ``seer_attention``'s ``gate_loss``; the entry's tests check that objective reaches them)."""
    if not any(p.requires_grad for p in m.parameters()):
        pytest.skip(f"{slug} has no trainable parameters")
    loss(m).backward()
    apart = tuple(getattr(m, "trained_by_own_loss", ()))
    missing = [n for n, p in m.named_parameters() if p.requires_grad and not (apart and n.startswith(apart))
               and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"{slug}: no gradient for {missing}"


def check_seeded(make: Callable[[int], nn.Module], out: Callable[[nn.Module], torch.Tensor]) -> None:
    """Two modules built with the same seed give the same output, exactly."""
    torch.testing.assert_close(out(make(7)), out(make(7)), rtol=0, atol=0)


def check_safetensors_round_trip(make: Callable[[int], nn.Module], out: Callable[[nn.Module], torch.Tensor]) -> None:
    """A state dict saved with safetensors and loaded into another module gives the same output, exactly."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    m = make(1)
    blob = safetensors_torch.save({k: v.contiguous() for k, v in m.state_dict().items()})
    other = make(2)
    other.load_state_dict(safetensors_torch.load(io.BytesIO(blob).getvalue()))
    torch.testing.assert_close(out(other), out(m), rtol=0, atol=0)


@contextmanager
def registered_probes(cls: type, family: str, type_: str, probes: dict[str, dict[str, Any]],
                      **fields: Any) -> Iterator[dict[str, Spec]]:
    """Register ``cls`` as each probe slug (its test kwargs) for the duration of a test, then remove them."""
    from attnzoo import registry

    try:
        for slug, kw in probes.items():
            registry.register(slug, family=family, type=type_, reference_kwargs={}, test_kwargs=kw, **fields)(cls)
        yield {slug: registry.spec(slug) for slug in probes}
    finally:
        for slug in probes:
            registry._REGISTRY.pop(slug, None)
