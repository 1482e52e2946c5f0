"""``moba``: Mixture of block attention: each query attends its top-k key blocks, scored against mean-pooled keys."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    block_means,
    check_top_k,
    query_positions,
    rand_x,
    top_k_lists,
)
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register


class MoBA(RoutedMixer):
    """Mixture of block attention (MoBA).

    Keys split into blocks of ``block_size``; query ``q`` scores block ``b`` by ``⟨q, mean(K_b)⟩`` and attends
    the union of its ``top_k`` best blocks (per head). Under ``causal``, future blocks score ``-inf`` and the
    query's own block ``+inf`` (always selected, causal inside), so ``top_k`` counts the own block (checked
    against a copy of MoonshotAI/MoBA ``moba_naive.py``: unscaled ``q·mean(K_b)`` gate, own chunk ``+inf``,
    later chunks ``-inf``, ``topk(min(top_k, n_blocks))``, then the token-level causal mask). Early queries
    with fewer than ``top_k`` candidate blocks attend all of them. Unlike the authors' ``min``, a ``top_k``
    above the number of key blocks of a call is refused (``ValueError``); ``top_k`` equal to it is full
    attention. KV-cache decoding steps are not checked (each is part of a longer sequence). The choice is
    non-differentiable (hard top-k, as in MoBA); gradients flow through the attention over the chosen keys.
    ``rep = "mean"`` only (LongHeads' chunk keys and its first+local always-on blocks are not implemented).

    Args:
        dim, n_heads: as ``mha``.
        block_size: keys per block.
        top_k: blocks per query (own block included under causality).
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 64, top_k: int = 3, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        self.top_k = check_top_k(top_k)

    def top_k_limit(self, n_keys):
        return self.top_k, -(-n_keys // self.block_size), f"key blocks of {self.block_size}"

    def route(self, q, k, keep, call):
        n, m = q.shape[2], k.shape[2]
        causal = bool(call is not None and call.causal)
        means, valid = self._block_means(k, keep, call)
        scores = q @ means.transpose(-1, -2)  # [B, H, N, nb]
        nb = means.shape[2]
        if not bool(valid.all()):
            scores.masked_fill_(~valid.view(valid.shape[0], 1, 1, nb), float("-inf"))
        if causal:
            blk = torch.arange(nb, device=q.device).view(1, -1)
            own = (query_positions(n, m, q.device) // self.block_size).view(-1, 1)
            scores.masked_fill_(blk > own, float("-inf")).masked_fill_(blk == own, float("inf"))
        return Routing("blocks", top_k_lists(scores, self.top_k), 1, self.block_size)

    def _block_means(self, k: torch.Tensor, keep: torch.Tensor | None, call) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`block_means`; while decoding with a KV cache (no padding), the means of the completed blocks are
        kept in the cache's state and only the blocks after them are averaged (a step reads ``O(block_size)``
        keys, not the whole cache)."""
        cache = call.cache if call is not None else None
        if cache is None or keep is not None:
            return block_means(k, self.block_size, keep)
        m, bs = k.shape[2], self.block_size
        done, kept = cache.state.get("moba_block_means", (0, None))
        if kept is None or done * bs > m or kept.shape[:2] != k.shape[:2]:
            done, kept = 0, k.new_zeros(*k.shape[:2], 0, k.shape[-1])
        tail, _ = block_means(k[:, :, done * bs:], bs, None)
        means = torch.cat([kept, tail], 2)
        complete = m // bs
        cache.state["moba_block_means"] = (complete, means[:, :, :complete])
        return means, torch.ones(k.shape[0], means.shape[2], dtype=torch.bool, device=k.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, top_k={self.top_k}"


def _all_blocks_is_mha():
    outs, want = [], []
    x = rand_x(n=13)
    for causal in (False, True):
        m = seeded(MoBA, dim=32, n_heads=4, block_size=4, top_k=4)
        outs.append(m(x, causal=causal))
        want.append(mha_from(m)(x, causal=causal))
    return torch.stack(outs), torch.stack(want)


def _own_block_and_no_future():
    m = seeded(MoBA, dim=32, n_heads=4, block_size=3, top_k=2)
    x = rand_x(n=12)
    q, k, _ = m.project(x, x)
    from attnzoo.layers.base import Call

    r = m.route(q, k, None, Call(x=x, src=x, causal=True)).block_mask(12)  # [B, H, N, nb]
    own = torch.arange(12) // 3
    blk = torch.arange(4).view(1, -1)
    got = torch.stack([r[..., torch.arange(12), own].all().double(), (r & (blk > own.view(-1, 1))).any().double(),
                       (r.sum(-1) <= 2).all().double()])
    return got, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)


register(
    "moba", family=FAMILY, type="pattern", priority=2, papers=("MoBA", "LongHeads"),
    supports=SUPPORT, complexity="O(N k B)",
    backends=("reference", "gather", "blocksparse", "flex", "sdpa"),
    summary="Mixture of block attention: per query the top-k key blocks by mean-pooled keys (own block forced).",
    test_kwargs={**SMALL, "block_size": 4, "top_k": 2},
    reductions=(
        Reduction("all_blocks_is_mha", "top_k == #blocks equals mha (causal and not)", _all_blocks_is_mha),
        Reduction("own_block_no_future", "the own block is always selected, future blocks never, <= top_k blocks",
                  _own_block_and_no_future),
    ),
)(MoBA)
