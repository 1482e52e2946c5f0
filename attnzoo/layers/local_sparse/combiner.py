"""``combiner``: Combiner (fixed partition): direct attention in the own region, one learned-weighted
abstraction per other region, in one softmax: full support.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.ops.score_mod import ScoreMod
from attnzoo.patterns import Causal, KeyPadding, Pattern
from attnzoo.registry import Reduction, register


class _CombinerPattern(Pattern):
    """Keys ``[tokens (m) ; regions (r)]``: query ``i`` (position ``q + m - n``) sees the tokens of its
    own region directly (causal: ``j <= i``) and every other region's abstraction (causal: earlier regions)."""

    def __init__(self, m: int, block: int, causal: bool) -> None:
        self.m, self.block, self.causal = m, block, causal

    def allow(self, b, h, q, kv, shape):
        i = q + (self.m - shape.n_q)
        own = torch.div(i, self.block, rounding_mode="floor")
        direct = (kv < self.m) & (torch.div(kv, self.block, rounding_mode="floor") == own)
        region = kv - self.m
        abstract = (kv >= self.m) & ((region < own) if self.causal else (region != own))
        if self.causal:
            direct = direct & (kv <= i)
        return direct | abstract

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = self.m - shape.n_q
        i_lo, i_hi = q_lo + off, q_hi + off
        o_lo, o_hi = i_lo // self.block, i_hi // self.block
        t_lo, t_hi = k_lo, k_hi.clamp(max=self.m - 1)
        d_any = (k_lo < self.m) & (t_lo // self.block <= o_hi) & (t_hi // self.block >= o_lo)
        d_all = (k_hi < self.m) & (o_lo == o_hi) & (k_lo // self.block == o_lo) & (k_hi // self.block == o_lo)
        if self.causal:
            d_any, d_all = d_any & (k_lo <= i_hi), d_all & (k_hi <= i_lo)
        r_lo, r_hi = (k_lo - self.m).clamp(min=0), k_hi - self.m
        if self.causal:
            a_any = (k_hi >= self.m) & (r_lo < o_hi)
            a_all = (k_lo >= self.m) & (r_hi < o_lo)
        else:
            a_any = (k_hi >= self.m) & ~((r_lo == r_hi) & (o_lo == o_hi) & (r_lo == o_lo))
            a_all = (k_lo >= self.m) & ((r_hi < o_lo) | (r_lo > o_hi))
        return d_any | a_any, d_all | a_all


class _RegionLogSize(ScoreMod):
    """``s += log |region|`` on the region keys (the abstraction stands for that many tokens)."""

    additive = True
    per_batch = True

    def __init__(self, log_size: torch.Tensor, m: int) -> None:
        self.log_size, self.m = log_size, m  # [B, R]

    def __call__(self, score, b, h, q, kv, shape):
        ls = self.on(self.log_size, score)
        region = (kv - self.m).clamp(min=0, max=ls.shape[1] - 1)
        return score + torch.where(kv >= self.m, ls[b, region], torch.zeros((), dtype=score.dtype, device=score.device))


class CombinerAttention(MultiHeadAttention):
    """Combiner (fixed partition): full-support attention in O(N b + N^2 / b).

    Tokens are split into regions of ``block`` tokens. Query ``i`` attends directly to the
    tokens of its own region (causal: up to ``i``) and to one abstraction per other region
    (causal: per earlier region): ``k_r = sum_j q(j|r) k_j``, ``v_r = sum_j q(j|r) v_j`` with
    ``q(j|r) = softmax_{j in r}(k_j . u_h / sqrt(d))`` (``u_h`` learned, zero-initialised: the
    mean) and logit ``q_i . k_r / sqrt(d) + log |r|``. One softmax over both, so the effective
    weight of token ``j`` in region ``r`` is ``p(r | i) q(j | r)``: every allowed position gets
    positive weight and the weights sum to 1. ``block = 1`` (singleton regions) is exact full
    attention. Padded tokens are left out of the abstractions.
    """

    # base-class arguments it sets itself or cannot honour
    refused_arguments = ('n_kv_heads', 'context_dim', 'pattern', 'score_mod')

    cross_ok = False  # regions partition one sequence: no cross-attention

    def __init__(self, dim: int, n_heads: int = 8, *, block: int = 16, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"n_kv_heads: Combiner needs n_kv_heads = n_heads, got {self.n_kv_heads}")
        self.block = check_int("block", block)
        self.region_query = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def abstractions(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None):
        """``(k_r [B, H, R, D], v_r, q(j|r) [B, H, R, block], region sizes [B, R])``."""
        b, h, m, d = k.shape
        r = math.ceil(m / self.block)
        pad = r * self.block - m
        kg = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, r, self.block, d)
        vg = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, r, self.block, -1)
        real = torch.nn.functional.pad(torch.ones(b, m, dtype=torch.bool, device=k.device) if keep is None else keep,
                                       (0, pad)).view(b, 1, r, self.block)
        logits = (kg * self.region_query.to(k.dtype).view(1, h, 1, 1, d)).sum(-1) / math.sqrt(d)
        logits = logits.masked_fill(~real, float("-inf"))
        any_real = real.any(-1, keepdim=True)
        w = torch.softmax(torch.where(any_real, logits, torch.zeros_like(logits)), -1) * any_real
        size = real[:, 0].sum(-1)  # [B, R]
        return (w.unsqueeze(-1) * kg).sum(-2), (w.unsqueeze(-1) * vg).sum(-2), w, size

    def _extended(self, q, k, v, pattern):
        b, h, n, _ = q.shape
        m = k.shape[2]
        causal = _has_causal(pattern)
        keep = _keep(pattern)
        kr, vr, w, size = self.abstractions(k, v, keep)
        keys = torch.cat([k, kr], 2)
        vals = torch.cat([v, vr], 2)
        pat: Pattern = _CombinerPattern(m, self.block, causal)
        valid = torch.cat([torch.ones(b, m, dtype=torch.bool, device=q.device) if keep is None else keep, size > 0], 1)
        if not bool(valid.all()):
            pat = pat & KeyPadding(valid)
        mod = _RegionLogSize(torch.log(size.clamp(min=1).to(q.dtype)), m)
        return keys, vals, pat, mod, w

    def attend(self, q, k, v, pattern, want_weights, call=None):
        keys, vals, pat, mod, _ = self._extended(q, k, v, pattern)
        res = attention(q, keys, vals, pattern=pat, score_mod=mod, scale=self.attention_scale(q),
                        backend="reference" if want_weights else self.backend, return_weights=want_weights)
        if not want_weights:
            return res, None
        return res[0], self._effective(res[1], pattern, k, v)

    def _effective(self, w_ext: torch.Tensor, pattern, k, v) -> torch.Tensor:
        """Effective weights ``[B, H, N, M]`` over tokens: direct weights plus ``p(r | i) q(j | r)``."""
        m = k.shape[2]
        _, _, _, _, qjr = self._extended(k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[-1]), k, v, pattern)
        direct, region = w_ext[..., :m], w_ext[..., m:]  # [B, H, N, M], [B, H, N, R]
        spread = (region.unsqueeze(-1) * qjr.unsqueeze(2)).flatten(-2)[..., :m]
        return direct + spread

    def effective_weights(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """``[B, H, N, N]``: the attention each token gives to each token, abstractions expanded."""
        return self(x, causal=causal, return_weights=True)[1]


def _has_causal(pattern: Any) -> bool:
    from attnzoo.patterns import And

    if isinstance(pattern, Causal):
        return True
    return isinstance(pattern, And) and (_has_causal(pattern.a) or _has_causal(pattern.b))


def _keep(pattern: Any) -> torch.Tensor | None:
    from attnzoo.patterns import And

    if isinstance(pattern, KeyPadding):
        return pattern.mask
    if isinstance(pattern, And):
        a = _keep(pattern.a)
        return a if a is not None else _keep(pattern.b)
    return None


def _combiner_singletons():
    m = seeded(CombinerAttention, dim=32, n_heads=4, block=1)
    with torch.no_grad():
        m.region_query.normal_()
    x = rand_x()
    ref = mha_from(m, backend="reference")
    return torch.stack([m(x), m(x, causal=True)]), torch.stack([ref(x), ref(x, causal=True)])


def _combiner_weights():
    m = seeded(CombinerAttention, dim=32, n_heads=4, block=4)
    with torch.no_grad():
        m.region_query.normal_()
    x = rand_x(n=14)
    got, want = [], []
    for causal in (False, True):
        w = m.effective_weights(x, causal=causal)
        support = torch.ones(14, 14, dtype=torch.bool)
        if causal:
            support = torch.tril(support)
        got += [w.sum(-1).flatten(), (w > 0).eq(support).double().flatten()]
        want += [torch.ones(w.shape[:-1], dtype=torch.float64).flatten(), torch.ones_like(w).flatten()]
    return torch.cat(got), torch.cat(want)


register(
    "combiner", family=FAMILY, type="mixer", priority=3, papers=("Combiner",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N b + N^2 / b)",
    summary="Combiner (fixed partition): direct attention in the own region, one learned-weighted abstraction "
            "per other region, in one softmax: full support.",
    test_kwargs={"dim": 32, "n_heads": 4, "block": 4},
    reductions=(
        Reduction("singletons_are_full", "singleton regions give full (and causal) attention", _combiner_singletons),
        Reduction("full_support_sums_to_one", "effective weights are positive on every allowed position and sum to 1",
                  _combiner_weights),
    ),
)(CombinerAttention)
