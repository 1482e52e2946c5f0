"""Shared by the cross-multimodal entries: the family name, input checks and small test inputs."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_context, check_mixer_input

FAMILY = "cross-multimodal"


def check_cross_call(module: Any, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                     context: torch.Tensor | None, context_mask: torch.Tensor | None, cache: Any,
                     width: int | None, causal_ok: bool = False) -> None:
    """Validate a mixer call (shapes of ``x``/``mask``/``context``/``context_mask``) before any work."""
    check_mixer_input(x, mask, context, module.dim)
    check_context(context, context_mask, width)
    if causal and not causal_ok:
        raise ValueError(f"causal: {type(module).__name__} does not support causal attention")
    if cache is not None:
        raise ValueError(f"cache: {type(module).__name__} does not decode token by token")


def rand_x(b: int = 2, n: int = 10, c: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)
