"""``mixed_pool``: mixed, gated and tree pooling over a bag.

Mixed: ``a * max(R) + (1 - a) * avg(R)`` with ``a`` learned per channel (clamped to [0, 1]). Gated:
``a = sigmoid(w^T avg(R) + b)`` per bag, from the bag mean (the region's values summarised by
their mean, since a bag has no fixed size for the paper's region-shaped gate mask). The region R
is the whole bag.

Tree (``mode="tree"``): the region is a fixed number ``region`` of positions, the bag's kept
instances in order (the j-th kept instance at position j; positions past the bag's size hold
zeros, like a region at a border). A tree of ``depth`` levels has ``2^(depth-1)`` leaves, each a
learned pooling filter ``v_l^T x_R`` over the positions, and ``2^(depth-1) - 1`` internal nodes,
each mixing its two children with a learned gating mask: ``sigmoid(w_m^T x_R) f_left + (1 -
sigmoid(w_m^T x_R)) f_right``. Filters and masks are shared by the channels (each channel is
pooled on its own). Tree pooling reads positions: unlike the other modes it is not invariant to
the order of the instances, and a bag with more than ``region`` kept instances is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler
from attnzoo.registry import Reduction, register

__all__ = ["MixedPool", "MODES"]

MODES = ("mixed", "gated", "tree")


class MixedPool(Pooler):
    """Mixed / gated max-average pooling and tree pooling ``[B, N, C] -> [B, C]``."""

    def __init__(self, dim: int, *, mode: str = "gated", mix: float = 0.5, region: int | None = None,
                 depth: int = 2) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, MODES)
        if mode != "tree":
            for name, value, default in (("region", region, None), ("depth", depth, 2)):
                if value != default:
                    raise ValueError(f"{name}: only used with mode='tree', got {name}={value!r} with mode={mode!r}")
        if mode == "mixed":
            self.mix = nn.Parameter(torch.full((dim,), float(mix)))
        elif mode == "gated":
            self.gate = nn.Linear(dim, dim)
        else:
            if region is None:
                raise ValueError("region: mode='tree' needs the number of positions its filters cover, got None")
            self.region = check_int("region", region)
            self.depth = check_int("depth", depth)
            n_leaves = 2 ** (self.depth - 1)
            self.leaves = nn.Parameter(torch.full((n_leaves, self.region), 1.0 / self.region)
                                       + torch.randn(n_leaves, self.region) / self.region)
            self.gates = nn.Parameter(torch.randn(n_leaves - 1, self.region) / self.region)

    def mixing(self, bags: Bags) -> torch.Tensor:
        """``a`` ``[B, C]`` (or ``[C]`` for ``mixed``) in [0, 1]."""
        if self.mode == "mixed":
            return self.mix.clamp(0.0, 1.0).to(bags.x.dtype)
        return torch.sigmoid(self.gate(bags.mean(bags.x)))

    def pool(self, bags: Bags) -> tuple[torch.Tensor, None]:
        if self.mode == "tree":
            return self.tree(region_positions(bags, self.region)), None
        a = self.mixing(bags)
        return a * bags.max(bags.x) + (1 - a) * bags.mean(bags.x), None

    def tree(self, r: torch.Tensor) -> torch.Tensor:
        """Tree pooling of regions ``r`` ``[B, region, C]``: ``[B, C]``."""
        leaves = torch.einsum("brc,lr->blc", r, self.leaves.to(r.dtype))
        gates = torch.sigmoid(torch.einsum("brc,mr->bmc", r, self.gates.to(r.dtype)))
        level = list(leaves.unbind(1))                         # the deepest level, left to right
        first = gates.shape[1]                                 # internal nodes in heap order: root 0
        while len(level) > 1:
            first -= len(level) // 2
            level = [gates[:, first + i] * level[2 * i] + (1 - gates[:, first + i]) * level[2 * i + 1]
                     for i in range(len(level) // 2)]
        return level[0]

    def extra_repr(self) -> str:
        tree = f", region={self.region}, depth={self.depth}" if self.mode == "tree" else ""
        return f"dim={self.dim}, mode={self.mode!r}{tree}"


def region_positions(bags: Bags, region: int) -> torch.Tensor:
    """``[B, region, C]``: each bag's kept instances in order at positions 0, 1, ... (zeros after them).
    ``ValueError`` when a bag has more than ``region`` kept instances."""
    x = bags.x
    most = int(bags.counts().max()) if bags.n_bags else 0
    if most > region:
        raise ValueError(f"x: tree pooling's filters cover region={region} positions, got a bag of {most} kept "
                         "instances")
    out = x.new_zeros(bags.n_bags, region, x.shape[-1])
    if bags.packed:
        rank = torch.arange(x.shape[0], device=x.device) - bags.cu_seqlens[:-1].index_select(0, bags.ids)
        return out.index_put((bags.ids, rank), x)
    keep = bags.mask if bags.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    rank = keep.long().cumsum(1) - 1
    bag_of = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(keep)
    return out.index_put((bag_of[keep], rank[keep]), x[keep])


def _ends() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = torch.stack([MixedPool(8, mode="mixed", mix=a).double()(x) for a in (1.0, 0.0)])
    return got, torch.stack([x.amax(1), x.mean(1)])


def _tree_reductions() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    v = torch.randn(5, generator=g, dtype=torch.float64)
    same = seeded(MixedPool, dim=8, mode="tree", region=5, depth=3)
    half = seeded(MixedPool, dim=8, mode="tree", region=5, depth=2)
    with torch.no_grad():
        same.leaves.copy_(v.expand(4, 5))                    # equal leaves: the leaf filter, whatever the gates
        half.gates.zero_()                                   # zero gating masks: the mean of the two leaf filters
    xz = x.masked_fill(~keep.unsqueeze(-1), 0)
    got = torch.stack([same(x, mask=keep), half(x, mask=keep)])
    want = torch.stack([torch.einsum("brc,r->bc", xz, v), torch.einsum("brc,r->bc", xz, half.leaves.mean(0))])
    return got, want


register(
    "mixed_pool", family=FAMILY, type="pooler", priority=3, input_kind="set", papers=("Mixed/Gated/Tree pooling",),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the closed form a max + (1 - a) avg in float64", reference_kwargs={}, test_kwargs={"dim": 32},
    summary="Mixed (learned a) and gated (a = sigmoid(w^T avg + b)) mixtures of max and average pooling, and "
            "tree pooling (learned leaf filters mixed by learned gating masks over a fixed region).",
    reductions=(Reduction("mix_ends", "a = 1 gives max and a = 0 gives avg", _ends),
                Reduction("tree", "a tree with equal leaves is that leaf filter whatever its gates; zero gating "
                          "masks give the mean of the two leaf filters", _tree_reductions)),
)(MixedPool)
