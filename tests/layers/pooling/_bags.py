"""Inputs for the pooler property tests: random bags, padded and packed, in float64."""

from __future__ import annotations

import torch


def bags(lengths: tuple[int, ...] = (6, 9, 1, 4), dim: int = 16, seed: int = 0):
    """``(x [B, N, dim], mask [B, N], packed [1, T, dim], cu_seqlens [B + 1])`` with the same bags."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, dim, generator=g, dtype=torch.float64)
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    packed = torch.cat([x[i, :k] for i, k in enumerate(lengths)])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return x, mask, packed, cu


def unpad(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-instance ``[B, N, ...]`` -> packed ``[T, ...]`` (the kept rows in order)."""
    return t[mask]
