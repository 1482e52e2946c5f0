"""The dtype the PyTorch-level ops compute in."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 and float64 as they are; half types (and any other dtype) in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
