"""A tiny causal language model: the host that steering entries are applied to in tests and examples."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int
from attnzoo.layers.cache import KVCache

__all__ = ["TinyLM"]


class TinyLM(nn.Module):
    """Token embedding, ``n_layers`` pre-norm blocks (``mha`` with rope + MLP), LM head.

    ``forward(tokens [B, N] long, *, mask=None, caches=None) -> logits [B, N, vocab]``,
    causal. ``caches`` is a list with one :class:`KVCache` per layer for incremental
    decoding. ``mixer`` builds the attention layer of each block (default: ``mha`` with
    a :class:`~attnzoo.layers.rotary.RotaryEmbedding`).
    """

    def __init__(self, vocab: int = 64, dim: int = 32, n_heads: int = 4, n_layers: int = 2, *,
                 backend: str = "auto", mixer: Any = None) -> None:
        super().__init__()
        self.vocab, self.dim = check_int("vocab", vocab), check_int("dim", dim)
        check_int("n_layers", n_layers)
        if mixer is None:
            from attnzoo.layers.rotary import RotaryEmbedding

            if dim % n_heads:
                raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
            mixer = lambda: MultiHeadAttention(dim, n_heads, rope=RotaryEmbedding(dim // n_heads), backend=backend)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(dim), "attn": mixer(), "norm2": nn.LayerNorm(dim),
                           "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected a long tensor [B, N], got {got}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches: expected {len(self.blocks)} KVCache objects (one per layer), got {len(caches)}")
        h = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            h = h + blk["attn"](blk["norm1"](h), causal=True, mask=mask, cache=None if caches is None else caches[i])
            h = h + blk["mlp"](blk["norm2"](h))
        return self.head(self.norm(h))
