"""Tile plans: the exact, regular structure of windowed patterns, for the chunked backend.

A :class:`TilePlan` groups the queries into tiles and gives, per tile, one fixed list of
keys that holds every key any query of the tile may see. The ``blocksparse`` backend then
gathers each tile's queries and keys once and runs one dense (masked) softmax per tile,
with the exact mask evaluated from the pattern's ``allow`` on the tile's indices. Plans are
derived from the pattern's structure (window arithmetic per axis), never from an N x N mask.

Grid patterns are separable per axis (a key is allowed iff it is allowed on every axis), so
their plans are Cartesian products of per-axis tilings (:func:`product_plan`): a 2-D
neighbourhood becomes spatial tiles of ``a x b`` queries reading an ``(a+k-1) x (b+k-1)``
key box; Swin windows become a token permutation into windows (block-diagonal); MaxViT grid
attention becomes a permutation into its dilated groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AxisTiles", "TilePlan", "band_tiles", "choose_band_tile", "product_plan", "tile_cost"]


@dataclass(frozen=True)
class TilePlan:
    """Query tiles and the keys each tile reads.

    ``q_index``: ``[T, bq]`` query ids (``-1``: empty slot); every query appears at most
    once. A query in no tile sees no key. ``kv_index``: ``[T, R]`` key ids (``-1``: empty
    slot), no id twice in a row; for each query of tile ``t`` every key it may attend is in
    ``kv_index[t]``. ``strided``: ``(start, step)`` when ``kv_index[t, r] = start + t*step + r``
    wherever that id is in ``[0, n_kv)`` (and ``-1`` elsewhere): keys can then be read as
    overlapping strided views, without a gather. ``grid_perm``: ``(grid, ((T, a, strided), ...))``
    when ``q_index == kv_index`` is a pure axis permutation of the row-major grid (each axis
    cut into ``T`` tiles of ``a`` consecutive tokens, or, ``strided``, of ``a`` tokens ``T``
    apart): tiles are then a reshape and permute of the tokens, without an index gather.
    """

    q_index: torch.Tensor
    kv_index: torch.Tensor
    strided: tuple[int, int] | None = None
    grid_perm: tuple[tuple[int, ...], tuple[tuple[int, int, bool], ...]] | None = None

    @property
    def tiles(self) -> int:
        return self.q_index.shape[0]

    @property
    def computed_pairs(self) -> int:
        """(query slot, key slot) pairs the chunked path computes: ``T * bq * R``."""
        return self.q_index.numel() * self.kv_index.shape[1]

    def to(self, device: torch.device | str) -> TilePlan:
        return TilePlan(self.q_index.to(device), self.kv_index.to(device), self.strided, self.grid_perm)


@dataclass(frozen=True)
class AxisTiles:
    """A tiling of one grid axis: ``q [T, a]`` query coordinates and ``k [T, R]`` key coordinates (-1 pads)."""

    q: torch.Tensor
    k: torch.Tensor
    strided: tuple[int, int] | None = None


def band_tiles(first: torch.Tensor, last: torch.Tensor, n_kv: int, a: int, regular: bool = True) -> AxisTiles:
    """Tile queries ``0..n_q-1`` in runs of ``a``; query ``i`` sees keys in ``[first[i], last[i]]``.

    Each tile reads one contiguous key range holding the union of its queries' ranges. With
    ``regular``, the ranges start at ``start + t * a`` (a strided layout) when that costs no
    more than 1/8 extra keys over the tightest ranges.
    """
    n_q = first.numel()
    first = first.clamp(min=0)
    last = last.clamp(max=n_kv - 1)
    t_count = math.ceil(n_q / a)
    pad = t_count * a - n_q
    q = torch.arange(t_count * a)
    q = torch.where(q < n_q, q, torch.full_like(q, -1)).view(t_count, a)
    big = torch.iinfo(torch.long).max // 4
    lo = torch.nn.functional.pad(first, (0, pad), value=big).view(t_count, a).amin(-1)
    hi = torch.nn.functional.pad(last, (0, pad), value=-big).view(t_count, a).amax(-1)
    empty = hi < lo
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, lo - 1, hi)
    span = int((hi - lo + 1).max()) if t_count else 0
    span = max(span, 1)
    if regular and t_count > 1:
        steps = torch.arange(t_count) * a
        live = ~empty
        start = int((lo - steps)[live].min()) if bool(live.any()) else 0
        reg_span = int((hi - (start + steps) + 1)[live].max()) if bool(live.any()) else 1
        if reg_span * 8 <= span * 9:
            keys = start + steps.view(-1, 1) + torch.arange(reg_span).view(1, -1)
            k = torch.where((keys >= 0) & (keys < n_kv), keys, torch.full_like(keys, -1))
            return AxisTiles(q, k, (start, a))
    # Tight ranges, shifted inside [0, n_kv) so that every tile reads `span` real keys when it can.
    start = torch.minimum(lo, torch.full_like(lo, max(n_kv - span, 0)))
    keys = start.view(-1, 1) + torch.arange(span).view(1, -1)
    k = torch.where(keys < n_kv, keys, torch.full_like(keys, -1))
    return AxisTiles(q, k)


def product_plan(axes: Sequence[AxisTiles], grid: Sequence[int]) -> TilePlan:
    """The N-D plan whose tiles are products of per-axis tiles (row-major token ids)."""
    strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]
    q_index = torch.zeros(1, 1, dtype=torch.long)
    kv_index = torch.zeros(1, 1, dtype=torch.long)
    q_bad = torch.zeros(1, 1, dtype=torch.bool)
    k_bad = torch.zeros(1, 1, dtype=torch.bool)
    for ax, stride in zip(axes, strides):
        tq, a = ax.q.shape
        tk, r = ax.k.shape
        # tiles: outer product; slots: outer product
        q_index = (q_index.view(-1, 1, q_index.shape[1], 1) + (ax.q * stride).view(1, tq, 1, a)).reshape(
            -1, q_index.shape[1] * a)
        q_bad = (q_bad.view(-1, 1, q_bad.shape[1], 1) | (ax.q < 0).view(1, tq, 1, a)).reshape(-1, q_bad.shape[1] * a)
        kv_index = (kv_index.view(-1, 1, kv_index.shape[1], 1) + (ax.k * stride).view(1, tk, 1, r)).reshape(
            -1, kv_index.shape[1] * r)
        k_bad = (k_bad.view(-1, 1, k_bad.shape[1], 1) | (ax.k < 0).view(1, tk, 1, r)).reshape(-1, k_bad.shape[1] * r)
    q_index = torch.where(q_bad, torch.full_like(q_index, -1), q_index)
    kv_index = torch.where(k_bad, torch.full_like(kv_index, -1), kv_index)
    strided = axes[0].strided if len(axes) == 1 else None
    perm = [_axis_permutation(ax, n) for ax, n in zip(axes, grid)]
    grid_perm = (tuple(grid), tuple(perm)) if all(p is not None for p in perm) else None  # type: ignore[misc]
    return TilePlan(q_index, kv_index, strided, grid_perm)


def _axis_permutation(ax: AxisTiles, length: int) -> tuple[int, int, bool] | None:
    """``(T, a, strided)`` when the axis tiling is a pure reshape of ``0..length-1`` with equal query and key tiles."""
    t, a = ax.q.shape
    if t * a != length or ax.k.shape != ax.q.shape or not torch.equal(ax.q, ax.k):
        return None
    idx = torch.arange(length)
    if torch.equal(ax.q, idx.view(t, a)):
        return (t, a, False)
    if torch.equal(ax.q, idx.view(a, t).t()):
        return (t, a, True)
    return None


def tile_cost(queries_per_tile: int, keys_per_tile: int) -> float:
    """Relative CPU cost of one (query, key) pair computed in a tile (a fit of measured timings).

    Small tiles run small matrix products: per-pair cost ~ ``1 + 11 / queries`` (1 at large tiles).
    """
    return 1.0 + 11.0 / max(queries_per_tile, 1) + 2.0 / max(keys_per_tile, 1)


def choose_band_tile(
    axes: Sequence[Callable[[int], AxisTiles]], candidates: Sequence[Sequence[int]], max_queries: int = 256
) -> list[AxisTiles]:
    """Per-axis tile sizes minimising the estimated cost: pairs computed per query x per-pair cost."""
    built = [{a: make(a) for a in cands} for make, cands in zip(axes, candidates)]
    best, best_cost = None, math.inf
    for combo in _product([list(b) for b in built]):
        qn = math.prod(combo)
        if qn > max_queries and best is not None:
            continue
        tiles = [built[i][a] for i, a in enumerate(combo)]
        keys = math.prod(t.k.shape[1] for t in tiles)
        slots = math.prod(t.q.numel() for t in tiles)
        cost = slots * keys * tile_cost(qn, keys)
        if cost < best_cost:
            best, best_cost = tiles, cost
    assert best is not None
    return best


def _product(lists: list[list[int]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for items in lists:
        out = [o + (i,) for o in out for i in items]
    return out
