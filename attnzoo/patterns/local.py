"""Static 1-D sparse patterns: segment masks, per-head context shards (S2-Attention), shifted
group attention with sinks (SinkLoRA), and MoA's length-dependent per-head windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape
from attnzoo.patterns.masks import SlidingWindow
from attnzoo.patterns.tiles import TilePlan

__all__ = ["ElasticWindow", "HeadSharded", "SegmentMask", "ShiftedGroups"]


def _off(offset: int | None, shape: Shape) -> int:
    return shape.offset if offset is None else offset


def _block_minmax(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``values [X, L]`` over the token ranges ``[lo, hi]`` (uniform blocks, the last ragged)."""
    lo, hi = lo.flatten(), hi.flatten()
    block = int(hi[0] - lo[0] + 1)
    n = values.shape[-1]
    nb = lo.numel()
    pad = nb * block - n
    big = torch.iinfo(torch.long).max // 4
    v = values.long()
    mins = torch.nn.functional.pad(v, (0, pad), value=big).view(values.shape[0], nb, block).amin(-1)
    maxs = torch.nn.functional.pad(v, (0, pad), value=-big).view(values.shape[0], nb, block).amax(-1)
    return mins, maxs


def _token_flags(value: int | torch.Tensor | None, name: str) -> torch.Tensor | None:
    """``None``, the first ``n`` tokens (int), or a bool tensor ``[N]`` / ``[B, N]``."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative int or a bool tensor [N] or [B, N], got {value}")
        return torch.tensor([value])  # resolved against the length later
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() in (1, 2):
        return value
    got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
    raise ValueError(f"{name}: expected a non-negative int or a bool tensor [N] or [B, N], got {got}")


class SegmentMask(Pattern):
    """Segment mask: same segment, or a global key, or a global query; optionally causal.

    ``allow(i, j) = [seg_i == seg_j] or global_key[j] or global_query[i]`` (``and j <= i``
    when ``causal``). ``ids``: segment id per token, ``[N]`` or ``[B, N]`` (any integers;
    packed documents, LAIT segments, BlockRank blocks). ``global_keys`` / ``global_queries``:
    an int (the first ``n`` tokens) or a bool tensor ``[N]`` / ``[B, N]`` (BlockRank: the
    instruction is a global key, the query tokens are global queries). Ids cover the keys;
    with fewer queries than keys (KV cache) queries are the last ``n_q`` tokens.
    """

    def __init__(
        self,
        ids: Sequence[int] | torch.Tensor,
        *,
        global_keys: int | torch.Tensor | None = None,
        global_queries: int | torch.Tensor | None = None,
        causal: bool = False,
        offset: int | None = None,
    ) -> None:
        ids_t = torch.as_tensor(ids)
        bad_type = ids_t.dtype.is_floating_point or ids_t.dtype == torch.bool
        if ids_t.dim() not in (1, 2) or ids_t.numel() == 0 or bad_type:
            raise ValueError(f"ids: expected integer segment ids [N] or [B, N], got {getattr(ids, 'shape', ids)}")
        self.ids = ids_t.long()
        self.global_keys = _token_flags(global_keys, "global_keys")
        self.global_queries = _token_flags(global_queries, "global_queries")
        self.causal = bool(causal)
        self.offset = offset
        self.per_batch = any(t is not None and t.dim() == 2 for t in (self.ids, self.global_keys, self.global_queries))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], **kwargs) -> SegmentMask:
        """Segments of the given lengths (segment ``s`` is ``lengths[s]`` consecutive tokens)."""
        lengths_t = torch.as_tensor(lengths)
        if lengths_t.dim() != 1 or lengths_t.numel() == 0 or (lengths_t < 0).any():
            raise ValueError(f"lengths: expected a non-empty list of non-negative ints, got {list(lengths)}")
        return cls(torch.repeat_interleave(torch.arange(len(lengths_t)), lengths_t), **kwargs)

    @property
    def length(self) -> int:
        return self.ids.shape[-1]

    def check(self, shape: Shape) -> None:
        n = self.length
        if shape.n_kv != n or shape.n_q > n:
            raise ValueError(f"SegmentMask: ids cover {n} tokens but the problem has n_q={shape.n_q}, "
                             f"n_kv={shape.n_kv}")
        for name, t in (("ids", self.ids), ("global_keys", self.global_keys), ("global_queries", self.global_queries)):
            if t is None or t.dtype != torch.bool and name != "ids":
                continue
            if t.dim() == 2 and t.shape[0] != shape.batch:
                raise ValueError(f"{name}: has batch {t.shape[0]}, expected {shape.batch}")
            if t.shape[-1] != n:
                raise ValueError(f"{name}: covers {t.shape[-1]} tokens, expected {n} (the length of ids)")

    def _table(self, name: str, device: torch.device) -> torch.Tensor | None:
        t = getattr(self, name)
        if t is None:
            return None
        key = (name, str(device))
        out = self._cache_get(key)
        if out is None:
            if name != "ids" and t.dtype != torch.bool:  # int n: the first n tokens
                t = torch.arange(self.length) < int(t[0])
            out = self._cache_put(key, t.to(device))
        return out

    @staticmethod
    def _at(table: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return table[b, pos] if table.dim() == 2 else table[pos]

    def allow(self, b, h, q, kv, shape):
        dev = q.device if isinstance(q, torch.Tensor) else None
        i = q + _off(self.offset, shape)
        ids = self._table("ids", dev)
        ok = self._at(ids, b, i) == self._at(ids, b, kv)
        gk, gq = self._table("global_keys", dev), self._table("global_queries", dev)
        if gk is not None:
            ok = ok | self._at(gk, b, kv)
        if gq is not None:
            ok = ok | self._at(gq, b, i)
        if self.causal:
            ok = ok & (kv <= i)
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        dev = q_lo.device
        off = _off(self.offset, shape)
        n = self.length

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if t.dim() == 2 else t.view(1, -1)

        ids = rows(self._table("ids", dev))
        # Query blocks are ranges of query positions i = q + off; pad the id table so they index it.
        q_min, q_max = _block_minmax(ids[:, off:] if off >= 0 else ids, q_lo, q_hi)
        k_min, k_max = _block_minmax(ids, k_lo, k_hi)
        any_ = (q_min.unsqueeze(-1) <= k_max.unsqueeze(-2)) & (k_min.unsqueeze(-2) <= q_max.unsqueeze(-1))
        all_ = (q_min == q_max).unsqueeze(-1) & (k_min == k_max).unsqueeze(-2) & (
            q_min.unsqueeze(-1) == k_min.unsqueeze(-2))
        for name, is_key in (("global_keys", True), ("global_queries", False)):
            t = self._table(name, dev)
            if t is None:
                continue
            t = rows(t).long()
            if is_key:
                lo_, hi_ = _block_minmax(t, k_lo, k_hi)
                any_ = any_ | (hi_ == 1).unsqueeze(-2)
                all_ = all_ | (lo_ == 1).unsqueeze(-2)
            else:
                lo_, hi_ = _block_minmax(t[:, off:] if off >= 0 else t, q_lo, q_hi)
                any_ = any_ | (hi_ == 1).unsqueeze(-1)
                all_ = all_ | (lo_ == 1).unsqueeze(-1)
        any_, all_ = any_.unsqueeze(1), all_.unsqueeze(1)  # [B', 1, nqb, nkb]
        del n
        if self.causal:
            any_ = any_ & (k_lo <= q_hi + off)
            all_ = all_ & (k_hi <= q_lo + off)
        return any_, all_


class HeadSharded(Pattern):
    """S2-Attention context sharding: head ``h`` sees the keys with ``(j + o_h) mod stride == 0``.

    ``offsets`` (one per head, or one per head group when fewer) default to
    ``o_h = h mod stride``, so with ``heads >= stride`` the shards of the heads together
    cover every position. ``causal`` adds ``j <= i`` (``i = q + offset``, KV-cache aware).
    ``stride = 1`` is dense attention.
    """

    per_head = True

    def __init__(self, stride: int, *, offsets: Sequence[int] | None = None, causal: bool = False,
                 offset: int | None = None) -> None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride: expected a positive int, got {stride!r}")
        self.stride = stride
        if offsets is not None:
            offsets = tuple(int(o) for o in offsets)
            if not offsets:
                raise ValueError("offsets: expected one offset per head (group), got []")
        self.offsets = offsets
        self.causal = bool(causal)
        self.offset = offset

    def check(self, shape: Shape) -> None:
        if self.offsets is not None and shape.heads % len(self.offsets):
            raise ValueError(f"offsets: {len(self.offsets)} offsets must divide the number of heads, "
                             f"got heads={shape.heads}")

    def head_offsets(self, heads: int) -> torch.Tensor:
        """``o_h`` for each of ``heads`` heads."""
        if self.offsets is None:
            return torch.arange(heads) % self.stride
        per = heads // len(self.offsets)
        return torch.tensor(self.offsets).repeat_interleave(per) % self.stride

    def _o(self, h: torch.Tensor, shape: Shape) -> torch.Tensor:
        key = ("offsets", shape.heads, str(h.device))
        table = self._cache_get(key)
        if table is None:
            table = self._cache_put(key, self.head_offsets(shape.heads).to(h.device))
        return table[h]

    def allow(self, b, h, q, kv, shape):
        ok = torch.remainder(kv + self._o(h, shape), self.stride) == 0
        if self.causal:
            ok = ok & (kv <= q + _off(self.offset, shape))
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        h = torch.arange(shape.heads, device=q_lo.device).view(1, -1, 1, 1)
        o = self._o(h, shape)
        first = k_lo + torch.remainder(-(k_lo + o), self.stride)  # first shard key >= k_lo
        any_ = first <= k_hi
        all_ = (k_lo == k_hi) & any_ if self.stride > 1 else any_
        if self.causal:
            off = _off(self.offset, shape)
            any_ = any_ & (first <= q_hi + off)
            all_ = all_ & (k_hi <= q_lo + off)
        return any_, all_


class ShiftedGroups(Pattern):
    """SinkLoRA SF-Attn: group-local attention, half of the heads on groups shifted by ``group // 2``, plus sinks.

    Tokens are cut into groups of ``group``; heads in the first half attend within their
    group, heads in the second half within groups shifted by ``group // 2`` (the shifted
    groups are taken in the original token order, so no group wraps around the sequence);
    every query also sees the first ``n_sink`` tokens. ``causal`` (default) adds ``j <= i``.
    ``shift=False`` keeps every head unshifted (the block-local segment mask).
    """

    per_head = True

    def __init__(self, group: int, *, n_sink: int = 0, causal: bool = True, shift: bool = True,
                 offset: int | None = None) -> None:
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group: expected a positive int, got {group!r}")
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink: expected a non-negative int, got {n_sink!r}")
        self.group, self.n_sink, self.causal, self.shift = group, n_sink, bool(causal), bool(shift)
        self.offset = offset

    def check(self, shape: Shape) -> None:
        if self.shift and shape.heads % 2:
            raise ValueError(f"ShiftedGroups: shifting half of the heads needs an even head count, "
                             f"got heads={shape.heads}")

    def _shift(self, h: torch.Tensor, shape: Shape) -> torch.Tensor | int:
        if not self.shift:
            return 0
        return (h >= shape.heads // 2).long() * (self.group // 2)

    def _gid(self, x: torch.Tensor, shift) -> torch.Tensor:
        return torch.div(x + shift, self.group, rounding_mode="floor")

    def allow(self, b, h, q, kv, shape):
        i = q + _off(self.offset, shape)
        s = self._shift(h, shape)
        ok = self._gid(i, s) == self._gid(kv, s)
        if self.n_sink:
            ok = ok | (kv < self.n_sink)
        if self.causal:
            ok = ok & (kv <= i)
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = _off(self.offset, shape)
        h = torch.arange(shape.heads, device=q_lo.device).view(1, -1, 1, 1)
        s = self._shift(h, shape)
        qa, qb = self._gid(q_lo + off, s), self._gid(q_hi + off, s)
        ka, kb = self._gid(k_lo, s), self._gid(k_hi, s)
        any_ = (qa <= kb) & (ka <= qb)
        all_ = (qa == qb) & (ka == kb) & (qa == ka)
        if self.n_sink:
            any_, all_ = any_ | (k_lo < self.n_sink), all_ | (k_hi < self.n_sink)
        if self.causal:
            any_ = any_ & (k_lo <= q_hi + off)
            all_ = all_ & (k_hi <= q_lo + off)
        return any_, all_


class ElasticWindow(Pattern):
    """MoA elastic windows: head ``h`` has a causal window of span ``S_h(N) = alpha_h + beta_h * N`` plus sinks.

    ``N`` is the number of keys of the call (the sequence length so far), so each head's
    span grows with the input. Spans are rounded down and kept in ``[1, N]``. ``alpha`` and
    ``beta`` have one value per head (or per head group). A span ``>= N`` is dense causal
    attention.
    """

    per_head = True

    def __init__(self, alpha: Sequence[float], beta: Sequence[float], *, n_sink: int = 0) -> None:
        self.alpha = tuple(float(a) for a in alpha)
        self.beta = tuple(float(b) for b in beta)
        if not self.alpha or len(self.alpha) != len(self.beta):
            raise ValueError(f"alpha, beta: expected equal, non-empty per-head lists, got {len(self.alpha)} and "
                             f"{len(self.beta)} values")
        if any(a < 0 for a in self.alpha) or any(b < 0 for b in self.beta):
            raise ValueError(f"alpha, beta: expected non-negative values, got alpha={self.alpha}, beta={self.beta}")
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink: expected a non-negative int, got {n_sink!r}")
        self.n_sink = n_sink

    def spans(self, n: int) -> tuple[int, ...]:
        """Each head (group)'s window span at length ``n``."""
        return tuple(max(1, min(n, int(a + b * n))) for a, b in zip(self.alpha, self.beta))

    def window(self, shape: Shape) -> SlidingWindow:
        """The equivalent per-head causal :class:`SlidingWindow` at this shape."""
        key = ("window", shape.n_kv)
        sw = self._cache_get(key)
        if sw is None:
            sw = self._cache_put(key, SlidingWindow(list(self.spans(shape.n_kv)), causal=True, n_sink=self.n_sink))
        return sw

    def check(self, shape: Shape) -> None:
        if shape.heads % len(self.alpha):
            raise ValueError(f"alpha: {len(self.alpha)} per-head spans must divide the number of heads, "
                             f"got heads={shape.heads}")

    def density(self, shape: Shape) -> float:
        return self.window(shape).density(shape)

    def allow(self, b, h, q, kv, shape):
        return self.window(shape).allow(b, h, q, kv, shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        return self.window(shape).bounds(q_lo, q_hi, k_lo, k_hi, shape)

    def tile_plan(self, shape: Shape, block: int = 64) -> TilePlan:
        return self.window(shape).tile_plan(shape, block)
