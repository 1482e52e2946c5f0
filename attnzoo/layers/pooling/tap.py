"""``tap``: token aggregation pooling before attention, ``x'_i = sum_k w_ik AvgPool_k(X)_i``.

Several local average-pooling kernels (sizes ``kernels``, the identity kernel 1 included) over a
1-D, 2-D or 3-D grid of channels-last tokens, mixed per token with weights ``w_i = softmax(W x_i + b)``
over the kernels (learned). Padded tokens are left out of every average and give zero rows. Its
ADL loss is the ``attention_diversity`` metric.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, check_grid_call, local_average
from attnzoo.registry import Reduction, register

__all__ = ["TokenAggregationPooling"]


class TokenAggregationPooling(nn.Module):
    """TAP ``[B, *spatial, C] -> [B, *spatial, C]`` over the odd ``kernels`` (1 = identity)."""

    def __init__(self, dim: int, *, kernels: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        ks = tuple(check_int("kernels", k) for k in kernels)
        if not ks or any(k % 2 == 0 for k in ks) or 1 not in ks:
            raise ValueError(f"kernels: expected odd sizes including 1 (the identity), got {kernels!r}")
        self.kernels = ks
        self.weight = nn.Linear(dim, len(ks))

    def kernel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token weights over the kernels ``[B, *spatial, K]``."""
        return torch.softmax(self.weight(x), -1)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``x`` ``[B, *spatial, C]`` -> same shape; ``mask`` bool ``[B, *spatial]``, True = keep.
        ``causal`` and ``context`` are refused."""
        check_grid_call("tap", x, self.dim, mask, causal, context)
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0)
        w = self.kernel_weights(x)
        pooled = torch.stack([x if k == 1 else local_average(x, mask, k) for k in self.kernels], -1)
        y = (pooled * w.unsqueeze(-2)).sum(-1)
        return y if mask is None else y.masked_fill(~mask.unsqueeze(-1), 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernels={self.kernels}"


def _identity_weight() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(TokenAggregationPooling, dim=8)
    with torch.no_grad():
        m.weight.weight.zero_()
        m.weight.bias.copy_(torch.tensor([800.0, 0.0, 0.0]))
    x = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return m(x), x


register(
    "tap", family=FAMILY, type="mixer", priority=3, input_kind="grid2d", papers=("TAP+ADL (robust token attention)",),
    supports={"self", "padding"}, complexity="O(N K)", backends=(), reference="the same module in float64",
    reference_kwargs={}, test_kwargs={"dim": 32},
    summary="Token aggregation pooling: a learned per-token softmax mix of local average pools (identity included).",
    reductions=(Reduction("identity_weight", "weight 1 on the identity kernel returns the original tokens",
                          _identity_weight),),
)(TokenAggregationPooling)
