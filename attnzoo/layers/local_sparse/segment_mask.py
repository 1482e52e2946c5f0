"""``segment_mask``: Segment-local attention with global keys/queries (BlockRank) and LAIT's per-layer schedule."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.cache import KVCache
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.patterns import Pattern, SegmentMask
from attnzoo.registry import Reduction, register


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

    call_pattern = True

    refused_arguments = ('context_dim', 'pattern', 'score_mod')  # base-class arguments it sets itself or cannot honour

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
        ``global_queries`` ``[B, N]`` for the new tokens (defaults from the constructor).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        pattern = self._pattern(x, segment_ids, global_keys, global_queries, cache) if self.segment_local else None
        return self.mix(x, cache=cache, pattern=pattern, **kw)

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
    ref = mha_from(m)
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
        y_ref = y_ref + mha_from(layer)(y_ref)
    return y, y_ref


def _seg_blockrank():
    m = seeded(SegmentAttention, dim=32, n_heads=4, segment_size=4, global_keys=2, global_queries=3)
    x = rand_x(n=14)
    ids = torch.arange(14) // 4
    gk, gq = torch.arange(14) < 2, torch.arange(14) >= 11
    allowed = (ids.view(-1, 1) == ids.view(1, -1)) | gk.view(1, -1) | gq.view(-1, 1)
    from attnzoo.patterns import Custom

    pat = Custom(lambda b, h, q, kv: allowed.to(q.device)[q, kv], per_batch=False, per_head=False)
    return m(x), mha_from(m, backend='reference', pattern=pat)(x)


register(
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
)(SegmentAttention)
