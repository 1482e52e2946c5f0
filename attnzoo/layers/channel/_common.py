"""Shared checks of the channel modules: feature maps ``[B, C, *spatial]`` (1-D, 2-D or 3-D)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILY", "check_feature_map", "spatial_mean"]

FAMILY = "channel"


def check_feature_map(name: str, x: Any, channels: int, spatial: tuple[int, ...] = (2,)) -> None:
    """``x`` must be ``[B, channels, *S]`` with ``len(S)`` in ``spatial`` (else ``ValueError`` naming ``name``)."""
    dims = " or ".join(f"[B, {channels}" + "".join(f", S{i}" for i in range(k)) + "]" for k in spatial)
    if not isinstance(x, torch.Tensor) or x.dim() - 2 not in spatial or x.shape[1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor {dims}, got {got}")


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the channels: ``[B, C]``."""
    return x.flatten(2).mean(-1)
