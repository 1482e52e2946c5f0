"""``ulsam``: ultra-lightweight subspace attention, one spatial attention map per channel subspace.

Channels split into ``g`` subspaces ``F_i``; ``A_i = softmax_HW(PWConv_{->1}(MaxPool_3x3(DWConv_1x1(F_i))))``
and ``out_i = F_i * A_i + F_i``; the subspaces are concatenated [recalled: depthwise 1x1 conv,
3x3 max pool with stride 1 and padding 1, pointwise conv to one map]. Parameters: O(C), independent of H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.channel._common import FAMILY, check_feature_map
from attnzoo.registry import register

__all__ = ["ULSAM"]


class ULSAM(nn.Module):
    """ULSAM ``[B, C, H, W] -> [B, C, H, W]`` with ``groups`` subspaces."""

    def __init__(self, channels: int, *, groups: int = 4) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.groups = check_int("groups", groups)
        if channels % groups:
            raise ValueError(f"groups: must divide channels={channels}, got groups={groups}")
        self.dw = nn.Conv2d(channels, channels, 1, groups=channels)
        self.pw = nn.Conv2d(channels, groups, 1, groups=groups)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """The attention maps ``[B, g, H, W]``, each summing to 1 over H x W."""
        check_feature_map("x", x, self.channels)
        s = self.pw(F.max_pool2d(self.dw(x), 3, stride=1, padding=1))
        return torch.softmax(s.flatten(2), -1).view_as(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.maps(x).repeat_interleave(self.channels // self.groups, 1)
        return x * a + x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"


register(
    "ulsam", family=FAMILY, type="channel", priority=3, input_kind="feature_map", papers=("ULSAM",),
    supports=frozenset(), complexity="O(C HW)", backends=(), reference="the same module in float64",
    reference_kwargs={}, test_kwargs={"channels": 32},
    summary="ULSAM: per channel subspace, a softmax-over-space map from depthwise conv, max pool and a "
            "pointwise conv; out = F * A + F.",
)(ULSAM)
