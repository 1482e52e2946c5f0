"""``shifted_group_attention``: SinkLoRA SF-Attn: causal group attention, half the heads on half-
shifted groups, plus sinks.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, load_shared, seeded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.local_sparse.segment_mask import SegmentAttention
from attnzoo.patterns import ShiftedGroups
from attnzoo.patterns.base import Shape
from attnzoo.registry import Reduction, register


class ShiftedGroupAttention(MultiHeadAttention):
    """SinkLoRA SF-Attn (:class:`~attnzoo.patterns.ShiftedGroups`): causal group-local attention
    in groups of ``group`` tokens, the second half of the heads on groups shifted by
    ``group // 2`` (in place, so the outputs come back in token order), every query also
    seeing the first ``n_sink`` tokens. Always causal. ``shift=False``: all heads unshifted.
    (SinkLoRA's H2O KV eviction at inference is not part of this entry.)
    """

    # base-class arguments it sets itself or cannot honour
    refused_arguments = ('n_kv_heads', 'context_dim', 'pattern', 'score_mod')

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


register(
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
)(ShiftedGroupAttention)
