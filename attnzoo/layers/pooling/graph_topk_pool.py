"""``graph_topk_pool``: sparse top-k graph pooling (gPool / SAG-style) with a mean || max readout.

``y = X p / |p|``; ``idx = top-ceil(k N)(y)`` over the kept nodes; ``X' = X[idx] * tanh(y[idx])``
and ``A' = A[idx, idx]`` [recalled]. The kept nodes stay in their original order. :func:`readout`
gives ``concat(mean, max)`` over the kept nodes; stacking levels, the readouts are summed.
``[B, N, C] -> [B, K, C]`` with ``K = ceil(ratio * N)``; with padding each bag keeps
``ceil(ratio * n_b)`` of its ``n_b`` real nodes and the other rows are zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, check_bag_input
from attnzoo.registry import Reduction, register

__all__ = ["GraphTopKPool", "readout"]


def readout(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``concat(mean, max)`` over the kept nodes: ``[B, N, C] -> [B, 2 C]`` (zeros for an empty graph)."""
    bags = Bags.build(x, mask, None)
    out = torch.cat([bags.mean(bags.x), bags.max(bags.x)], -1)
    return out * bags.nonempty().unsqueeze(-1).to(out.dtype)


class GraphTopKPool(nn.Module):
    """Top-k node pooling ``[B, N, C] -> [B, K, C]``; ``adj`` ``[B, N, N]`` is pooled to ``[B, K, K]``."""

    def __init__(self, dim: int, *, ratio: float = 0.5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio!r}")
        self.ratio = float(ratio)
        self.p = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, adj: torch.Tensor | None = None,
                return_info: bool = False) -> torch.Tensor | tuple:
        """Pool the nodes ``x`` ``[B, N, C]``; ``return_info``: also ``(idx [B, K], kept [B, K], adj' or None)``."""
        check_bag_input(x, mask, None, self.dim)
        b, n, _ = x.shape
        if adj is not None and (not isinstance(adj, torch.Tensor) or tuple(adj.shape) != (b, n, n)):
            got = list(adj.shape) if isinstance(adj, torch.Tensor) else adj
            raise ValueError(f"adj: expected a tensor [{b}, {n}, {n}], got {got}")
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        x = x.masked_fill(~keep.unsqueeze(-1), 0)
        y = x @ (self.p / self.p.norm()).to(x.dtype)                               # [B, N]
        k_all = math.ceil(self.ratio * n)
        k_each = torch.ceil(self.ratio * keep.sum(1).double()).long()              # [B]
        idx = y.detach().masked_fill(~keep, float("-inf")).topk(k_all, dim=1).indices.sort(1).values
        rank = y.detach().masked_fill(~keep, float("-inf")).argsort(dim=1, descending=True, stable=True)
        chosen = torch.zeros_like(keep).scatter(1, rank, torch.arange(n, device=x.device).expand(b, n) <
                                                k_each.unsqueeze(1))
        kept = chosen.gather(1, idx)
        out = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.dim)) * torch.tanh(y.gather(1, idx)).unsqueeze(-1)
        out = out * kept.unsqueeze(-1).to(out.dtype)
        if not return_info:
            return out
        adj_out = None if adj is None else adj.gather(1, idx.unsqueeze(-1).expand(-1, -1, n)).gather(
            2, idx.unsqueeze(1).expand(-1, k_all, -1)) * (kept.unsqueeze(-1) & kept.unsqueeze(1)).to(adj.dtype)
        return out, (idx, kept, adj_out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ratio={self.ratio}"


def _node_permutation() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = GraphTopKPool(8, ratio=0.4).double()
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    return readout(m(x[:, perm])), readout(m(x))


register(
    "graph_topk_pool", family=FAMILY, type="pooler", priority=3, input_kind="sequence",
    papers=("Sparse hierarchical graph classifiers",), supports={"padding"}, complexity="O(N log N)", backends=(),
    reference="the closed form (projection score, top-k gather, tanh gate) in float64", reference_kwargs={},
    test_kwargs={"dim": 32, "ratio": 0.5},
    summary="Top-k graph pooling: score y = X p / |p|, keep the ceil(kN) best nodes gated by tanh(y), pool the "
            "adjacency; concat(mean, max) readout.",
    reductions=(Reduction("readout_permutation_invariant", "the readout after pooling is permutation-invariant",
                          _node_permutation),),
)(GraphTopKPool)
