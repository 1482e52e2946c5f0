"""``attentive_stats_pool``: attentive statistics pooling (attention-weighted mean and standard deviation).

``e_t = v^T tanh(W h_t + b) + k``, ``a = softmax_t(e)`` over the kept frames, ``mu = sum_t a_t h_t``,
``sigma = sqrt(clamp(sum_t a_t h_t * h_t - mu * mu, eps))``; output ``[mu; sigma]`` (``2 C``).
``channel_dependent`` (ECAPA-TDNN) gives every channel its own scores ``e_(t,c)`` (a softmax over t
per channel); ``global_context`` feeds the scorer ``[h_t; mean(H); std(H)]`` (the unweighted bag
statistics, broadcast to every frame).

``dual_resolution`` (DRASP): ``alpha [mu; sigma] + beta [mu_s; sigma_s]``, a coarse branch (the plain
mean / std over the kept frames) plus a fine attentive branch over segments: each bag's kept frames,
in order, cut into consecutive segments of ``segment_size`` frames (the last one may be shorter),
each segment represented by the mean of its frames, and the attentive statistics above computed over
the segment representations. ``alpha`` and ``beta`` are learned scalars starting at 1 and 0 (so the
module starts as statistics pooling). The abstract defines neither the segments nor the fusion; they
follow a public implementation of the paper (segment means, a learned weighted sum) [unverified
against the paper's text]. The weights it returns are each frame's weight in the fine branch (its
segment's weight shared equally by the segment's frames).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.ops.segment import segment_sum
from attnzoo.registry import Reduction, register

__all__ = ["AttentiveStatsPool"]


class AttentiveStatsPool(Pooler):
    """Attentive statistics pooling ``[B, N, C] -> [B, 2 C]``; weights ``[B, N]`` (``[B, N, C]`` channel-dependent)."""

    def __init__(self, dim: int, *, attn_dim: int = 64, channel_dependent: bool = False, global_context: bool = False,
                 eps: float = 1e-5, dual_resolution: bool = False, segment_size: int = 4) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
        self.eps = float(eps)
        self.channel_dependent, self.global_context = bool(channel_dependent), bool(global_context)
        self.proj = nn.Linear(dim * (3 if global_context else 1), check_int("attn_dim", attn_dim))
        self.score = nn.Linear(attn_dim, dim if channel_dependent else 1)
        self.dual_resolution = bool(dual_resolution)
        self.segment_size = check_int("segment_size", segment_size)
        if self.dual_resolution:
            self.alpha = nn.Parameter(torch.tensor(1.0))
            self.beta = nn.Parameter(torch.tensor(0.0))
        elif segment_size != 4:
            raise ValueError(f"segment_size: only used with dual_resolution=True, got segment_size={segment_size}")

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

    def attentive(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        """``([mu; sigma] [B, 2 C], weights [., 1 or C])``: the attentive statistics over ``bags``' instances."""
        h = bags.x
        if self.global_context:
            mu, sigma = self.stats(bags, None)
            ctx = bags.broadcast(torch.cat([mu, sigma], -1))
            h_in = torch.cat([h, ctx.expand(*h.shape[:-1], 2 * self.dim)], -1)
        else:
            h_in = h
        a = bags.softmax(self.score(torch.tanh(self.proj(h_in))))
        return torch.cat(self.stats(bags, a), -1), a

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dual_resolution:
            out, a = self.attentive(bags)
            return out, (a if self.channel_dependent else a.squeeze(-1))
        segments, frame_segment, frames = segment_bags(bags, self.segment_size)
        fine, a_seg = self.attentive(segments)
        coarse = torch.cat(self.stats(bags, None), -1)
        dtype = coarse.dtype
        out = self.alpha.to(dtype) * coarse + self.beta.to(dtype) * fine
        if frames.numel():
            per_frame = (a_seg / frames.unsqueeze(-1))[frame_segment.clamp(min=0)]
            per_frame = per_frame * (frame_segment >= 0).unsqueeze(-1).to(per_frame.dtype)
        else:  # every bag is empty
            per_frame = a_seg.new_zeros(*frame_segment.shape, a_seg.shape[-1])
        return out, (per_frame if self.channel_dependent else per_frame.squeeze(-1))

    def extra_repr(self) -> str:
        dual = f", dual_resolution=True, segment_size={self.segment_size}" if self.dual_resolution else ""
        return (f"dim={self.dim}, channel_dependent={self.channel_dependent}, "
                f"global_context={self.global_context}{dual}")


def segment_bags(bags: Bags, size: int) -> tuple[Bags, torch.Tensor, torch.Tensor]:
    """Each bag's kept instances, in order, cut into consecutive segments of ``size`` (the last one may be
    shorter), as packed :class:`Bags` of the segment means (the bag of a segment is its instances' bag).

    Returns ``(segments, frame_segment, frames)``: ``frame_segment`` maps each instance (in the layout of
    ``bags``: ``[B, N]`` padded, ``[T]`` packed) to its segment (-1 on padding); ``frames`` ``[S]`` is the
    number of instances of each segment. The same segments come out of the padded and the packed layout.
    """
    x = bags.x
    if bags.packed:
        start = bags.cu_seqlens[:-1].index_select(0, bags.ids)
        rank = torch.arange(x.shape[0], device=x.device) - start
        bag_of, rows, keep = bags.ids, x, None
    else:
        keep = bags.mask if bags.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        rank = keep.long().cumsum(1) - 1
        bag_of = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(keep)
        rank, bag_of, rows = rank[keep], bag_of[keep], x[keep]
    counts = bags.counts().long()
    n_segments = (counts + size - 1) // size
    offset = torch.cumsum(n_segments, 0) - n_segments
    seg = offset.index_select(0, bag_of) + torch.div(rank, size, rounding_mode="floor")
    total = int(n_segments.sum())
    frames = segment_sum(torch.ones_like(seg, dtype=x.dtype), seg, total)
    means = segment_sum(rows, seg, total) / frames.clamp(min=1).unsqueeze(-1)
    cu = torch.cat([n_segments.new_zeros(1), torch.cumsum(n_segments, 0)])
    seg_ids = torch.repeat_interleave(torch.arange(bags.n_bags, device=x.device), n_segments)
    segments = Bags(means, None, seg_ids, cu, bags.n_bags)
    if keep is None:
        return segments, seg, frames
    frame_segment = torch.full(keep.shape, -1, dtype=torch.long, device=x.device)
    frame_segment[keep] = seg
    return segments, frame_segment, frames


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


def _dual_resolution_ends() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x(n=11)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 7:] = False
    single = seeded(AttentiveStatsPool, dim=8, attn_dim=6, channel_dependent=True)
    fine = seeded(AttentiveStatsPool, dim=8, attn_dim=6, channel_dependent=True, dual_resolution=True, segment_size=1)
    start = seeded(AttentiveStatsPool, dim=8, attn_dim=6, dual_resolution=True, segment_size=3)
    with torch.no_grad():
        fine.alpha.zero_()
        fine.beta.fill_(1.0)
    mu, sigma = start.stats(Bags.build(x, keep, None), None)
    return (torch.stack([fine(x, mask=keep), start(x, mask=keep)]),
            torch.stack([single(x, mask=keep), torch.cat([mu, sigma], -1)]))


def _segment_means() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x(b=1, n=7)
    segments, _, frames = segment_bags(Bags.build(x, None, None), 3)
    want = torch.stack([x[0, 0:3].mean(0), x[0, 3:6].mean(0), x[0, 6:7].mean(0)])
    return torch.cat([segments.x.flatten(), frames]), torch.cat([want.flatten(), x.new_tensor([3.0, 3.0, 1.0])])


register(
    "attentive_stats_pool", family=FAMILY, type="pooler", priority=2, input_kind="set",
    papers=("ECAPA-TDNN", "DRASP"), supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "attn_dim": 16, "channel_dependent": True, "global_context": True},
    summary="Attentive statistics pooling [mu; sigma] with ECAPA's channel-dependent scores and global context, "
            "and DRASP's dual resolution (global statistics plus attentive statistics over segments, fused by "
            "learned weights).",
    reductions=(
        Reduction("uniform_is_stats_pooling", "uniform weights give plain mean / std statistics pooling",
                  _uniform_is_stats_pooling),
        Reduction("identical_frames_sigma", "identical frames give sigma = sqrt(eps)", _identical_frames_sigma),
        Reduction("dual_resolution_ends", "DRASP with one-frame segments, alpha = 0 and beta = 1 is the "
                  "single-resolution module; at initialisation (alpha = 1, beta = 0) it is statistics pooling",
                  _dual_resolution_ends),
        Reduction("segment_means", "DRASP's segments are the means of consecutive runs of segment_size kept frames "
                  "(the last one shorter)", _segment_means),
    ),
)(AttentiveStatsPool)
