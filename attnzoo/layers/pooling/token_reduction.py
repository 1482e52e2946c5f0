"""``token_reduction``: token pruning and merging between blocks (N -> K tokens).

``prune``: keep the top-K tokens by importance, in their original order, optionally with one
fused token (the importance-weighted mean of the pruned ones) appended. Importance: a per-call
``importance`` ``[B, N]`` (CLS attention (BAT), attention received (SpAtten), information flow
(FlowCut), a learned gate (SPA), ...) or, without one, the token's L2 norm.
:class:`CumulativeImportance` is SpAtten's cascade: attention received, summed over heads and
queries and accumulated over layers, with tokens pruned at one layer absent from every later one.
``merge``: ToMe-style bipartite soft matching: alternate tokens form sets A and B, each A token
links to its most similar (cosine) B token, and the N - K most similar links merge, each merged
token being the size-weighted mean of its members (``size`` ``[B, N]``, default ones).
Returns ``[B, K, C]`` (with ``return_info=True`` also ``(kept index [B, K], sizes [B, K])``).
Padded tokens are never kept or merged before a real token; a row that holds no real token is zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.pooling._common import FAMILY, check_bag_input
from attnzoo.registry import Reduction, register

__all__ = ["TokenReduction", "CumulativeImportance", "MODES"]

MODES = ("prune", "merge")


class TokenReduction(nn.Module):
    """Prune or merge ``[B, N, C] -> [B, K, C]`` (``K`` fixed, or ``ratio`` of N rounded down, at least 1)."""

    def __init__(self, dim: int, *, mode: str = "prune", k: int | None = None, ratio: float | None = None,
                 fuse_pruned: bool = False) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, MODES)
        if (k is None) == (ratio is None):
            raise ValueError(f"k, ratio: expected exactly one of them, got k={k!r}, ratio={ratio!r}")
        self.k = None if k is None else check_int("k", k)
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"ratio: expected 0 < ratio <= 1, got {ratio!r}")
        self.ratio = ratio
        self.fuse_pruned = bool(fuse_pruned)
        if fuse_pruned and mode != "prune":
            raise ValueError("fuse_pruned: only with mode='prune'")

    def n_keep(self, n: int) -> int:
        """K for a sequence of N tokens (``ValueError`` naming ``k`` when K > N)."""
        if self.k is not None:
            if self.k > n:
                raise ValueError(f"k: expected k <= N = {n} (the number of tokens), got k={self.k}")
            if self.mode == "merge" and self.k < (n + 1) // 2:
                raise ValueError(f"k: bipartite merging removes at most N // 2 tokens, expected k >= {(n + 1) // 2} "
                                 f"for N = {n}, got k={self.k}")
            return self.k
        return max(int(self.ratio * n), (n + 1) // 2 if self.mode == "merge" else 1)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                size: torch.Tensor | None = None, return_info: bool = False) -> torch.Tensor | tuple:
        """Reduce ``x`` ``[B, N, C]`` (``mask`` bool ``[B, N]``) to ``[B, K(+1), C]``."""
        check_bag_input(x, mask, None, self.dim)
        b, n, _ = x.shape
        k = self.n_keep(n)
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        x = x.masked_fill(~keep.unsqueeze(-1), 0)
        if importance is not None and (not isinstance(importance, torch.Tensor) or tuple(importance.shape) != (b, n)):
            got = list(importance.shape) if isinstance(importance, torch.Tensor) else importance
            raise ValueError(f"importance: expected a tensor [{b}, {n}], got {got}")
        if size is not None and (not isinstance(size, torch.Tensor) or tuple(size.shape) != (b, n)):
            got = list(size.shape) if isinstance(size, torch.Tensor) else size
            raise ValueError(f"size: expected a tensor [{b}, {n}], got {got}")
        if self.mode == "prune":
            out, idx, sizes = self._prune(x, keep, k, importance, size)
        else:
            out, idx, sizes = self._merge(x, keep, k, size)
        return (out, (idx, sizes)) if return_info else out

    def _prune(self, x, keep, k, importance, size):
        score = x.detach().norm(dim=-1) if importance is None else importance.detach().to(x.dtype)
        score = score.masked_fill(~keep, float("-inf"))
        top = score.topk(k, dim=1).indices.sort(1).values                         # original order
        out = x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        sizes = (torch.ones_like(score) if size is None else size.to(x.dtype)).gather(1, top)
        kept_real = keep.gather(1, top)
        out = out * kept_real.unsqueeze(-1).to(x.dtype)
        sizes = sizes * kept_real.to(x.dtype)
        if self.fuse_pruned:
            rest = keep.clone()
            rest.scatter_(1, top, False)
            w = torch.where(rest, torch.softmax(score.masked_fill(~rest, float("-inf")), 1).nan_to_num(0.0),
                            torch.zeros_like(score))
            fused = torch.einsum("bn,bnc->bc", w, x).unsqueeze(1)
            out = torch.cat([out, fused], 1)
            sizes = torch.cat([sizes, rest.sum(1, keepdim=True).to(x.dtype)], 1)
            top = torch.cat([top, torch.full_like(top[:, :1], -1)], 1)
        return out, top, sizes

    def _merge(self, x, keep, k, size):
        b, n, c = x.shape
        r = n - k
        sizes = (torch.ones(b, n, dtype=x.dtype, device=x.device) if size is None else size.to(x.dtype)) * keep
        if r == 0:
            return x, torch.arange(n, device=x.device).expand(b, n), sizes
        a_idx, b_idx = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
        xn = F.normalize(x.detach(), dim=-1, eps=1e-12)
        sim = xn[:, a_idx] @ xn[:, b_idx].transpose(1, 2)                        # [B, A, B]
        valid = keep[:, a_idx].unsqueeze(-1) & keep[:, b_idx].unsqueeze(1)
        sim = sim.masked_fill(~valid, float("-inf"))
        best, match = sim.max(-1)                                                  # per A token
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged_a = order[:, :r]                                                    # positions within A
        unmerged_a = order[:, r:].sort(-1).values
        src = a_idx[merged_a]
        dst = b_idx[match.gather(1, merged_a)]
        # size-weighted sums into the destination B tokens
        w_src = sizes.gather(1, src)
        num = x * sizes.unsqueeze(-1)
        dst_c, src_c = dst.unsqueeze(-1).expand(-1, -1, c), src.unsqueeze(-1).expand(-1, -1, c)
        num = num.scatter_add(1, dst_c, num.gather(1, src_c))
        tot = sizes.scatter_add(1, dst, w_src)
        kept = torch.cat([a_idx[unmerged_a], b_idx.expand(b, -1)], 1).sort(1).values  # original order
        tot_k = tot.gather(1, kept)
        out = num.gather(1, kept.unsqueeze(-1).expand(-1, -1, c)) / torch.where(tot_k > 0, tot_k,
                                                                                   torch.ones_like(tot_k)).unsqueeze(-1)
        return out, kept, tot_k

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, k={self.k}, ratio={self.ratio}"


class CumulativeImportance:
    """SpAtten's cascade token pruning across layers.

    ``update(attn)`` adds the attention each surviving token receives at this layer (``attn``
    ``[B, H, Nq, Nk]`` over the surviving tokens, summed over heads and queries) to its running
    total; ``prune(k)`` keeps the k highest totals (in their original order) and returns their
    original indices ``[B, k]``. A token pruned once never comes back.
    """

    def __init__(self, batch: int, n: int) -> None:
        self.alive = torch.arange(n).expand(batch, n).clone()
        self.score = torch.zeros(batch, n, dtype=torch.float64)

    def update(self, attn: torch.Tensor) -> torch.Tensor:
        if attn.dim() != 4 or attn.shape[0] != self.alive.shape[0] or attn.shape[-1] != self.alive.shape[1]:
            raise ValueError(f"attn: expected [{self.alive.shape[0]}, H, Nq, {self.alive.shape[1]}], "
                             f"got {list(attn.shape)}")
        self.score = self.score + attn.detach().double().sum((1, 2)).cpu()
        return self.score

    def prune(self, k: int) -> torch.Tensor:
        if not 1 <= k <= self.alive.shape[1]:
            raise ValueError(f"k: expected 1 <= k <= {self.alive.shape[1]} (the surviving tokens), got {k}")
        top = self.score.topk(k, dim=1).indices.sort(1).values
        self.alive, self.score = self.alive.gather(1, top), self.score.gather(1, top)
        return self.alive


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ratio_one_is_identity() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    return torch.stack([TokenReduction(8, mode=m, ratio=1.0)(x) for m in MODES]), torch.stack([x, x])


def _merged_is_size_weighted_mean() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    size = torch.arange(1, 10, dtype=torch.float64).expand(2, 9)
    out, (kept, sizes) = TokenReduction(8, mode="merge", k=7)(x, size=size, return_info=True)
    want = torch.zeros_like(out)
    # rebuild each output token from the members the matching assigned to it
    xn = F.normalize(x, dim=-1)
    sim = xn[:, 0::2] @ xn[:, 1::2].transpose(1, 2)
    best, match = sim.max(-1)
    merged = best.argsort(dim=-1, descending=True, stable=True)[:, :2]
    for b in range(2):
        members = {int(t): [int(t)] for t in kept[b]}
        for a in merged[b].tolist():
            members[2 * int(match[b, a]) + 1].append(2 * a)
        for j, t in enumerate(kept[b].tolist()):
            ids = torch.tensor(members[t])
            want[b, j] = (x[b, ids] * size[b, ids, None]).sum(0) / size[b, ids].sum()
    return out, want


register(
    "token_reduction", family=FAMILY, type="pooler", priority=2,
    papers=("FlowCut", "SpAtten", "BAT (beyond attentive tokens)", "PPT (token pruning and pooling)",
            "Token Pooling (ViT)", "ColBERT token pooling", "CoreMatching", "Zeroth-order token pruning",
            "SPA (select and pack attention)"),
    supports={"padding"}, complexity="O(N log N) prune, O(N^2) merge", backends=(),
    reference="the closed forms (top-K gather in order; size-weighted means of matched members) in float64",
    reference_kwargs={}, test_kwargs={"dim": 32, "ratio": 0.5},
    summary="Token pruning (top-K by a given importance or the norm, optional fused token; SpAtten cumulative "
            "cascade) and ToMe bipartite merging with size-weighted means: N -> K tokens.",
    reductions=(
        Reduction("ratio_one_is_identity", "keep ratio 1 (K = N) is the identity", _ratio_one_is_identity),
        Reduction("merged_is_size_weighted_mean", "a merged token is the size-weighted mean of its members",
                  _merged_is_size_weighted_mean),
    ),
)(TokenReduction)
