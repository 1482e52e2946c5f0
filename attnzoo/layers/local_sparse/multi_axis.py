"""``multi_axis``: MaxViT multi-axis attention: block (P x P windows) then grid (G x G dilated groups), with RPB."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, load_shared, seeded
from attnzoo.layers.local_sparse._common import FAMILY
from attnzoo.layers.local_sparse._grid import GridMixer, fixed_ndim, mha_on_grid, per_axis
from attnzoo.layers.local_sparse.swin_window import SwinWindowAttention
from attnzoo.layers.testing import random_grid
from attnzoo.patterns import GridPartition, GridRelativeBias
from attnzoo.registry import Reduction, register


class GridGroupAttention(GridMixer):
    """MaxViT grid attention: tokens attend within their dilated grid group
    (:class:`~attnzoo.patterns.GridPartition`, ``cells`` per axis). ``rpb``: learned bias over
    the group offsets."""

    def __init__(self, dim: int, n_heads: int = 8, *, cells: int | Sequence[int] = 7, rpb: bool = False,
                 ndim: int | None = None, head_dim: int | None = None, bias: bool = True, scale: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        self.cells = cells
        self.ndim = ndim or fixed_ndim(cells)
        if self.ndim is not None:
            per_axis(cells, self.ndim, "cells")
        if rpb:
            self.ndim = self.ndim or 2
            self.rpb = GridRelativeBias(n_heads, per_axis(cells, self.ndim, "cells"))

    def grid_pattern(self, grid):
        return GridPartition(per_axis(self.cells, len(grid), "cells"), grid=grid)

    def grid_score_mod(self, grid):
        if self.rpb is None:
            return None
        cells = per_axis(self.cells, len(grid), "cells")
        return self.rpb.at(grid, tuple(max(1, n // c) for n, c in zip(grid, cells)))


class MultiAxisAttention(nn.Module):
    """MaxViT multi-axis attention: block attention (``block`` tokens per axis) then grid
    attention (``grid`` cells per axis), each with its own projections (and ``rpb``).

    ``mode="block+grid"`` returns ``y`` with ``x + y`` equal to the two residual sub-layers
    of a MaxViT stage without norms and MLPs: ``h = x + block(x)``, ``x + y = h + grid(h)``.
    ``mode="block"`` / ``"grid"``: one sub-layer's output. Both patterns must divide the grid.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, block: int | Sequence[int] = 7, grid: int | Sequence[int] = 7,
                 mode: str = "block+grid", rpb: bool = False, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, ("block+grid", "block", "grid"))
        kw = dict(head_dim=head_dim, bias=bias, scale=scale, backend=backend, rpb=rpb, ndim=ndim)
        self.block_attn = SwinWindowAttention(dim, n_heads, window=block, **kw)
        self.grid_attn = GridGroupAttention(dim, n_heads, cells=grid, **kw)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, *spatial, C]`` -> same shape.

        ``mask``: bool ``[B, *spatial]``, True = keep (a real token), False = padding.
        """
        if causal:
            raise ValueError("causal: MultiAxisAttention (MaxViT) does not support causal attention")
        kw = dict(mask=mask, context=context, cache=cache)
        if self.mode == "block":
            return self.block_attn(x, **kw)
        if self.mode == "grid":
            return self.grid_attn(x, **kw)
        h = x + self.block_attn(x, **kw)
        return h + self.grid_attn(h, **kw) - x


def _maxvit_full():
    x = random_grid(grid=(6, 6))
    m_block = seeded(MultiAxisAttention, dim=32, n_heads=4, block=6, grid=2, mode="block")
    m_grid = seeded(MultiAxisAttention, dim=32, n_heads=4, block=2, grid=6, mode="grid")
    return (torch.stack([m_block(x), m_grid(x)]),
            torch.stack([mha_on_grid(m_block.block_attn, x), mha_on_grid(m_grid.grid_attn, x)]))


def _maxvit_grid_is_permuted_block():
    m = seeded(MultiAxisAttention, dim=32, n_heads=4, block=3, grid=(2, 4), mode="grid")
    block = load_shared(m.grid_attn, SwinWindowAttention(32, 4, window=(2, 4))).double()
    x = random_grid(grid=(6, 8))
    b, c = x.shape[0], x.shape[-1]
    # y = g * P + i  ->  y' = i * G + g   (P = extent / G)
    xp = x.view(b, 2, 3, 4, 2, c).permute(0, 2, 1, 4, 3, 5).reshape(b, 6, 8, c)
    yp = block(xp)
    y = yp.view(b, 3, 2, 2, 4, c).permute(0, 2, 1, 4, 3, 5).reshape(b, 6, 8, c)
    return m(x), y


def _maxvit_stage():
    m = seeded(MultiAxisAttention, dim=32, n_heads=4, block=(3, 4), grid=2)
    x = random_grid()
    h = x + m.block_attn(x)
    return x + m(x), h + m.grid_attn(h)


register(
    "multi_axis", family=FAMILY, type="pattern", priority=2, input_kind="grid2d", papers=("MaxViT",),
    supports={"self", "padding"}, complexity="O(N (P^2 + G^2))",
    summary="MaxViT multi-axis attention: block (P x P windows) then grid (G x G dilated groups), with RPB.",
    test_kwargs={"dim": 32, "n_heads": 4, "block": 4, "grid": 3},
    reductions=(
        Reduction("full_block_and_grid", "P = H = W and G = H both give full attention", _maxvit_full),
        Reduction("grid_is_permuted_block", "grid attention = block attention between an axis permutation and its "
                  "inverse", _maxvit_grid_is_permuted_block),
        Reduction("stage", "x + y equals the residual block then grid sub-layers", _maxvit_stage),
    ),
)(MultiAxisAttention)
