"""Attention-row similarity (catalogue 11.20 ``attention_diversity``, the ADL loss of TAP+ADL)."""

from __future__ import annotations

import torch

from attnzoo.inspect.metrics._common import check_weights, metric

__all__ = ["attention_diversity"]


@metric("attention_diversity", priority=3, papers=("TAP+ADL (robust token attention)",),
        summary="ADL: mean cosine similarity between attention rows i ≠ i' (usable as a loss).",
        reference="float64 cosine similarities of the reference rows")
def attention_diversity(weights: torch.Tensor) -> torch.Tensor:
    """``mean_{i ≠ i'} cos(a_i, a_i')`` ``[B, H]`` (differentiable; 1 for identical rows, 0 for orthogonal)."""
    w = check_weights(weights)
    n = w.shape[-2]
    if n < 2:
        raise ValueError("attention_diversity: needs at least two query rows")
    u = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    c = u @ u.transpose(-1, -2)
    off = c.sum(dim=(-1, -2)) - c.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (n * (n - 1))
