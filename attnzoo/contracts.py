"""The contract of each entry type: how an entry is built and fed, and which checks the conformance suite runs.

The one mapping from an entry's type to its inputs and checks, used by the conformance suite
(``tests/conformance``), the catalogue page (:mod:`attnzoo.catalog`) and the bench
(:mod:`attnzoo.bench.models`, which takes every token-mixer entry as a mixer):

* **token mixer** (``mixer``, ``pattern``, ``memory``; a ``score_mod`` or ``pattern`` with a
  ``host`` runs inside a host ``mha``): ``(B, N, C)`` -> ``(B, N, C)`` with ``mask`` (bool
  ``[B, N]``, True = keep), ``causal``, ``context``, ``cache``; grid entries take channels-last
  ``(B, *spatial, C)``.
* **steering**: ``factory(model, **test_kwargs)`` wraps a small host language model; tokens in,
  logits out, the host unchanged.
* **pooler**: ``(B, N, C)`` + ``mask`` -> ``(B, C_out)`` or ``(B, K, C_out)``; padded content
  changes nothing, a fully masked bag gives zeros, and an entry with ``input_kind == "set"``
  is invariant to permuting its tokens.
* **channel**: ``(B, C, H, W)`` -> the same shape.

Every entry is built from its spec's ``test_kwargs`` (width :data:`DIM`); the float64 oracle
adds ``reference_kwargs``. The input builders here are the ones the suite uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnzoo import registry
from attnzoo.registry import Spec

if TYPE_CHECKING:  # torch is imported where a builder runs: the CLI lists the checks without it
    import torch
    from torch import nn

__all__ = [
    "CHANNEL", "CONTRACTS", "Contract", "DIM", "HEADS", "POOLER", "STEERING", "TOKEN_MIXER", "VOCAB", "build",
    "build_entry", "build_pair", "channel_inputs", "checks_for", "contract_for", "grid_inputs", "grid_mask",
    "hosted", "inputs", "pad_mask", "pooler_inputs", "specs_of", "tokens",
]

DIM, HEADS, VOCAB = 32, 4, 64
MODULE_TYPES = ("mixer", "pattern", "memory")  # entries whose factory builds the token mixer itself


def hosted(spec: Spec) -> bool:
    """An entry that runs inside a host ``mha`` (a score modifier or pattern whose spec has a ``host``)."""
    return spec.host is not None and spec.type in ("pattern", "score_mod")


@dataclass(frozen=True)
class Contract:
    """What the suite does with the entries it ``applies`` to: ``checks(spec)`` names the checks it runs."""

    name: str
    summary: str
    applies: Callable[[Spec], bool]
    checks: Callable[[Spec], list[str]]
    token_mixer: bool = False


def _if(spec: Spec, pairs: tuple[tuple[str, str], ...]) -> list[str]:
    return [check for capability, check in pairs if capability in spec.supports]


def _mixer_checks(s: Spec) -> list[str]:
    return (["shape/dtype", "bf16-large", "float64-reference", "gradients", "batch-independence", "seed",
             "safetensors", "no-per-call-state"]
            + _if(s, (("causal", "causal-prefix"), ("decoding", "kv-cache"), ("padding", "padding"),
                      ("training", "training-loss"))))


def _steering_checks(s: Spec) -> list[str]:
    return (["shape/dtype", "bf16-large", "float64-reference", "host-unchanged", "batch-independence", "seed"]
            + _if(s, (("causal", "causal-prefix"), ("padding", "padding"))))


def _pooler_checks(s: Spec) -> list[str]:
    out = ["shape/dtype", "float64-reference", "gradients", "batch-independence", "seed", "safetensors",
           "padding", "all-masked-zeros"]
    return out + (["permutation-invariance"] if s.input_kind == "set" else [])


def _channel_checks(s: Spec) -> list[str]:
    return ["shape/dtype", "float64-reference", "gradients", "batch-independence", "seed", "safetensors"]


TOKEN_MIXER = Contract(
    "token_mixer", "(B, N, C) -> (B, N, C) with mask, causal, context, cache (grids: (B, *spatial, C))",
    lambda s: s.type in MODULE_TYPES or hosted(s), _mixer_checks, token_mixer=True)
STEERING = Contract("steering", "wraps a host model: tokens -> logits, the host unchanged",
                    lambda s: s.type == "steering", _steering_checks)
POOLER = Contract("pooler", "(B, N, C) + mask -> (B, C_out) or (B, K, C_out); padding and order (sets) do not count",
                  lambda s: s.type == "pooler", _pooler_checks)
CHANNEL = Contract("channel", "(B, C, H, W) -> (B, C, H, W)", lambda s: s.type == "channel", _channel_checks)
CONTRACTS: tuple[Contract, ...] = (TOKEN_MIXER, STEERING, POOLER, CHANNEL)


def contract_for(spec: Spec) -> Contract | None:
    """The contract the suite checks ``spec`` by (None: only its reductions are checked)."""
    return next((c for c in CONTRACTS if c.applies(spec)), None)


def checks_for(spec: Spec) -> list[str]:
    """Names of the conformance checks the suite runs for ``spec`` (all must pass in CI)."""
    c = contract_for(spec)
    return (c.checks(spec) if c is not None else []) + [f"reduction:{r.name}" for r in spec.reductions]


def specs_of(contract: Contract) -> list[Spec]:
    """Every registered entry checked by ``contract``, sorted by slug."""
    return [s for s in registry.list() if contract_for(s) is contract]


# Building -------------------------------------------------------------------------------------
def build_entry(spec: Spec, seed: int = 0, reference: bool = False) -> tuple[nn.Module, nn.Module]:
    """(the module the suite runs, the entry's own module), seeded: equal except for a hosted entry,
    which runs inside a host ``mha`` (``backend="reference"`` when ``reference``)."""
    import torch

    from attnzoo.layers import MultiHeadAttention

    torch.manual_seed(seed)
    if hosted(spec) and spec.type not in MODULE_TYPES:
        inner = registry.create(spec.slug, **spec.test_kwargs)
        return MultiHeadAttention(DIM, HEADS, backend="reference" if reference else "auto", **spec.host(inner)), inner
    kw: dict[str, Any] = dict(spec.test_kwargs)
    if reference:
        kw.update(spec.reference_kwargs)
    m = registry.create(spec.slug, **kw)
    return m, m


def build(spec: Spec, seed: int = 0, reference: bool = False) -> nn.Module:
    """The entry's small test configuration (its float64 oracle when ``reference``), seeded."""
    return build_entry(spec, seed, reference)[0]


def build_pair(spec: Spec, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(default module in float32, float64 oracle with the same weights)."""
    m = build(spec, seed)
    ref = build(spec, seed + 1, reference=True)
    ref.load_state_dict(m.state_dict())
    return m.float(), ref.double()


# Inputs ---------------------------------------------------------------------------------------
def inputs(b: int = 2, n: int = 12, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token-mixer input ``[b, n, DIM]``."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=torch.float64).to(dtype)


def pad_mask(b: int = 2, n: int = 12) -> torch.Tensor:
    """Keep-mask ``[b, n]``: element 0 loses its last 4 tokens, element 1 its last one."""
    import torch

    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, n - 4:] = False
    keep[1, n - 1:] = False
    return keep


def tokens(b: int = 2, n: int = 12, seed: int = 0) -> torch.Tensor:
    """Token ids ``[b, n]`` for a steering entry's host model."""
    import torch

    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def grid_inputs(grid: tuple[int, ...], b: int = 2, seed: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Channels-last grid input ``[b, *grid, DIM]``."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *grid, DIM, generator=g, dtype=torch.float64).to(dtype)


def grid_mask(grid: tuple[int, ...], b: int = 2) -> torch.Tensor:
    """Keep-mask ``[b, *grid]``: element 0 loses its last row, element 1 its last 3 tokens."""
    import torch

    keep = torch.ones(b, *grid, dtype=torch.bool)
    keep[0, -1] = False
    keep[1].view(-1)[-3:] = False
    return keep


def pooler_inputs(b: int = 2, n: int = 12, seed: int = 0, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pooler's input: tokens ``[b, n, DIM]`` and the keep-mask :func:`pad_mask`."""
    return inputs(b, n, seed, dtype), pad_mask(b, n)


def channel_inputs(b: int = 2, hw: tuple[int, int] = (6, 8), seed: int = 0,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """A channel module's input: a feature map ``[b, DIM, H, W]``."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DIM, *hw, generator=g, dtype=torch.float64).to(dtype)
