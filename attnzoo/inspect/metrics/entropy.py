"""Row entropy of attention (catalogue 11.3 ``attention_entropy``) and the localist group penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.inspect.metrics._common import check_weights, metric

__all__ = ["attention_entropy", "locality_penalty"]


@metric("attention_entropy", priority=1,
        papers=("Localist LLMs (recruitment learning)", "Localist LLMs (dynamic locality control)"),
        summary="Row entropy H_i = −Σ_j a_ij log a_ij; localist group-sparsity penalty.",
        reference="float64 entropy with 0·log 0 = 0")
def attention_entropy(weights: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``H_i = −Σ_j a_ij log a_ij`` ``[B, H, N]`` (nats; ``0 log 0 = 0``); ``normalize`` divides by ``log M``."""
    w = check_weights(weights)
    h = -torch.where(w > 0, w * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny)), torch.zeros_like(w)).sum(-1)
    if normalize:
        m = w.shape[-1]
        h = h / torch.log(torch.tensor(float(m), dtype=w.dtype)) if m > 1 else torch.zeros_like(h)
    return h


def locality_penalty(weights: torch.Tensor, groups: Sequence[Any], allowed: Sequence[int] = (),
                     lam: float = 1.0) -> torch.Tensor:
    """``λ Σ_{G ∉ allowed} ‖a_{i,G}‖₂`` ``[B, H, N]``: group-lasso over key groups outside the allowed ones.

    ``groups``: a list of key index lists (or slices); ``allowed``: indices into ``groups``.
    """
    w = check_weights(weights)
    total = torch.zeros(w.shape[:-1], dtype=w.dtype, device=w.device)
    for gi, g in enumerate(groups):
        if gi in set(allowed):
            continue
        idx = g if isinstance(g, slice) else torch.as_tensor(list(g), dtype=torch.long, device=w.device)
        total = total + w[..., idx].norm(dim=-1)
    return lam * total
