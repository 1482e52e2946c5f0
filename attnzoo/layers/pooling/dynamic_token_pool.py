"""``dynamic_token_pool``: Dynamic Token Pooling, learned segment boundaries with mean pooling (hourglass LM).

A boundary predictor ``b_t = sigmoid(MLP(h_t))`` marks the tokens that end a segment (hard
``b_t > 0.5``; the predictor learns through straight-through token weights, value 1 and derivative 1 in
``b_t``, and through :meth:`DynamicTokenPool.boundary_loss`) unless per-call
``boundaries`` are given (tokenizer, entropy-spike or whitespace boundaries). Token t belongs to
segment ``c_t = sum_{tau < t} b_tau``; each segment is mean-pooled over its kept tokens (the
downsampling matrix's rows sum to 1). :meth:`DynamicTokenPool.upsample` gives position t the vector
of the last segment completed before t (shifted to stay autoregressive) plus a residual.
``[B, N, C] -> [B, S, C]`` with ``S = max_segments`` (default N, so the shape does not depend on
the content); rows past a bag's last segment are zero. :meth:`boundary_loss` supervises the predictor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.pooling._common import FAMILY, check_bag_input, check_pool_mask
from attnzoo.registry import Reduction, register

__all__ = ["DynamicTokenPool"]


class DynamicTokenPool(nn.Module):
    """Dynamic token pooling ``[B, N, C] -> [B, S, C]``; ``return_info`` adds ``(segment [B, N], seg_mask [B, S])``."""

    def __init__(self, dim: int, *, hidden: int | None = None, max_segments: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        hidden = check_int("hidden", hidden if hidden is not None else dim)
        self.max_segments = None if max_segments is None else check_int("max_segments", max_segments)
        self.predictor = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def boundary_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(MLP(h_t))`` ``[B, N]``."""
        return torch.sigmoid(self.predictor(x)[..., 0])

    def boundary_loss(self, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy of the predicted boundaries against ``target`` (bool ``[B, N]``) over kept tokens."""
        check_pool_mask("target", target, tuple(x.shape[:2]))
        logits = self.predictor(x)[..., 0]
        loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        keep = torch.ones_like(target) if mask is None else mask
        return (loss * keep).sum() / keep.sum().clamp(min=1)

    def segments(self, x: torch.Tensor, keep: torch.Tensor,
                 boundaries: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_t, w_t)`` ``[B, N]``: completed segments before t, and each token's pooling weight (1 in value;
        with predicted boundaries it carries the straight-through gradient ``d w_t / d p_t = 1``)."""
        if boundaries is None:
            p = self.boundary_probs(x)
            b = (p.detach() > 0.5).to(x.dtype)
            w = 1 + p - p.detach()
        else:
            b = boundaries.to(x.dtype)
            w = torch.ones_like(b)
        b = b * keep.to(x.dtype)
        return torch.cumsum(b, 1) - b, w

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, boundaries: torch.Tensor | None = None,
                return_info: bool = False) -> torch.Tensor | tuple:
        """Pool ``x`` ``[B, N, C]`` into segments (``boundaries`` bool ``[B, N]``: True = the token ends one)."""
        check_bag_input(x, mask, None, self.dim)
        check_pool_mask("boundaries", boundaries, tuple(x.shape[:2]))
        b, n, _ = x.shape
        s_max = self.max_segments or n
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        x = x.masked_fill(~keep.unsqueeze(-1), 0)
        c, weight = self.segments(x, keep, boundaries)
        if int(c.detach().max()) >= s_max:
            raise ValueError(f"max_segments: expected at least {int(c.detach().max()) + 1} segments' room, "
                             f"got max_segments={s_max}")
        j = torch.arange(s_max, device=x.device, dtype=x.dtype)
        onehot = (c.round().unsqueeze(-1) == j) & keep.unsqueeze(-1)                            # [B, N, S]
        assign = onehot.to(x.dtype) * weight.unsqueeze(-1)
        count = assign.sum(1)                                                                   # [B, S]
        den = torch.where(count > 0, count, torch.ones_like(count))
        pooled = torch.einsum("bns,bnc->bsc", assign, x) / den.unsqueeze(-1)
        if not return_info:
            return pooled
        return pooled, (c.round().long(), count.detach() > 0)

    def upsample(self, pooled: torch.Tensor, segment: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_t + pooled[c_t - 1]`` (zero before the first completed segment): ``[B, N, C]``, causal."""
        prev = (segment - 1).clamp(min=0)
        up = pooled.gather(1, prev.unsqueeze(-1).expand(-1, -1, pooled.shape[-1]))
        return x + up * (segment > 0).unsqueeze(-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_segments={self.max_segments}"


def _every_k_is_fixed_pooling() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = DynamicTokenPool(8).double()
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bounds = (torch.arange(12) % 3 == 2).expand(2, 12)
    return m(x, boundaries=bounds)[:, :4], x.view(2, 4, 3, 8).mean(2)


register(
    "dynamic_token_pool", family=FAMILY, type="pooler", priority=3, input_kind="sequence",
    papers=("Dynamic Token Pooling",), supports={"padding"}, complexity="O(N S)", backends=(),
    reference="the closed form (segment means of the one-hot downsampling matrix) in float64", reference_kwargs={},
    test_kwargs={"dim": 32},
    summary="Dynamic Token Pooling: a boundary predictor (hard, straight-through; or given boundaries) splits the "
            "sequence into segments that are mean-pooled; causal upsampling from the last completed segment.",
    reductions=(Reduction("every_k_is_fixed_pooling", "boundaries every k reproduce fixed-length pooling",
                          _every_k_is_fixed_pooling),),
)(DynamicTokenPool)
