"""Window patterns over 1-D, 2-D and 3-D token grids: Swin / HaloNet windows and MaxViT grid groups.

Tokens are the row-major flattening of ``grid``. Both patterns are separable per axis (a key
is allowed iff it is allowed on every axis), which gives exact block bounds from per-axis
boxes and tile plans that are token permutations: windows (or grid groups) become the
tiles, so attention runs as one dense softmax per window with no wasted pair (a mask only
on the border windows of a shifted partition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape
from attnzoo.patterns.tiles import AxisTiles, TilePlan, band_tiles, product_plan

__all__ = ["GridPartition", "QuerySubset", "WindowPartition", "grid_boxes", "grid_coords", "parse_grid"]


def _ints(value: int | Sequence[int], ndim: int, name: str, minimum: int) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: expected a {kind} int or {ndim} {kind} ints, got {value!r}")
    return values


def parse_grid(grid: int | Sequence[int] | None, ndim_hint: int | None = None) -> tuple[int, ...] | None:
    """``grid`` as a tuple of 1 to 3 positive extents (None stays None)."""
    if grid is None:
        return None
    g = (grid,) if isinstance(grid, int) and not isinstance(grid, bool) else tuple(grid)
    if not 1 <= len(g) <= 3:
        raise ValueError(f"grid: expected 1, 2 or 3 axes, got {grid!r}")
    return _ints(g, len(g), "grid", 1)


def grid_coords(idx: torch.Tensor, grid: Sequence[int]) -> list[torch.Tensor]:
    """Per-axis coordinates of row-major token ids ``idx`` on ``grid``."""
    coords, rest = [], idx
    for length in reversed(grid):
        coords.append(torch.remainder(rest, length))
        rest = torch.div(rest, length, rounding_mode="floor")
    return coords[::-1]


def grid_boxes(lo: torch.Tensor, hi: torch.Tensor, grid: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-axis (min, max) coordinate bounds over each contiguous token range ``[lo, hi]`` (inclusive).

    Exact when the range does not wrap on an axis; ``(0, extent - 1)`` on the axes where it does.
    """
    out = []
    for axis, length in enumerate(grid):
        inner = math.prod(grid[axis + 1:])
        c_lo = torch.remainder(torch.div(lo, inner, rounding_mode="floor"), length)
        c_hi = torch.remainder(torch.div(hi, inner, rounding_mode="floor"), length)
        wraps = torch.div(lo, inner * length, rounding_mode="floor") != torch.div(hi, inner * length,
                                                                                    rounding_mode="floor")
        out.append((torch.where(wraps, torch.zeros_like(c_lo), c_lo),
                    torch.where(wraps, torch.full_like(c_hi, length - 1), c_hi)))
    return out


class _GridPattern(Pattern):
    """Shared plumbing of self-attention patterns over a row-major grid."""

    grid: tuple[int, ...] | None
    ndim: int

    def _grid(self, shape: Shape) -> tuple[int, ...]:
        return self.grid if self.grid is not None else (shape.n_q,)

    def check(self, shape: Shape) -> None:
        grid = self._grid(shape)
        if shape.n_q != shape.n_kv or shape.n_q != math.prod(grid):
            raise ValueError(
                f"{type(self).__name__}: grid {grid} has {math.prod(grid)} tokens but n_q={shape.n_q}, "
                f"n_kv={shape.n_kv}"
            )
        self._check_grid(grid)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _axis_allow(self, axis: int, length: int, xq: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _axis_bounds(self, axis: int, length: int, q_box, k_box) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _axis_tiles(self, axis: int, length: int) -> AxisTiles:
        raise NotImplementedError

    def allow(self, b, h, q, kv, shape):
        grid = self._grid(shape)
        ok = None
        for axis, (xq, xk) in enumerate(zip(grid_coords(q, grid), grid_coords(kv, grid))):
            axis_ok = self._axis_allow(axis, grid[axis], xq, xk)
            ok = axis_ok if ok is None else ok & axis_ok
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        grid = self._grid(shape)
        q_box = grid_boxes(q_lo, q_hi, grid)
        k_box = grid_boxes(k_lo, k_hi, grid)
        any_ = torch.ones(q_lo.shape[0], k_lo.shape[1], dtype=torch.bool, device=q_lo.device)
        all_ = any_.clone()
        for axis, length in enumerate(grid):
            a, b = self._axis_bounds(axis, length, q_box[axis], k_box[axis])
            any_ = any_ & a
            all_ = all_ & b
        return any_, all_

    def tile_plan(self, shape: Shape, block: int = 64) -> TilePlan:
        key = ("tile_plan", shape)
        cached = self._cache_get(key)
        if cached is None:
            self.check(shape)
            grid = self._grid(shape)
            axes = [self._axis_tiles(axis, length) for axis, length in enumerate(grid)]
            cached = self._cache_put(key, product_plan(axes, grid))
        return cached


class WindowPartition(_GridPattern):
    """Non-overlapping windows over a grid, with Swin's shift and HaloNet's halo.

    The grid (``(L,)``, ``(H, W)`` or ``(T, H, W)``; a 1-D pattern may omit it) is cut into
    windows of ``window`` tokens per axis (rectangular windows allowed); each window size
    must divide its axis. A query sees the keys of its own window:
    ``floor((x_q - shift) / w) == floor((x_k - shift) / w)`` on every axis.

    ``shift`` (per axis, ``0 <= shift < window``) is Swin's cyclic shift *with* its boundary
    mask, written in the original token order: windows start at ``shift + t * window`` and
    the wrapped border window splits into its two pieces (exactly what ``roll(-shift)``,
    window attention with Swin's region mask and ``roll(+shift)`` compute). ``halo``
    (per axis, HaloNet) grows the key window by ``halo`` on each side, clipped to the grid
    (keys outside the grid do not exist; HaloNet's zero-padded keys are a module option).
    Self-attention only (``n_q == n_kv == prod(grid)``).
    """

    def __init__(
        self,
        window: int | Sequence[int],
        *,
        grid: int | Sequence[int] | None = None,
        shift: int | Sequence[int] = 0,
        halo: int | Sequence[int] = 0,
    ) -> None:
        grid_t = parse_grid(grid)
        ndim = len(grid_t) if grid_t is not None else (1 if isinstance(window, int) else len(window))
        if ndim not in (1, 2, 3):
            raise ValueError(f"window: expected 1, 2 or 3 axes, got {window!r}")
        self.grid = grid_t
        self.window = _ints(window, ndim, "window", 1)
        self.shift = _ints(shift, ndim, "shift", 0)
        self.halo = _ints(halo, ndim, "halo", 0)
        for axis, (w, s) in enumerate(zip(self.window, self.shift)):
            if s >= w:
                raise ValueError(f"shift: shift {s} must be smaller than the window {w} on axis {axis}")
        if self.grid is not None:
            self._check_grid(self.grid)

    @property
    def ndim(self) -> int:
        return len(self.window)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        if len(grid) != self.ndim:
            raise ValueError(f"grid: expected {self.ndim} axes (as window {self.window}), got {grid}")
        for axis, (length, w) in enumerate(zip(grid, self.window)):
            if w > length:
                raise ValueError(f"window: window {w} is larger than the grid extent {length} on axis {axis}")
            if length % w:
                raise ValueError(f"window: window {w} does not divide the grid extent {length} on axis {axis}")

    def _wid(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.div(x - self.shift[axis], self.window[axis], rounding_mode="floor")

    def _axis_allow(self, axis, length, xq, xk):
        w, s, eta = self.window[axis], self.shift[axis], self.halo[axis]
        wid = self._wid(xq, axis)
        if eta == 0:
            return wid == self._wid(xk, axis)
        start = wid * w + s
        return (xk >= start - eta) & (xk <= start + (w - 1) + eta)

    def _axis_bounds(self, axis, length, q_box, k_box):
        w, s, eta = self.window[axis], self.shift[axis], self.halo[axis]
        (qa, qb), (ka, kb) = q_box, k_box
        ida, idb = self._wid(qa, axis), self._wid(qb, axis)
        lo = (ida * w + s - eta).view(-1, 1)
        hi = (idb * w + s + w - 1 + eta).view(-1, 1)
        any_ = (kb.view(1, -1) >= lo) & (ka.view(1, -1) <= hi)
        all_ = (ida == idb).view(-1, 1) & (ka.view(1, -1) >= lo) & (kb.view(1, -1) <= hi)
        return any_, all_

    def _axis_tiles(self, axis: int, length: int) -> AxisTiles:
        w, s, eta = self.window[axis], self.shift[axis], self.halo[axis]
        if s == 0:
            x = torch.arange(length)
            start = torch.div(x, w, rounding_mode="floor") * w
            return band_tiles(start - eta, start + w - 1 + eta, length, w)
        # Swin's rolled order: tile t holds rolled positions [t*w, (t+1)*w), i.e. x = (p + s) mod L.
        q = torch.remainder(torch.arange(length) + s, length).view(length // w, w)
        keys = []
        for row in q:
            ids = sorted(set(self._wid(row, axis).tolist()))
            parts = [torch.arange(max(0, i * w + s - eta), min(length, i * w + s + w + eta)) for i in ids]
            keys.append(torch.cat(parts).unique())  # the two pieces' halos may overlap: each key once
        r = max(k.numel() for k in keys)
        k = torch.stack([torch.nn.functional.pad(t, (0, r - t.numel()), value=-1) for t in keys])
        return AxisTiles(q, k)


class GridPartition(_GridPattern):
    """MaxViT grid attention: a query sees the keys congruent to it modulo ``extent / cells`` on every axis.

    With ``cells`` ``G`` per axis the map of extent ``L`` is viewed as ``(G, L/G)`` and
    attention runs over the ``G`` axis: each group has ``G`` tokens spaced ``L/G`` apart (a
    dilated, global window). ``cells = L`` gives full attention. ``cells`` must divide
    each extent. Self-attention only.
    """

    def __init__(self, cells: int | Sequence[int], *, grid: int | Sequence[int] | None = None) -> None:
        grid_t = parse_grid(grid)
        ndim = len(grid_t) if grid_t is not None else (1 if isinstance(cells, int) else len(cells))
        if ndim not in (1, 2, 3):
            raise ValueError(f"cells: expected 1, 2 or 3 axes, got {cells!r}")
        self.grid = grid_t
        self.cells = _ints(cells, ndim, "cells", 1)
        if self.grid is not None:
            self._check_grid(self.grid)

    @property
    def ndim(self) -> int:
        return len(self.cells)

    def _check_grid(self, grid: tuple[int, ...]) -> None:
        if len(grid) != self.ndim:
            raise ValueError(f"grid: expected {self.ndim} axes (as cells {self.cells}), got {grid}")
        for axis, (length, g) in enumerate(zip(grid, self.cells)):
            if g > length:
                raise ValueError(f"cells: {g} grid cells are more than the grid extent {length} on axis {axis}")
            if length % g:
                raise ValueError(f"cells: {g} grid cells do not divide the grid extent {length} on axis {axis}")

    def _axis_allow(self, axis, length, xq, xk):
        period = length // self.cells[axis]
        return torch.remainder(xq - xk, period) == 0

    def _axis_bounds(self, axis, length, q_box, k_box):
        period = length // self.cells[axis]
        (qa, qb), (ka, kb) = q_box, k_box
        lo = ka.view(1, -1) - qb.view(-1, 1)  # differences xk - xq range over [lo, hi]
        hi = kb.view(1, -1) - qa.view(-1, 1)
        any_ = torch.div(hi, period, rounding_mode="floor") * period >= lo
        if period == 1:
            return any_, torch.ones_like(any_)
        all_ = (lo == hi) & (torch.remainder(lo, period) == 0)
        return any_, all_

    def _axis_tiles(self, axis: int, length: int) -> AxisTiles:
        period = length // self.cells[axis]
        members = torch.arange(period).view(-1, 1) + period * torch.arange(self.cells[axis]).view(1, -1)
        return AxisTiles(members, members.clone())


class QuerySubset(Pattern):
    """``inner`` evaluated at a subset of its query positions: query ``q`` is position ``positions[q]``.

    For strided outputs (TiC MSA-Conv: neighbourhood attention at every ``output_stride``-th
    position). ``positions`` (int ``[n_q]``, increasing) index the ``n_kv`` tokens ``inner``
    is defined on (a self-attention pattern over ``n_kv`` tokens).
    """

    def __init__(self, inner: Pattern, positions: torch.Tensor) -> None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype.is_floating_point:
            got = getattr(positions, "shape", positions)
            raise ValueError(f"positions: expected an integer tensor [n_q], got {got}")
        if positions.numel() > 1 and bool((positions[1:] <= positions[:-1]).any()):
            raise ValueError("positions: expected increasing query positions")
        self.inner = inner
        self.positions = positions.long()
        self.per_batch, self.per_head = inner.per_batch, inner.per_head

    def _inner_shape(self, shape: Shape) -> Shape:
        return Shape(shape.batch, shape.heads, shape.n_kv, shape.n_kv)

    def check(self, shape: Shape) -> None:
        if shape.n_q != self.positions.numel():
            raise ValueError(f"QuerySubset: {self.positions.numel()} query positions but n_q={shape.n_q}")
        if int(self.positions.max()) >= shape.n_kv or int(self.positions.min()) < 0:
            raise ValueError(f"positions: must lie in [0, {shape.n_kv}), got [{int(self.positions.min())}, "
                             f"{int(self.positions.max())}]")
        self.inner.check(self._inner_shape(shape))

    def _pos(self, device: torch.device) -> torch.Tensor:
        key = ("positions", str(device))
        t = self._cache_get(key)
        if t is None:
            t = self._cache_put(key, self.positions.to(device))
        return t

    def allow(self, b, h, q, kv, shape):
        return self.inner.allow(b, h, self._pos(q.device)[q], kv, self._inner_shape(shape))

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        pos = self._pos(q_lo.device)
        return self.inner.bounds(pos[q_lo], pos[q_hi], k_lo, k_hi, self._inner_shape(shape))
