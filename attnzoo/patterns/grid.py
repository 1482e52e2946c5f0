"""Neighborhood attention over 1-D, 2-D and 3-D token grids (NATTEN semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape
from attnzoo.patterns.tiles import AxisTiles, TilePlan, band_tiles, choose_band_tile, product_plan

# Tile sizes (queries per axis) the tile planner considers.
TILE_CANDIDATES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 24, 32, 48, 64, 96, 128)


def _per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) else tuple(value)
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name}: expected a positive int or {ndim} positive ints, got {value!r}")
    return values


class Neighborhood(Pattern):
    """Neighborhood attention: each query sees the ``kernel_size`` nearest keys per axis.

    Tokens are a row-major flattening of ``grid`` (``(L,)``, ``(H, W)`` or ``(T, H, W)``); a
    1-D pattern may omit ``grid`` (it is then the sequence length). At borders the window is
    shifted, not cut, so every query sees exactly ``prod(kernel_size)`` keys (NATTEN).

    ``dilation`` d: the window lives on the sub-grid of positions congruent to the query
    mod d (DiNA). ``stride`` s: queries are grouped in tiles of s per axis and every
    query of a tile uses the window of the tile's centre, ``start + s // 2`` clamped to the
    grid (GNA; s = kernel gives non-overlapping blocks). ``causal``: per axis, the window
    ends at the query and is cut (not shifted) at the start, as in NATTEN's causal mode.
    Self-attention only: ``n_q == n_kv == prod(grid)``.
    """

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        *,
        dilation: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        causal: bool | Sequence[bool] = False,
        grid: int | Sequence[int] | None = None,
    ) -> None:
        if grid is not None:
            grid = (grid,) if isinstance(grid, int) else tuple(grid)
        ndim = len(grid) if grid is not None else (1 if isinstance(kernel_size, int) else len(kernel_size))
        if ndim not in (1, 2, 3):
            raise ValueError(f"grid: expected 1, 2 or 3 axes, got {ndim}")
        self.grid = _per_axis(grid, ndim, "grid") if grid is not None else None
        self.kernel_size = _per_axis(kernel_size, ndim, "kernel_size")
        self.dilation = _per_axis(dilation, ndim, "dilation")
        self.stride = _per_axis(stride, ndim, "stride")
        self.causal = (bool(causal),) * ndim if isinstance(causal, bool) else tuple(bool(c) for c in causal)
        if len(self.causal) != ndim:
            raise ValueError(f"causal: expected a bool or {ndim} bools, got {causal!r}")
        for axis, (k, s, c) in enumerate(zip(self.kernel_size, self.stride, self.causal)):
            if s > k:
                raise ValueError(f"stride: stride {s} is larger than kernel_size {k} on axis {axis}")
            if c and s > 1:
                raise ValueError(f"stride: causal axes need stride 1, got stride {s} on axis {axis}")
        if self.grid is not None:
            self._check_grid(self.grid)

    @property
    def ndim(self) -> int:
        return len(self.kernel_size)

    def _grid(self, shape: Shape) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (shape.n_q,)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        for axis, (length, k, d) in enumerate(zip(grid, self.kernel_size, self.dilation)):
            if k > length:
                raise ValueError(f"kernel_size: {k} is larger than the grid extent {length} on axis {axis}")
            if length // d < k:
                raise ValueError(
                    f"dilation: dilation {d} on axis {axis} (extent {length}) leaves groups of "
                    f"{length // d} positions, fewer than kernel_size {k}"
                )

    def check(self, shape: Shape) -> None:
        grid = self._grid(shape)
        if shape.n_q != shape.n_kv or shape.n_q != math.prod(grid):
            raise ValueError(
                f"Neighborhood: grid {grid} has {math.prod(grid)} tokens but n_q={shape.n_q}, n_kv={shape.n_kv}"
            )
        self._check_grid(grid)

    def _coords(self, idx: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
        coords, rest = [], idx
        for length in reversed(grid):
            coords.append(torch.remainder(rest, length))
            rest = torch.div(rest, length, rounding_mode="floor")
        return coords[::-1]

    def _axis_window(self, x: torch.Tensor, axis: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last key index on the dilated sub-grid (in sub-grid units) for query coord ``x``."""
        k, d, s = self.kernel_size[axis], self.dilation[axis], self.stride[axis]
        group = torch.remainder(x, d)
        size = torch.div(length - group + d - 1, d, rounding_mode="floor")
        local = torch.div(x, d, rounding_mode="floor")
        if self.causal[axis]:
            return local - (k - 1), local
        leader = torch.div(local, s, rounding_mode="floor") * s + s // 2
        leader = torch.minimum(leader, size - 1)
        start = torch.clamp(leader - k // 2, min=0)
        start = torch.minimum(start, size - k)
        return start, start + (k - 1)

    def allow(self, b, h, q, kv, shape):
        grid = self._grid(shape)
        ok = None
        for axis, (xq, xk) in enumerate(zip(self._coords(q, grid), self._coords(kv, grid))):
            d = self.dilation[axis]
            first, last = self._axis_window(xq, axis, grid[axis])
            local_k = torch.div(xk, d, rounding_mode="floor")
            axis_ok = (torch.remainder(xk - xq, d) == 0) & (local_k >= first) & (local_k <= last)
            ok = axis_ok if ok is None else ok & axis_ok
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        grid = self._grid(shape)
        if self.ndim == 1 and self.dilation[0] == 1:
            first_lo, last_lo = self._axis_window(q_lo, 0, grid[0])
            first_hi, last_hi = self._axis_window(q_hi, 0, grid[0])
            # Window ends are non-decreasing in the query coordinate.
            return (k_hi >= first_lo) & (k_lo <= last_hi), (k_lo >= first_hi) & (k_hi <= last_lo)
        q_box = self._boxes(q_lo.flatten(), q_hi.flatten(), grid)
        k_box = self._boxes(k_lo.flatten(), k_hi.flatten(), grid)
        any_ = torch.ones(q_lo.shape[0], k_lo.shape[1], dtype=torch.bool, device=q_lo.device)
        for axis in range(self.ndim):
            reach = (self.kernel_size[axis] - 1) * self.dilation[axis]
            q_min, q_max = q_box[axis]
            k_min, k_max = k_box[axis]
            any_ &= (k_max.view(1, -1) >= q_min.view(-1, 1) - reach) & (k_min.view(1, -1) <= q_max.view(-1, 1) + reach)
        axes = zip(self.kernel_size, grid, self.dilation, self.causal)
        covers = all(k == n and d == 1 and not c for k, n, d, c in axes)
        return any_, any_ & covers

    def key_table(self, shape: Shape) -> torch.Tensor:
        """``[N, prod(kernel_size)]``: each query's keys, row-major, -1 where a causal window is cut."""
        key = ("key_table", shape)
        cached = self._cache_get(key)
        if cached is not None:
            return cached
        self.check(shape)
        grid = self._grid(shape)
        table = torch.zeros((1,) * (2 * self.ndim), dtype=torch.long)
        valid = torch.ones_like(table, dtype=torch.bool)
        for axis, length in enumerate(grid):
            k, d = self.kernel_size[axis], self.dilation[axis]
            x = torch.arange(length)
            first, _ = self._axis_window(x, axis, length)
            local = first[:, None] + torch.arange(k)  # [length, k] in dilated sub-grid units
            coord = torch.remainder(x, d)[:, None] + d * local
            view = [1] * (2 * self.ndim)
            view[axis], view[self.ndim + axis] = length, k
            table = table * length + coord.view(view)
            valid = valid & (local >= 0).view(view)
        table = torch.where(valid, table, -1).reshape(math.prod(grid), math.prod(self.kernel_size))
        return self._cache_put(key, table)

    def tile_plan(self, shape: Shape, block: int = 64) -> TilePlan:
        """Spatial tiles of queries, each reading the box of keys its neighbourhoods cover.

        Per axis, queries of one dilation group are cut into runs of ``a``; a run reads the
        key range that holds its windows (``a + k - 1`` keys inside the grid, fewer at causal
        or strided tiles). ``a`` per axis minimises the estimated cost (keys computed per
        query, and the cost of small products); tiles are the products of the axis runs.
        """
        key = ("tile_plan", shape)
        cached = self._cache_get(key)
        if cached is None:
            self.check(shape)
            grid = self._grid(shape)
            makers, cands = [], []
            for axis, length in enumerate(grid):
                makers.append(lambda a, axis=axis, length=length: self._axis_tiles(axis, length, a))
                cands.append([c for c in TILE_CANDIDATES if c <= length] or [length])
            cached = self._cache_put(key, product_plan(choose_band_tile(makers, cands), grid))
        return cached

    def _axis_tiles(self, axis: int, length: int, a: int) -> AxisTiles:
        d = self.dilation[axis]
        qs, ks = [], []
        for g in range(min(d, length)):
            x = torch.arange(g, length, d)
            first, last = self._axis_window(x, axis, length)
            t = band_tiles(first, last, x.numel(), a, regular=d == 1)
            if d == 1:
                return t
            qs.append(torch.where(t.q >= 0, g + d * t.q, t.q))
            ks.append(torch.where(t.k >= 0, g + d * t.k, t.k))
        r = max(k.shape[1] for k in ks)
        ks = [torch.nn.functional.pad(k, (0, r - k.shape[1]), value=-1) for k in ks]
        return AxisTiles(torch.cat(qs), torch.cat(ks))

    def _boxes(self, lo: torch.Tensor, hi: torch.Tensor, grid: tuple[int, ...]) -> list[tuple[torch.Tensor, ...]]:
        """Per-axis (min, max) coordinate of the contiguous index ranges ``[lo, hi]`` (O(1) per range)."""
        from attnzoo.patterns.windows import grid_boxes

        return grid_boxes(lo, hi, grid)
