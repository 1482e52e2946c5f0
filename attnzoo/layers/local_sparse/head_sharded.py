"""``head_sharded``: S2-Attention: each head attends to its own strided shard of the context; shards cover it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.patterns import Causal, HeadSharded, KeyPadding, Pattern
from attnzoo.patterns.base import Shape
from attnzoo.registry import Reduction, register


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

    refused_arguments = ('context_dim', 'pattern', 'score_mod')  # base-class arguments it sets itself or cannot honour

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

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if want_weights or self.backend == "reference":
            return super().attend(q, k, v, pattern, want_weights, call=call)
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
    return m(x), mha_from(m)(x)


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


register(
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
)(HeadShardedAttention)
