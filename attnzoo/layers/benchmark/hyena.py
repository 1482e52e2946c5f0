"""``hyena``: the Hyena operator (order 2), Zoology's gated-convolution baseline with a short and a
long convolution."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, seeded
from attnzoo.layers.benchmark._common import FAMILY, REFERENCE, SMALL, LongConv, causal_conv, rand_x
from attnzoo.layers.recurrent import ShortConv
from attnzoo.registry import Reduction, register


class Hyena(nn.Module):
    """Hyena of order 2 (Poli et al. 2023; a baseline of Zoology's Figure 2):
    ``(x1, x2, v) = ShortConv(x W_in)``, ``y = W_out (x2 ⊙ (h ∗ (x1 ⊙ v)))`` with ``h ∗`` a causal
    long convolution whose taps decay as ``exp(-α_c t)``.

    From the paper: input projection to three streams, a short depthwise convolution on them, the
    order-2 recurrence of gates and a long convolution, output projection. Recalled / simplified
    here: the long filter is explicit (taps times a fixed per-channel exponential decay window)
    instead of Hyena's implicit positional-encoding MLP; the short convolution has ``short_kernel``
    taps (3) and no activation. Always causal; no padding mask, cross input or cache.
    """

    def __init__(self, dim: int, *, max_len: int = 512, short_kernel: int = 3, form: str = "fft",
                 bias: bool = True) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.short = ShortConv(3 * dim, short_kernel, activation=False)
        self.conv = LongConv(dim, max_len, form=form)
        rates = torch.logspace(math.log10(0.3), math.log10(30.0), dim) / self.conv.max_len  # fast to slow
        self.register_buffer("decay", torch.exp(-rates[:, None] * torch.arange(self.conv.max_len)), persistent=False)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def long_filter(self) -> torch.Tensor:
        """The long convolution's taps ``[C, max_len]`` (explicit taps times the decay window)."""
        return self.conv.filter * self.decay.to(self.conv.filter.dtype)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = True,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal); ``mask``, ``context`` and ``cache`` refused."""
        check_mixer_input(x, mask, context, self.dim)
        if mask is not None or context is not None or cache is not None:
            raise ValueError("hyena: mask, context and cache are not supported (a causal self mixer)")
        x1, x2, v = self.short(self.in_proj(x))[0].chunk(3, dim=-1)
        z = causal_conv(x1 * v, self.long_filter(), self.conv.form)
        return self.out_proj(x2 * z)


def _order2_formula() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(Hyena, dim=32, max_len=16)
    x = rand_x()
    u = m.in_proj(x)
    n = x.shape[1]
    full = torch.cat([u.new_zeros(2, 2, 96), u], dim=1)
    sc = sum(full[:, j:j + n] * m.short.weight[:, j] for j in range(3)) + m.short.bias
    x1, x2, v = sc.chunk(3, dim=-1)
    h = m.long_filter()
    z = torch.stack([sum(h[:, t - s] * (x1 * v)[:, s] for s in range(t + 1)) for t in range(n)], dim=1)
    return m(x), m.out_proj(x2 * z)


register(
    "hyena", family=FAMILY, type="mixer", priority=3,
    papers=("Hyena Hierarchy (Poli et al. 2023)", "Zoology (Arora et al. 2023)"),
    supports={"self", "causal"}, complexity="O(N log N)", backends=(),
    reference=REFERENCE, reference_kwargs={"form": "direct"}, test_kwargs=SMALL,
    summary="Hyena (order 2): short convolution, gates and a decaying causal long convolution "
            "(attention-free bench baseline).",
    reductions=(
        Reduction("order2_formula", "y = W_out(x2 ⊙ (h ∗ (x1 ⊙ v))) written as explicit sums over taps",
                  _order2_formula),
    ),
)(Hyena)
