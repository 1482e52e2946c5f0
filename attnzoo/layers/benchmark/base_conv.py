"""``base_conv``: Zoology's BaseConv, a gated long convolution (no attention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, seeded
from attnzoo.layers.benchmark._common import FAMILY, REFERENCE, SMALL, LongConv, causal_conv, rand_x
from attnzoo.registry import Reduction, register


class BaseConv(nn.Module):
    """BaseConv (Zoology, Arora et al. 2023, Figure 2's gated-convolution baseline):
    ``y = (x W + b) ⊙ (h ∗ x)``, with ``h ∗`` a causal depthwise long convolution over tokens.

    From the paper: the gated-convolution form (a linear projection multiplied elementwise by a long
    convolution of the input). Recalled / chosen here: the filter is explicit (``max_len`` taps per
    channel, Zoology also has implicit filters), no residual inside the mixer (the bench model adds
    one), always causal (``causal=False`` changes nothing), no padding mask and no cross input.

    Args:
        dim: width C. max_len: the longest sequence (filter taps). form: ``fft`` or ``direct``.
    """

    def __init__(self, dim: int, *, max_len: int = 512, form: str = "fft", bias: bool = True) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.projection = nn.Linear(dim, dim, bias=bias)
        self.conv = LongConv(dim, max_len, form=form)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = True,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal); ``mask``, ``context`` and ``cache`` refused."""
        check_mixer_input(x, mask, context, self.dim)
        if mask is not None or context is not None or cache is not None:
            raise ValueError("base_conv: mask, context and cache are not supported (a causal self mixer)")
        return self.projection(x) * self.conv(x)


def _gated_formula() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(BaseConv, dim=32, max_len=16)
    x = rand_x()
    return m(x), m.projection(x) * causal_conv(x, m.conv.filter, "direct")


def _delta_filter() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(BaseConv, dim=32, max_len=16)
    with torch.no_grad():
        m.conv.filter.zero_()
        m.conv.filter[:, 0] = 1.0
    x = rand_x()
    return m(x), m.projection(x) * x


register(
    "base_conv", family=FAMILY, type="mixer", priority=3,
    papers=("Zoology (Arora et al. 2023)",),
    supports={"self", "causal"}, complexity="O(N log N)", backends=(),
    reference=REFERENCE, reference_kwargs={"form": "direct"}, test_kwargs=SMALL,
    summary="Zoology's BaseConv: a linear projection gated by a causal long convolution (attention-free "
            "bench baseline).",
    reductions=(
        Reduction("gated_formula", "y = (xW + b) ⊙ (h ∗ x) with h ∗ the causal Toeplitz product", _gated_formula),
        Reduction("delta_filter", "a unit impulse filter gives y = (xW + b) ⊙ x", _delta_filter),
    ),
)(BaseConv)
