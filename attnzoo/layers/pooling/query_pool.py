"""``query_pool``: query-based cross-attention pooling (attentive probes, class attention, target attention).

M query vectors cross-attend over the N tokens of each bag: ``Z = MHA(Q_M, X, X)`` with an
optional output projection and MLP; the output size does not depend on N. Query sources:
``learned`` (attentive probe), ``mean`` (a linear map of the bag mean), ``cls`` (the first kept
token of the bag attends over all of them: class attention) and ``external`` (a per-call
``query`` ``[B, M, C]``, e.g. DARE's target item). ``topk`` keeps each query's k highest-scoring
tokens (DARE's pre-selection). ``include_query_in_kv`` adds the M query vectors to the keys and
values (``MHA(Q_M, [Q_M; X], [Q_M; X])``, class attention over ``[CLS; patches]`` as in CaiT), in one
softmax with the tokens; the returned weights are then the tokens' (summing to their share, below 1).
``variant="ep"`` is Efficient Probing: no ``W_Q``/``W_K`` and no output projection; the values
``W_V X`` split channel-wise into M chunks and query m aggregates chunk m only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler, bag_attention, rank_in_bag
from attnzoo.layers.pooling.mean_pool import MeanPool
from attnzoo.registry import Reduction, register

__all__ = ["QueryPool", "QUERY_SOURCES", "VARIANTS"]

QUERY_SOURCES = ("learned", "mean", "cls", "external")
VARIANTS = ("mha", "ep")


class QueryPool(Pooler):
    """Multi-query cross-attention pooling ``[B, N, C] -> [B, M, C_out]`` (``[B, C_out]`` when M = 1).

    Weights: ``[B, N, M, H]`` (``mha``) or ``[B, N, M]`` (``ep``). ``C_out`` is ``dim`` (``out_dim``
    for ``ep``, which concatenates the M chunks into one ``[B, C_out]`` vector).
    """

    def __init__(self, dim: int, *, n_queries: int = 1, n_heads: int = 4, query_source: str = "learned",
                 variant: str = "mha", topk: int | None = None, out_proj: bool = True, mlp_ratio: float = 0.0,
                 out_dim: int | None = None, bias: bool = True, include_query_in_kv: bool = False) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.include_query_in_kv = bool(include_query_in_kv)
        if include_query_in_kv and (variant == "ep" or query_source == "cls"):
            reason = ("variant='ep' has no key projection for them" if variant == "ep" else
                      "query_source='cls' takes its query from the bag, whose tokens are the keys already")
            raise ValueError(f"include_query_in_kv: {reason}")
        self.n_queries = check_int("n_queries", n_queries)
        self.query_source = check_choice("query_source", query_source, QUERY_SOURCES)
        self.variant = check_choice("variant", variant, VARIANTS)
        self.topk = None if topk is None else check_int("topk", topk)
        if query_source == "cls" and n_queries != 1:
            raise ValueError(f"n_queries: query_source='cls' uses one query (the CLS token), got {n_queries}")
        if variant == "ep":
            if query_source != "learned":
                raise ValueError(f"query_source: variant='ep' uses learned queries, got {query_source!r}")
            self.out_dim = check_int("out_dim", out_dim if out_dim is not None else dim)
            if self.out_dim % self.n_queries:
                raise ValueError(f"n_queries: must divide out_dim={self.out_dim}, got {self.n_queries}")
            self.query = nn.Parameter(torch.randn(self.n_queries, dim) * dim ** -0.5)
            self.v = nn.Linear(dim, self.out_dim, bias=False)
            return
        if out_dim is not None:
            raise ValueError("out_dim: only variant='ep' sets the output width (mha outputs dim)")
        self.out_dim = dim
        self.n_heads = check_int("n_heads", n_heads)
        if dim % self.n_heads:
            raise ValueError(f"n_heads: must divide dim={dim}, got n_heads={n_heads}")
        if query_source == "learned":
            self.query = nn.Parameter(torch.randn(self.n_queries, dim) * 0.02)
        elif query_source == "mean":
            self.query_map = nn.Linear(dim, self.n_queries * dim)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias) if out_proj else None
        hidden = int(round(mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) \
            if hidden > 0 else None

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_weights: bool = False, query: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``x`` ``[B, N, C]``; ``query`` ``[B, M, C]`` (``[S, M, C]`` packed) for ``query_source='external'``."""
        if self.query_source == "external":
            b = (int(cu_seqlens.numel()) - 1 if isinstance(cu_seqlens, torch.Tensor) else
                 x.shape[0] if isinstance(x, torch.Tensor) else -1)
            if not isinstance(query, torch.Tensor) or tuple(query.shape) != (b, self.n_queries, self.dim):
                got = list(query.shape) if isinstance(query, torch.Tensor) else query
                raise ValueError(f"query: expected a tensor [{b}, {self.n_queries}, {self.dim}], got {got}")
        elif query is not None:
            raise ValueError(f"query: only used with query_source='external', got query_source={self.query_source!r}")
        return super().forward(x, mask=mask, cu_seqlens=cu_seqlens, return_weights=return_weights, query=query)

    def pool(self, bags: Bags, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = bags.x
        if self.variant == "ep":
            s = x @ self.query.t() / math.sqrt(self.dim)
            if self.topk is not None:
                s = s.masked_fill(rank_in_bag(bags, s) >= self.topk, float("-inf"))
            a = bags.softmax(s)
            v = self.v(x).unflatten(-1, (self.n_queries, self.out_dim // self.n_queries))
            return bags.weighted_sum(a, v).flatten(-2), a
        h, d, m = self.n_heads, self.dim // self.n_heads, self.n_queries
        if self.query_source == "learned":
            q0 = self.query
        elif self.query_source == "mean":
            q0 = self.query_map(bags.mean(x)).unflatten(-1, (m, self.dim))
        elif self.query_source == "cls":
            q0 = bags.first(x).unsqueeze(1)
        else:
            q0 = query
        q = self.q(q0).unflatten(-1, (h, d)) / math.sqrt(d)           # [B, M, H, d]
        k, v = self.k(x).unflatten(-1, (h, d)), self.v(x).unflatten(-1, (h, d))
        learned = self.query_source == "learned"
        extra = None
        if self.include_query_in_kv:
            extra = (self.k(q0).unflatten(-1, (h, d)), self.v(q0).unflatten(-1, (h, d)))
        z, a = bag_attention(bags, q, k, v, per_bag=not learned, topk=self.topk, extra=extra)
        if self.o is not None:
            z = self.o(z)
        if self.mlp is not None:
            z = z + self.mlp(z)
        return (z[:, 0] if m == 1 else z), a

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_queries={self.n_queries}, query_source={self.query_source!r}, "
                f"variant={self.variant!r}")


def _x(b: int = 2, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _zero_queries_is_mean_map() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(QueryPool, dim=8, n_heads=2, n_queries=2, bias=False)
    with torch.no_grad():
        m.query.zero_()
    x = _x()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    want = m.o(m.v(MeanPool(8)(x, mask=keep))).unsqueeze(1).expand(2, 2, 8)
    return m(x, mask=keep), want


def _permutation_invariant() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(QueryPool, dim=8, n_heads=2, n_queries=3, query_source="mean", mlp_ratio=2.0)
    x = _x()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    return m(x[:, perm]), m(x)


def _query_in_kv_is_attention_over_both() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(QueryPool, dim=8, n_heads=2, n_queries=2, include_query_in_kv=True)
    x = _x()
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, 4:] = False
    want = []
    for b, n in enumerate((9, 4)):
        kv = torch.cat([m.query, x[b, :n]])                                   # [Q_M; X]
        q = m.q(m.query).unflatten(-1, (2, 4)).transpose(0, 1) / 2.0          # [H, M, d], scale 1/sqrt(4)
        k, v = (f(kv).unflatten(-1, (2, 4)).transpose(0, 1) for f in (m.k, m.v))
        z = (torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(0, 1).flatten(-2)
        want.append(m.o(z))
    return m(x, mask=keep), torch.stack(want)


def _topk_all_is_full() -> tuple[torch.Tensor, torch.Tensor]:
    full = seeded(QueryPool, dim=8, n_heads=2, n_queries=2)
    top = seeded(QueryPool, dim=8, n_heads=2, n_queries=2, topk=9)
    x = _x()
    return top(x), full(x)


register(
    "query_pool", family=FAMILY, type="pooler", priority=1, input_kind="set",
    papers=("Efficient Probing (attentive probing)", "LLM embedding pooling study",
            "Adaptive pooling (noise attenuation)", "Gated class-attention (continual learning)", "CrossViT",
            "MaxPoolBERT", "DARE"),
    supports={"padding", "varlen"}, complexity="O(M N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "n_heads": 4, "n_queries": 1},
    summary="M query vectors (learned, bag mean, CLS, external) cross-attend over the bag: attentive probe, "
            "class attention, target attention with top-k pre-selection, and Efficient Probing (variant='ep').",
    reductions=(
        Reduction("zero_queries_is_mean_map", "zero queries give uniform weights: W_O W_V mean_pool(x)",
                  _zero_queries_is_mean_map),
        Reduction("permutation_invariant", "permutation-invariant without positional encoding", _permutation_invariant),
        Reduction("topk_all_is_full", "topk = N keeps every token (full cross-attention)", _topk_all_is_full),
        Reduction("query_in_kv", "include_query_in_kv is one softmax attention of the queries over [Q_M; X]",
                  _query_in_kv_is_attention_over_both),
    ),
)(QueryPool)
