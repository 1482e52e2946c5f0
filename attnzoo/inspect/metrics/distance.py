"""Attention-weighted distance (catalogue 11.4 ``attention_distance``): mean distance, ViT profile, WAAD."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.inspect.metrics._common import check_weights, metric

__all__ = ["attention_distance", "distance_profile", "grid_positions", "waad"]


def grid_positions(h: int, w: int, *, cls: bool = False) -> torch.Tensor:
    """Patch centres ``[h·w (+1), 2]`` of an ``h × w`` grid (row-major); ``cls`` prepends a token at NaN
    (excluded from distances by :func:`attention_distance`)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], -1)
    return torch.cat([torch.full((1, 2), float("nan"), dtype=torch.float64), pos]) if cls else pos


def _dist(n: int, m: int, positions: torch.Tensor | None, device: Any, dtype: torch.dtype) -> torch.Tensor:
    if positions is None:  # 1-D positions, queries aligned to the last n keys (decoding)
        qi = torch.arange(m - n, m, device=device, dtype=dtype)
        kj = torch.arange(m, device=device, dtype=dtype)
        return (qi[:, None] - kj[None, :]).abs()
    p = positions.to(device=device, dtype=dtype)
    if p.dim() == 1:
        p = p[:, None]
    if p.shape[0] != m:
        raise ValueError(f"positions: expected {m} rows (one per key), got {p.shape[0]}")
    d = torch.cdist(p[m - n:], p) if p.shape[-1] > 1 else (p[m - n:] - p.T).abs()
    return torch.nan_to_num(d, nan=0.0)


@metric("attention_distance", priority=2,
        papers=("Attention Illuminates (WAAD/FAI)", "ViT attention visual analytics"),
        summary="Attention-weighted distance Σ_j a_ij d(i,j): ViT mean distance and profile, WAAD.",
        reference="float64 weighted sums over explicit distance matrices")
def attention_distance(weights: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``D_i = Σ_j a_ij d(i, j)`` ``[B, H, N]``; ``d`` = |i − j|, or the Euclidean distance between
    ``positions`` ``[M, P]`` (e.g. :func:`grid_positions` for ViT patches; NaN rows count as distance 0)."""
    w = check_weights(weights)
    d = _dist(w.shape[-2], w.shape[-1], positions, w.device, w.dtype)
    return (w * d).sum(-1)


def waad(weights: torch.Tensor, window: int) -> torch.Tensor:
    """Windowed attention-weighted distance: ``d = min(max(i − j, 0), W)`` ``[B, H, N]``."""
    w = check_weights(weights)
    n, m = w.shape[-2:]
    qi = torch.arange(m - n, m, device=w.device, dtype=w.dtype)
    kj = torch.arange(m, device=w.device, dtype=w.dtype)
    d = (qi[:, None] - kj[None, :]).clamp(min=0, max=float(window))
    return (w * d).sum(-1)


def distance_profile(weights: torch.Tensor, bins: torch.Tensor | int = 10,
                     positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of attention mass against distance ``[B, H, N, n_bins]`` and the bin edges.

    Each query's profile sums to its row's mass (1 for softmax rows). ``bins``: a count (equal
    widths from 0 to the largest distance) or explicit increasing edges.
    """
    w = check_weights(weights)
    d = _dist(w.shape[-2], w.shape[-1], positions, w.device, w.dtype)
    if isinstance(bins, int):
        edges = torch.linspace(0, float(d.max()) + 1e-9, bins + 1, dtype=w.dtype, device=w.device)
    else:
        edges = bins.to(w.device, w.dtype)
    idx = (torch.bucketize(d, edges, right=True) - 1).clamp(0, len(edges) - 2)
    onehot = torch.nn.functional.one_hot(idx, len(edges) - 1).to(w.dtype)  # [N, M, K]
    return torch.einsum("bhnm,nmk->bhnk", w, onehot), edges
