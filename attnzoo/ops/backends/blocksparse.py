"""Chunked block-sparse attention in plain PyTorch: visits only a pattern's active blocks.

Query blocks are grouped into buckets that visit the same number ``K`` of key blocks; a
chunk of query blocks gathers its ``K`` key blocks and runs one batched softmax over them.
The backward is FlashAttention-style: it saves only ``q, k, v, out, lse`` and recomputes
each chunk's scores, so memory stays linear in N for a fixed window, on any device.

Patterns with a regular structure (sliding windows, neighbourhoods, Swin windows, MaxViT
axes) give a *tile plan* instead (``pattern.tile_plan(shape, block)``, see
:mod:`attnzoo.patterns.tiles`): query tiles, each with one fixed list of keys. On CPU those
run on our compiled tile kernels where :func:`attnzoo.ops.backends.tile_native.why_not`
allows (rows read and written in place); otherwise on the tiled path below: gather each
tile's queries and keys once (overlapping strided views for 1-D bands, no copy), one masked
softmax per tile (on CPU the fused flash kernel of PyTorch for the forward), and a chunked
recomputing backward sized to stay in cache.
"""

from __future__ import annotations

import math

import torch

from attnzoo.ops.backends import tile_native
from attnzoo.ops.backends.base import Backend, Result, compute_dtype
from attnzoo.ops.backends.blocksparse_layout import BlockSparseFn, LayoutPlan, tile_masks
from attnzoo.ops.backends.blocksparse_tiles import TileFn, Tiles
from attnzoo.ops.layout import FULL, BlockLayout, Shape
from attnzoo.ops.problem import Problem


def default_block(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 64


def full_layout(shape: Shape, block: int, device: torch.device) -> BlockLayout:
    nqb, nkb = math.ceil(shape.n_q / block), math.ceil(shape.n_kv / block)
    state = torch.full((1, 1, nqb, nkb), FULL, dtype=torch.int8, device=device)
    return BlockLayout.from_state(state, block, block, shape.n_q, shape.n_kv)


class BlockSparse(Backend):
    """Runs any pattern and score modifier, forward and backward, on any device."""

    name = "blocksparse"

    def __init__(self, block: int | None = None) -> None:
        self.block = block

    def why_not(self, p: Problem) -> str | None:
        if p.return_weights:
            return "blocksparse never materialises the attention weights"
        return None

    def layout(self, p: Problem) -> BlockLayout:
        block = self.block or default_block(p.device)
        if p.pattern is None:
            return full_layout(p.shape, block, p.device)
        return p.pattern.block_layout(p.shape, block, block, device=p.device)

    def work_fraction(self, p: Problem) -> float:
        """Fraction of the ``n_q x n_kv`` pairs this backend computes: its block layout's active
        tiles, or its tile plan's slots when that is smaller (e.g. MaxViT grid groups, which
        touch every row-major block but only ``G^2`` keys per query)."""
        fraction = self.layout(p).active_fraction
        plan_fn = getattr(p.pattern, "tile_plan", None)
        plan = plan_fn(p.shape, self.block or default_block(p.device)) if plan_fn is not None else None
        if plan is not None:
            fraction = min(fraction, plan.computed_pairs / (p.shape.n_q * p.shape.n_kv))
        return fraction

    def tiles(self, p: Problem) -> Tiles | None:
        """The tiled plan of this problem, or None when the pattern has no tile plan."""
        plan_fn = getattr(p.pattern, "tile_plan", None)
        if plan_fn is None:
            return None
        plan = plan_fn(p.shape, self.block or default_block(p.device))
        if plan is None:
            return None
        return Tiles.build(p, plan)

    def path(self, p: Problem) -> str:
        """How :meth:`run` computes ``p``: its tile plan on the compiled tile kernels or on PyTorch ops (and why
        not the kernels), or the pattern's block layout."""
        tiles = self.tiles(p)
        if tiles is None:
            return "the pattern's block layout (it has no tile plan for this shape)"
        dtype = compute_dtype(p.q.dtype)
        reason = tile_native.why_not(tiles, p.q.to(dtype), p.v.to(dtype))
        if reason is None:
            return "its tile plan on the compiled tile kernel"
        return f"its tile plan on PyTorch ops (not the compiled tile kernel: {reason})"

    def run(self, p: Problem) -> Result:
        dtype = compute_dtype(p.q.dtype)
        tiles = self.tiles(p)
        if tiles is not None:
            mod_tensors = p.score_mod.tensors() if p.score_mod is not None else []
            q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))
            if tile_native.why_not(tiles, q, v) is None:
                out, lse = tile_native.attention(tiles, q, k, v, p.scale, p.needs_grad)
            else:
                out, lse = TileFn.apply(tiles, not p.return_lse, q, k, v, *mod_tensors)
            return Result(out.to(p.q.dtype), None, lse if p.return_lse else None)
        layout = self.layout(p)
        plan = LayoutPlan(layout, p.pattern, p.score_mod, p.shape, p.scale, p.groups, [])
        plan.masks = tile_masks(plan, p.device) if p.pattern is not None else [None] * len(layout.buckets)
        mod_tensors = p.score_mod.tensors() if p.score_mod is not None else []
        q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))
        out, lse = BlockSparseFn.apply(plan, q, k, v, *mod_tensors)
        return Result(out.to(p.q.dtype), None, lse if p.return_lse else None)
