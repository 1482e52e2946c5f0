"""``neighborhood``: Neighbourhood attention 1-D/2-D/3-D (NATTEN borders), per-axis
kernel/dilation/stride/causal, RPB, TiC output stride; spatial tiles on the chunked path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnzoo.layers.base import check_int, load_shared, seeded, zero_padded
from attnzoo.layers.local_sparse._common import FAMILY
from attnzoo.layers.local_sparse._grid import (
    GRID_SUPPORT,
    GridMixer,
    fixed_ndim,
    flatten_grid,
    mha_on_grid,
    per_axis,
    per_window,
)
from attnzoo.layers.testing import random_grid
from attnzoo.ops import attention
from attnzoo.ops.score_mod import ScoreMod
from attnzoo.patterns import GridRelativeBias, KeyPadding, Neighborhood
from attnzoo.patterns.windows import QuerySubset
from attnzoo.registry import Reduction, register


class NeighborhoodAttention(GridMixer):
    """Neighbourhood attention (NA, NATTEN semantics) over 1-D, 2-D or 3-D grids.

    Each token attends to the ``kernel_size`` nearest tokens per axis; at borders the window
    is shifted, so every query sees exactly ``prod(kernel_size)`` keys. ``dilation`` (DiNA),
    ``stride`` (GNA: groups of ``stride`` queries share a window; ``stride = kernel_size``
    is blocked attention) and ``causal_axes`` (NATTEN's per-axis causal mode) are per axis.
    ``rpb`` adds NATTEN's learned relative-position bias (``(2k-1)`` offsets per axis).
    ``output_stride`` (TiC MSA-Conv) evaluates NA only at every ``output_stride``-th
    position per axis: the output grid is ``ceil(extent / output_stride)``.
    Integer arguments apply to every axis; tuples fix the number of spatial axes (``ndim``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                 dilation: int | Sequence[int] = 1, stride: int | Sequence[int] = 1,
                 causal_axes: bool | Sequence[bool] = False, rpb: bool = False,
                 output_stride: int | Sequence[int] = 1, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        fixed = fixed_ndim(kernel_size, dilation, stride, causal_axes, output_stride)
        if ndim is not None:
            check_int("ndim", ndim)
            if ndim > 3 or (fixed is not None and fixed != ndim):
                raise ValueError(f"ndim: expected 1, 2 or 3 matching the per-axis arguments, got {ndim}")
        self.ndim = ndim or fixed
        self.kernel_size, self.dilation, self.stride = kernel_size, dilation, stride
        self.causal_axes, self.output_stride = causal_axes, output_stride
        if self.ndim is not None:  # validate per-axis arguments now
            self._axes(self.ndim)
        if rpb:
            nd = self.ndim or 2
            self.ndim = nd
            k, d, _, _, _ = self._axes(nd)
            self.rpb = GridRelativeBias(n_heads, k, step=d)

    def _axes(self, nd: int):
        k = per_axis(self.kernel_size, nd, "kernel_size")
        d = per_axis(self.dilation, nd, "dilation")
        s = per_axis(self.stride, nd, "stride")
        c = (self.causal_axes,) * nd if isinstance(self.causal_axes, bool) else tuple(bool(v) for v in self.causal_axes)
        if len(c) != nd:
            raise ValueError(f"causal_axes: expected a bool or {nd} bools, got {self.causal_axes!r}")
        o = per_axis(self.output_stride, nd, "output_stride")
        return k, d, s, c, o

    def grid_pattern(self, grid):
        k, d, s, c, _ = self._axes(len(grid))
        return Neighborhood(k, dilation=d, stride=s, causal=c, grid=grid)

    def grid_score_mod(self, grid):
        if self.rpb is None:
            return None
        return self.rpb.at(grid, self._axes(len(grid))[1])

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if isinstance(x, torch.Tensor) and 3 <= x.dim() <= 5:
            self.check_grid(tuple(x.shape[1:-1]))
            os_ = self._axes(x.dim() - 2)[4]
            if any(o > 1 for o in os_):
                return self._strided_forward(x, mask, causal, context, cache, os_)
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask, cache=cache,
                               head_mask=head_mask, return_weights=return_weights)

    def _strided_forward(self, x, mask, causal, context, cache, os_):
        if causal or context is not None or cache is not None:
            raise ValueError("output_stride: strided neighbourhood attention runs without causal, context or cache")
        grid, flat, keep = flatten_grid(x, mask, self.dim)
        self.check_grid(grid)
        axes = [torch.arange(0, n, o) for n, o in zip(grid, os_)]
        out_grid = tuple(len(a) for a in axes)
        strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]
        pos = torch.zeros(1, dtype=torch.long)
        for a, st in zip(axes, strides):
            pos = (pos.view(-1, 1) + (a * st).view(1, -1)).flatten()
        pos = pos.to(x.device)
        q, k, v = self.project(flat, flat)
        q = q[:, :, pos]
        pattern = QuerySubset(self._cached(("pattern", grid, None), lambda: self.grid_pattern(grid)), pos)
        if keep is not None and not bool(keep.all()):
            pattern = pattern & KeyPadding(keep)
        mod = self.grid_score_mod(grid)
        if mod is not None:
            mod = _AtQueries(mod, pos)
        z = attention(q, k, v, pattern=pattern, score_mod=mod, scale=self.scale,
                      backend=self.backend)
        y = self.output(z, flat)
        if keep is not None:
            y = zero_padded(y, keep[:, pos])
        return y.reshape(x.shape[0], *out_grid, self.dim)


class _AtQueries(ScoreMod):
    """A grid score modifier evaluated at query positions ``pos[q]`` (strided outputs)."""

    additive = True
    per_head = True

    def __init__(self, inner: ScoreMod, pos: torch.Tensor) -> None:
        self.inner, self.pos = inner, pos

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()

    def __call__(self, score, b, h, q, kv, shape):
        return self.inner(score, b, h, self.pos.to(q.device)[q], kv, shape)


def _na_full_kernel_is_dense():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(6, 8))
    x = random_grid()
    return m(x), mha_on_grid(m, x)


def _na_stride_kernel_is_window():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(3, 4), stride=(3, 4))
    x = random_grid()
    return m(x), per_window(m, x, (3, 4))


def _na_tiled_equals_dense_mask():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(5, 3), dilation=(1, 2),
               backend="blocksparse")
    ref = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=(5, 3), dilation=(1, 2),
                                               backend="reference")).double()
    x = random_grid(grid=(10, 12))
    keep = torch.ones(2, 10, 12, dtype=torch.bool)
    keep[1, 7:] = False
    return torch.stack([m(x), m(x, mask=keep), m(x, causal=True)]), torch.stack([ref(x), ref(x, mask=keep),
                                                                                  ref(x, causal=True)])


def _na_output_stride():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, output_stride=(2, 3))
    full = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=3)).double()
    x = random_grid(grid=(7, 9))
    return m(x), full(x)[:, ::2, ::3]


register(
    "neighborhood", family=FAMILY, type="pattern", priority=1, input_kind="grid2d",
    papers=("Faster Neighborhood Attention (FNA)", "Generalized Neighborhood Attention (GNA)", "TiC (MSA-Conv)"),
    supports=GRID_SUPPORT, complexity="O(N k^D)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather", "triton"),
    summary="Neighbourhood attention 1-D/2-D/3-D (NATTEN borders), per-axis kernel/dilation/stride/causal, RPB, "
            "TiC output stride; spatial tiles on the chunked path.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3},
    reductions=(
        Reduction("full_kernel_is_dense", "k = input extent with dilation 1 gives dense attention",
                  _na_full_kernel_is_dense),
        Reduction("stride_kernel_is_windows", "stride = k gives block-diagonal (window) attention",
                  _na_stride_kernel_is_window),
        Reduction("tiled_equals_dense_mask", "the tiled kernel equals dense attention under the NA mask "
                  "(padding and raster-causal too)", _na_tiled_equals_dense_mask),
        Reduction("output_stride", "TiC output_stride equals NA sampled at the strided positions", _na_output_stride),
    ),
)(NeighborhoodAttention)
