"""Shared by the positional entries: the family name, the host's capabilities and random queries/keys."""

from __future__ import annotations

import torch

FAMILY = "positional"
HOST_SUPPORT = {"self", "causal", "padding", "decoding", "gqa"}


def rand_qk(seed: int = 0, d: int = 8, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64),
            torch.randn(2, 3, n, d, generator=g, dtype=torch.float64))
