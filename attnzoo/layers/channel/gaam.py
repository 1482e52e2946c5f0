"""``gaam``: Gaussian adaptive attention, multi-head Gaussian feature recalibration.

Along an axis (``channel``: over the channels at each position, per head's channel split;
``spatial``: over the positions of each channel) compute the mean ``mu`` and variance ``var``
of ``x``. For each Gaussian g: ``y_g = (x - (mu + delta_g)) / sqrt(var + eps)`` and
``w_g = exp(-y_g^2 / (2 c_g^2))`` (the normal density's shape; its constant cancels in the
normalisation), with learnable ``delta_g`` and ``c_g``. ``w = prod_g w_g``, normalised to sum to 1
along the axis; ``out = x * w``. With ``mask`` (bool ``[B, *spatial]``, spatial axis only) padding
positions are left out of the statistics and pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.channel._common import FAMILY, check_feature_map
from attnzoo.registry import register

__all__ = ["GAAM", "AXES"]

AXES = ("channel", "spatial")


class GAAM(nn.Module):
    """GAAM ``[B, C, *spatial] -> [B, C, *spatial]``; ``weights(x)`` returns ``w``."""

    def __init__(self, channels: int, *, n_heads: int = 1, n_gaussians: int = 2, axis: str = "channel",
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.n_heads = check_int("n_heads", n_heads)
        if channels % n_heads:
            raise ValueError(f"n_heads: must divide channels={channels}, got n_heads={n_heads}")
        self.axis = check_choice("axis", axis, AXES)
        self.eps = float(eps)
        g = check_int("n_gaussians", n_gaussians)
        self.delta = nn.Parameter(torch.zeros(n_heads, g))
        self.log_c = nn.Parameter(torch.zeros(n_heads, g))

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``w`` with the shape of ``x``, summing to 1 along the axis (per head split)."""
        check_feature_map("x", x, self.channels, (1, 2, 3))
        b, c = x.shape[:2]
        h = self.n_heads
        xs = x.reshape(b, h, c // h, -1)                                      # [B, h, C/h, P]
        dim = 2 if self.axis == "channel" else 3
        if mask is not None:
            if self.axis != "spatial":
                raise ValueError("mask: padding positions are an axis='spatial' notion; this gaam uses axis='channel'")
            if mask.dtype != torch.bool or tuple(mask.shape) != (b, *x.shape[2:]):
                raise ValueError(f"mask: expected a bool tensor {[b, *x.shape[2:]]}, "
                                 f"got {mask.dtype} {list(mask.shape)}")
            keep = mask.reshape(b, 1, 1, -1)
        else:
            keep = None
        if keep is None:
            mu = xs.mean(dim, keepdim=True)
            var = xs.var(dim, keepdim=True, unbiased=False)
        else:
            n = keep.sum(dim, keepdim=True).clamp(min=1).to(x.dtype)
            xk = xs.masked_fill(~keep, 0)
            mu = xk.sum(dim, keepdim=True) / n
            var = ((xs - mu).masked_fill(~keep, 0) ** 2).sum(dim, keepdim=True) / n
        delta = self.delta.to(x.dtype)[None, :, None, None, :]               # [1, h, 1, 1, g]
        cg = torch.exp(self.log_c.to(x.dtype))[None, :, None, None, :]
        y = (xs.unsqueeze(-1) - (mu.unsqueeze(-1) + delta)) / torch.sqrt(var + self.eps).unsqueeze(-1)
        logw = (-(y ** 2) / (2 * cg ** 2)).sum(-1)                           # log prod_g w_g
        if keep is not None:
            logw = logw.masked_fill(~keep, float("-inf"))
        w = torch.softmax(logw, dim)
        if keep is not None:
            w = torch.nan_to_num(w, nan=0.0)
        return w.reshape_as(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weights(x, mask)
        out = x * w
        if mask is not None:
            out = torch.where(mask.unsqueeze(1), out, x)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, n_heads={self.n_heads}, axis={self.axis!r}"


register(
    "gaam", family=FAMILY, type="channel", priority=3, input_kind="feature_map", papers=("GAAM",),
    supports=frozenset(), complexity="O(C HW G)", backends=(), reference="the same module in float64",
    reference_kwargs={}, test_kwargs={"channels": 32, "n_heads": 4},
    summary="Gaussian adaptive attention: products of learnable Gaussians around the mean (offset delta, width c) "
            "of x along an axis, normalised to sum to 1; out = x * w.",
)(GAAM)
