"""Helpers of the entries' reduction checks and of the tests: seeded float64 inputs, seeded modules,
and an ``mha`` carrying another module's weights. Nothing here registers an entry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, load_shared, seeded

__all__ = ["mha_from", "random_grid", "random_tokens", "seeded"]


def random_tokens(b: int = 2, n: int = 12, c: int = 32, seed: int = 0, **kw: Any) -> torch.Tensor:
    """Float64 tokens ``[b, n, c]`` from a generator seeded with ``seed`` (``kw`` go to ``torch.randn``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64, **kw)


def random_grid(b: int = 2, grid: tuple[int, ...] = (6, 8), c: int = 32, seed: int = 0) -> torch.Tensor:
    """A float64 channels-last grid ``[b, *grid, c]`` from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *grid, c, generator=g, dtype=torch.float64)


def mha_from(src: nn.Module, **kw: Any) -> MultiHeadAttention:
    """A float64 :class:`MultiHeadAttention` of ``src``'s sizes (``dim``, ``n_heads``, ``head_dim``,
    ``n_kv_heads``) carrying every weight of ``src`` it shares by name and shape (the q/k/v/o
    projections); ``kw`` go to the constructor (``pattern=``, ``backend="reference"``, ...)."""
    sizes = {"head_dim": src.head_dim, "n_kv_heads": getattr(src, "n_kv_heads", src.n_heads)}
    return load_shared(src, MultiHeadAttention(src.dim, src.n_heads, **{**sizes, **kw}).double())
