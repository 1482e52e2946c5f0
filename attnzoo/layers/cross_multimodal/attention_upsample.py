"""``attention_upsample``: window attention upsampling (WAU): bilinear upsampling plus window cross-attention
from the upsampled decoder queries to the encoder skip features."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.cross_multimodal._common import FAMILY
from attnzoo.patterns import WindowPartition
from attnzoo.registry import Reduction, register


class AttentionUpsample(MultiHeadAttention):
    """WAU: ``out = Up(x) + W_o Attn(Q = W_q Up(x), K, V = W_k skip, W_v skip)`` within local windows.

    ``x`` is a channels-last grid ``[B, L, C]`` or ``[B, H, W, C]``; ``Up`` is (bi)linear
    interpolation by ``scale_factor`` (``align_corners=False``); the skip features ``context``
    live on the upsampled grid: ``[B, *out_grid, C_ctx]`` or flattened ``[B, prod(out_grid), C_ctx]``
    (``context_mask`` of the same leading shape). A query sees the skip tokens of its own
    ``window`` (non-overlapping windows of the output grid). Without a context the upsampled
    tokens are their own skip features (window self-attention). ``mask`` ``[B, *grid]`` pads
    ``x``: padded tokens are zeroed before upsampling and the output cells they cover
    (nearest) are padded (zero) too. ``W_o = 0`` gives plain bilinear upsampling.
    """

    refused_arguments = ("pattern", "rope", "n_kv_heads")

    # CAB's noncausal patterns assume an input-shaped output and a context of any length.
    cab_not_applicable = {
        "NS": "an upsampler: the output grid is scale_factor times the input's",
        "NC": "the context is the skip features at the output resolution, not a sequence of any length",
    }

    def __init__(self, dim: int, n_heads: int = 8, *, scale_factor: int = 2, window: int = 4, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.scale_factor = check_int("scale_factor", scale_factor)
        self.window = check_int("window", window)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """(Bi)linear upsampling of a channels-last grid ``[B, *grid, C]`` -> ``[B, *(s·grid), C]``."""
        if self.scale_factor == 1:
            return x
        nd = x.dim() - 2
        y = F.interpolate(x.movedim(-1, 1), scale_factor=self.scale_factor, mode="linear" if nd == 1 else "bilinear",
                          align_corners=False)
        return y.movedim(1, -1)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, *grid, C]`` (1 or 2 spatial axes) -> ``[B, *(scale_factor·grid), C]``.

        ``mask``: bool ``[B, *grid]``, True = keep (a real token), False = padding; ``context_mask`` the same
        for the skip features.
        """
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a channels-last grid [B, L, {self.dim}] or [B, H, W, {self.dim}] "
                             f"(1 or 2 spatial axes), got {got}")
        if causal:
            raise ValueError("causal: AttentionUpsample does not support causal attention")
        if cache is not None:
            raise ValueError("cache: AttentionUpsample does not decode token by token")
        b, grid = x.shape[0], tuple(x.shape[1:-1])
        out_grid = tuple(g * self.scale_factor for g in grid)
        n_out = 1
        for g in out_grid:
            n_out *= g
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, *grid)):
            raise ValueError(f"mask: expected a bool tensor {[b, *grid]}, got {mask.dtype} {list(mask.shape)}")
        if context is not None:
            if context.dim() not in (3, len(out_grid) + 2) or context.shape[0] != b or \
                    tuple(context.shape[1:-1]) not in ((n_out,), out_grid) or context.shape[-1] != self.context_width:
                raise ValueError(f"context: expected skip features {[b, *out_grid, self.context_width]} or "
                                 f"{[b, n_out, self.context_width]}, got {list(context.shape)}")
            context = context.reshape(b, n_out, -1)
            if context_mask is not None:
                if context_mask.dtype != torch.bool or context_mask.numel() != b * n_out or \
                        tuple(context_mask.shape[1:]) not in ((n_out,), out_grid) or context_mask.shape[0] != b:
                    raise ValueError(f"context_mask: expected a bool tensor {[b, *out_grid]} or {[b, n_out]}, got "
                                     f"{context_mask.dtype} {list(context_mask.shape)}")
                context_mask = context_mask.reshape(b, n_out)
        elif context_mask is not None:
            raise ValueError("context_mask: given without a context (the padding mask of x is mask)")
        elif self.context_width != self.dim:
            raise ValueError(f"context: required, this module reads skip features of width {self.context_width}")
        pattern = WindowPartition(self.window if len(out_grid) == 1 else (self.window, self.window), grid=out_grid)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        up = self.upsample(x)
        out_mask = None
        if mask is not None:
            out_mask = mask
            for axis in range(1, len(grid) + 1):
                out_mask = out_mask.repeat_interleave(self.scale_factor, dim=axis)
            out_mask = out_mask.reshape(b, n_out)
        flat = up.reshape(b, n_out, self.dim)
        if context is None:
            context, context_mask = flat, out_mask
        y = self.mix(flat, mask=out_mask, context=context, context_mask=context_mask, pattern=pattern,
                     extra={"grid": out_grid})
        y = flat + y
        if out_mask is not None:
            y = y * out_mask.unsqueeze(-1).to(y.dtype)
        return y.reshape(b, *out_grid, self.dim)


def _zero_output_is_bilinear() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentionUpsample, dim=32, n_heads=4, scale_factor=2, window=4, context_dim=16)
    with torch.no_grad():
        m.o_proj.weight.zero_()
        m.o_proj.bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 32, generator=g, dtype=torch.float64)
    skip = torch.randn(2, 8, 12, 16, generator=g, dtype=torch.float64)
    want = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return m(x, context=skip), want.permute(0, 2, 3, 1)


def _window_locality() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentionUpsample, dim=32, n_heads=4, scale_factor=2, window=4, context_dim=16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 32, generator=g, dtype=torch.float64)
    skip = torch.randn(1, 8, 8, 16, generator=g, dtype=torch.float64)
    skip2 = skip.clone()
    skip2[:, 4:, :] = torch.randn(1, 4, 8, 16, generator=g, dtype=torch.float64)  # every window but the top ones
    return m(x, context=skip2)[:, :4], m(x, context=skip)[:, :4]


register(
    "attention_upsample", family=FAMILY, type="mixer", priority=3, papers=("WAU (window attention upsample)",),
    input_kind="grid2d", supports={"self", "cross", "padding"}, complexity="O(N·window^2)",
    summary="Window attention upsampling: bilinear upsampling plus window cross-attention to skip features.",
    test_kwargs={"dim": 32, "n_heads": 4, "scale_factor": 1, "window": 4},
    reductions=(
        Reduction("zero_output_is_bilinear", "W_o = 0 gives bilinear upsampling", _zero_output_is_bilinear),
        Reduction("window_locality", "a query's output does not depend on skip tokens outside its window",
                  _window_locality),
    ),
)(AttentionUpsample)
