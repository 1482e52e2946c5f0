"""``simpool``: SimPool, GAP-initialised single-query attention pooling with a power mean over the values.

``u = GAP(LN(X))``, ``q = W_q u``, ``K = W_k LN(X)``, ``a = softmax(q K^T / sqrt(C))`` over the kept
tokens; ``y = (sum_i a_i (x_i - m + eps)^gamma)^(1 / gamma) + m - eps`` with ``m`` the bag's minimum
(over its tokens and channels; the reference code takes it over the whole batch) and ``gamma = 2``;
no value or output projection. Shifting back by ``m - eps`` keeps ``y`` within [min, max] of X.
``use_gamma=False`` gives ``y = sum_i a_i x_i``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["SimPool"]


class SimPool(Pooler):
    """SimPool ``[B, N, C] -> [B, C]``; weights ``[B, N]``."""

    def __init__(self, dim: int, *, gamma: float = 2.0, use_gamma: bool = True, eps: float = 1e-6,
                 bias: bool = True) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not (isinstance(gamma, (int, float)) and gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma: expected a finite float > 0, got {gamma!r}")
        self.gamma, self.use_gamma, self.eps = float(gamma), bool(use_gamma), float(eps)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        xn = self.norm(bags.x)
        q = self.q(bags.mean(xn))
        s = (self.k(xn) * bags.broadcast(q)).sum(-1, keepdim=True) / math.sqrt(self.dim)
        a = bags.softmax(s)
        if not self.use_gamma:
            return bags.weighted_sum(a, bags.x)[:, 0], a[..., 0]
        low = bags.min(bags.x).amin(-1).detach() - self.eps              # [B]
        shifted = (bags.x - bags.broadcast(low).unsqueeze(-1)).clamp(min=0).pow(self.gamma)
        y = bags.weighted_sum(a, shifted)[:, 0].clamp(min=self.eps ** self.gamma).pow(1 / self.gamma)
        return y + low.unsqueeze(-1), a[..., 0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gamma={self.gamma}, use_gamma={self.use_gamma}"


def _wq0_is_gap() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = SimPool(8, use_gamma=False, bias=False).double()
    with torch.no_grad():
        m.q.weight.zero_()
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return m(x), x.mean(1)


register(
    "simpool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("SimPool",),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32},
    summary="SimPool: a GAP query over layer-normed keys, then a power mean (gamma = 2) of the min-shifted values.",
    reductions=(Reduction("wq0_is_gap", "W_q = 0 with use_gamma = False gives GAP exactly", _wq0_is_gap),),
)(SimPool)
