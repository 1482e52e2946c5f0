"""Attention restricted to the edges of a graph: a bool adjacency as a pattern."""

from __future__ import annotations

import torch

from attnzoo.patterns.base import Pattern, Shape

__all__ = ["Adjacency"]


class Adjacency(Pattern):
    """Query node ``i`` sees key node ``j`` iff ``adj[i, j]`` (``adj``: bool ``[N, M]`` or ``[B, N, M]``).

    Build from an edge list with :meth:`from_edges`. Block bounds are exact block
    reductions of the adjacency (no dense score-sized work beyond the adjacency itself).
    """

    def __init__(self, adj: torch.Tensor) -> None:
        if not isinstance(adj, torch.Tensor) or adj.dtype != torch.bool or adj.dim() not in (2, 3):
            got = f"{adj.dtype} {tuple(adj.shape)}" if isinstance(adj, torch.Tensor) else type(adj).__name__
            raise ValueError(f"adj: expected a bool tensor [N, M] or [B, N, M], got {got}")
        self.adj = adj
        self.per_batch = adj.dim() == 3

    @classmethod
    def from_edges(cls, edges: torch.Tensor, n: int, m: int | None = None) -> Adjacency:
        """``edges``: int ``[2, E]`` rows ``(query node, key node)``; ``n`` query and ``m`` key nodes."""
        m = n if m is None else m
        if (not isinstance(edges, torch.Tensor) or edges.dim() != 2 or edges.shape[0] != 2
                or edges.dtype.is_floating_point):
            raise ValueError(f"edges: expected an integer tensor [2, E], got {getattr(edges, 'shape', edges)}")
        if edges.numel() and (edges.min() < 0 or edges[0].max() >= n or edges[1].max() >= m):
            raise ValueError(f"edges: node ids must lie in [0, {n}) x [0, {m}), got max ({int(edges[0].max())}, "
                             f"{int(edges[1].max())}) and min {int(edges.min())}")
        adj = torch.zeros(n, m, dtype=torch.bool, device=edges.device)
        adj[edges[0], edges[1]] = True
        return cls(adj)

    def check(self, shape: Shape) -> None:
        want = (shape.n_q, shape.n_kv)
        if tuple(self.adj.shape[-2:]) != want or (self.per_batch and self.adj.shape[0] != shape.batch):
            lead = f"{shape.batch}, " if self.per_batch else ""
            raise ValueError(f"adj: expected shape [{lead}{shape.n_q}, {shape.n_kv}], got {list(self.adj.shape)}")

    def _data(self, device: torch.device) -> torch.Tensor:
        key = ("adj", str(device))
        t = self._cache_get(key)
        if t is None:
            t = self._cache_put(key, self.adj.to(device))
        return t

    def allow(self, b, h, q, kv, shape):
        adj = self._data(q.device)
        return adj[b, q, kv] if self.per_batch else adj[q, kv] & (b >= 0)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        adj = self._data(q_lo.device)
        a = adj if self.per_batch else adj.unsqueeze(0)
        bq, bk = int(q_hi[0, 0] - q_lo[0, 0] + 1), int(k_hi[0, 0] - k_lo[0, 0] + 1)
        nqb, nkb = q_lo.shape[0], k_lo.shape[1]
        pq, pk = nqb * bq - shape.n_q, nkb * bk - shape.n_kv
        valid = torch.nn.functional.pad(torch.ones_like(a), (0, pk, 0, pq), value=False)
        padded = torch.nn.functional.pad(a, (0, pk, 0, pq), value=False)
        blocks = padded.view(a.shape[0], nqb, bq, nkb, bk)
        any_ = blocks.any(-1).any(2)
        all_ = (padded | ~valid).view(a.shape[0], nqb, bq, nkb, bk).all(-1).all(2)
        return any_.unsqueeze(1), all_.unsqueeze(1)
