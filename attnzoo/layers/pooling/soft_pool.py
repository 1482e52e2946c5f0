"""``soft_pool``: SoftPool and AdaPool, exponentially weighted pooling over a bag (a global region).

SoftPool (eM): ``sum_i softmax_i(a)_i a_i`` per channel. eDSCW: weights ``w_i ∝ exp(DSC(a_i, ā))``
with the Dice-Sørensen coefficient ``DSC = 2 |a_i . ā| / (|a_i|^2 + |ā|^2)`` against the bag mean
``ā``. AdaPool: ``beta * eDSCW + (1 - beta) * eM`` with ``beta`` in [0, 1] learned per channel.
The region is the whole bag (the pooler contract).

adaUnPool (:meth:`SoftPool.unpool`) spreads a pooled vector ``y`` back over the bag's instances with
the same weights: ``beta y w_i^eDSCW + (1 - beta) y w_i^eM`` (one branch for ``softpool`` and
``edscw``), zero on padding. The weights sum to 1 over the bag, so the instances sum back to ``y``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler, check_bag_input
from attnzoo.registry import Reduction, register

__all__ = ["SoftPool", "MODES"]

MODES = ("softpool", "edscw", "adapool")


class SoftPool(Pooler):
    """SoftPool / eDSCW / AdaPool ``[B, N, C] -> [B, C]``; ``beta`` (AdaPool) is clamped to [0, 1]."""

    def __init__(self, dim: int, *, mode: str = "adapool", beta: float = 0.5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, MODES)
        if mode == "adapool":
            self.beta = nn.Parameter(torch.full((dim,), float(beta)))

    def _em_weights(self, bags: Bags) -> torch.Tensor:
        """eM's weights per instance and channel ``[., C]`` (a softmax over the bag per channel)."""
        return bags.softmax(bags.x)

    def _edscw_weights(self, bags: Bags) -> torch.Tensor:
        """eDSCW's weight per instance ``[., 1]`` (a softmax over the bag of the DSC with the bag mean)."""
        a = bags.x
        mean = bags.broadcast(bags.mean(a))
        dsc = 2 * (a * mean).sum(-1).abs() / ((a * a).sum(-1) + (mean * mean).sum(-1)).clamp(min=1e-12)
        return bags.softmax(dsc.unsqueeze(-1))

    def _em(self, bags: Bags) -> torch.Tensor:
        return bags.weighted_sum(self._em_weights(bags), bags.x.unsqueeze(-1))[..., 0]

    def _edscw(self, bags: Bags) -> torch.Tensor:
        return bags.weighted_sum(self._edscw_weights(bags), bags.x)[:, 0]

    def pool(self, bags: Bags) -> tuple[torch.Tensor, None]:
        if self.mode == "softpool":
            return self._em(bags), None
        if self.mode == "edscw":
            return self._edscw(bags), None
        beta = self.beta.clamp(0.0, 1.0).to(bags.x.dtype)
        return beta * self._edscw(bags) + (1 - beta) * self._em(bags), None

    def unpool(self, y: torch.Tensor, x: torch.Tensor, *, mask: torch.Tensor | None = None,
               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """adaUnPool: ``y`` ``[B, C]`` (one vector per bag, e.g. this module's output, or a processed
        version of it) spread over the instances of ``x`` ``[B, N, C]`` (``mask``) or packed ``[1, T, C]``
        (``cu_seqlens``, ``y`` ``[S, C]``) with the pooling weights of ``x``; returns the layout of ``x``,
        zeros on padding and in empty bags."""
        check_bag_input(x, mask, cu_seqlens, self.dim)
        bags = Bags.build(x, mask, cu_seqlens)
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (bags.n_bags, self.dim) or y.dtype != x.dtype:
            got = f"{y.dtype} {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected a {x.dtype} tensor [{bags.n_bags}, {self.dim}] (one vector per bag), "
                             f"got {got}")
        if self.mode == "softpool":
            w = self._em_weights(bags)
        elif self.mode == "edscw":
            w = self._edscw_weights(bags)
        else:
            beta = self.beta.clamp(0.0, 1.0).to(x.dtype)
            w = beta * self._edscw_weights(bags) + (1 - beta) * self._em_weights(bags)
        out = bags.broadcast(y) * w
        if not bags.packed and bags.mask is not None:
            out = out.masked_fill(~bags.mask.unsqueeze(-1), 0)
        return bags.to_instances(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}"


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _beta_ends() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    got = [SoftPool(8, beta=b).double()(x) for b in (0.0, 1.0)]
    want = [SoftPool(8, mode=m).double()(x) for m in ("softpool", "edscw")]
    return torch.stack(got), torch.stack(want)


def _constant_region() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()[:, :1].expand(2, 5, 8)
    return torch.stack([SoftPool(8, mode=m).double()(x) for m in MODES]), x[:, 0].expand(3, 2, 8)


def _unpool_sums_back() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    got, want = [], []
    for mode in MODES:
        m = SoftPool(8, mode=mode, beta=0.3).double()
        y = m(x, mask=keep)
        got.append(m.unpool(y, x, mask=keep).sum(1))
        want.append(y)
    return torch.stack(got), torch.stack(want)


register(
    "soft_pool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("SoftPool", "AdaPool"),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32},
    summary="SoftPool (softmax-weighted values), eDSCW (Dice-Sørensen weights against the mean) and AdaPool "
            "(a learned per-channel mix of the two) over a bag, and adaUnPool (unpool) with the same weights.",
    reductions=(Reduction("beta_ends", "beta = 0 gives SoftPool and beta = 1 gives eDSCW", _beta_ends),
                Reduction("constant_region", "a constant region returns the constant", _constant_region),
                Reduction("unpool_sums_back", "adaUnPool spreads y with weights summing to 1: the unpooled "
                          "instances sum back to y", _unpool_sums_back)),
)(SoftPool)
