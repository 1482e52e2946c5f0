"""``mixed_pool``: mixed and gated max/average pooling over a bag.

Mixed: ``a * max(R) + (1 - a) * avg(R)`` with ``a`` learned per channel (clamped to [0, 1]). Gated:
``a = sigmoid(w^T avg(R) + b)`` per bag, from the bag mean (the region's values summarised by
their mean, since a bag has no fixed size for the paper's region-shaped gate mask). The region R
is the whole bag. Tree pooling (learned per-position leaf filters) needs regions of a fixed
size and is not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["MixedPool", "MODES"]

MODES = ("mixed", "gated")


class MixedPool(Pooler):
    """Mixed / gated max-average pooling ``[B, N, C] -> [B, C]``."""

    def __init__(self, dim: int, *, mode: str = "gated", mix: float = 0.5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, MODES)
        if mode == "mixed":
            self.mix = nn.Parameter(torch.full((dim,), float(mix)))
        else:
            self.gate = nn.Linear(dim, dim)

    def mixing(self, bags: Bags) -> torch.Tensor:
        """``a`` ``[B, C]`` (or ``[C]`` for ``mixed``) in [0, 1]."""
        if self.mode == "mixed":
            return self.mix.clamp(0.0, 1.0).to(bags.x.dtype)
        return torch.sigmoid(self.gate(bags.mean(bags.x)))

    def pool(self, bags: Bags) -> tuple[torch.Tensor, None]:
        a = self.mixing(bags)
        return a * bags.max(bags.x) + (1 - a) * bags.mean(bags.x), None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}"


def _ends() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = torch.stack([MixedPool(8, mode="mixed", mix=a).double()(x) for a in (1.0, 0.0)])
    return got, torch.stack([x.amax(1), x.mean(1)])


register(
    "mixed_pool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("Mixed/Gated/Tree pooling",),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the closed form a max + (1 - a) avg in float64", reference_kwargs={}, test_kwargs={"dim": 32},
    summary="Mixed (learned a) and gated (a = sigmoid(w^T avg + b)) mixtures of max and average pooling "
            "(tree pooling not implemented).",
    reductions=(Reduction("mix_ends", "a = 1 gives max and a = 0 gives avg", _ends),),
)(MixedPool)
