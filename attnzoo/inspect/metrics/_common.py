"""Shared helpers of the metrics: weight validation and the registration defaults."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.registry import register

__all__ = ["check_weights", "metric", "weights_list"]


def check_weights(w: Any, name: str = "weights") -> torch.Tensor:
    """``w`` as a float tensor ``[B, H, N, M]`` (a ``[H, N, M]`` or ``[N, M]`` map gains leading dims)."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        got = f"{w.dtype} tensor" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"{name}: expected a float tensor [B, H, N, M], got {got}")
    if w.dim() == 2:
        w = w[None, None]
    elif w.dim() == 3:
        w = w[None]
    if w.dim() != 4:
        raise ValueError(f"{name}: expected [B, H, N, M], got shape {list(w.shape)}")
    return w


def weights_list(weights: Any) -> list[torch.Tensor]:
    """Per-layer weights from a :class:`~attnzoo.inspect.Cache`, a list, or a stacked ``[L, B, H, N, M]``."""
    from attnzoo.inspect.capture import Cache

    if isinstance(weights, Cache):
        weights = weights.weights()
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 5:
            raise ValueError(f"weights: a stacked tensor must be [L, B, H, N, M], got shape {list(weights.shape)}")
        weights = list(weights)
    out = [check_weights(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not out:
        raise ValueError("weights: no layer given")
    return out


def metric(slug: str, *, priority: int, papers: tuple[str, ...], summary: str, reference: str,
           **kw: Any) -> Any:
    """Register a metric function under its catalogue slug (family ``analysis``, type ``metric``)."""
    return register(slug, family="analysis", type="metric", priority=priority, papers=papers, summary=summary,
                    reference=reference, supports=kw.pop("supports", {"self", "cross", "causal", "padding"}),
                    backends=("reference",), complexity=kw.pop("complexity", "O(N^2)"), **kw)
