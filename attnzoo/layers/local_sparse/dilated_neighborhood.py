"""``dilated_neighborhood``: Dilated neighbourhood attention (DiNA) with NATTEN borders per dilation
group; DiNAT alternation via dinat_dilations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.layers.base import check_int, load_shared, seeded
from attnzoo.layers.local_sparse._common import FAMILY
from attnzoo.layers.local_sparse._grid import GRID_SUPPORT, per_axis
from attnzoo.layers.local_sparse.neighborhood import NeighborhoodAttention
from attnzoo.layers.testing import random_grid
from attnzoo.registry import Reduction, register


def dinat_dilations(grid: Sequence[int], kernel_size: int | Sequence[int], depth: int) -> list[tuple[int, ...]]:
    """DiNAT's NA/DiNA alternation: even layers dilation 1, odd layers the largest dilation
    that keeps ``kernel_size`` keys per axis (``extent // kernel_size``), so the receptive field
    grows exponentially with depth."""
    grid = tuple(grid)
    k = per_axis(kernel_size, len(grid), "kernel_size")
    sparse = tuple(max(1, n // kk) for n, kk in zip(grid, k))
    return [(1,) * len(grid) if i % 2 == 0 else sparse for i in range(check_int("depth", depth))]


class DilatedNeighborhoodAttention(NeighborhoodAttention):
    """Dilated neighbourhood attention (DiNA): the ``kernel_size`` nearest tokens on the
    dilation-``dilation`` sub-grid of the query (keys congruent to the query modulo the
    dilation, windows shifted inside the sub-grid at borders). ``dilation = 1`` is NA;
    :func:`dinat_dilations` gives DiNAT's per-layer alternation."""

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                 dilation: int | Sequence[int] = 2, **kw: Any) -> None:
        super().__init__(dim, n_heads, kernel_size=kernel_size, dilation=dilation, **kw)


def _dina_one_is_na():
    m = seeded(DilatedNeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, dilation=1)
    na = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=3)).double()
    x = random_grid()
    return m(x), na(x)


def _dina_congruent_keys():
    m = seeded(DilatedNeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, dilation=2, backend="reference")
    x = random_grid(b=1, grid=(7, 8))
    _, w = m(x, return_weights=True)
    seen = w[0] > 0  # [H, N, N]
    c = torch.cartesian_prod(torch.arange(7), torch.arange(8))
    congruent = ((c.view(-1, 1, 2) - c.view(1, -1, 2)) % 2 == 0).all(-1)
    counts = seen.sum(-1).double()
    off_grid = (seen & ~congruent).sum().double()
    return torch.cat([counts.flatten(), off_grid.view(1)]), torch.cat([torch.full((counts.numel(),), 9.0,
                                                                                 dtype=torch.float64),
                                                                      torch.zeros(1, dtype=torch.float64)])


register(
    "dilated_neighborhood", family=FAMILY, type="pattern", priority=2, input_kind="grid2d", papers=("DiNAT",),
    supports=GRID_SUPPORT, complexity="O(N k^D)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather"),
    summary="Dilated neighbourhood attention (DiNA) with NATTEN borders per dilation group; DiNAT alternation "
            "via dinat_dilations.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3, "dilation": 2},
    reductions=(
        Reduction("dilation_one_is_na", "dilation 1 equals neighborhood", _dina_one_is_na),
        Reduction("k_congruent_keys", "each query attends exactly k^D keys, all congruent to it mod dilation",
                  _dina_congruent_keys),
    ),
)(DilatedNeighborhoodAttention)
