"""``poolformer``: the PoolFormer token mixer, ``AvgPool_{3x3, stride 1, pad 1, count_include_pad=False}(X) - X``.

A non-attention comparator inside the MetaFormer block (``X + Mixer(Norm X)``, then ``+ MLP(Norm .)``:
the wrapper every registry mixer plugs into, :class:`attnzoo.bench.models.Block`). Channels-last
grids ``[B, H, W, C]`` (and ``[B, N, C]`` as a 1-D grid, pooling 3 neighbours). Padded tokens are
left out of the averages (as ``count_include_pad=False`` leaves out the border) and give zero rows.
No parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, check_grid_call, local_average
from attnzoo.registry import Reduction, register

__all__ = ["PoolFormerMixer"]


class PoolFormerMixer(nn.Module):
    """PoolFormer mixer ``[B, *spatial, C] -> [B, *spatial, C]`` (1-D, 2-D or 3-D grids, channels last)."""

    def __init__(self, dim: int, *, pool_size: int = 3) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.pool_size = check_int("pool_size", pool_size)
        if pool_size % 2 == 0:
            raise ValueError(f"pool_size: expected an odd size (same-size output), got {pool_size}")

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """``AvgPool(X) - X`` over the kept tokens of ``x`` ``[B, *spatial, C]``; ``mask`` bool ``[B, *spatial]``,
        True = keep. ``causal`` and ``context`` are refused."""
        check_grid_call("poolformer", x, self.dim, mask, causal, context)
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0)
        y = local_average(x, mask, self.pool_size) - x
        return y if mask is None else y.masked_fill(~mask.unsqueeze(-1), 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pool_size={self.pool_size}"


def _constant_is_zero() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 1, 1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).expand(2, 5, 6, 8)
    return PoolFormerMixer(8)(x), torch.zeros(2, 5, 6, 8, dtype=torch.float64)


def _matches_avg_pool() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pooled = F.avg_pool2d(x.movedim(-1, 1), 3, 1, 1, count_include_pad=False).movedim(1, -1)
    return PoolFormerMixer(8)(x), pooled - x


register(
    "poolformer", family=FAMILY, type="mixer", priority=3, input_kind="grid2d", papers=("MetaFormer/PoolFormer",),
    supports={"self", "padding"}, complexity="O(N)", backends=(),
    reference="torch avg_pool2d (count_include_pad=False)",
    reference_kwargs={}, test_kwargs={"dim": 32},
    summary="PoolFormer token mixer AvgPool3x3(X) - X (count_include_pad=False): no parameters, a spatially "
            "constant input gives 0.",
    reductions=(Reduction("constant_is_zero", "a spatially constant input gives mixer output 0", _constant_is_zero),
                Reduction("avg_pool_minus_x", "equals avg_pool2d(3, 1, 1, count_include_pad=False)(X) - X",
                          _matches_avg_pool)),
)(PoolFormerMixer)
