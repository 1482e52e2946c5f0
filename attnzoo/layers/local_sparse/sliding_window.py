"""``sliding_window``: Sliding window (symmetric or causal), sink tokens, per-head windows; KV cache
bounded by the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, seeded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.patterns import SlidingWindow
from attnzoo.registry import Reduction, register


class SlidingWindowAttention(MultiHeadAttention):
    """Sliding-window attention (:class:`~attnzoo.patterns.SlidingWindow`).

    Symmetric ``|i - j| <= window`` or, with ``causal_window``, ``0 <= i - j < window``;
    ``n_sink`` first tokens always visible (StreamingLLM); ``window`` may be a list (one per
    head group). ``forward(causal=True)`` adds the causal mask. In KV-cache decoding the cache
    keeps only the last ``window`` entries plus the sinks (memory bounded in N).
    """

    refused_arguments = ('context_dim', 'pattern')  # base-class arguments it sets itself or cannot honour

    def __init__(self, dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 256,
                 causal_window: bool = False, n_sink: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, pattern=SlidingWindow(window, causal=causal_window, n_sink=n_sink), **kw)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.pattern!r}"


def _sw_full_window_is_dense():
    outs, want = [], []
    x = rand_x()
    for causal_window in (False, True):
        m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=12, causal_window=causal_window)
        outs.append(m(x, causal=causal_window))
        want.append(mha_from(m)(x, causal=causal_window))
    return torch.stack(outs), torch.stack(want)


def _sw_outside_window_invariant():
    m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=3)
    x = rand_x(n=16)
    x2 = x.clone()
    x2[:, 12:] += 1.0  # outside the window of tokens 0..8
    x2[:, :2] -= 1.0  # outside the window of tokens 5..8
    return m(x2)[:, 5:9], m(x)[:, 5:9]


def _sw_per_head_and_sinks():
    from attnzoo.patterns import Custom

    m = seeded(SlidingWindowAttention, dim=32, n_heads=4, window=[2, 5], causal_window=True, n_sink=2)
    x = rand_x(n=14)
    i, j = torch.arange(14).view(-1, 1), torch.arange(14).view(1, -1)
    allowed = torch.stack([((i - j >= 0) & (i - j < w)) | ((j < 2) & (j <= i)) for w in (2, 2, 5, 5)])

    def rule(b, h, q, kv):
        return allowed.to(q.device)[h, q, kv]

    return m(x), mha_from(m, backend='reference', pattern=Custom(rule, per_batch=False))(x)


register(
    "sliding_window", family=FAMILY, type="pattern", priority=1,
    papers=("baseline", "TKL (local self-attention retrieval)"),
    supports={"self", "causal", "padding", "decoding", "gqa"}, complexity="O(N w)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather", "triton"),
    summary="Sliding window (symmetric or causal), sink tokens, per-head windows; KV cache bounded by the window.",
    test_kwargs={"dim": 32, "n_heads": 4, "window": 3, "n_sink": 1},
    reductions=(
        Reduction("full_window_is_dense", "w >= N equals dense (and causal) mha", _sw_full_window_is_dense),
        Reduction("outside_window_invariant", "a token's output ignores tokens outside its window",
                  _sw_outside_window_invariant),
        Reduction("per_head_sinks", "per-head windows with sinks equal mha under the explicit pattern (reference)",
                  _sw_per_head_and_sinks),
    ),
)(SlidingWindowAttention)
