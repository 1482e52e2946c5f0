"""``ela``: efficient local attention: strip pooling, a 1-D conv, GroupNorm and sigmoid gates along H and W.

``z_h = mean_W(x)`` ``[B, C, H]`` and ``z_w = mean_H(x)`` ``[B, C, W]``; ``a_h = sigmoid(GN(Conv1d(z_h)))``
and ``a_w = sigmoid(GN(Conv1d(z_w)))`` with one conv and one GroupNorm shared by both directions and no
channel reduction; ``y = x * a_h * a_w``. Variants set the kernel size, the conv groups and the
GroupNorm groups [recalled from the ELA paper]: T (k 5, depthwise, GN 32), B (k 7, depthwise,
GN 16), S (k 5, C / 8 groups, GN 16), L (k 7, C / 8 groups, GN 16).
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.channel._common import FAMILY, check_feature_map
from attnzoo.registry import register

__all__ = ["ELA", "VARIANTS"]

VARIANTS = {"T": (5, None, 32), "B": (7, None, 16), "S": (5, 8, 16), "L": (7, 8, 16)}


class ELA(nn.Module):
    """ELA ``[B, C, H, W] -> [B, C, H, W]``; ``conv_groups`` None = depthwise, else ``C / channels_per_group``."""

    def __init__(self, channels: int, *, variant: str = "T", kernel_size: int | None = None,
                 gn_groups: int | None = None) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        check_choice("variant", variant, tuple(VARIANTS))
        k, per_group, gn = VARIANTS[variant]
        k = check_int("kernel_size", kernel_size if kernel_size is not None else k)
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size (same-length output), got {k}")
        conv_groups = channels if per_group is None else max(channels // per_group, 1)
        gn = check_int("gn_groups", gn_groups if gn_groups is not None else min(gn, channels))
        if channels % conv_groups or channels % gn:
            raise ValueError(f"channels: must be divisible by the conv groups ({conv_groups}) and the GroupNorm "
                             f"groups ({gn}), got channels={channels}")
        self.variant = variant
        self.conv = nn.Conv1d(channels, channels, k, padding=k // 2, groups=conv_groups, bias=False)
        self.norm = nn.GroupNorm(gn, channels)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_h [B, C, H], a_w [B, C, W])`` in (0, 1)."""
        check_feature_map("x", x, self.channels)
        a_h = torch.sigmoid(self.norm(self.conv(x.mean(3))))
        a_w = torch.sigmoid(self.norm(self.conv(x.mean(2))))
        return a_h, a_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return x * a_h.unsqueeze(-1) * a_w.unsqueeze(-2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}"


register(
    "ela", family=FAMILY, type="channel", priority=3, input_kind="feature_map", papers=("ELA",),
    supports=frozenset(), complexity="O(C HW)", backends=(), reference="the same module in float64",
    reference_kwargs={}, test_kwargs={"channels": 32},
    summary="Efficient local attention: strip means along H and W, a shared 1-D conv + GroupNorm + sigmoid, "
            "y = x * a_h * a_w (variants T/B/S/L).",
)(ELA)
