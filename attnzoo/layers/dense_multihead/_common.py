"""Shared by the dense-multihead entries: the family name, the supported capabilities, small test sizes and helpers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    MultiHeadAttention,
    load_shared,
)

FAMILY = "dense-multihead"
MIXER_SUPPORT = {"self", "cross", "causal", "padding", "decoding", "gqa"}
SMALL = {"dim": 32, "n_heads": 4}


def rand_x(b: int = 2, n: int = 10, c: int = 32, seed: int = 0, **kw: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64, **kw)


def copy_mha(src: MultiHeadAttention, dst: nn.Module) -> None:
    """Load ``src``'s q/k/v/o projections into ``dst`` (same names), leaving its other parameters."""
    load_shared(src, dst)
