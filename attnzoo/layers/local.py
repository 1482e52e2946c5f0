"""Catalogue section 3 (local-sparse), sequence entries: causal, sliding window, segment mask,
MoA elastic windows, S2-Attention head shards, SinkLoRA shifted groups.

Each entry is a pattern of :mod:`attnzoo.patterns` (usable with :func:`attnzoo.attention`
and any mixer's ``pattern=``) and a registered multi-head mixer running it, with the
projections of ``mha`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) so weights load
across entries. Grid entries are in :mod:`attnzoo.layers.local_grid`, pooled and hierarchical
ones in :mod:`attnzoo.layers.local_pooled`, :mod:`attnzoo.layers.local_hier` and
:mod:`attnzoo.layers.local_graph`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, load_shared, seeded
from attnzoo.layers.cache import KVCache
from attnzoo.ops import attention
from attnzoo.patterns import (
    Causal,
    ElasticWindow,
    HeadSharded,
    KeyPadding,
    Pattern,
    SegmentMask,
    ShiftedGroups,
    SlidingWindow,
)
from attnzoo.patterns.base import Shape
from attnzoo.registry import Reduction, register

__all__ = [
    "CausalAttention", "HeadShardedAttention", "MoAAttention", "SegmentAttention", "ShiftedGroupAttention",
    "SlidingWindowAttention", "lait_stack", "moa_select",
]

FAMILY = "local-sparse"
SMALL = {"dim": 32, "n_heads": 4}


def rand_x(b: int = 2, n: int = 12, c: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)


def mha_like(src: nn.Module) -> MultiHeadAttention:
    """A float64 ``mha`` with ``src``'s projections."""
    m = MultiHeadAttention(src.dim, src.n_heads, head_dim=src.head_dim, n_kv_heads=src.n_kv_heads).double()
    return load_shared(src, m)


# ------------------------------------------------------------------------------------ causal
class CausalAttention(MultiHeadAttention):
    """Multi-head attention under the causal mask ``j <= i + (L_k - L_q)`` (always applied;
    the offset makes KV-cache decoding exact)."""

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, pattern=Causal(), **kw)


def _causal_is_mha_causal():
    m = seeded(CausalAttention, dim=32, n_heads=4)
    x = rand_x()
    return m(x), mha_like(m)(x, causal=True)


def _causal_future_independent():
    m = seeded(CausalAttention, dim=32, n_heads=4)
    x = rand_x(n=13)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return m(x2)[:, :7], m(x)[:, :7]


@register(
    "causal", family=FAMILY, type="pattern", priority=1, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(N^2 / 2)",
    summary="Causal mask j <= i + (L_k - L_q) (KV-cache offset): patterns.Causal, as an always-causal mha.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("equals_mha_causal", "the entry equals mha(causal=True) with the same weights",
                  _causal_is_mha_causal),
        Reduction("future_independent", "outputs at i are unchanged when inputs after i change",
                  _causal_future_independent),
    ),
)
def causal(dim: int, n_heads: int = 8, *, head_dim: int | None = None, n_kv_heads: int | None = None,
           bias: bool = True, score_mod: Any = None, rope: Any = None, scale: float | None = None,
           backend: str = "auto") -> CausalAttention:
    """Causal attention (:class:`CausalAttention`)."""
    return CausalAttention(dim, n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias, score_mod=score_mod,
                           rope=rope, scale=scale, backend=backend)


# ---------------------------------------------------------------------------- sliding window
class SlidingWindowAttention(MultiHeadAttention):
    """Sliding-window attention (:class:`~attnzoo.patterns.SlidingWindow`).

    Symmetric ``|i - j| <= window`` or, with ``causal_window``, ``0 <= i - j < window``;
    ``n_sink`` first tokens always visible (StreamingLLM); ``window`` may be a list (one per
    head group). ``forward(causal=True)`` adds the causal mask. In KV-cache decoding the cache
    keeps only the last ``window`` entries plus the sinks (memory bounded in N).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 256,
                 causal_window: bool = False, n_sink: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, pattern=SlidingWindow(window, causal=causal_window, n_sink=n_sink), **kw)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}"


def _sw_full_window_is_dense():
    outs, want = [], []
    x = rand_x()
    for causal_window in (False, True):
        m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=12, causal_window=causal_window)
        outs.append(m(x, causal=causal_window))
        want.append(mha_like(m)(x, causal=causal_window))
    return torch.stack(outs), torch.stack(want)


def _sw_outside_window_invariant():
    m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=3)
    x = rand_x(n=16)
    x2 = x.clone()
    x2[:, 12:] += 1.0  # outside the window of tokens 0..8
    x2[:, :2] -= 1.0  # outside the window of tokens 5..8
    return m(x2)[:, 5:9], m(x)[:, 5:9]


def _sw_per_head_and_sinks():
    from attnzoo.patterns import Custom

    m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=[2, 5], causal_window=True, n_sink=2)
    x = rand_x(n=14)
    i, j = torch.arange(14).view(-1, 1), torch.arange(14).view(1, -1)
    allowed = torch.stack([((i - j >= 0) & (i - j < w)) | ((j < 2) & (j <= i)) for w in (2, 2, 5, 5)])

    def rule(b, h, q, kv):
        return allowed.to(q.device)[h, q, kv]

    return m(x), _with_pattern(m, Custom(rule, per_batch=False))(x)


def _with_pattern(src: MultiHeadAttention, pattern: Any) -> MultiHeadAttention:
    m = MultiHeadAttention(src.dim, src.n_heads, head_dim=src.head_dim, n_kv_heads=src.n_kv_heads,
                           pattern=pattern, backend="reference").double()
    return load_shared(src, m)


@register(
    "sliding_window", family=FAMILY, type="pattern", priority=1,
    papers=("baseline", "TKL (local self-attention retrieval)"),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(N w)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather", "triton"),
    summary="Sliding window (symmetric or causal), sink tokens, per-head windows; KV cache bounded by the window.",
    test_kwargs={"dim": 32, "n_heads": 4, "window": 3, "n_sink": 1},
    reductions=(
        Reduction("full_window_is_dense", "w >= N equals dense (and causal) mha", _sw_full_window_is_dense),
        Reduction("outside_window_invariant", "a token's output ignores tokens outside its window",
                  _sw_outside_window_invariant),
        Reduction("per_head_sinks", "per-head windows with sinks equal mha under the explicit pattern (reference)",
                  _sw_per_head_and_sinks),
    ),
)
def sliding_window(dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 256, causal_window: bool = False,
                   n_sink: int = 0, head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True,
                   score_mod: Any = None, rope: Any = None, scale: float | None = None,
                   backend: str = "auto") -> SlidingWindowAttention:
    """Sliding-window attention (:class:`SlidingWindowAttention`)."""
    return SlidingWindowAttention(dim, n_heads, window=window, causal_window=causal_window, n_sink=n_sink,
                                  head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias, score_mod=score_mod, rope=rope,
                                  scale=scale, backend=backend)


# ------------------------------------------------------------------------------ segment mask
class SegmentAttention(MultiHeadAttention):
    """Segment-local attention with global tokens and LAIT's per-layer schedule
    (:class:`~attnzoo.patterns.SegmentMask`).

    Segments come from ``forward(..., segment_ids=[B, N] or [N])`` or, by default, from
    ``segment_size`` (consecutive runs). ``global_keys`` / ``global_queries``: the first
    (resp. last) ``n`` tokens are global keys (seen by every query: BlockRank's instruction)
    / global queries (see every key: BlockRank's query tokens); ``forward`` may pass bool
    ``[B, N]`` masks instead. LAIT: layer ``layer_index`` is segment-local when
    ``layer_index < segment_layers`` and full otherwise (``segment_layers=None``: always
    local; ``0``: the standard encoder). SPA's packed sets are the plain block-diagonal case.
    In KV-cache decoding the ids of earlier tokens are kept in the cache.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, segment_size: int | None = None, global_keys: int = 0,
                 global_queries: int = 0, layer_index: int = 0, segment_layers: int | None = None, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.segment_size = None if segment_size is None else check_int("segment_size", segment_size)
        self.global_keys = check_int("global_keys", global_keys, minimum=0)
        self.global_queries = check_int("global_queries", global_queries, minimum=0)
        self.layer_index = check_int("layer_index", layer_index, minimum=0)
        self.segment_layers = None if segment_layers is None else check_int("segment_layers", segment_layers,
                                                                            minimum=0)

    @property
    def segment_local(self) -> bool:
        return self.segment_layers is None or self.layer_index < self.segment_layers

    def forward(self, x: torch.Tensor, *, segment_ids: torch.Tensor | None = None,
                global_keys: torch.Tensor | None = None, global_queries: torch.Tensor | None = None,
                cache: KVCache | None = None, **kw: Any):
        """``x`` ``[B, N, C]``; ``segment_ids`` int ``[B, N]`` / ``[N]`` and bool ``global_keys`` /

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        ``global_queries`` ``[B, N]`` for the new tokens (defaults from the constructor)."""
        self.pattern = self._pattern(x, segment_ids, global_keys, global_queries, cache) if self.segment_local else None
        return super().forward(x, cache=cache, **kw)

    def _pattern(self, x, ids, gk, gq, cache) -> Pattern | None:
        b, n = x.shape[0], x.shape[1]
        start = cache.position if cache is not None else 0
        if ids is None:
            if self.segment_size is None:
                raise ValueError("segment_ids: pass segment ids [B, N] (or build with segment_size=...)")
            ids = torch.arange(start, start + n, device=x.device) // self.segment_size
        ids = torch.as_tensor(ids, device=x.device)
        if ids.shape[-1] != n or ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != b):
            raise ValueError(f"segment_ids: expected int [{b}, {n}] or [{n}], got {list(ids.shape)}")
        ids = ids.expand(b, n)
        total = start + n
        pos = torch.arange(start, start + n, device=x.device)
        gk = pos.view(1, -1).expand(b, n) < self.global_keys if gk is None else gk
        gq = pos.view(1, -1).expand(b, n) >= total - self.global_queries if gq is None else gq
        for name, t in (("global_keys", gk), ("global_queries", gq)):
            if t.dtype != torch.bool or tuple(t.shape) != (b, n):
                raise ValueError(f"{name}: expected a bool tensor [{b}, {n}], got {t.dtype} {list(t.shape)}")
        if cache is not None:
            cache.claim_batch(b)
            st = cache.state
            ids = torch.cat([st["segment_ids"], ids], 1) if "segment_ids" in st else ids
            gk = torch.cat([st["global_keys"], gk], 1) if "global_keys" in st else gk
            gq_all = torch.cat([st["global_queries"], gq], 1) if "global_queries" in st else gq
            st["segment_ids"], st["global_keys"], st["global_queries"] = ids, gk, gq_all
            gq = gq_all
        return SegmentMask(ids, global_keys=gk if bool(gk.any()) else None,
                           global_queries=gq if bool(gq.any()) else None)


def lait_stack(dim: int, n_heads: int, depth: int, segment_layers: int, **kw: Any) -> nn.ModuleList:
    """LAIT's schedule: ``depth`` layers, the first ``segment_layers`` segment-local, the rest full."""
    return nn.ModuleList(SegmentAttention(dim, n_heads, layer_index=i, segment_layers=segment_layers, **kw)
                         for i in range(check_int("depth", depth)))


def _seg_packed_equals_separate():
    m = seeded(SegmentAttention, dim=32, n_heads=4)
    lengths = [4, 7, 3]
    x = rand_x(n=sum(lengths))
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    packed = m(x, segment_ids=ids)
    parts = torch.split(x, lengths, dim=1)
    ref = mha_like(m)
    return packed, torch.cat([ref(p) for p in parts], dim=1)


def _seg_edit_other_segment():
    m = seeded(SegmentAttention, dim=32, n_heads=4, segment_size=5)
    x = rand_x(n=15)
    x2 = x.clone()
    x2[:, 5:10] += 2.0  # segment B
    return torch.cat([m(x2)[:, :5], m(x2)[:, 10:]], 1), torch.cat([m(x)[:, :5], m(x)[:, 10:]], 1)


def _seg_lait_zero_is_encoder():
    layers = lait_stack(32, 4, 3, 0, segment_size=4).double()
    torch.manual_seed(0)
    for layer in layers:
        layer.load_state_dict(seeded(MultiHeadAttention, dim=32, n_heads=4).state_dict())
    x = rand_x()
    y, y_ref = x, x
    for layer in layers:
        y = y + layer(y)
        y_ref = y_ref + mha_like(layer)(y_ref)
    return y, y_ref


def _seg_blockrank():
    m = seeded(SegmentAttention, dim=32, n_heads=4, segment_size=4, global_keys=2, global_queries=3)
    x = rand_x(n=14)
    ids = torch.arange(14) // 4
    gk, gq = torch.arange(14) < 2, torch.arange(14) >= 11
    allowed = (ids.view(-1, 1) == ids.view(1, -1)) | gk.view(1, -1) | gq.view(-1, 1)
    from attnzoo.patterns import Custom

    pat = Custom(lambda b, h, q, kv: allowed.to(q.device)[q, kv], per_batch=False, per_head=False)
    return m(x), _with_pattern(m, pat)(x)


@register(
    "segment_mask", family=FAMILY, type="pattern", priority=1, papers=("LAIT", "BlockRank",
                                                                       "SPA (select and pack attention)"),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(sum of segment^2)",
    summary="Segment-local attention with global keys/queries (BlockRank) and LAIT's per-layer schedule.",
    test_kwargs={"dim": 32, "n_heads": 4, "segment_size": 5, "global_keys": 1},
    reductions=(
        Reduction("packed_equals_separate", "packed segments equal separate runs per segment",
                  _seg_packed_equals_separate),
        Reduction("edit_other_segment", "editing segment B leaves segment A's outputs unchanged",
                  _seg_edit_other_segment),
        Reduction("lait_p0_is_encoder", "LAIT with P = 0 is the standard encoder (a stack of mha)",
                  _seg_lait_zero_is_encoder),
        Reduction("blockrank_globals", "global keys/queries equal the explicit BlockRank mask", _seg_blockrank),
    ),
)
def segment_mask(dim: int, n_heads: int = 8, *, segment_size: int | None = None, global_keys: int = 0,
                 global_queries: int = 0, layer_index: int = 0, segment_layers: int | None = None,
                 head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True, rope: Any = None,
                 scale: float | None = None, backend: str = "auto") -> SegmentAttention:
    """Segment-mask attention (:class:`SegmentAttention`)."""
    return SegmentAttention(dim, n_heads, segment_size=segment_size, global_keys=global_keys,
                            global_queries=global_queries, layer_index=layer_index, segment_layers=segment_layers,
                            head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias, rope=rope, scale=scale,
                            backend=backend)


# ------------------------------------------------------------------------------ moa window
def moa_select(gains: torch.Tensor, densities: torch.Tensor, budget: float) -> list[int]:
    """Per head, the candidate index minimising the total estimated loss increase ``gains [H, C]``
    under ``mean_h densities[h, c_h] <= budget`` (a Lagrangian sweep, then a greedy repair)."""
    h, c = gains.shape
    if float(densities.min(1).values.mean()) > budget + 1e-12:
        raise ValueError(f"budget: {budget} is below the sparsest configuration's mean density "
                         f"{float(densities.min(1).values.mean()):.4f}")
    best, best_gain = None, float("inf")
    scale = float(gains.abs().max()) + 1e-12
    for lam in [0.0, *(scale * 10.0 ** e for e in torch.linspace(-6, 6, 121).tolist())]:
        choice = (gains + lam * densities).argmin(1)
        dens = float(densities[torch.arange(h), choice].mean())
        total = float(gains[torch.arange(h), choice].sum())
        if dens <= budget + 1e-12 and total < best_gain:
            best, best_gain = choice, total
    assert best is not None
    return best.tolist()


class MoAAttention(MultiHeadAttention):
    """MoA heterogeneous elastic windows (:class:`~attnzoo.patterns.ElasticWindow`): head ``h``
    attends causally to a window of span ``alpha_h + beta_h * N`` (``N`` the length) plus
    ``n_sink`` sink tokens. Always causal. :meth:`profile` picks ``(alpha_h, beta_h)`` per head
    from calibration data under an average-density budget.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, alpha: Sequence[float] | None = None,
                 beta: Sequence[float] | None = None, n_sink: int = 0, **kw: Any) -> None:
        alpha = [64.0] * n_heads if alpha is None else list(alpha)
        beta = [0.0] * len(alpha) if beta is None else list(beta)
        super().__init__(dim, n_heads, pattern=ElasticWindow(alpha, beta, n_sink=n_sink), **kw)
        self.n_sink = n_sink

    def spans(self, n: int) -> tuple[int, ...]:
        return self.pattern.spans(n)

    def profile(self, x: torch.Tensor, loss_fn: Any, candidates: Sequence[tuple[float, float]],
                budget: float) -> list[tuple[float, float]]:
        """Choose ``(alpha_h, beta_h)`` per head from ``candidates`` on calibration input ``x``.

        The effect on the loss of dropping attention entry ``(i, j)`` is estimated to first
        order, softmax renormalisation included (MoA): ``A_ij (sum_n A_in G_in - G_ij)`` with
        ``G = dL/dA`` of dense causal attention; a configuration's cost is the sum over the
        entries it drops, its density the fraction of causal pairs it keeps. The choice
        minimises the summed cost under ``mean density <= budget``, is installed and returned.
        """
        q, k, v = self.project(x, x)
        s = Shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        z, w = attention(q, k, v, pattern=Causal(), backend="reference", return_weights=True,
                         scale=self.scale)
        loss = loss_fn(self.output(z, x))
        (g,) = torch.autograd.grad(loss, w)
        a, g = w.detach(), g.detach()
        keep_cost = (a * g).sum(-1, keepdim=True)
        per_entry = a * (keep_cost - g)  # [B, H, N, N]
        causal_pairs = s.n_q * (s.n_q + 1) / 2
        gains, dens = [], []
        for alpha, beta in candidates:
            span = max(1, min(s.n_kv, int(alpha + beta * s.n_kv)))
            kept = SlidingWindow(span, causal=True, n_sink=self.n_sink).dense_mask(s, q.device)[0, 0]
            gains.append(per_entry.masked_fill(kept, 0.0).sum((0, 2, 3)))
            dens.append(torch.full((s.heads,), float(kept.sum()) / causal_pairs))
        choice = moa_select(torch.stack(gains, 1), torch.stack(dens, 1), budget)
        chosen = [tuple(candidates[c]) for c in choice]
        self.pattern = ElasticWindow([c[0] for c in chosen], [c[1] for c in chosen], n_sink=self.n_sink)
        return chosen


def _moa_full_span_is_causal():
    m = seeded(MoAAttention, dim=32, n_heads=4, alpha=[2.0, 20.0], beta=[1.0, 0.0])
    x = rand_x()
    return m(x), mha_like(m)(x, causal=True)


def _moa_span_rule():
    m = MoAAttention(32, 4, alpha=[2.0, 4.0], beta=[0.5, 0.1])
    got = torch.tensor([m.spans(n) for n in (8, 16, 64)], dtype=torch.float64)
    rule = [[min(n, int(2 + 0.5 * n)), min(n, int(4 + 0.1 * n))] for n in (8, 16, 64)]
    want = torch.tensor(rule, dtype=torch.float64)
    return got, want


def _moa_budget():
    m = seeded(MoAAttention, dim=32, n_heads=4)
    x = rand_x(n=16)
    cands = [(2.0, 0.0), (4.0, 0.0), (2.0, 0.25), (16.0, 0.0)]
    m.profile(x, lambda y: y.pow(2).mean(), cands, budget=0.5)
    density = m.pattern.density(Shape(1, 4, 16, 16)) * 16 * 16 / (16 * 17 / 2)  # kept fraction of causal pairs
    return torch.tensor(min(density, 0.5), dtype=torch.float64), torch.tensor(density, dtype=torch.float64)


@register(
    "moa_window", family=FAMILY, type="pattern", priority=3, papers=("MoA (mixture of sparse attention)",),
    supports={"self", "causal", "padding", "gqa"}, complexity="O(N * mean span)",
    summary="MoA per-head elastic causal windows S_h(N) = alpha_h + beta_h N plus sinks; a profiler picks them.",
    test_kwargs={"dim": 32, "n_heads": 4, "alpha": [2.0, 3.0], "beta": [0.25, 0.0], "n_sink": 1},
    reductions=(
        Reduction("full_span_is_causal", "spans >= N give dense causal attention", _moa_full_span_is_causal),
        Reduction("span_rule", "each head's span follows alpha_h + beta_h N as N changes", _moa_span_rule),
        Reduction("density_budget", "the profiler's choice keeps the mean density within the budget", _moa_budget),
    ),
)
def moa_window(dim: int, n_heads: int = 8, *, alpha: Sequence[float] | None = None,
               beta: Sequence[float] | None = None, n_sink: int = 0, head_dim: int | None = None,
               n_kv_heads: int | None = None, bias: bool = True, rope: Any = None, scale: float | None = None,
               backend: str = "auto") -> MoAAttention:
    """MoA elastic-window attention (:class:`MoAAttention`)."""
    return MoAAttention(dim, n_heads, alpha=alpha, beta=beta, n_sink=n_sink, head_dim=head_dim,
                        n_kv_heads=n_kv_heads, bias=bias, rope=rope, scale=scale, backend=backend)


# ----------------------------------------------------------------------------- head sharded
class _CausalAt(Pattern):
    """Causal mask for a key subset at increasing positions ``pos``: ``pos[kv] <= q + offset``."""

    def __init__(self, pos: torch.Tensor, offset: int) -> None:
        self.pos, self.offset = pos, offset

    def allow(self, b, h, q, kv, shape):
        return self.pos.to(kv.device)[kv] <= q + self.offset

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        pos = self.pos.to(q_lo.device)
        return pos[k_lo] <= q_hi + self.offset, pos[k_hi] <= q_lo + self.offset


class HeadShardedAttention(MultiHeadAttention):
    """S2-Attention: head ``h`` attends only to its shard ``{j : (j + o_h) mod stride == 0}``
    (:class:`~attnzoo.patterns.HeadSharded`; default offsets ``o_h = h mod stride``, so the
    heads' shards together cover the context).

    Runs each group of heads on its gathered shard (``ceil(N / stride)`` keys per head: the
    per-head KV is ``1/stride`` of dense); ``backend="reference"`` and weight capture run the
    pattern over all keys instead (the two are checked against each other).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, stride: int = 4, offsets: Sequence[int] | None = None,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.stride = check_int("stride", stride)
        self.shards = HeadSharded(stride, offsets=offsets)
        self.shards.check(Shape(1, n_heads, 1, 1))
        self.pattern = self.shards

    def shard_positions(self, n: int, head: int) -> torch.Tensor:
        """Key positions head ``head`` reads among ``n`` keys."""
        o = int(self.shards.head_offsets(self.n_heads)[head])
        return torch.arange((self.stride - o) % self.stride, n, self.stride)

    def attend(self, q, k, v, pattern, want_weights):
        if want_weights or self.backend == "reference":
            return super().attend(q, k, v, pattern, want_weights)
        b, h, n, _ = q.shape
        m = k.shape[2]
        g = h // k.shape[1]
        causal_off = _causal_offset(pattern, n, m)
        keep = _key_padding(pattern)
        offsets = self.shards.head_offsets(h)
        out = q.new_zeros(b, h, n, v.shape[-1])
        for o in offsets.unique().tolist():
            heads = torch.nonzero(offsets == o).flatten().to(q.device)
            first = (self.stride - o) % self.stride
            if first >= m:  # no key of this shard yet: these heads see nothing (zeros)
                continue
            pos = torch.arange(first, m, self.stride, device=q.device)
            kv_heads = heads // g
            ks, vs = k[:, kv_heads][:, :, pos], v[:, kv_heads][:, :, pos]
            parts = []
            if causal_off is not None:
                parts.append(_CausalAt(pos, causal_off))
            if keep is not None:
                parts.append(KeyPadding(keep[:, pos]))
            pat = None
            for p in parts:
                pat = p if pat is None else pat & p
            out[:, heads] = attention(q[:, heads], ks, vs, pattern=pat, scale=self.attention_scale(q),
                                      backend=self.backend)
        return out, None


def _causal_offset(pattern: Any, n: int, m: int) -> int | None:
    from attnzoo.patterns import And

    if isinstance(pattern, Causal):
        return m - n if pattern.offset is None else pattern.offset
    if isinstance(pattern, And):
        for part in (pattern.a, pattern.b):
            off = _causal_offset(part, n, m)
            if off is not None:
                return off
    return None


def _key_padding(pattern: Any) -> torch.Tensor | None:
    from attnzoo.patterns import And

    if isinstance(pattern, KeyPadding):
        return pattern.mask
    if isinstance(pattern, And):
        for part in (pattern.a, pattern.b):
            keep = _key_padding(part)
            if keep is not None:
                return keep
    return None


def _hs_sharded_equals_pattern():
    m = seeded(HeadShardedAttention, dim=32, n_heads=4, stride=3)
    ref = seeded(HeadShardedAttention, dim=32, n_heads=4, stride=3, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = rand_x(n=13)
    return torch.stack([m(x), m(x, causal=True)]), torch.stack([ref(x), ref(x, causal=True)])


def _hs_stride_one_is_dense():
    m = seeded(HeadShardedAttention, dim=32, n_heads=4, stride=1)
    x = rand_x()
    return m(x), mha_like(m)(x)


def _hs_cover_and_kv():
    m = HeadShardedAttention(32, 4, stride=3)
    n = 13
    union = torch.zeros(n, dtype=torch.float64)
    sizes = []
    for h in range(4):
        union[m.shard_positions(n, h)] = 1.0
        sizes.append(m.shard_positions(n, h).numel())
    return torch.cat([union, torch.tensor(sizes, dtype=torch.float64)]), torch.cat(
        [torch.ones(n, dtype=torch.float64), torch.tensor([5.0, 4.0, 4.0, 5.0], dtype=torch.float64)])


@register(
    "head_sharded", family=FAMILY, type="pattern", priority=3, papers=("S2-Attention",),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(N^2 / stride)",
    summary="S2-Attention: each head attends to its own strided shard of the context; shards cover it.",
    test_kwargs={"dim": 32, "n_heads": 4, "stride": 3},
    reductions=(
        Reduction("sharded_equals_pattern", "the gathered-shard path equals the pattern over all keys",
                  _hs_sharded_equals_pattern),
        Reduction("stride_one_is_dense", "stride = 1 gives mha", _hs_stride_one_is_dense),
        Reduction("cover_and_kv", "the union of the heads' shards covers every position; per-head KV is N/stride",
                  _hs_cover_and_kv),
    ),
)
def head_sharded(dim: int, n_heads: int = 8, *, stride: int = 4, offsets: Sequence[int] | None = None,
                 head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True, rope: Any = None,
                 scale: float | None = None, backend: str = "auto") -> HeadShardedAttention:
    """S2-Attention head-sharded attention (:class:`HeadShardedAttention`)."""
    return HeadShardedAttention(dim, n_heads, stride=stride, offsets=offsets, head_dim=head_dim,
                                n_kv_heads=n_kv_heads, bias=bias, rope=rope, scale=scale, backend=backend)


# ------------------------------------------------------------------ shifted group attention
class ShiftedGroupAttention(MultiHeadAttention):
    """SinkLoRA SF-Attn (:class:`~attnzoo.patterns.ShiftedGroups`): causal group-local attention
    in groups of ``group`` tokens, the second half of the heads on groups shifted by
    ``group // 2`` (in place, so the outputs come back in token order), every query also
    seeing the first ``n_sink`` tokens. Always causal. ``shift=False``: all heads unshifted.
    (SinkLoRA's H2O KV eviction at inference is not part of this entry.)
    """

    def __init__(self, dim: int, n_heads: int = 8, *, group: int = 64, n_sink: int = 4, shift: bool = True,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, pattern=ShiftedGroups(group, n_sink=n_sink, shift=shift), **kw)
        self.pattern.check(Shape(1, n_heads, 1, 1))


def _sga_unshifted_is_segment_mask():
    m = seeded(ShiftedGroupAttention, dim=32, n_heads=4, group=4, n_sink=2, shift=False)
    seg = load_shared(m, SegmentAttention(32, 4, segment_size=4, global_keys=2).double())
    x = rand_x(n=14)
    return m(x), seg(x, causal=True)


def _sga_sinks_and_causal():
    m = seeded(ShiftedGroupAttention, dim=32, n_heads=4, group=4, n_sink=2)
    x = rand_x(n=14)
    _, w = m(x, return_weights=True)
    sink_mass = (w[..., :2].sum(-1) > 0).double()
    future = torch.triu(torch.ones(14, 14, dtype=torch.bool), 1)
    leak = w.masked_fill(~future, 0.0).abs().sum()
    return torch.stack([sink_mass.mean(), leak]), torch.tensor([1.0, 0.0], dtype=torch.float64)


@register(
    "shifted_group_attention", family=FAMILY, type="pattern", priority=3, papers=("SinkLoRA",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N group)",
    summary="SinkLoRA SF-Attn: causal group attention, half the heads on half-shifted groups, plus sinks.",
    test_kwargs={"dim": 32, "n_heads": 4, "group": 4, "n_sink": 1},
    reductions=(
        Reduction("unshifted_is_segment_mask", "shift=False equals segment_mask (groups, sinks as global keys)",
                  _sga_unshifted_is_segment_mask),
        Reduction("sinks_and_causal", "every query attends the sinks; no weight on future tokens",
                  _sga_sinks_and_causal),
    ),
)
def shifted_group_attention(dim: int, n_heads: int = 8, *, group: int = 64, n_sink: int = 4, shift: bool = True,
                            head_dim: int | None = None, bias: bool = True, rope: Any = None,
                            scale: float | None = None, backend: str = "auto") -> ShiftedGroupAttention:
    """SinkLoRA shifted group attention (:class:`ShiftedGroupAttention`)."""
    return ShiftedGroupAttention(dim, n_heads, group=group, n_sink=n_sink, shift=shift, head_dim=head_dim, bias=bias,
                                 rope=rope, scale=scale, backend=backend)
