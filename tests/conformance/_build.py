"""Building registered entries as token mixers for the conformance suite."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import attnzoo
from attnzoo.layers import MultiHeadAttention
from attnzoo.registry import Spec

DIM, HEADS = 32, 4


def mixer_specs() -> list[Spec]:
    """Every entry that can be checked as a token mixer (mixers, and score_mods inside a host mha)."""
    return [s for s in attnzoo.list()
            if s.type in ("mixer", "pattern", "memory") or (s.type == "score_mod" and s.host is not None)]


def build(spec: Spec, seed: int = 0, reference: bool = False) -> nn.Module:
    """The entry's small test configuration (its float64 oracle when ``reference``), seeded."""
    torch.manual_seed(seed)
    if spec.type in ("mixer", "pattern", "memory"):
        kw: dict[str, Any] = dict(spec.test_kwargs)
        if reference:
            kw.update(spec.reference_kwargs)
        return attnzoo.create(spec.slug, **kw)
    inner = attnzoo.create(spec.slug, **spec.test_kwargs)
    return MultiHeadAttention(DIM, HEADS, backend="reference" if reference else "auto", **spec.host(inner))


def build_pair(spec: Spec, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(default module in float32, float64 oracle with the same weights)."""
    m = build(spec, seed)
    ref = build(spec, seed + 1, reference=True)
    ref.load_state_dict(m.state_dict())
    return m.float(), ref.double()


def supports(spec: Spec, what: str) -> bool:
    return what in spec.supports


def inputs(b: int = 2, n: int = 12, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=torch.float64).to(dtype)


def pad_mask(b: int = 2, n: int = 12) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n - 4:] = False
    keep[1, n - 1:] = False
    return keep
