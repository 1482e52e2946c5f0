"""``based``: Based (Taylor-feature linear attention + a small sliding window + a short convolution)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, seeded
from attnzoo.layers.benchmark._common import FAMILY, rand_x
from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention
from attnzoo.layers.recurrent import ShortConv, merge_heads, split_heads
from attnzoo.ops import attention
from attnzoo.patterns.masks import SlidingWindow
from attnzoo.registry import Reduction, register


class Based(nn.Module):
    """Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
    tradeoff"), as one mixer: ``h = ShortConv(x)`` (causal, ``conv_size`` taps), then
    ``y = LinearAttention_taylor(h) + W_o SlidingWindowAttention_w(h)``.

    From the paper: the three parts (2nd-order Taylor feature map with feature dimension 16, a small
    exact sliding window of 64 tokens, short gated convolutions). Recalled / simplified here: Based
    stacks them as separate layers (convolution, linear-attention and window layers); this mixer
    runs them as parallel branches summed in one layer, with the window ``window`` (default 16 at
    the bench's short sequences). Always causal; no padding mask, cross input or cache.
    """

    def __init__(self, dim: int, n_heads: int = 4, *, feature_dim: int = 16, window: int = 16,
                 conv_size: int = 3, form: str = "chunked", chunk_size: int = 64, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
        self.window, self.backend = check_int("window", window), backend
        self.conv = ShortConv(dim, conv_size, activation=True)
        self.linear = LinearAttention(dim, n_heads, feature_dim=feature_dim, feature_map="taylor", form=form,
                                      chunk_size=chunk_size)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def window_branch(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(h).chunk(3, dim=-1))
        o = attention(q, k, v, pattern=SlidingWindow(self.window, causal=True), backend=self.backend)
        return self.out(merge_heads(o))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = True,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal); ``mask``, ``context`` and ``cache`` refused."""
        check_mixer_input(x, mask, context, self.dim)
        if mask is not None or context is not None or cache is not None:
            raise ValueError("based: mask, context and cache are not supported (a causal self mixer)")
        h = self.conv(x)[0]
        return self.linear(h, causal=True) + self.window_branch(h)


def _parts() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(Based, dim=32, n_heads=4, window=3)
    x = rand_x()
    h = m.conv(x)[0]
    q, k, v = (split_heads(t, 4) for t in m.qkv(h).chunk(3, dim=-1))
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    i = torch.arange(x.shape[1])
    lag = i[:, None] - i[None, :]
    s = s.masked_fill(~((lag >= 0) & (lag < 3)), float("-inf"))
    win = m.out(merge_heads(s.softmax(-1) @ v))
    return m(x), m.linear(h, causal=True, ) + win


register(
    "based", family=FAMILY, type="mixer", priority=3,
    papers=("Based (Arora et al. 2024)", "Zoology (Arora et al. 2023)"),
    supports={"self", "causal"}, complexity="O(N w)", backends=(),
    reference="the same module with the linear branch in form='parallel' and the window by the reference "
              "attention backend, in float64",
    reference_kwargs={"form": "parallel", "backend": "reference"},
    test_kwargs={"dim": 32, "n_heads": 4, "chunk_size": 5, "window": 3},
    summary="Based: short convolution, then Taylor-feature linear attention plus a small causal sliding "
            "window (attention-free apart from the window; bench baseline).",
    reductions=(
        Reduction("parts", "y = linear_attention_taylor(h) + window softmax attention(h), h = ShortConv(x)",
                  _parts),
    ),
)(Based)
