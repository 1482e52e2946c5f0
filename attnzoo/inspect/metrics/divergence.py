"""Vision-aware head divergence (catalogue 11.14 ``head_divergence``, VHD)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.inspect.capture import capture
from attnzoo.inspect.metrics._common import metric

__all__ = ["head_divergence", "head_divergence_from_outputs"]


def head_divergence_from_outputs(z_with: torch.Tensor, z_without: torch.Tensor) -> torch.Tensor:
    """``[B, H]``: mean over positions of ``‖O_h(with) − O_h(without)‖₂`` for aligned ``[B, H, N, D]`` outputs."""
    if z_with.shape != z_without.shape:
        raise ValueError(f"head outputs must be aligned, got {list(z_with.shape)} and {list(z_without.shape)}")
    return (z_with - z_without).norm(dim=-1).mean(-1)


@metric("head_divergence", priority=3, papers=("VHD/VHR",),
        summary="VHD: distance between each head's output with and without the visual context, on the same text.",
        reference="float64 distances of captured head outputs")
def head_divergence(model: nn.Module, with_context: Any, without_context: Any, positions_with: Any,
                    positions_without: Any) -> torch.Tensor:
    """VHD ``[L, H]`` (mean over the batch): compare each head's outputs at the text positions.

    ``positions_with`` / ``positions_without``: index lists of the same text tokens in each input.
    """
    with torch.no_grad():
        a = capture(model, with_context, what=("head_outputs",))
        b = capture(model, without_context, what=("head_outputs",))
    pw = torch.as_tensor(list(positions_with), dtype=torch.long)
    po = torch.as_tensor(list(positions_without), dtype=torch.long)
    rows = [head_divergence_from_outputs(a["head_outputs", li][:, :, pw], b["head_outputs", li][:, :, po]).mean(0)
            for li in a.layers]
    return torch.stack(rows)
