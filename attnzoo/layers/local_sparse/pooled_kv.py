"""``pooled_kv``: Full-resolution queries over pooled K/V (2-D average or 1-D CCA significance
pooling), optionally in one softmax with a local window; causal sees completed groups only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, seeded, zero_padded
from attnzoo.layers.local_sparse._common import FAMILY, pool_grid, rand_x
from attnzoo.layers.local_sparse._grid import flatten_grid, per_axis
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.patterns import KeyPadding, Pattern
from attnzoo.patterns.base import Shape
from attnzoo.registry import Reduction, register


class _PooledUnion(Pattern):
    """Keys ``[pooled (n_pool) ; tokens (n_tok)]``: query ``i`` sees pooled key ``r`` (causal: only
    the completed earlier groups, ``r < i // group``) and, with a local window, token ``j`` with
    ``|i - j| <= window`` (causal: ``0 <= i - j < window``). Queries are the last ``n_q`` tokens."""

    def __init__(self, n_pool: int, group: int, window: int | None, causal: bool) -> None:
        self.n_pool, self.group, self.window, self.causal = n_pool, group, window, causal

    def _i(self, q, shape: Shape):
        n_tok = shape.n_kv - self.n_pool if self.window is not None else None
        off = (n_tok - shape.n_q) if n_tok is not None else 0
        return q + off

    def allow(self, b, h, q, kv, shape):
        i = self._i(q, shape)
        pooled = kv < self.n_pool
        p_ok = kv < torch.div(i, self.group, rounding_mode="floor") if self.causal else kv >= 0
        if self.window is None:
            return pooled & p_ok
        d = i - (kv - self.n_pool)
        l_ok = ((d >= 0) & (d < self.window)) if self.causal else (d.abs() <= self.window)
        return torch.where(pooled, p_ok, l_ok)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        i_lo, i_hi = self._i(q_lo, shape), self._i(q_hi, shape)
        p = self.n_pool
        if self.causal:
            p_any = (k_lo < p) & (k_lo < torch.div(i_hi, self.group, rounding_mode="floor"))
            p_all = (k_hi < p) & (k_hi < torch.div(i_lo, self.group, rounding_mode="floor"))
        else:
            p_any, p_all = k_lo < p, k_hi < p
        if self.window is None:
            return p_any, p_all
        j_lo, j_hi = (k_lo - p).clamp(min=0), k_hi - p
        w = self.window
        if self.causal:
            l_any = (k_hi >= p) & (j_lo <= i_hi) & (j_hi > i_lo - w)
            l_all = (k_lo >= p) & (j_hi <= i_lo) & (j_lo > i_hi - w)
        else:
            l_any = (k_hi >= p) & (j_lo <= i_hi + w) & (j_hi >= i_lo - w)
            l_all = (k_lo >= p) & (j_hi <= i_lo + w) & (j_lo >= i_hi - w)
        return p_any | l_any, p_all | l_all


class PooledKVAttention(MultiHeadAttention):
    """Spatial-reduction attention: full-resolution queries over pooled keys/values.

    Grids ``[B, *spatial, C]``: K and V are averaged over cells of ``pool`` tokens per axis
    (HiLo Lo-Fi, MAFormer GLD, DualToken-ViT global tokens): ``N / pool^D`` keys. Sequences
    ``[B, N, C]``: groups of ``pool`` consecutive tokens, averaged (``mode="avg"``) or merged
    by significance-weighted pooling (``mode="significance"``, CCA-Attention: weights are the
    softmax, within the group, of the group's last query against its keys, per head).
    ``causal`` (sequences): a query sees only the pooled tokens of completed earlier groups.
    ``local_window`` (sequences): one softmax over the pooled keys and a local window of
    tokens (``|i - j| <= w``; causal ``0 <= i - j < w``): CCA's locality-preserved attention.
    Padding: pooling averages kept tokens only. Projections as ``mha``; K/V are projected
    before pooling (equal to pooling first for the average).
    """

    # base-class arguments it sets itself or cannot honour
    refused_arguments = ('n_kv_heads', 'context_dim', 'pattern', 'score_mod', 'rope')

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, pool: int = 2, mode: str = "avg",
                 local_window: int | None = None, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.pool = pool
        self.mode = check_choice("mode", mode, ("avg", "significance"))
        self.local_window = None if local_window is None else check_int("local_window", local_window)

    def pooled_length(self, grid: tuple[int, ...]) -> int:
        """Number of pooled keys for a grid (``prod(ceil(extent / pool))``)."""
        s = per_axis(self.pool, len(grid), "pool")
        return math.prod(math.ceil(n / p) for n, p in zip(grid, s))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None, return_weights: bool = False, **kw: Any):
        """``x`` ``[B, N, C]`` or ``[B, *spatial, C]`` -> same shape.

        ``mask``: bool ``[B, N]`` (``[B, *spatial]`` for grid input), True = keep (a real token), False = padding.
        """
        if context is not None or cache is not None:
            raise ValueError("context, cache: PooledKVAttention is self-attention without a KV cache")
        grid, flat, keep = flatten_grid(x, mask, self.dim)
        s = per_axis(self.pool, len(grid), "pool")
        if len(grid) > 1:
            if causal or self.local_window is not None or self.mode != "avg":
                raise ValueError("causal, local_window, mode='significance': for sequences [B, N, C] only "
                                 f"(got a {len(grid)}-D grid {grid})")
            for axis, (n, p) in enumerate(zip(grid, s)):
                if n % p:
                    raise ValueError(f"pool: pool {p} does not divide the grid extent {n} on axis {axis}")
        q, k, v = self.project(flat, flat)
        kp, vp, valid = self._pool(q, k, v, keep, grid, s)
        n_pool = kp.shape[2]
        window = self.local_window
        if window is not None:
            kp, vp = torch.cat([kp, k], 2), torch.cat([vp, v], 2)
            if valid is not None or keep is not None:
                pv = valid if valid is not None else torch.ones(x.shape[0], n_pool, dtype=torch.bool, device=x.device)
                tv = keep if keep is not None else torch.ones_like(flat[..., 0], dtype=torch.bool)
                valid = torch.cat([pv, tv], 1)
        pattern: Any = None
        if causal or window is not None:
            pattern = _PooledUnion(n_pool, s[0], window, causal)
        if valid is not None and not bool(valid.all()):
            pad = KeyPadding(valid)
            pattern = pad if pattern is None else pattern & pad
        want = return_weights or self.capture
        res = attention(q, kp, vp, pattern=pattern, scale=self.attention_scale(q),
                        backend="reference" if want else self.backend, return_weights=want)
        z, w = res if want else (res, None)
        if self.capture:
            self.captured = {"weights": w, "z": z}
        y = zero_padded(self.output(z, flat), keep).reshape(x.shape)
        return (y, w) if return_weights else y

    def _pool(self, q, k, v, keep, grid, s):
        if self.mode == "avg":
            kp, valid = pool_grid(k, keep, grid, s)
            vp, _ = pool_grid(v, keep, grid, s)
            return kp, vp, valid
        g = s[0]
        b, h, n, d = k.shape
        ng = math.ceil(n / g)
        pad = ng * g - n
        kg = F.pad(k, (0, 0, 0, pad)).view(b, h, ng, g, d)
        vg = F.pad(v, (0, 0, 0, pad)).view(b, h, ng, g, -1)
        real = F.pad(torch.ones(n, dtype=torch.bool, device=k.device), (0, pad)).view(1, 1, ng, g)
        ok = real if keep is None else real & F.pad(keep, (0, pad)).view(b, 1, ng, g)
        # the group's last (kept) token is the query that weighs it
        pos = torch.arange(ng * g, device=k.device).view(1, ng, g).expand(b, ng, g)
        last = torch.where(ok[:, 0] if ok.shape[0] == b else ok[:, 0].expand(b, ng, g), pos, -1).amax(-1).clamp(min=0)
        q_last = torch.gather(q, 2, last.view(b, 1, ng, 1).expand(b, h, ng, d))
        scale = self.attention_scale(q) or 1.0 / math.sqrt(d)
        logits = (q_last.unsqueeze(-2) * kg).sum(-1) * scale  # [B, H, ng, g]
        logits = logits.masked_fill(~ok, float("-inf"))
        any_ok = ok.any(-1, keepdim=True)
        wts = torch.softmax(torch.where(any_ok, logits, torch.zeros_like(logits)), -1) * any_ok
        kp = (wts.unsqueeze(-1) * kg).sum(-2)
        vp = (wts.unsqueeze(-1) * vg).sum(-2)
        valid = None if keep is None else any_ok[:, 0, :, 0].expand(b, ng)
        return kp, vp, valid


def _pkv_pool_one_is_full():
    m = seeded(PooledKVAttention, dim=32, n_heads=4, pool=1)
    x1, x2 = rand_x(), torch.randn(2, 4, 6, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = mha_from(m, backend="reference")
    return torch.cat([m(x1).flatten(), m(x2).flatten()]), torch.cat([ref(x1).flatten(),
                                                                    ref(x2.view(2, 24, 32)).flatten()])


def _pkv_cca_g1_w1_is_causal():
    m = seeded(PooledKVAttention, dim=32, n_heads=4, pool=1, mode="significance", local_window=1)
    x = rand_x()
    return m(x, causal=True), mha_from(m, backend="reference")(x, causal=True)


def _pkv_key_count_and_avg():
    m = seeded(PooledKVAttention, dim=32, n_heads=4, pool=2)
    x = torch.randn(2, 4, 6, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q, k, v = m.project(x.view(2, 24, 32), x.view(2, 24, 32))
    pooled = k.view(2, 4, 2, 2, 3, 2, 8).mean((3, 5)).reshape(2, 4, 6, 8)
    vp = v.view(2, 4, 2, 2, 3, 2, 8).mean((3, 5)).reshape(2, 4, 6, 8)
    z = attention(q, pooled, vp, backend="reference")
    count = torch.tensor([float(m.pooled_length((4, 6)))], dtype=torch.float64)
    return (torch.cat([m(x).flatten(), count]), torch.cat([m.output(z, x).view(2, 4, 6, 32).flatten(),
                                                          torch.tensor([24.0 / 4], dtype=torch.float64)]))


def _pkv_no_future_groups():
    m = seeded(PooledKVAttention, dim=32, n_heads=4, pool=3, mode="significance", local_window=2)
    x = rand_x(n=13)
    x2 = x.clone()
    x2[:, 7:] += 1.0
    return m(x2, causal=True)[:, :7], m(x, causal=True)[:, :7]


register(
    "pooled_kv", family=FAMILY, type="mixer", priority=2,
    papers=("HiLo (LITv2)", "MAFormer", "DualToken-ViT", "CCA-Attention"),
    supports={"self", "causal", "padding"}, complexity="O(N (N / s^D + w))",
    summary="Full-resolution queries over pooled K/V (2-D average or 1-D CCA significance pooling), optionally "
            "in one softmax with a local window; causal sees completed groups only.",
    test_kwargs={"dim": 32, "n_heads": 4, "pool": 3, "mode": "significance", "local_window": 2},
    reductions=(
        Reduction("pool_one_is_full", "s = 1 (no window) gives full attention, 1-D and 2-D", _pkv_pool_one_is_full),
        Reduction("cca_g1_w1_is_causal", "g = 1 with window 1 gives causal attention", _pkv_cca_g1_w1_is_causal),
        Reduction("pooled_keys", "2-D: N / s^2 keys, each the cell average", _pkv_key_count_and_avg),
        Reduction("no_future_groups", "causal outputs ignore later tokens (incomplete groups are not pooled)",
                  _pkv_no_future_groups),
    ),
)(PooledKVAttention)
