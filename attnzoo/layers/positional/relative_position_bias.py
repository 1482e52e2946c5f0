"""``relative_position_bias``: Learned per-head relative-position bias: 1-D clipped table or 2-D (2M-1)^2 Swin table."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention
from attnzoo.layers.positional._common import FAMILY, HOST_SUPPORT
from attnzoo.ops.layout import Shape
from attnzoo.patterns import RelativePositionBias
from attnzoo.registry import Reduction, register


def _rpb_zero_noop() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, score_mod=RelativePositionBias(4, max_distance=8)).double()
    ref = MultiHeadAttention(32, 4).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "table" not in k})
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    return m(x, causal=True), ref(x, causal=True)


def _rpb_shift() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    rpb = RelativePositionBias(2, max_distance=5).double()
    nn.init.normal_(rpb.table)
    zero = torch.zeros((), dtype=torch.float64)
    q = torch.arange(6).view(-1, 1)
    kv = torch.arange(6).view(1, -1)
    h = torch.arange(2).view(-1, 1, 1)
    shape = Shape(1, 2, 6, 6)
    return rpb(zero, 0, h, q + 11, kv + 11, shape), rpb(zero, 0, h, q, kv, shape)


register(
    "relative_position_bias", family=FAMILY, type="score_mod", priority=1, papers=("baseline",),
    supports=HOST_SUPPORT, complexity="O(N^2)", reference="the host mha with backend='reference' in float64",
    summary="Learned per-head relative-position bias: 1-D clipped table or 2-D (2M-1)^2 Swin table.",
    test_kwargs={"heads": 4, "max_distance": 8, "init_std": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("zero_table_noop", "an all-zero table is a no-op", _rpb_zero_noop),
        Reduction("shift_invariant", "scores are unchanged when all positions shift together", _rpb_shift),
    ),
)(RelativePositionBias)
