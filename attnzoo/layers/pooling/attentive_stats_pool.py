"""``attentive_stats_pool``: attentive statistics pooling (attention-weighted mean and standard deviation).

``e_t = v^T tanh(W h_t + b) + k``, ``a = softmax_t(e)`` over the kept frames, ``mu = sum_t a_t h_t``,
``sigma = sqrt(clamp(sum_t a_t h_t * h_t - mu * mu, eps))``; output ``[mu; sigma]`` (``2 C``).
``channel_dependent`` (ECAPA-TDNN) gives every channel its own scores ``e_(t,c)`` (a softmax over t
per channel); ``global_context`` feeds the scorer ``[h_t; mean(H); std(H)]`` (the unweighted bag
statistics, broadcast to every frame). DRASP's dual-resolution variant is not implemented: the
abstract defines neither its segments nor its fusion.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["AttentiveStatsPool"]


class AttentiveStatsPool(Pooler):
    """Attentive statistics pooling ``[B, N, C] -> [B, 2 C]``; weights ``[B, N]`` (``[B, N, C]`` channel-dependent)."""

    def __init__(self, dim: int, *, attn_dim: int = 64, channel_dependent: bool = False, global_context: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
        self.eps = float(eps)
        self.channel_dependent, self.global_context = bool(channel_dependent), bool(global_context)
        self.proj = nn.Linear(dim * (3 if global_context else 1), check_int("attn_dim", attn_dim))
        self.score = nn.Linear(attn_dim, dim if channel_dependent else 1)

    def stats(self, bags: Bags, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted ``(mu, sigma)`` per bag (``a`` None: the plain mean / std over the kept frames)."""
        h = bags.x
        if a is None:
            mu, sq = bags.mean(h), bags.mean(h * h)
        elif a.shape[-1] == 1:
            mu, sq = bags.weighted_sum(a, h)[:, 0], bags.weighted_sum(a, h * h)[:, 0]
        else:
            mu = bags.weighted_sum(a, h.unsqueeze(-1))[..., 0]
            sq = bags.weighted_sum(a, (h * h).unsqueeze(-1))[..., 0]
        return mu, torch.sqrt(torch.clamp(sq - mu * mu, min=self.eps))

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        h = bags.x
        if self.global_context:
            mu, sigma = self.stats(bags, None)
            ctx = bags.broadcast(torch.cat([mu, sigma], -1))
            h_in = torch.cat([h, ctx.expand(*h.shape[:-1], 2 * self.dim)], -1)
        else:
            h_in = h
        a = bags.softmax(self.score(torch.tanh(self.proj(h_in))))
        mu, sigma = self.stats(bags, a)
        return torch.cat([mu, sigma], -1), (a if self.channel_dependent else a.squeeze(-1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channel_dependent={self.channel_dependent}, global_context={self.global_context}"


def _x(b: int = 2, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _uniform_is_stats_pooling() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentiveStatsPool, dim=8, attn_dim=6, channel_dependent=True, global_context=True)
    with torch.no_grad():
        m.score.weight.zero_()
    x = _x()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 3:] = False
    want = []
    for b, n in enumerate((9, 3)):
        mu = x[b, :n].mean(0)
        want.append(torch.cat([mu, torch.sqrt(torch.clamp((x[b, :n] ** 2).mean(0) - mu ** 2, min=1e-5))]))
    return m(x, mask=keep), torch.stack(want)


def _identical_frames_sigma() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentiveStatsPool, dim=8, attn_dim=6, eps=1e-6)
    x = _x(n=1).expand(2, 5, 8)
    return m(x)[:, 8:], torch.full((2, 8), 1e-3, dtype=torch.float64)


register(
    "attentive_stats_pool", family=FAMILY, type="pooler", priority=2, input_kind="set",
    papers=("ECAPA-TDNN", "DRASP"), supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "attn_dim": 16, "channel_dependent": True, "global_context": True},
    summary="Attentive statistics pooling [mu; sigma] with ECAPA's channel-dependent scores and global context "
            "(DRASP's dual resolution is not in the abstract and not implemented).",
    reductions=(
        Reduction("uniform_is_stats_pooling", "uniform weights give plain mean / std statistics pooling",
                  _uniform_is_stats_pooling),
        Reduction("identical_frames_sigma", "identical frames give sigma = sqrt(eps)", _identical_frames_sigma),
    ),
)(AttentiveStatsPool)
