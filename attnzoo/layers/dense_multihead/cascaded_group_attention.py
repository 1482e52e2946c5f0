"""``cascaded_group_attention``: EfficientViT: head j attends on channel chunk j plus the previous head's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


class CascadedGroupAttention(nn.Module):
    """EfficientViT cascaded group attention.

    Channels split into ``n_heads`` chunks ``X_j``; head j takes ``X̃_j = X_j + O_{j−1}``
    (``O_0 = 0``) and computes ``O_j = Attn(X̃_j W_Q^j, X̃_j W_K^j, X̃_j W_V^j)`` with
    ``key_dim``-wide queries/keys; ``Y = act(Concat_j O_j) W_O`` (ReLU before the
    projection as in the official code when ``activation``; [recalled], not in the abstract).
    Checked against the abstract (EfficientViT): "a cascaded group attention module feeding
    attention heads with different splits of the full feature"; the cascade sum
    ``X_j + O_{j−1}`` is the catalogue's. Causal: each head is causal, so the layer is.
    KV-cache decoding (``causal=True``) keeps one cache per head in ``cache.state``: a new
    token's ``X̃_j`` only needs the previous head's output at that token, so the cascade
    runs on the new tokens alone.
    """

    def __init__(self, dim: int, n_heads: int = 4, *, key_dim: int | None = None, bias: bool = True,
                 activation: bool = True, pattern: Any = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
        self.chunk = dim // n_heads
        self.key_dim = self.chunk if key_dim is None else check_int("key_dim", key_dim)
        self.qkv = nn.ModuleList(nn.Linear(self.chunk, 2 * self.key_dim + self.chunk, bias=bias)
                                 for _ in range(n_heads))
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.pattern, self.backend = pattern, backend

    def head_outputs(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                     cache: Any = None) -> list[torch.Tensor]:
        """Per-head outputs ``O_j`` ``[B, N, dim // n_heads]``."""
        from attnzoo.layers.base import build_pattern
        from attnzoo.layers.cache import KVCache, window_of

        heads = None
        if cache is not None:
            heads = cache.state.setdefault("cascaded_heads", [KVCache() for _ in range(self.n_heads)])
        outs: list[torch.Tensor] = []
        for j, chunk in enumerate(x.split(self.chunk, dim=-1)):
            xj = chunk if j == 0 else chunk + outs[-1]
            q, k, v = self.qkv[j](xj).unsqueeze(1).split([self.key_dim, self.key_dim, self.chunk], dim=-1)
            keep = mask
            if heads is not None:
                k, v, keep = heads[j].append(k, v, mask)
            pattern = build_pattern(self.pattern, causal, keep)
            outs.append(attention(q, k, v, pattern=pattern, backend=self.backend)[:, 0])
            if heads is not None:
                heads[j].advance(x.shape[1])
                bound = window_of(self.pattern)
                if bound is not None:
                    heads[j].trim(*bound)
        if cache is not None:
            cache.advance(x.shape[1])
        return outs

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        from attnzoo.layers.cache import KVCache

        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: cascaded_group_attention is self-attention only")
        if cache is not None and (not causal or not isinstance(cache, KVCache)):
            raise ValueError("cache: cascaded_group_attention decodes causally with an attnzoo KVCache "
                             f"(causal=True), got causal={causal}, cache={type(cache).__name__}")
        outs = self.head_outputs(x, mask=mask, causal=causal, cache=cache)
        return zero_padded(self.proj(self.act(torch.cat(outs, -1))), mask)


def _cga_cascade() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(CascadedGroupAttention, dim=32, n_heads=4)
    x = rand_x()
    x2 = x.clone()
    x2[..., 16:] += 1.0  # perturb chunks 2 and 3: O_0 and O_1 must not change
    a, b = m.head_outputs(x2), m.head_outputs(x)
    return torch.cat(a[:2], -1), torch.cat(b[:2], -1)


def _cga_params() -> tuple[torch.Tensor, torch.Tensor]:
    m = CascadedGroupAttention(32, 4, bias=False)
    ref = MultiHeadAttention(32, 4, bias=False)
    n = sum(p.numel() for p in m.qkv.parameters())
    n_ref = sum(p.numel() for name, p in ref.named_parameters() if name[0] in "qkv")
    return torch.tensor(float(n) * 4, dtype=torch.float64), torch.tensor(float(n_ref), dtype=torch.float64)


register(
    "cascaded_group_attention", family=FAMILY, type="mixer", priority=3,
    papers=("EfficientViT (cascaded group attention)",), supports={"self", "causal", "padding", "decoding"},
    summary="EfficientViT: head j attends on channel chunk j plus the previous head's output.",
    test_kwargs={"dim": 32, "n_heads": 4},
    reductions=(
        Reduction("cascade", "O_j is unaffected by perturbing chunks after j", _cga_cascade),
        Reduction("param_count", "Q/K/V parameter count is 1/h of mha at the same width", _cga_params),
    ),
)(CascadedGroupAttention)
