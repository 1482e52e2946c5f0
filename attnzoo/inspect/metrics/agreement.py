"""Agreement of attention with attribution maps (catalogue 11.13 ``attention_attribution_agreement``)."""

from __future__ import annotations

import torch

from attnzoo.inspect.metrics._common import metric

__all__ = ["attention_attribution_agreement", "relevance_captured"]


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks over the last axis (ties share their mean rank)."""
    less = (x[..., None, :] < x[..., :, None]).to(x.dtype).sum(-1)
    equal = (x[..., None, :] == x[..., :, None]).to(x.dtype).sum(-1)
    return less + (equal - 1) / 2


@metric("attention_attribution_agreement", priority=3, papers=("S2T cross-attention vs saliency",),
        summary="Pearson or Spearman correlation between attention and saliency maps; relevance captured.",
        reference="float64 correlations over the last axis")
def attention_attribution_agreement(attention: torch.Tensor, saliency: torch.Tensor,
                                    method: str = "spearman") -> torch.Tensor:
    """Correlation over the last axis (``"pearson"`` or ``"spearman"``), in [−1, 1]; 1 for a map with itself."""
    a, s = attention.to(torch.float64), saliency.to(torch.float64)
    if a.shape != s.shape:
        raise ValueError(f"attention and saliency must have the same shape, got {list(a.shape)} and {list(s.shape)}")
    if method == "spearman":
        a, s = _rank(a), _rank(s)
    elif method != "pearson":
        raise ValueError(f"method: expected 'pearson' or 'spearman', got {method!r}")
    a, s = a - a.mean(-1, keepdim=True), s - s.mean(-1, keepdim=True)
    return (a * s).sum(-1) / (a.norm(dim=-1) * s.norm(dim=-1)).clamp_min(1e-300)


def relevance_captured(attention: torch.Tensor, saliency: torch.Tensor, top: float = 0.2) -> torch.Tensor:
    """Share of the total (non-negative) saliency on the top ``top`` fraction of positions by attention."""
    k = max(1, int(round(attention.shape[-1] * top)))
    idx = attention.topk(k, dim=-1).indices
    s = saliency.clamp(min=0).to(torch.float64)
    return s.gather(-1, idx).sum(-1) / s.sum(-1).clamp_min(1e-300)
