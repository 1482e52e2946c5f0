"""``bi_level_routing``: region-to-region top-k routing: BiFormer's bi-level routing attention (BRA) on a grid of
regions, and DHSA's variable-length 1-D chunks with length-normalised chunk representations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import Call, check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    RoutedMixer,
    Routing,
    check_top_k,
    check_top_k_fits,
)
from attnzoo.layers.local_sparse._grid import flatten_grid, per_axis
from attnzoo.layers.testing import mha_from, random_grid, random_tokens
from attnzoo.ops import attention
from attnzoo.patterns import KeyPadding
from attnzoo.registry import Reduction, register


def region_members(rid: torch.Tensor, n_regions: int) -> torch.Tensor:
    """Token indices of every region, ``[B, R, L]`` (increasing, ``-1`` filler; ``L`` the largest region), from
    the region id of every token ``rid`` int64 ``[B, N]``."""
    b, n = rid.shape
    ar = torch.arange(n, device=rid.device)
    order = (rid * n + ar).argsort(dim=1)
    srt = rid.gather(1, order)
    counts = F.one_hot(rid, n_regions).sum(1)  # [B, R]
    start = counts.cumsum(1) - counts
    slot = ar.view(1, -1) - start.gather(1, srt)
    length = max(int(counts.max()), 1)
    out = torch.full((b, n_regions, length), -1, dtype=torch.int64, device=rid.device)
    out[torch.arange(b, device=rid.device).view(-1, 1), srt, slot] = order
    return out


def grid_region_ids(grid: tuple[int, ...], regions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Region id ``[N]`` of every token of a raster-ordered ``grid`` cut into ``regions[a]`` equal parts per axis."""
    rid = torch.zeros(1, dtype=torch.int64, device=device)
    for extent, parts in zip(grid, regions):
        along = torch.arange(extent, device=device) // (extent // parts)
        rid = (rid.view(-1, 1) * parts + along.view(1, -1)).flatten()
    return rid


class BiLevelRoutingAttention(RoutedMixer):
    """Bi-level routing attention: a coarse region-to-region routing, then token attention inside the routed
    regions (BiFormer BRA; DHSA's chunked form on sequences).

    The tokens are cut into regions: ``chunking="grid"`` cuts a channels-last grid ``[B, *spatial, C]`` (a
    sequence ``[B, N, C]`` is a 1-D grid) into ``regions`` equal parts per axis (BiFormer's ``n_win``: an
    ``S x S`` region grid in 2-D; each extent must be a multiple of it); ``chunking="adaptive"`` cuts a
    sequence into ``regions`` variable-length chunks. Region representations are the means of their kept
    tokens' ``q`` and ``k`` (``rep="mean"``, BRA) or those means times ``sqrt(len)`` (``rep="mean_sqrt_len"``,
    DHSA's length-normalised aggregation; for equal regions it changes nothing). The region affinity
    ``A = Q^r K^rᵀ`` (summed over heads, i.e. on the full q/k width as BRA routes, or per head with
    ``per_head_routing``) keeps the ``top_k`` key regions of every query region; every query attends all
    tokens of its region's routed regions (one softmax over their union). ``lce``: BRA's local context
    enhancement, a depthwise ``lce x lce`` convolution of ``V`` (on the grid, padded tokens zeroed) added to
    the attention output before ``o_proj`` (0: off; 1-D grids run it as a ``1 x N`` map).

    From the BiFormer code (rayleizhu/BiFormer ``ops/bra_legacy.py``, read): window means of q and k, routing
    logits on the full qk width shared by the heads, ``topk``, gathered K/V of the routed windows, the
    ``lepe`` depthwise conv of V added before ``wo``; routing detached by default (``diff_routing=False``), as
    here: the region choice is non-differentiable, gradients flow through the attention over the routed keys.
    Not implemented: BRA's K/V downsampling (``kv_downsample_mode``), ``param_routing`` / soft routing
    weights. From the DHSA abstract: variable-length chunks and the ``sqrt(len)`` scaling; DHSA's own chunk
    boundary predictor is not in the abstract, so ``chunking="adaptive"`` places the ``regions - 1``
    boundaries where consecutive keys are least alike (lowest mean cosine over heads; ties to the earlier
    position): a stand-in, recalled from no source. Causal attention (DHSA's LLM prefill) is refused: a
    region's query mean reads every token of the region, so the routing of a token would depend on later
    tokens. ``top_k`` above the number of regions of a call is refused; ``top_k`` equal to it is full
    attention.
    ``backend="auto"`` runs BRA's gathered form (:meth:`region_attend`: every query region gathers its routed
    regions' K/V, one dense problem per region and head); ``"reference"`` / ``"gather"`` / ``"sdpa"`` /
    ``"flex"`` run the same routing as per-query key lists on the routed-attention op (equal in float64).

    Args:
        dim, n_heads: as ``mha``.
        regions: regions per spatial axis (``int`` or one per axis) for ``"grid"``; the number of chunks for
            ``"adaptive"``.
        top_k: routed key regions per query region (its own region is not forced).
        rep: ``"mean"`` or ``"mean_sqrt_len"``.
        chunking: ``"grid"`` or ``"adaptive"`` (sequences / 1-D grids only).
        per_head_routing: route each head on its own affinity (BRA shares one routing across heads).
        lce: kernel size of the local context enhancement (odd; 0: off).
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``scale``, ``backend``).
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, regions: int | Sequence[int] = 7, top_k: int = 4,
                 rep: str = "mean", chunking: str = "grid", per_head_routing: bool = False, lce: int = 0,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.chunking = check_choice("chunking", chunking, ("grid", "adaptive"))
        if chunking == "adaptive":
            self.regions: int | tuple[int, ...] = check_int("regions", regions)
        else:
            per_axis(regions, 1 if isinstance(regions, int) else len(tuple(regions)), "regions")
            self.regions = regions if isinstance(regions, int) else tuple(regions)
        self.top_k = check_top_k(top_k)
        self.rep = check_choice("rep", rep, ("mean", "mean_sqrt_len"))
        self.per_head_routing = bool(per_head_routing)
        self.lce_size = check_int("lce", lce, minimum=0)
        if self.lce_size and self.lce_size % 2 == 0:
            raise ValueError(f"lce: expected an odd kernel size (or 0: off), got {lce}")
        width = n_heads * self.head_dim
        self.lce = nn.Conv2d(width, width, self.lce_size, padding=self.lce_size // 2, groups=width) \
            if self.lce_size else None

    # Per call ------------------------------------------------------------------------------
    def call_regions(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Regions per axis of a call on ``grid`` (checked: each extent a multiple, ``top_k`` at most their
        number); ``ValueError`` naming the argument otherwise."""
        if self.chunking == "adaptive":
            if len(grid) != 1:
                raise ValueError(f"x: chunking='adaptive' cuts sequences (1 spatial axes), got grid {grid}")
            if self.regions > grid[0]:
                raise ValueError(f"regions: expected at most the number of tokens ({grid[0]}) chunks, got "
                                 f"{self.regions}")
            parts: tuple[int, ...] = (self.regions,)
        else:
            parts = per_axis(self.regions, len(grid), "regions")
            bad = [a for a, (e, p) in enumerate(zip(grid, parts)) if e % p]
            if bad:
                raise ValueError(f"x: grid extent {grid} must be a multiple of regions {parts} on every axis")
        if self.lce is not None and len(grid) > 2:
            raise ValueError(f"x: lce runs a 2-D depthwise convolution: 1 or 2 spatial axes, got grid {grid}")
        check_top_k_fits(self.top_k, math.prod(parts), "regions")
        return parts

    def region_ids(self, k: torch.Tensor, keep: torch.Tensor | None, grid: tuple[int, ...]
                   ) -> tuple[torch.Tensor, int]:
        """``(rid [B, N] int64, R)``: the region of every token."""
        b, _, n, _ = k.shape
        if self.chunking == "grid":
            parts = per_axis(self.regions, len(grid), "regions")
            return grid_region_ids(grid, parts, k.device).expand(b, n), math.prod(parts)
        return adaptive_chunks(k, keep, self.regions), self.regions

    def region_routing(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, grid: tuple[int, ...]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rid [B, N], members [B, R, L], keys [B, H', R, top_k * L])``: every token's region, every region's
        tokens (-1 filler) and the tokens of every query region's routed regions (-1: none; ``H'`` is 1
        unless ``per_head_routing``)."""
        b, h, n, _ = q.shape
        rid, r = self.region_ids(k, keep, grid)
        w = torch.ones(b, n, dtype=q.dtype, device=q.device) if keep is None else keep.to(q.dtype)
        member = F.one_hot(rid, r).to(q.dtype) * w.unsqueeze(-1)  # [B, N, R]
        cnt = member.sum(1)  # [B, R]
        qr = torch.einsum("bnr,bhnd->bhrd", member, q) / cnt.clamp(min=1).view(b, 1, r, 1)
        kr = torch.einsum("bnr,bhnd->bhrd", member, k) / cnt.clamp(min=1).view(b, 1, r, 1)
        if self.rep == "mean_sqrt_len":
            qr, kr = (t * cnt.sqrt().view(b, 1, r, 1) for t in (qr, kr))
        scores = qr @ kr.transpose(-1, -2)  # [B, H, R, R]
        if not self.per_head_routing:
            scores = scores.sum(1, keepdim=True)
        scores = scores.masked_fill((cnt == 0).view(b, 1, 1, r), float("-inf"))
        val, idx = scores.topk(self.top_k, dim=-1)  # [B, H', R, k]
        members = region_members(rid, r)  # [B, R, L]
        hh = scores.shape[1]
        sel = members.view(b, 1, 1, r, -1).expand(b, hh, r, r, -1).gather(
            3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, members.shape[-1]))  # [B, H', R, k, L]
        return rid, members, torch.where((val > float("-inf")).unsqueeze(-1), sel, -1).flatten(3)

    def route(self, q, k, keep, call):
        b, h, n, _ = q.shape
        grid = call.extra.get("grid", (n,)) if call is not None else (n,)
        rid, _, sel = self.region_routing(q, k, keep, grid)
        hh = sel.shape[1]
        keys = sel.gather(2, rid.view(b, 1, n, 1).expand(b, hh, n, sel.shape[-1]))  # [B, H', N, K]
        return Routing("keys", keys.expand(b, h, n, keys.shape[-1]))

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if want_weights or self.backend != "auto":
            z, weights = super().attend(q, k, v, pattern, want_weights, call=call)
        else:
            z, weights = self.region_attend(q, k, v, call), None
        if self.lce is not None:
            z = z + self.local_context(v, call)
        return z, weights

    def region_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call | None) -> torch.Tensor:
        """BRA's gathered form (``backend="auto"``): each query region gathers the K/V of its routed regions and
        its queries attend them densely (:func:`attnzoo.attention`, one problem per region and head), memory
        linear in ``N x top_k``; equal to the key-routed op."""
        b, h, n, d = q.shape
        keep = call.kv_keep if call is not None else None
        keep = None if keep is None or bool(keep.all()) else keep
        grid = call.extra.get("grid", (n,)) if call is not None else (n,)
        with torch.no_grad():
            _, members, sel = self.region_routing(q.detach(), k.detach(), keep, grid)
        r, length = members.shape[1:]
        kidx = sel.expand(b, h, r, sel.shape[-1])  # [B, H, R, K]
        ok = kidx >= 0
        if keep is not None:
            ok = ok & keep.gather(1, kidx.clamp(min=0).reshape(b, -1)).view_as(kidx)
        qidx = members.view(b, 1, r, length).expand(b, h, r, length)

        def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            flat = idx.clamp(min=0).reshape(b, h, -1, 1).expand(-1, -1, -1, t.shape[-1])
            return t.gather(2, flat).view(b * h * r, 1, idx.shape[-1], t.shape[-1])

        big = b * h * r
        pad = None if bool(ok.all()) else KeyPadding(ok.reshape(big, -1))
        out = attention(take(q, qidx), take(k, kidx), take(v, kidx), pattern=pad, scale=self.attention_scale(q))
        dv = v.shape[-1]
        dest = torch.where(qidx >= 0, qidx, n).reshape(b, h, -1, 1).expand(-1, -1, -1, dv)
        z = out.new_zeros(b, h, n + 1, dv).scatter(2, dest, out.reshape(b, h, -1, dv))
        return z[:, :, :n]

    def local_context(self, v: torch.Tensor, call: Call | None) -> torch.Tensor:
        """BRA's LCE: the depthwise convolution of ``v`` ``[B, H, N, D]`` on the grid -> ``[B, H, N, D]``."""
        b, h, n, d = v.shape
        grid = call.extra.get("grid", (n,)) if call is not None else (n,)
        if call is not None and call.kv_keep is not None:
            v = v * call.kv_keep.view(b, 1, n, 1).to(v.dtype)
        hw = grid if len(grid) == 2 else (1, grid[0])
        fmap = self.merge(v).transpose(1, 2).reshape(b, h * d, *hw)
        return self.split(self.lce(fmap).flatten(2).transpose(1, 2), h)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, cache: Any = None,
                head_mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x`` ``[B, *spatial, C]`` (1 to 3 spatial axes; ``[B, N, C]`` is a sequence) -> the same shape (and
        weights ``[B, H, N, N]`` with ``return_weights``). ``mask``: bool ``[B, *spatial]``, True = keep."""
        if context is not None:
            raise ValueError("context: bi_level_routing is self-attention (its regions cut the input itself)")
        if cache is not None:
            raise ValueError("cache: bi_level_routing does not decode token by token (a region's mean needs all "
                             "its tokens)")
        if causal:
            raise ValueError("causal: bi_level_routing does not support causal attention (a region's query mean "
                             "reads the region's later tokens)")
        grid, flat, flat_mask = flatten_grid(x, mask, self.dim)
        self.call_regions(grid)
        out = self.mix(flat, mask=flat_mask, head_mask=head_mask, return_weights=return_weights,
                       extra={"grid": grid})
        y, w = out if return_weights else (out, None)
        y = y.reshape(x.shape)
        return (y, w) if return_weights else y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, regions={self.regions}, top_k={self.top_k}, rep={self.rep!r}, "
                f"chunking={self.chunking!r}, per_head_routing={self.per_head_routing}, lce={self.lce_size}")


def adaptive_chunks(k: torch.Tensor, keep: torch.Tensor | None, n_chunks: int) -> torch.Tensor:
    """Chunk id ``[B, N]`` of every token: boundaries after the ``n_chunks - 1`` positions ``t`` whose keys
    ``k_t, k_{t+1}`` (``[B, H, N, D]``) have the lowest mean cosine over heads (ties: the earlier ``t``; a pair
    with a padded token is never preferred, so padded content does not move the boundaries)."""
    b, _, n, _ = k.shape
    kn = F.normalize(k, dim=-1)
    sim = (kn[:, :, :-1] * kn[:, :, 1:]).sum(-1).mean(1)  # [B, N-1]
    if keep is not None:
        sim = torch.where(keep[:, :-1] & keep[:, 1:], sim, torch.full_like(sim, float("inf")))
    cut = sim.argsort(dim=1, stable=True)[:, :n_chunks - 1]
    boundary = torch.zeros(b, n, dtype=torch.int64, device=k.device)
    boundary.scatter_(1, cut + 1, 1)
    return boundary.cumsum(1)


# Reductions -------------------------------------------------------------------------------------
def _all_regions_is_mha():
    got, want = [], []
    x = random_grid(grid=(6, 8))
    m = seeded(BiLevelRoutingAttention, dim=32, n_heads=4, regions=2, top_k=4)
    got.append(m(x).flatten())
    want.append(mha_from(m)(x.reshape(2, -1, 32)).flatten())
    s = random_tokens(n=13)
    for chunking, regions in (("grid", 13), ("adaptive", 5)):
        m = seeded(BiLevelRoutingAttention, dim=32, n_heads=4, regions=regions, top_k=regions, chunking=chunking,
                   rep="mean_sqrt_len")
        got.append(m(s).flatten())
        want.append(mha_from(m)(s).flatten())
    return torch.cat(got), torch.cat(want)


def _explicit_region_mask(m, x, parts):
    """BRA written out: 2-D window means by reshaping, head-summed affinity, top-k, the token mask."""
    b, hh, ww, c = x.shape
    q, k, _ = m.project(x.reshape(b, -1, c), x.reshape(b, -1, c))
    sh, sw = parts

    def region_mean(t):
        t = t.reshape(b, 4, sh, hh // sh, sw, ww // sw, 8)
        return t.mean((3, 5)).reshape(b, 4, sh * sw, 8)

    scores = (region_mean(q) @ region_mean(k).transpose(-1, -2)).sum(1)  # [B, R, R]
    idx = scores.topk(m.top_k, -1).indices
    routed = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    rows, cols = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    rid = ((rows // (hh // sh)) * sw + cols // (ww // sw)).flatten()
    return routed[:, rid][:, :, rid]  # [B, N, N]


def _gathered_equals_region_masked_dense():
    from attnzoo.patterns import Custom

    x = random_grid(grid=(6, 8))
    m = seeded(BiLevelRoutingAttention, dim=32, n_heads=4, regions=(3, 2), top_k=2)
    allow = _explicit_region_mask(m, x, (3, 2))
    ref = mha_from(m, backend="reference", pattern=Custom(lambda b, h, q, kv: allow[b, q, kv], per_head=False))
    return m(x), ref(x.reshape(2, -1, 32)).reshape(x.shape)


def _mask_constant_within_region_pairs():
    got, want = [], []
    for chunking, regions, x in (("grid", (3, 2), random_grid(grid=(6, 8)).reshape(2, -1, 32)),
                                 ("adaptive", 4, random_tokens(n=15))):
        m = seeded(BiLevelRoutingAttention, dim=32, n_heads=4, regions=regions, top_k=2, chunking=chunking,
                   per_head_routing=True)
        grid = (6, 8) if chunking == "grid" else (15,)
        q, k, _ = m.project(x, x)
        allow = m.route(q, k, None, Call(x=x, src=x, extra={"grid": grid})).dense(x.shape[1], x.shape[1], False)
        rid, r = m.region_ids(k, None, grid)
        first = region_members(rid, r)[:, :, 0].gather(1, rid)  # [B, N]: the first token of each token's region
        expand = allow.gather(2, first.view(2, 1, -1, 1).expand_as(allow))
        expand = expand.gather(3, first.view(2, 1, 1, -1).expand_as(allow))
        got.append(expand.double().flatten())
        want.append(allow.double().flatten())
    return torch.cat(got), torch.cat(want)


register(
    "bi_level_routing", family=FAMILY, type="pattern", priority=2, input_kind="grid2d", papers=("BiFormer (BRA)",
                                                                                                "DHSA"),
    supports={"self", "padding"}, complexity="O(N R + N k N/R)",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Region-to-region top-k routing (BiFormer BRA on a region grid, DHSA variable 1-D chunks), then "
            "token attention over the routed regions' union; optional LCE.",
    test_kwargs={**SMALL, "regions": 2, "top_k": 2, "lce": 3},
    reductions=(
        Reduction("all_regions_is_mha", "top_k = #regions (LCE off) equals mha (2-D grid, 1-D, adaptive chunks)",
                  _all_regions_is_mha),
        Reduction("region_masked_dense", "the gathered result equals dense attention under the explicit region "
                  "mask (window means, head-summed affinity, top-k)", _gathered_equals_region_masked_dense),
        Reduction("mask_constant_per_region_pair", "the routing mask is constant within each region pair (grid "
                  "regions and adaptive chunks, per-head routing)", _mask_constant_within_region_pairs),
    ),
)(BiLevelRoutingAttention)
