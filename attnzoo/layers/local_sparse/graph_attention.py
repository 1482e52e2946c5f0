"""Catalogue section 3, graph attention: GAT, GATv2 and dot-product scores over graph neighbourhoods,
with an optional global codebook (LargeGT)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.ops import attention
from attnzoo.patterns import Adjacency
from attnzoo.registry import Reduction, register


class GraphAttention(MultiHeadAttention):
    """Attention restricted to graph neighbourhoods: ``alpha_ij = softmax_{j in N(i)} e_ij``.

    Scores (per head, ``q = W_q h``, ``k = W_k h``; messages ``v = W_v h``):
    ``scorer="gat"``: ``e_ij = LeakyReLU(a_q . q_i + a_k . k_j)`` (GAT; its ranking of
    neighbours is the same for every query); ``"gatv2"``: ``e_ij = a . LeakyReLU(q_i + k_j)``
    (GATv2, dynamic); ``"dot"``: ``e_ij = q_i . k_j / sqrt(d)`` (LargeGT's local module). GAT's
    single ``W`` is the case ``W_q = W_k = W_v``. The graph: ``forward(..., adj=bool [N, N] or
    [B, N, N])`` or ``edges=int [2, E]`` (``(query node, key node)`` rows), else the ``adj``
    given at construction, else the complete graph. A node with no neighbour outputs zeros.
    ``codebook_size = K > 0`` adds LargeGT's global branch: every node also attends to ``K``
    learned codebook vectors (its own softmax), added through ``g_proj``.

    The dot scorer runs through :func:`attnzoo.attention` with an
    :class:`~attnzoo.patterns.Adjacency` pattern (every backend); GAT/GATv2 run an exact
    edge-list softmax (``O(E d)``), or dense masked scores with ``backend="reference"``.
    """

    call_pattern = True

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, scorer: str = "gatv2", negative_slope: float = 0.2,
                 codebook_size: int = 0, adj: torch.Tensor | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        self.scorer = check_choice("scorer", scorer, ("gat", "gatv2", "dot"))
        self.negative_slope = float(negative_slope)
        hd = self.head_dim
        if scorer == "gat":
            self.att_q = nn.Parameter(torch.randn(n_heads, hd) / hd ** 0.5)
            self.att_k = nn.Parameter(torch.randn(n_heads, hd) / hd ** 0.5)
        elif scorer == "gatv2":
            self.att = nn.Parameter(torch.randn(n_heads, hd) / hd ** 0.5)
        self.codebook_size = check_int("codebook_size", codebook_size, minimum=0)
        if codebook_size:
            self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * 0.5)
            self.g_proj = nn.Linear(n_heads * hd, dim, bias=bias)
        if adj is not None:
            Adjacency(adj)  # validates
        self.adj = adj

    # Scores -----------------------------------------------------------------------------------
    def edge_scores(self, q: torch.Tensor, k: torch.Tensor, bi: torch.Tensor, qi: torch.Tensor,
                    kj: torch.Tensor) -> torch.Tensor:
        """``e`` ``[E, H]`` for edges ``(batch bi, query qi, key kj)``; ``q``, ``k`` ``[B, H, N, D]``."""
        qe, ke = q[bi, :, qi], k[bi, :, kj]  # [E, H, D]
        if self.scorer == "gat":
            return F.leaky_relu((qe * self.att_q).sum(-1) + (ke * self.att_k).sum(-1), self.negative_slope)
        if self.scorer == "gatv2":
            return (self.att * F.leaky_relu(qe + ke, self.negative_slope)).sum(-1)
        return (qe * ke).sum(-1) * (self.scale if self.scale is not None else self.head_dim ** -0.5)

    def dense_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``e`` ``[B, H, N, N]`` for every pair."""
        if self.scorer == "gat":
            sq = (q * self.att_q.unsqueeze(1)).sum(-1)
            sk = (k * self.att_k.unsqueeze(1)).sum(-1)
            return F.leaky_relu(sq.unsqueeze(-1) + sk.unsqueeze(-2), self.negative_slope)
        if self.scorer == "gatv2":
            pair = F.leaky_relu(q.unsqueeze(3) + k.unsqueeze(2), self.negative_slope)
            return (pair * self.att.view(1, -1, 1, 1, self.head_dim)).sum(-1)
        return (q @ k.transpose(-1, -2)) * (self.scale if self.scale is not None else self.head_dim ** -0.5)

    # Forward ----------------------------------------------------------------------------------
    def _graph(self, b: int, n: int, adj: torch.Tensor | None, edges: torch.Tensor | None,
               device: torch.device) -> torch.Tensor | None:
        if adj is not None and edges is not None:
            raise ValueError("adj, edges: pass one graph, got both")
        if edges is not None:
            return Adjacency.from_edges(edges.to(device), n).adj
        adj = self.adj if adj is None else adj
        if adj is None:
            return None
        if not isinstance(adj, torch.Tensor) or adj.dtype != torch.bool or tuple(adj.shape[-2:]) != (n, n) or (
                adj.dim() == 3 and adj.shape[0] != b) or adj.dim() not in (2, 3):
            got = f"{adj.dtype} {list(adj.shape)}" if isinstance(adj, torch.Tensor) else type(adj).__name__
            raise ValueError(f"adj: expected a bool tensor [{n}, {n}] or [{b}, {n}, {n}], got {got}")
        return adj.to(device)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None, adj: torch.Tensor | None = None,
                edges: torch.Tensor | None = None, return_weights: bool = False, **kw: Any):
        """``x`` ``[B, N, C]`` node features -> ``[B, N, C]`` (and weights ``[B, H, N, N]``).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None or cache is not None:
            raise ValueError("context, cache: GraphAttention is self-attention over one graph")
        b, n, _ = x.shape
        graph = self._graph(b, n, adj, edges, x.device)
        if self.scorer == "dot":
            out = self.mix(x, mask=mask, causal=causal, return_weights=return_weights,
                           pattern=Adjacency(graph) if graph is not None else None, **kw)
            y, w = out if return_weights else (out, None)
        else:
            q, k, v = self.project(x, x)
            if return_weights or self.backend == "reference":
                z, w = self._dense(q, k, v, graph, causal, mask)
            else:
                z, w = self._edges(q, k, v, graph, causal, mask), None
            y = self.output(z, x)
        if self.codebook_size:
            y = y + self._global(x)
        y = zero_padded(y, mask)
        return (y, w) if return_weights else y

    def _allowed(self, graph, causal, keep, b, n, device) -> torch.Tensor:
        allowed = torch.ones(1, n, n, dtype=torch.bool, device=device) if graph is None else graph.view(-1, n, n)
        if causal:
            allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=device).tril()
        if keep is not None:
            allowed = allowed & keep.view(b, 1, n)
        return allowed  # [B' , N, N]

    def _dense(self, q, k, v, graph, causal, keep):
        b, h, n, _ = q.shape
        allowed = self._allowed(graph, causal, keep, b, n, q.device).unsqueeze(1)  # [B', 1, N, N]
        e = self.dense_scores(q, k).masked_fill(~allowed, float("-inf"))
        row = allowed.any(-1, keepdim=True)
        w = torch.softmax(torch.where(row, e, torch.zeros_like(e)), -1) * row
        return w @ v, w

    def _edges(self, q, k, v, graph, causal, keep):
        b, h, n, d = q.shape
        allowed = self._allowed(graph, causal, keep, b, n, q.device).expand(b, n, n)
        bi, qi, kj = allowed.nonzero(as_tuple=True)
        z = q.new_zeros(b * n, h, v.shape[-1])
        if bi.numel() == 0:
            return z.view(b, n, h, -1).transpose(1, 2)
        e = self.edge_scores(q, k, bi, qi, kj)  # [E, H]
        row = bi * n + qi
        m = torch.full((b * n, h), float("-inf"), dtype=e.dtype, device=e.device)
        m = m.scatter_reduce(0, row.view(-1, 1).expand_as(e), e, "amax", include_self=True)
        p = torch.exp(e - m[row])
        den = torch.zeros(b * n, h, dtype=e.dtype, device=e.device).index_add(0, row, p)
        alpha = p / den[row]
        z = z.index_add(0, row, alpha.unsqueeze(-1) * v[bi, :, kj])
        return z.view(b, n, h, -1).transpose(1, 2)

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        cb = self.codebook.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        q = self.split(self.q_proj(x), self.n_heads)
        k, v = self.split(self.k_proj(cb), self.n_kv_heads), self.split(self.v_proj(cb), self.n_kv_heads)
        z = attention(q, k, v, scale=self.scale, backend=self.backend)
        return self.g_proj(self.merge(z))


def _graph_dot_complete_is_mha():
    m = seeded(GraphAttention, dim=32, n_heads=4, scorer="dot")
    ref = MultiHeadAttention(32, 4, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    x = rand_x(n=10)
    full = torch.ones(10, 10, dtype=torch.bool)
    return torch.stack([m(x), m(x, adj=full), m(x, causal=True)]), torch.stack([ref(x), ref(x), ref(x, causal=True)])


def _graph_alpha_normalised():
    g = torch.Generator().manual_seed(1)
    adj = torch.rand(2, 10, 10, generator=g) < 0.3
    adj[:, 3] = False  # an isolated query node
    got, want = [], []
    for scorer in ("gat", "gatv2", "dot"):
        m = seeded(GraphAttention, dim=32, n_heads=4, scorer=scorer)
        _, w = m(rand_x(n=10), adj=adj, return_weights=True)
        has = adj.any(-1).unsqueeze(1).expand(2, 4, 10)
        got += [w.sum(-1)[has], w.masked_fill(adj.unsqueeze(1), 0.0).abs().sum().view(1), w.sum(-1)[~has]]
        want += [torch.ones(int(has.sum()), dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                 torch.zeros(int((~has).sum()), dtype=torch.float64)]
    return torch.cat(got), torch.cat(want)


def _graph_edges_equal_dense():
    g = torch.Generator().manual_seed(2)
    adj = torch.rand(10, 10, generator=g) < 0.4
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    got, want = [], []
    for scorer in ("gat", "gatv2"):
        m = seeded(GraphAttention, dim=32, n_heads=4, scorer=scorer)
        ref = seeded(GraphAttention, dim=32, n_heads=4, scorer=scorer, backend="reference")
        ref.load_state_dict(m.state_dict())
        x = rand_x(n=10)
        edges = adj.nonzero().t()
        got += [m(x, edges=edges), m(x, adj=adj, mask=keep, causal=True)]
        want += [ref(x, adj=adj), ref(x, adj=adj, mask=keep, causal=True)]
    return torch.stack(got), torch.stack(want)


def _graph_gat_static_ranking():
    m = seeded(GraphAttention, dim=32, n_heads=4, scorer="gat")
    q, k, _ = m.project(rand_x(n=10), rand_x(n=10))
    best = m.dense_scores(q, k).argmax(-1)  # [B, H, N]
    distinct = torch.tensor([float(len(torch.unique(best[b, h]))) for b in range(2) for h in range(4)],
                            dtype=torch.float64)
    return distinct, torch.ones_like(distinct)


register(
    "graph_attention", family=FAMILY, type="mixer", priority=2, input_kind="set", papers=("GATv2", "LargeGT"),
    supports={"self", "causal", "padding"}, complexity="O(E d)",
    summary="Attention over graph neighbourhoods (adjacency or edge list) with GAT, GATv2 or dot scores and an "
            "optional LargeGT global codebook.",
    test_kwargs={"dim": 32, "n_heads": 4, "scorer": "gatv2", "codebook_size": 3},
    reductions=(
        Reduction("dot_complete_is_mha", "a complete graph with the dot scorer equals mha", _graph_dot_complete_is_mha),
        Reduction("alpha_normalised", "alpha sums to 1 over each neighbourhood and is 0 outside it (all scorers)",
                  _graph_alpha_normalised),
        Reduction("edges_equal_dense", "the edge-list softmax equals dense masked scores (GAT, GATv2; padding, "
                  "causal)", _graph_edges_equal_dense),
        Reduction("gat_static_ranking", "GAT's argmax_j e_ij is the same for every query i", _graph_gat_static_ranking),
    ),
)(GraphAttention)
