"""``gin_attention``: Attention matrix as a graph adjacency: GIN MLP((1+eps) v_i + sum_j A_ij v_j) or
PNA aggregators.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, load_shared, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, SMALL, rand_x
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


class GINAttention(MultiHeadAttention):
    """GIN-Attention: the attention matrix as a graph adjacency for GIN (or PNA) aggregation.

    ``aggregation="gin"``: per head ``u_i = (1 + ε)·v_i + Σ_j A_ij v_j`` (``v_i`` the token's
    own value), then ``Y = MLP(Concat_h u) W_O``; ``ε`` is a learned scalar (init 0), the
    MLP is ``Linear-GELU-Linear`` (``mlp=False``: identity).

    ``aggregation="pna"`` (Principal Neighborhood Aggregation over the attention graph, as
    in the official code, lamm-mit/Graph-Aware-Transformers ``src/xgpt/Attention_GNN.py``,
    ``LlamaAttentionPNA``): per head the aggregators ``sum = A V``, ``mean = A V / deg``,
    ``max = max_{j: A_ij > 0} v_j`` (elementwise) and ``var = max(A V² / deg − mean², 0)``
    with ``deg_i = Σ_j A_ij`` (1 where 0) are concatenated and mapped back to ``head_dim``
    by a per-head MLP ``Linear(4d, 2d)-SiLU-Linear(2d, d)``, then ``W_O``. (The code's
    default adjacency is ReLU of the scores; here it is the softmax attention matrix, one of
    the code's options, so ``sum = mean``.) ``max`` costs O(N²·d) memory.

    ``threshold`` sparsifies the adjacency (keeps ``A_ij > threshold``, no
    renormalisation; needs the weights, reference backend). Checked against the abstract
    (Graph-Aware Isomorphic Attention): "Graph Isomorphism Networks (GIN) and Principal
    Neighborhood Aggregation (PNA)" and "Sparse GIN-Attention ... interpreting attention
    matrices as sparse adjacency graphs". Self-attention only.
    """

    refused_arguments = ('context_dim', 'scale')  # base-class arguments it sets itself or cannot honour

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, mlp: bool = True, threshold: float | None = None,
                 aggregation: str = "gin", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.aggregation = check_choice("aggregation", aggregation, ("gin", "pna"))
        width = self.n_heads * self.head_dim
        d, h = self.head_dim, self.n_heads
        if aggregation == "gin":
            self.eps = nn.Parameter(torch.zeros(()))
            self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)) if mlp \
                else nn.Identity()
        else:
            bound1, bound2 = 1 / math.sqrt(4 * d), 1 / math.sqrt(2 * d)
            self.pna_w1 = nn.Parameter(torch.empty(h, 4 * d, 2 * d).uniform_(-bound1, bound1))
            self.pna_b1 = nn.Parameter(torch.empty(h, 2 * d).uniform_(-bound1, bound1))
            self.pna_w2 = nn.Parameter(torch.empty(h, 2 * d, d).uniform_(-bound2, bound2))
            self.pna_b2 = nn.Parameter(torch.empty(h, d).uniform_(-bound2, bound2))
        self.threshold = threshold

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if self.aggregation == "gin" and self.threshold is None:
            return super().attend(q, k, v, pattern, want_weights, call=call)
        _, a = attention(q, k, v, pattern=pattern, scale=self.scale, backend="reference", return_weights=True)
        if self.threshold is not None:
            a = a * (a > self.threshold)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        if self.aggregation == "gin":
            return torch.matmul(a, v), a
        return self.pna_aggregate(a, v), a

    @staticmethod
    def pna_aggregate(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[sum, mean, max, var]`` ``[B, H, N, 4d]`` of values ``v`` ``[B, H, M, d]`` over adjacency ``a``."""
        total = torch.matmul(a, v)
        deg = a.sum(-1, keepdim=True)
        deg = torch.where(deg == 0, torch.ones_like(deg), deg)
        mean = total / deg
        var = (torch.matmul(a, v * v) / deg - mean * mean).clamp(min=0)
        valid = (a > 0).unsqueeze(-1)  # [B, H, N, M, 1]
        big = torch.finfo(v.dtype).max
        mx = torch.where(valid, v.unsqueeze(2), torch.full((), -big, dtype=v.dtype, device=v.device)).amax(3)
        mx = torch.where(valid.any(3), mx, torch.zeros_like(mx))  # a token with no neighbour gets 0
        return torch.cat([total, mean, mx, var], -1)

    def post_attention(self, z, x, call=None):
        src = x if call is None else call.src  # each query's own value: that of the last N source tokens
        own = self.split(self.v_proj(src[:, src.shape[1] - z.shape[2]:]), self.n_kv_heads)
        own = own.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        if self.aggregation == "gin":
            return z + (1 + self.eps) * own
        hid = nn.functional.silu(torch.einsum("bhnf,hfg->bhng", z, self.pna_w1.to(z.dtype))
                                 + self.pna_b1.to(z.dtype).unsqueeze(1))
        return torch.einsum("bhng,hgd->bhnd", hid, self.pna_w2.to(z.dtype)) + self.pna_b2.to(z.dtype).unsqueeze(1)

    def output(self, z, x):
        if self.aggregation == "pna":
            return self.o_proj(self.merge(z))
        return self.o_proj(self.mlp(self.merge(z)))


def _gin_pna_aggregators() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=16, n_heads=2, aggregation="pna", threshold=0.15)
    x = rand_x(b=1, n=6, c=16)
    with torch.no_grad():
        q, k, v = g.project(x, x)
    agg = g.attend(q, k, v, None, False)[0]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    a = a * (a > 0.15)
    want = torch.empty_like(agg)
    for h in range(2):
        for i in range(6):
            nb = [j for j in range(6) if a[0, h, i, j] > 0]
            s = sum(a[0, h, i, j] * v[0, h, j] for j in range(6))
            deg = float(a[0, h, i].sum()) or 1.0
            mean = s / deg
            var = (sum(a[0, h, i, j] * v[0, h, j] ** 2 for j in range(6)) / deg - mean ** 2).clamp(min=0)
            mx = torch.stack([v[0, h, j] for j in nb]).amax(0) if nb else torch.zeros(8, dtype=torch.float64)
            want[0, h, i] = torch.cat([s, mean, mx, var])
    return agg, want


def _gin_pna_decoding() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    g = seeded(GINAttention, dim=32, n_heads=4, aggregation="pna")
    x = rand_x(n=9)
    full = g(x, causal=True)
    cache, parts, start = KVCache(), [], 0
    for size in (4, 1, 3, 1):
        parts.append(g(x[:, start:start + size], causal=True, cache=cache))
        start += size
    return torch.cat(parts, 1), full


def _gin_is_attention() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=32, n_heads=4, mlp=False)
    with torch.no_grad():
        g.eps.fill_(-1.0)
    m = MultiHeadAttention(32, 4).double()
    load_shared(g, m)
    x = rand_x()
    return g(x, causal=True), m(x, causal=True)


def _gin_threshold() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=32, n_heads=4, threshold=0.12)
    _, a = g(rand_x(), return_weights=True)
    kept = a[a != 0]
    return (kept > 0.12).all().to(torch.float64), torch.tensor(1.0, dtype=torch.float64)


register(
    "gin_attention", family=FAMILY, type="mixer", priority=3, papers=("GIN-Attention",),
    supports={"self", "causal", "padding", "decoding", "gqa"},
    summary="Attention matrix as a graph adjacency: GIN MLP((1+eps) v_i + sum_j A_ij v_j) or PNA aggregators.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("identity_mlp_eps_minus_one", "MLP = identity and ε = −1 give plain attention (mha)",
                  _gin_is_attention),
        Reduction("threshold", "the sparsified adjacency keeps only entries above the threshold", _gin_threshold),
        Reduction("pna_aggregators", "PNA sum/mean/max/var over the (thresholded) attention graph match a loop",
                  _gin_pna_aggregators),
        Reduction("pna_causal_decoding", "PNA aggregation is causal: KV-cache decoding equals the full forward",
                  _gin_pna_decoding),
    ),
)(GINAttention)


