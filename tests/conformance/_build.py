"""Building registered entries for the conformance suite, by type.

``mixer`` entries are token mixers; ``score_mod`` entries with a ``host`` run inside a host
``mha``; ``steering`` entries wrap a small host language model (:class:`TinyLM`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import attnzoo
from attnzoo.layers import MultiHeadAttention
from attnzoo.layers.lm import TinyLM
from attnzoo.registry import Spec

DIM, HEADS, VOCAB = 32, 4, 64


MODULE_TYPES = ("mixer", "pattern", "memory")  # entries whose factory builds the token mixer itself


def mixer_specs() -> list[Spec]:
    """Every entry that can be checked as a token mixer (mixers, patterns' mixers, score_mods inside a host mha)."""
    return [s for s in attnzoo.list() if s.type in MODULE_TYPES or (s.type == "score_mod" and s.host is not None)]


def steering_specs() -> list[Spec]:
    """Every steering entry (checked as a wrapper of a host model)."""
    return attnzoo.list(type="steering")


def suite_slugs() -> set[str]:
    """Slugs of every entry the conformance suite checks by its contract."""
    return {s.slug for s in [*mixer_specs(), *steering_specs()]}


def training_specs() -> list[Spec]:
    """Entries that declare the ``training`` capability (``training_loss(loss_fn)``)."""
    return [s for s in mixer_specs() if "training" in s.supports]


def build_with_entry(spec: Spec, seed: int = 0, reference: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the module the suite runs, the entry's own module): equal for mixers, (host, modifier) otherwise."""
    torch.manual_seed(seed)
    if spec.type in MODULE_TYPES:
        kw: dict[str, Any] = dict(spec.test_kwargs)
        if reference:
            kw.update(spec.reference_kwargs)
        m = attnzoo.create(spec.slug, **kw)
        return m, m
    inner = attnzoo.create(spec.slug, **spec.test_kwargs)
    return MultiHeadAttention(DIM, HEADS, backend="reference" if reference else "auto", **spec.host(inner)), inner


def build(spec: Spec, seed: int = 0, reference: bool = False) -> nn.Module:
    """The entry's small test configuration (its float64 oracle when ``reference``), seeded."""
    return build_with_entry(spec, seed, reference)[0]


def build_pair(spec: Spec, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(default module in float32, float64 oracle with the same weights)."""
    m = build(spec, seed)
    ref = build(spec, seed + 1, reference=True)
    ref.load_state_dict(m.state_dict())
    return m.float(), ref.double()


def build_steered(spec: Spec, seed: int = 0, reference: bool = False) -> tuple[nn.Module, nn.Module]:
    """(steering wrapper, the host model it wraps); the host runs ``backend="reference"`` when ``reference``."""
    torch.manual_seed(seed)
    host = TinyLM(VOCAB, DIM, HEADS, 2, backend="reference" if reference else "auto")
    return attnzoo.create(spec.slug, host, **spec.test_kwargs), host


def supports(spec: Spec, what: str) -> bool:
    return what in spec.supports


def inputs(b: int = 2, n: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=torch.float64).to(dtype)


def tokens(b: int = 2, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def pad_mask(b: int = 2, n: int = 12) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n - 4:] = False
    keep[1, n - 1:] = False
    return keep


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
