"""A pattern or score modifier of the whole sequence, read on one block of it (global positions).

Local query ``i`` of the block is global position ``q_start + i`` and local key ``j`` is
``k_start + j``; the wrapped rule is evaluated with those positions and the global shape, so
``Causal``, ``SlidingWindow``, ``Document``, ``KeyPadding`` of the full sequence (and any
composition) apply to a block exactly as they do to the whole.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.ops.layout import EMPTY, FULL, Shape
from attnzoo.ops.score_mod import ScoreMod
from attnzoo.patterns.base import Pattern

__all__ = ["BlockOfPattern", "BlockOfScoreMod", "pattern_block", "score_mod_block"]


class BlockOfPattern(Pattern):
    """``inner`` (a pattern of ``global_shape``) on the block starting at ``(q_start, k_start)``."""

    def __init__(self, inner: Pattern, global_shape: Shape, q_start: int, k_start: int) -> None:
        self.inner, self.global_shape, self.q_start, self.k_start = inner, global_shape, q_start, k_start
        self.per_batch = bool(getattr(inner, "per_batch", False))
        self.per_head = bool(getattr(inner, "per_head", False))

    def allow(self, b, h, q, kv, shape):
        return self.inner.allow(b, h, q + self.q_start, kv + self.k_start, self.global_shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        # Read the classification off the global layout at the same block sizes, when the local blocks
        # start on global block boundaries (each local block then lies inside one global block).
        bq, bk = int(q_hi.flatten()[0] - q_lo.flatten()[0]) + 1, int(k_hi.flatten()[0] - k_lo.flatten()[0]) + 1
        gq_lo, gk_lo = q_lo + self.q_start, k_lo + self.k_start
        if bool((gq_lo % bq).any()) or bool((gk_lo % bk).any()):
            return None  # misaligned: the backend evaluates the tiles
        state = self.inner.block_layout(self.global_shape, bq, bk, q_lo.device).state
        sub = state[:, :, (gq_lo // bq).view(-1)][:, :, :, (gk_lo // bk).view(-1)]
        return sub != EMPTY, sub == FULL

    def __repr__(self) -> str:
        return f"BlockOfPattern({self.inner!r}, q_start={self.q_start}, k_start={self.k_start})"


class BlockOfScoreMod(ScoreMod):
    """``inner`` (a modifier of ``global_shape``) on the block starting at ``(q_start, k_start)``."""

    def __init__(self, inner: ScoreMod, global_shape: Shape, q_start: int, k_start: int) -> None:
        self.inner, self.global_shape, self.q_start, self.k_start = inner, global_shape, q_start, k_start
        self.per_batch = bool(getattr(inner, "per_batch", False))
        self.per_head = bool(getattr(inner, "per_head", False))
        self.additive = bool(getattr(inner, "additive", False))

    def __call__(self, score, b, h, q, kv, shape):
        return self.inner(score, b, h, q + self.q_start, kv + self.k_start, self.global_shape)

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()


def _cached(owner: Any, key: tuple, build: Any) -> Any:
    cache = owner.__dict__.setdefault("_attnzoo_cache", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def pattern_block(pattern: Pattern, global_shape: Shape, q_start: int, k_start: int) -> BlockOfPattern:
    """The (cached) view of ``pattern`` on the block at ``(q_start, k_start)``: its block layouts are kept."""
    return _cached(pattern, ("block_of", global_shape, q_start, k_start),
                   lambda: BlockOfPattern(pattern, global_shape, q_start, k_start))


def score_mod_block(mod: ScoreMod, global_shape: Shape, q_start: int, k_start: int) -> BlockOfScoreMod:
    """The (cached) view of ``mod`` on the block at ``(q_start, k_start)``."""
    return _cached(mod, ("block_of", global_shape, q_start, k_start),
                   lambda: BlockOfScoreMod(mod, global_shape, q_start, k_start))
