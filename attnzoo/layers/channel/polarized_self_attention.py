"""``polarized_self_attention``: polarized self-attention, channel-only and spatial-only sigmoid gates.

Channel branch: ``w = softmax_HW(W_q x)`` (C -> 1), ``z = (W_v x) w`` (C -> C/2, collapsing HW),
``gate_c = sigmoid(LN(Conv_{C/2 -> C}(z)))`` ``[B, C, 1, 1]``. Spatial branch: ``q = softmax_C(GAP(W_q' x))``
over C/2 channels, ``gate_s = sigmoid(q . W_v' x)`` ``[B, 1, H, W]``. ``parallel``:
``x * gate_c + x * gate_s``; ``sequential``: ``y = x * gate_c``, then ``y * gate_s(y)`` [recalled].
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.channel._common import FAMILY, check_feature_map
from attnzoo.registry import register

__all__ = ["PolarizedSelfAttention", "LAYOUTS"]

LAYOUTS = ("parallel", "sequential")


class PolarizedSelfAttention(nn.Module):
    """PSA ``[B, C, H, W] -> [B, C, H, W]`` (``C`` even)."""

    def __init__(self, channels: int, *, layout: str = "parallel") -> None:
        super().__init__()
        self.channels = check_int("channels", channels, minimum=2)
        if channels % 2:
            raise ValueError(f"channels: expected an even number (C / 2 inner channels), got {channels}")
        self.layout = check_choice("layout", layout, LAYOUTS)
        half = channels // 2
        self.ch_q = nn.Conv2d(channels, 1, 1)
        self.ch_v = nn.Conv2d(channels, half, 1)
        self.ch_up = nn.Conv2d(half, channels, 1)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_q = nn.Conv2d(channels, half, 1)
        self.sp_v = nn.Conv2d(channels, half, 1)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 1, 1]`` in (0, 1)."""
        w = torch.softmax(self.ch_q(x).flatten(2), -1)                       # [B, 1, HW]
        z = torch.einsum("bcn,bon->bc", self.ch_v(x).flatten(2), w)         # [B, C/2]
        up = self.ch_up(z[..., None, None])[..., 0, 0]                      # [B, C]
        return torch.sigmoid(self.ch_norm(up))[..., None, None]

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` in (0, 1)."""
        q = torch.softmax(self.sp_q(x).flatten(2).mean(-1), -1)             # [B, C/2]
        s = torch.einsum("bc,bchw->bhw", q, self.sp_v(x))
        return torch.sigmoid(s).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map("x", x, self.channels)
        if self.layout == "parallel":
            return x * self.channel_gate(x) + x * self.spatial_gate(x)
        y = x * self.channel_gate(x)
        return y * self.spatial_gate(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}"


register(
    "polarized_self_attention", family=FAMILY, type="channel", priority=3, input_kind="feature_map",
    papers=("Polarized Self-Attention",), supports=frozenset(), complexity="O(C HW)", backends=(),
    reference="the same module in float64", reference_kwargs={}, test_kwargs={"channels": 32},
    summary="Polarized self-attention: a channel-only gate (softmax over space, C/2 bottleneck, LN, sigmoid) and "
            "a spatial-only gate (softmax over C/2 channels), in parallel or in sequence.",
)(PolarizedSelfAttention)
