"""Aggregated cross-attention maps and masks (catalogue 11.19 ``cross_attention_map``, BLD, AttenCraft)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.inspect.metrics._common import check_weights, metric

__all__ = ["cross_attention_map", "masks_from_maps"]


@metric("cross_attention_map", priority=2, papers=("BLD video editing", "AttenCraft"),
        summary="Per-token cross-attention maps aggregated over heads, layers and steps; self-attention "
                "refinement; argmax/threshold masks.",
        reference="float64 means of the reference cross-attention weights", supports={"cross"})
def cross_attention_map(weights: Any, tokens: Sequence[int], *, self_attention: Any = None,
                        normalize: str = "tokens") -> torch.Tensor:
    """Maps ``[B, P, K]`` of the chosen text ``tokens`` (K of them) over P image positions.

    ``weights``: one cross-attention map ``[B, H, P, T]`` or a list over layers/steps (averaged).
    ``self_attention``: optional ``[B, H, P, P]`` maps (or a list) for the refinement
    ``A_self · A_cross``. ``normalize``: ``"tokens"`` (each pixel's weights sum to 1 over the
    chosen tokens), ``"max"`` (each token's map scaled to max 1) or ``"none"``.
    """
    ws = [check_weights(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    a = torch.stack([w.mean(1) for w in ws]).mean(0)  # [B, P, T]
    if self_attention is not None:
        ss = [check_weights(s) for s in (self_attention if isinstance(self_attention, (list, tuple))
                                          else [self_attention])]
        a = torch.stack([s.mean(1) for s in ss]).mean(0) @ a
    idx = torch.as_tensor(list(tokens), dtype=torch.long, device=a.device)
    a = a[..., idx]
    if normalize == "tokens":
        return a / a.sum(-1, keepdim=True).clamp_min(1e-30)
    if normalize == "max":
        return a / a.amax(-2, keepdim=True).clamp_min(1e-30)
    if normalize == "none":
        return a
    raise ValueError(f"normalize: expected 'tokens', 'max' or 'none', got {normalize!r}")


def masks_from_maps(maps: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Per-token masks ``[B, K, P]`` (bool): the argmax over tokens (disjoint), optionally also above
    ``threshold`` (a pixel whose best weight is below it belongs to no token)."""
    best = maps.argmax(-1)  # [B, P]
    k = maps.shape[-1]
    m = torch.nn.functional.one_hot(best, k).bool().transpose(-1, -2)
    if threshold is not None:
        m = m & (maps.amax(-1) >= threshold)[:, None, :]
    return m
