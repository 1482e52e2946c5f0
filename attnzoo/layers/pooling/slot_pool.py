"""``slot_pool``: prototype / slot attentive pooling (SlotCon semantic grouping).

``A_ik = softmax_k(cos(z_i, c_k) / tau)`` (each instance distributes itself over the K learned
prototypes), then each slot is ``s_k = sum_i A_ik z_i / sum_i A_ik`` over the kept instances: a
convex combination of the instance features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["SlotPool"]


class SlotPool(Pooler):
    """Slot pooling ``[B, N, C] -> [B, K, C]``; weights ``[B, N, K]`` (each slot's normalised weights)."""

    def __init__(self, dim: int, *, n_slots: int = 8, tau: float = 0.1) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.n_slots = check_int("n_slots", n_slots)
        if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau: expected a finite float > 0, got {tau!r}")
        self.tau = float(tau)
        self.prototypes = nn.Parameter(torch.randn(n_slots, dim))

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        z = bags.x
        cos = F.normalize(z, dim=-1, eps=1e-12) @ F.normalize(self.prototypes, dim=-1).to(z.dtype).t()
        assign = torch.softmax(cos / self.tau, -1)                      # [., K], over the prototypes
        mass = bags.sum(assign)                                          # [B, K]
        w = assign / bags.broadcast(torch.where(mass > 0, mass, torch.ones_like(mass)))
        if not bags.packed and bags.mask is not None:
            w = w.masked_fill(~bags.mask.unsqueeze(-1), 0)
        return bags.weighted_sum(w, z), w

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_slots={self.n_slots}, tau={self.tau}"


def _convex() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = SlotPool(8, n_slots=3).double()
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, w = m(x, return_weights=True)
    return torch.cat([w.sum(1).flatten(), y.flatten()]), torch.cat([torch.ones(6, dtype=torch.float64),
                                                                     torch.einsum("bnk,bnc->bkc", w, x).flatten()])


register(
    "slot_pool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("SlotCon",),
    supports={"padding", "varlen"}, complexity="O(N K)", backends=(),
    reference="the same module in float64", reference_kwargs={}, test_kwargs={"dim": 32, "n_slots": 4},
    summary="SlotCon slot pooling: soft assignment of instances to K prototypes (softmax of cosine / tau over "
            "prototypes), each slot the assignment-weighted mean of the instances.",
    reductions=(Reduction("convex_slots", "each slot is a convex combination of the instance features", _convex),),
)(SlotPool)
