"""Attention mass on key sets (catalogue 11.2 ``attention_mass``), FAI and the deception penalty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.inspect.metrics._common import check_weights, metric
from attnzoo.inspect.steer import key_mask

__all__ = ["attention_mass", "deception_penalty", "future_attention_influence", "span_mass"]


@metric("attention_mass", priority=1,
        papers=("Attention Basin (AttnRank)", "Learning to deceive with attention",
                "Attention Illuminates (WAAD/FAI)"),
        summary="Attention mass on a key set per head and query; span masses, FAI, deception penalty.",
        reference="float64 sums of the reference weights")
def attention_mass(weights: torch.Tensor, keys: Any) -> torch.Tensor:
    """``mass(K | i) = Σ_{j∈K} a_ij`` ``[B, H, N]``; ``keys``: indices, a slice or a bool mask ``[M]``/``[B, M]``."""
    w = check_weights(weights)
    k = key_mask(keys, w.shape[-1], w.device).to(w.dtype)
    k = k.view(1, 1, 1, -1) if k.dim() == 1 else k.view(k.shape[0], 1, 1, -1)
    return (w * k).sum(-1)


def span_mass(weights: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mass on each span ``[start, end)`` ``[B, H, N, S]`` (Attention Basin's per-item mass)."""
    w = check_weights(weights)
    return torch.stack([w[..., a:b].sum(-1) for a, b in spans], dim=-1)


def future_attention_influence(weights: torch.Tensor) -> torch.Tensor:
    """FAI(s) = mean over queries t > s of a_ts, ``[B, H, M]`` (0 for the last key, which no later query sees).

    Queries and keys share positions (self-attention, ``N == M``).
    """
    w = check_weights(weights)
    n, m = w.shape[-2:]
    if n != m:
        raise ValueError(f"future_attention_influence: needs self-attention maps (N == M), got [{n}, {m}]")
    later = torch.ones(n, m, dtype=torch.bool, device=w.device).tril(-1).to(w.dtype)  # t > s
    count = later.sum(0)
    return (w * later).sum(-2) / count.clamp_min(1)


def deception_penalty(weights: torch.Tensor, keys: Any) -> torch.Tensor:
    """``−log(1 − Σ_{j∈I} a_j)`` per head and query (0 iff the mass on ``keys`` is 0)."""
    return -torch.log1p(-attention_mass(weights, keys).clamp(max=1 - 1e-12))
