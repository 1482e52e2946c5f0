"""``gem_pool``: generalised-mean pooling with one learnable exponent per channel group (GGeM; G = 1 is GeM).

``f_c = (mean_i clamp(x_ic, eps)^(p_g))^(1 / p_g)`` over the kept instances, with ``p_g`` the
exponent of channel c's group (G groups, e.g. G = the number of heads of a ViT). Activations below
``eps`` are clamped to ``eps`` (GeM's rule; negative ViT activations need a shift before pooling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["GeMPool"]


class GeMPool(Pooler):
    """GGeM pooling ``[B, N, C] -> [B, C]`` with ``groups`` learnable exponents (initialised to ``p``)."""

    def __init__(self, dim: int, *, groups: int = 1, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.groups = check_int("groups", groups)
        if dim % groups:
            raise ValueError(f"groups: must divide dim={dim}, got groups={groups}")
        if not (isinstance(p, (int, float)) and p > 0 and math.isfinite(p)):
            raise ValueError(f"p: expected a finite float > 0, got {p!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps: expected a float > 0, got {eps!r}")
        self.eps = float(eps)
        self.p = nn.Parameter(torch.full((groups,), float(p)), requires_grad=learn_p)

    def pool(self, bags: Bags) -> tuple[torch.Tensor, None]:
        p = self.p.to(bags.x.dtype).repeat_interleave(self.dim // self.groups)
        m = bags.mean(bags.x.clamp(min=self.eps).pow(p))
        return m.pow(1.0 / p), None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}"


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 7, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


def _p1_is_mean() -> tuple[torch.Tensor, torch.Tensor]:
    m = GeMPool(8, groups=4, p=1.0).double()
    x = _x()
    return m(x), x.mean(1)


def _g1_is_gem() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    return GeMPool(8, groups=1, p=3.0).double()(x), x.pow(3).mean(1).pow(1 / 3)


register(
    "gem_pool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("GGeM",),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the closed form (mean of clamped powers, then the root) in float64", reference_kwargs={},
    test_kwargs={"dim": 32, "groups": 4},
    summary="Generalised-mean (GeM) pooling with one learnable exponent per channel group (GGeM).",
    reductions=(Reduction("p1_is_mean", "p = 1 gives the mean", _p1_is_mean),
                Reduction("g1_is_gem", "G = 1 gives GeM (one exponent)", _g1_is_gem)),
)(GeMPool)
