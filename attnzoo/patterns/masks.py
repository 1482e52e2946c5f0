"""Position-based 1-D patterns: full, causal, sliding and dilated windows, prefix-LM, global tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape
from attnzoo.patterns.tiles import AxisTiles, TilePlan, band_tiles, choose_band_tile

# Query-tile sizes the 1-D tile planner considers.
BAND_CANDIDATES = (8, 16, 32, 64, 128)


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _nonneg_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return value


class Full(Pattern):
    """Every query attends every key."""

    def allow(self, b, h, q, kv, shape):
        return (q >= 0) & (kv >= 0)

    def sdpa_hint(self, shape: Shape) -> str | None:
        return "full"

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        t = torch.ones((q_lo.shape[0], k_lo.shape[1]), dtype=torch.bool, device=q_lo.device)
        return t, t


class Causal(Pattern):
    """``kv <= q + offset``; ``offset`` defaults to ``n_kv - n_q`` (queries are the newest tokens)."""

    def __init__(self, offset: int | None = None) -> None:
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
            raise ValueError(f"offset: expected an int or None, got {offset!r}")
        self.offset = offset

    def _off(self, shape: Shape) -> int:
        return shape.offset if self.offset is None else self.offset

    def value_key(self) -> tuple:
        return ("Causal", self.offset)

    def allow(self, b, h, q, kv, shape):
        return kv <= q + self._off(shape)

    def sdpa_hint(self, shape: Shape) -> str | None:
        return "causal" if self._off(shape) == 0 else None

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = self._off(shape)
        return k_lo <= q_hi + off, k_hi <= q_lo + off


class SlidingWindow(Pattern):
    """Local window. Symmetric: ``|i - j| <= window``; causal: ``0 <= i - j < window``.

    ``i = q + offset`` (offset defaults to ``n_kv - n_q``). ``n_sink`` first keys are always
    visible (attention sinks, StreamingLLM), subject to causality. ``window`` may be a list
    with one window per head group (its length must divide the number of heads).
    """

    def __init__(
        self, window: int | Sequence[int], *, causal: bool = False, n_sink: int = 0, offset: int | None = None
    ) -> None:
        if isinstance(window, int) and not isinstance(window, bool):
            self.window: int | tuple[int, ...] = _positive_int(window, "window")
        else:
            if not isinstance(window, Sequence):
                raise ValueError(f"window: expected a positive integer or a list of them, got {window!r}")
            self.window = tuple(_positive_int(w, f"window[{i}]") for i, w in enumerate(window))
            if not self.window:
                raise ValueError("window: expected a positive integer or a non-empty list, got []")
            self.per_head = True
        self.causal = bool(causal)
        self.n_sink = _nonneg_int(n_sink, "n_sink")
        self.offset = offset

    def check(self, shape: Shape) -> None:
        if isinstance(self.window, tuple) and shape.heads % len(self.window):
            raise ValueError(
                f"window: {len(self.window)} per-head windows must divide the number of heads, got heads={shape.heads}"
            )

    def _w(self, h: torch.Tensor, shape: Shape) -> torch.Tensor | int:
        if isinstance(self.window, int):
            return self.window
        table = self._cache_get(("windows", str(h.device)))
        if table is None:
            table = self._cache_put(("windows", str(h.device)), torch.tensor(self.window, device=h.device))
        return table[h // (shape.heads // len(self.window))]

    def _off(self, shape: Shape) -> int:
        return shape.offset if self.offset is None else self.offset

    def allow(self, b, h, q, kv, shape):
        w = self._w(h, shape)
        d = q + self._off(shape) - kv
        ok = ((d >= 0) & (d < w)) if self.causal else (d.abs() <= w)
        if self.n_sink:
            sink = kv < self.n_sink
            ok = ok | (sink & (d >= 0) if self.causal else sink)
        return ok

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = self._off(shape)
        h = torch.arange(shape.heads, device=q_lo.device).view(1, -1, 1, 1)
        w = self._w(h, shape)
        lo_i, hi_i = q_lo + off, q_hi + off
        if self.causal:
            any_ = (k_lo <= hi_i) & (k_hi > lo_i - w)
            all_ = (k_hi <= lo_i) & (k_lo > hi_i - w)
        else:
            any_ = (k_lo <= hi_i + w) & (k_hi >= lo_i - w)
            all_ = (k_hi <= lo_i + w) & (k_lo >= hi_i - w)
        if self.n_sink:
            sink_any = k_lo < self.n_sink
            sink_all = k_hi < self.n_sink
            if self.causal:
                sink_any, sink_all = sink_any & (k_lo <= hi_i), sink_all & (k_hi <= lo_i)
            any_, all_ = any_ | sink_any, all_ | sink_all
        return any_, all_

    def key_table(self, shape: Shape) -> torch.Tensor | None:
        """``[n_q, K]``: the window's keys (``K = window`` causal, ``2 window + 1`` symmetric), then the
        sinks not already in the window; -1 outside ``[0, n_kv)``. None for per-head windows."""
        if not isinstance(self.window, int):
            return None
        key = ("key_table", shape)
        cached = self._cache_get(key)
        if cached is None:
            w = self.window
            i = torch.arange(shape.n_q)[:, None] + self._off(shape)
            first = i - w + 1 if self.causal else i - w
            keys = first + torch.arange(w if self.causal else 2 * w + 1)
            sinks = torch.arange(self.n_sink).expand(shape.n_q, -1)
            sink_ok = (sinks < first) if self.causal else (sinks < first) | (sinks > i + w)  # not in the window
            keys = torch.cat([keys, torch.where(sink_ok, sinks, -1)], dim=1)
            cached = self._cache_put(key, torch.where((keys >= 0) & (keys < shape.n_kv), keys, -1))
        return cached

    def tile_plan(self, shape: Shape, block: int = 64) -> TilePlan:
        """Runs of queries, each reading the key range its windows cover (a strided view), plus the sinks."""
        key = ("tile_plan", shape)
        cached = self._cache_get(key)
        if cached is None:
            self.check(shape)
            w = self.window if isinstance(self.window, int) else max(self.window)
            i = torch.arange(shape.n_q) + self._off(shape)
            first, last = (i - w + 1, i) if self.causal else (i - w, i + w)
            cands = [c for c in BAND_CANDIDATES if c <= shape.n_q] or [shape.n_q]
            (axis,) = choose_band_tile([lambda a: band_tiles(first, last, shape.n_kv, a)], [cands])
            cached = self._cache_put(key, _with_sinks(axis, self.n_sink, shape.n_kv))
        return cached


class DilatedWindow(Pattern):
    """Keys at distance ``dilation * t`` from the query: ``|t| <= window`` (or ``0 <= t < window`` causal)."""

    def __init__(self, window: int, dilation: int, *, causal: bool = False, offset: int | None = None) -> None:
        self.window = _positive_int(window, "window")
        self.dilation = _positive_int(dilation, "dilation")
        self.causal = bool(causal)
        self.offset = offset

    def _off(self, shape: Shape) -> int:
        return shape.offset if self.offset is None else self.offset

    def allow(self, b, h, q, kv, shape):
        d = q + self._off(shape) - kv
        on_grid = torch.remainder(d, self.dilation) == 0
        t = torch.div(d, self.dilation, rounding_mode="floor")
        in_range = ((t >= 0) & (t < self.window)) if self.causal else (t.abs() <= self.window)
        return on_grid & in_range

    def key_table(self, shape: Shape) -> torch.Tensor:
        """``[n_q, K]``: keys ``i - dilation * t`` (``K = window`` causal, ``2 window + 1`` symmetric),
        -1 outside ``[0, n_kv)``."""
        key = ("key_table", shape)
        cached = self._cache_get(key)
        if cached is None:
            i = torch.arange(shape.n_q)[:, None] + self._off(shape)
            t = torch.arange(self.window) if self.causal else torch.arange(-self.window, self.window + 1)
            keys = i - self.dilation * t
            cached = self._cache_put(key, torch.where((keys >= 0) & (keys < shape.n_kv), keys, -1))
        return cached

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off, reach = self._off(shape), self.window * self.dilation
        lo_i, hi_i = q_lo + off, q_hi + off
        if self.causal:
            any_ = (k_lo <= hi_i) & (k_hi > lo_i - reach)
        else:
            any_ = (k_lo <= hi_i + reach) & (k_hi >= lo_i - reach)
        if self.dilation == 1:
            exact = SlidingWindow(self.window, causal=self.causal, offset=self.offset)
            return exact.bounds(q_lo, q_hi, k_lo, k_hi, shape)
        single = (q_lo == q_hi) & (k_lo == k_hi)
        return any_, single & any_ & (torch.remainder(lo_i - k_lo, self.dilation) == 0)


class PrefixLM(Pattern):
    """Bidirectional over the first ``prefix_len`` keys, causal after (``prefix_len`` int or ``[B]`` tensor)."""

    def __init__(self, prefix_len: int | torch.Tensor, *, offset: int | None = None) -> None:
        if isinstance(prefix_len, torch.Tensor):
            if prefix_len.dim() != 1 or prefix_len.dtype.is_floating_point:
                raise ValueError(
                    "prefix_len: expected an int or an integer tensor [B], "
                    f"got {prefix_len.dtype} {tuple(prefix_len.shape)}"
                )
            self.per_batch = True
        else:
            _nonneg_int(prefix_len, "prefix_len")
        self.prefix_len = prefix_len
        self.causal = Causal(offset)

    def check(self, shape: Shape) -> None:
        if isinstance(self.prefix_len, torch.Tensor) and self.prefix_len.shape[0] != shape.batch:
            raise ValueError(f"prefix_len: expected shape [{shape.batch}], got {list(self.prefix_len.shape)}")

    def _p(self, b: torch.Tensor) -> torch.Tensor | int:
        if isinstance(self.prefix_len, torch.Tensor):
            return self.prefix_len.to(b.device)[b]
        return self.prefix_len

    def allow(self, b, h, q, kv, shape):
        return (kv < self._p(b)) | self.causal.allow(b, h, q, kv, shape)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        b = torch.arange(shape.batch if self.per_batch else 1, device=q_lo.device).view(-1, 1, 1, 1)
        p = self._p(b)
        c_any, c_all = self.causal.bounds(q_lo, q_hi, k_lo, k_hi, shape)
        return (k_lo < p) | c_any, (k_hi < p) | c_all


class GlobalTokens(Pattern):
    """The first ``n`` positions attend everywhere and are attended from everywhere."""

    def __init__(self, n: int, *, offset: int | None = None) -> None:
        self.n = _nonneg_int(n, "n")
        self.offset = offset

    def _off(self, shape: Shape) -> int:
        return shape.offset if self.offset is None else self.offset

    def allow(self, b, h, q, kv, shape):
        return (q + self._off(shape) < self.n) | (kv < self.n)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = self._off(shape)
        return (q_lo + off < self.n) | (k_lo < self.n), (q_hi + off < self.n) | (k_hi < self.n)


def _with_sinks(axis: AxisTiles, n_sink: int, n_kv: int) -> TilePlan:
    """A 1-D plan; ``n_sink`` first keys are added to each tile unless its range already holds them."""
    if not n_sink:
        return TilePlan(axis.q, axis.k, axis.strided)
    sinks = torch.arange(min(n_sink, n_kv)).view(1, -1)
    in_range = (axis.k.unsqueeze(1) == sinks.unsqueeze(-1)).any(-1)
    extra = torch.where(in_range, torch.full_like(in_range, -1, dtype=torch.long), sinks)
    return TilePlan(axis.q, torch.cat([extra, axis.k], dim=1))
