"""``mha``: Multi-head scaled-dot-product attention, self or cross; the oracle of every reduction."""

from __future__ import annotations

import math

import torch

from attnzoo.layers.base import MultiHeadAttention, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, MIXER_SUPPORT, SMALL, rand_x
from attnzoo.ops import attention, merge_partials
from attnzoo.registry import Reduction, register


def _mha_lse_merge() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 11, 8, generator=g,
                                                                                   dtype=torch.float64)
    parts = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 10]), torch.tensor([5, 6, 7, 8])]
    outs, lses = zip(*[attention(q, k[:, :, p], v[:, :, p], return_lse=True) for p in parts])
    return merge_partials(list(outs), list(lses))[0], attention(q, k, v)


def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int) -> torch.Tensor:
    """One pass over key tiles of ``tile`` keys with a running max and sum (FlashAttention / FuseMax form)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    denom = torch.zeros(q.shape[:-1], dtype=q.dtype)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for start in range(0, k.shape[2], tile):
        s = q @ k[:, :, start:start + tile].transpose(-1, -2) * scale
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new.unsqueeze(-1))
        corr = torch.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr.unsqueeze(-1) + p @ v[:, :, start:start + tile]
        m = m_new
    return acc / denom.unsqueeze(-1)


def _mha_online_softmax() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    three_pass = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    tiles = [1, 2, 3, 5, 13, 20]
    return (torch.stack([online_softmax_attention(q, k, v, t) for t in tiles]),
            three_pass.expand(len(tiles), *three_pass.shape))


def _mha_permute_kv() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MultiHeadAttention, dim=32, n_heads=4)
    x, ctx = rand_x(), rand_x(n=13, seed=1)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(2))
    return m(x, context=ctx[:, perm]), m(x, context=ctx)


register(
    "mha", family=FAMILY, type="mixer", priority=1, papers=("baseline",), supports=MIXER_SUPPORT,
    summary="Multi-head scaled-dot-product attention, self or cross; the oracle of every reduction.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("lse_merge", "the lse-merge of partials over a key partition equals attention over the union",
                  _mha_lse_merge),
        Reduction("permute_kv", "permuting K and V together (cross-attention, no PE) leaves the output unchanged",
                  _mha_permute_kv),
        Reduction("online_softmax_tiles", "a 1-pass online-softmax tiled attention equals 3-pass softmax for any "
                  "tile size (1, 2, 3, 5, 13, 20)", _mha_online_softmax),
    ),
)(MultiHeadAttention)
