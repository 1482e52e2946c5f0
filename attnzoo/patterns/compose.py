"""Composition of patterns: ``&``, ``|``, ``~`` and per-head patterns."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape, _as_pattern


class And(Pattern):
    """Allowed where both patterns allow."""

    def __init__(self, a: Pattern, b: Pattern) -> None:
        self.a, self.b = _as_pattern(a, "a"), _as_pattern(b, "b")
        self.per_batch = a.per_batch or b.per_batch
        self.per_head = a.per_head or b.per_head

    def allow(self, b, h, q, kv, shape):
        return self.a.allow(b, h, q, kv, shape) & self.b.allow(b, h, q, kv, shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        ba, bb = self.a.bounds(q_lo, q_hi, k_lo, k_hi, shape), self.b.bounds(q_lo, q_hi, k_lo, k_hi, shape)
        if ba is None or bb is None:
            return None
        return ba[0] & bb[0], ba[1] & bb[1]

    def tile_plan(self, shape: Shape, block: int = 64):
        """The cheaper tile plan of the two sides (either holds every pair the conjunction allows)."""
        plans = [p for p in (self.a.tile_plan(shape, block), self.b.tile_plan(shape, block)) if p is not None]
        return min(plans, key=lambda p: p.computed_pairs) if plans else None

    def check(self, shape: Shape) -> None:
        self.a.check(shape)
        self.b.check(shape)

    def key_table(self, shape: Shape) -> torch.Tensor | None:
        """A side's key table with the entries the other side forbids set to -1 (the narrower of the
        two when both sides have one; the side's own table when nothing is forbidden); None when
        neither has one or a side depends on batch or head. Cached on the side when the other side
        has a :meth:`value_key` (compositions rebuilt on every call, e.g. ``user & Causal()``)."""
        if self.per_batch or self.per_head:
            return None
        cached = self._cache_get(("key_table", shape))
        if cached is not None:
            return cached
        tables = [t for t in (_restricted(self.a, self.b, shape), _restricted(self.b, self.a, shape)) if t is not None]
        if not tables:
            return None
        return self._cache_put(("key_table", shape), min(tables, key=lambda t: t.shape[1]))

    def key_padding(self) -> tuple[Pattern | None, torch.Tensor] | None:
        sa, sb = self.a.key_padding(), self.b.key_padding()
        if sa is not None and sb is not None:
            return _and_or_none(sa[0], sb[0]), sa[1] & sb[1]
        if sa is not None and not self.b.per_batch:
            return _and_or_none(sa[0], self.b), sa[1]
        if sb is not None and not self.a.per_batch:
            return _and_or_none(self.a, sb[0]), sb[1]
        return None


def _restricted(x: Pattern, y: Pattern, shape: Shape) -> torch.Tensor | None:
    """``x``'s key table with the pairs ``y`` forbids set to -1 (None if ``x`` has no table)."""
    token = y.value_key()
    key = ("key_table_and", shape, token)
    if token is not None:
        cached = x._cache_get(key)
        if cached is not None:
            return cached
    t = x.key_table(shape)
    if t is None:
        return None
    zero = torch.zeros(1, dtype=torch.long)
    keep = y.allow(zero, zero, torch.arange(shape.n_q)[:, None], t.clamp(min=0), shape) & (t >= 0)
    out = t if bool((keep == (t >= 0)).all()) else torch.where(keep, t, -1)
    return x._cache_put(key, out) if token is not None else out


def _and_or_none(a: Pattern | None, b: Pattern | None) -> Pattern | None:
    if a is None or b is None:
        return a if b is None else b
    return And(a, b)


class Or(Pattern):
    """Allowed where either pattern allows."""

    def __init__(self, a: Pattern, b: Pattern) -> None:
        self.a, self.b = _as_pattern(a, "a"), _as_pattern(b, "b")
        self.per_batch = a.per_batch or b.per_batch
        self.per_head = a.per_head or b.per_head

    def allow(self, b, h, q, kv, shape):
        return self.a.allow(b, h, q, kv, shape) | self.b.allow(b, h, q, kv, shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        ba, bb = self.a.bounds(q_lo, q_hi, k_lo, k_hi, shape), self.b.bounds(q_lo, q_hi, k_lo, k_hi, shape)
        if ba is None or bb is None:
            return None
        return ba[0] | bb[0], ba[1] | bb[1]

    def check(self, shape: Shape) -> None:
        self.a.check(shape)
        self.b.check(shape)


class Not(Pattern):
    """Allowed where the pattern forbids."""

    def __init__(self, a: Pattern) -> None:
        self.a = _as_pattern(a, "a")
        self.per_batch, self.per_head = a.per_batch, a.per_head

    def allow(self, b, h, q, kv, shape):
        return ~self.a.allow(b, h, q, kv, shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        inner = self.a.bounds(q_lo, q_hi, k_lo, k_hi, shape)
        if inner is None:
            return None
        return ~inner[1], ~inner[0]

    def check(self, shape: Shape) -> None:
        self.a.check(shape)


class PerHead(Pattern):
    """One pattern per head group: head ``h`` uses ``patterns[h // (H // len(patterns))]``.

    ``len(patterns)`` must divide the number of query heads.
    """

    per_head = True

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        if len(patterns) == 0:
            raise ValueError("patterns: expected at least one pattern, got an empty list")
        self.patterns = tuple(_as_pattern(p, f"patterns[{i}]") for i, p in enumerate(patterns))
        self.per_batch = any(p.per_batch for p in self.patterns)

    def _group(self, h: torch.Tensor, shape: Shape) -> torch.Tensor:
        return h // (shape.heads // len(self.patterns))

    def allow(self, b, h, q, kv, shape):
        group = self._group(h, shape)
        out = self.patterns[0].allow(b, h, q, kv, shape)
        for i, p in enumerate(self.patterns[1:], start=1):
            out = torch.where(group == i, p.allow(b, h, q, kv, shape), out)
        return out

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        parts = [p.bounds(q_lo, q_hi, k_lo, k_hi, shape) for p in self.patterns]
        if any(p is None for p in parts):
            return None
        group = self._group(torch.arange(shape.heads, device=q_lo.device), shape).view(1, -1, 1, 1)
        any_, all_ = parts[0]
        for i, (part_any, part_all) in enumerate(parts[1:], start=1):
            any_ = torch.where(group == i, part_any, any_)
            all_ = torch.where(group == i, part_all, all_)
        return any_, all_

    def check(self, shape: Shape) -> None:
        if shape.heads % len(self.patterns):
            raise ValueError(
                f"patterns: {len(self.patterns)} per-head patterns must divide the number of heads, "
                f"got heads={shape.heads}"
            )
        for p in self.patterns:
            p.check(shape)

