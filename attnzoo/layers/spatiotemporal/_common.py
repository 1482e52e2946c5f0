"""Shared by the spatiotemporal entries: video token layout ``(B, T, *space, C)`` and its checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

FAMILY = "spatiotemporal"
VIDEO_SUPPORT = {"self", "causal", "padding"}


def parse_video_grid(grid: Sequence[int] | None) -> tuple[int, ...] | None:
    """A configured grid ``(T,)``, ``(T, S)`` or ``(T, H, W)`` (positive ints), or None."""
    if grid is None:
        return None
    g = tuple(grid)
    if not 1 <= len(g) <= 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in g):
        raise ValueError(f"grid: expected (T,), (T, S) or (T, H, W) of positive integers, got {grid!r}")
    return g


def video_tokens(x: Any, mask: Any, dim: int, grid: tuple[int, ...] | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """``(x [B, T, S, C], mask [B, T, S] or None, (T, *space))`` from channels-last video tokens.

    ``x`` is ``[B, T, *space, C]`` with 0 to 2 spatial axes (a ``[B, N, C]`` sequence is N frames of
    one token, or the configured ``grid`` flattened in raster order when N equals its size).
    """
    if not isinstance(x, torch.Tensor) or not 3 <= x.dim() <= 5 or x.shape[-1] != dim:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected video tokens [B, T, *space, {dim}] with 1 to 3 spatial axes (time first), "
                         f"got {got}")
    b = x.shape[0]
    shape = tuple(x.shape[1:-1])
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, *shape):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor {[b, *shape]}, got {got}")
    if grid is not None:
        n_grid = 1
        for g in grid:
            n_grid *= g
        if shape == (n_grid,) and len(grid) > 1:
            shape = grid
        elif shape != grid:
            raise ValueError(f"x: the video's (T, *space) = {shape} does not match the configured grid {grid} "
                             f"(or its {n_grid} tokens flattened)")
    t = shape[0]
    s = 1
    for v in shape[1:]:
        s *= v
    return x.reshape(b, t, s, dim), None if mask is None else mask.reshape(b, t, s), shape
