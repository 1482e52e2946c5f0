"""``block_sparse``: block-sparse attention executor: attention over the kept tiles of a block mask."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.dynamic_sparse._common import FAMILY, SMALL, SUPPORT, RoutedMixer, Routing, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register


class BlockSparseAttention(RoutedMixer):
    """Block-sparse attention: query block ``i`` attends key block ``j`` where ``layout[(h,) i, j]``; the routing
    every router of the family emits, executed by the routed-attention op (``blocksparse`` tiles / ``flex`` block
    mask / the ``gather`` path for per-query rows while decoding).

    Args:
        dim, n_heads: as ``mha``.
        block_size: tokens per block (queries and keys).
        layout: bool ``[nQB, nKB]`` or ``[H, nQB, nKB]`` covering the longest call (``None``: all blocks, i.e.
            dense attention). A non-persistent buffer, so ``mha`` checkpoints load as they are.
        **kw: ``mha`` arguments.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 64, layout: torch.Tensor | None = None,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        if layout is not None:
            if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() not in (2, 3) \
                    or (layout.dim() == 3 and layout.shape[0] not in (1, n_heads)):
                got = f"{layout.dtype} {list(layout.shape)}" if isinstance(layout, torch.Tensor) else repr(layout)
                raise ValueError(f"layout: expected a bool tensor [nQB, nKB] or [{n_heads}, nQB, nKB], got {got}")
            layout = layout if layout.dim() == 3 else layout.unsqueeze(0)
        self.register_buffer("layout", layout, persistent=False)

    def blocks_for(self, n_q: int, n_kv: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """``(rows [H', nQB or N, nKB], block_q)``: the layout's rows for a call (per query when ``N != M``)."""
        bs = self.block_size
        nqb, nkb = -(-n_kv // bs), -(-n_kv // bs)
        if self.layout is None:
            full = torch.ones(1, nqb, nkb, dtype=torch.bool, device=device)
        else:
            if self.layout.shape[1] < nqb or self.layout.shape[2] < nkb:
                raise ValueError(f"layout: covers {list(self.layout.shape[1:])} blocks, this call needs "
                                 f"[{nqb}, {nkb}] (block_size={bs}, {n_kv} tokens)")
            full = self.layout[:, :nqb, :nkb].to(device)
        if n_q == n_kv:
            return full, bs
        return full[:, (torch.arange(n_q, device=device) + n_kv - n_q) // bs], 1

    def route(self, q, k, keep, call):
        rows, block_q = self.blocks_for(q.shape[2], k.shape[2], q.device)
        return Routing("blocks", rows.expand(q.shape[0], q.shape[1], *rows.shape[1:]), block_q, self.block_size)

    def sparsity(self, n: int) -> float:
        """Fraction of the ``ceil(n / block_size)^2`` blocks (per head, averaged) the layout drops at length ``n``."""
        rows, _ = self.blocks_for(n, n, torch.device("cpu"))
        return 1.0 - rows.double().mean().item()

    def extra_repr(self) -> str:
        shape = None if self.layout is None else list(self.layout.shape)
        return f"{super().extra_repr()}, block_size={self.block_size}, layout={shape}"


def _layout(seed: int = 0, heads: int = 4, nb: int = 4) -> torch.Tensor:
    out = torch.rand(heads, nb, nb, generator=torch.Generator().manual_seed(seed)) < 0.5
    out[:, :, 0] = True
    return out


def _all_ones_is_mha():
    x = rand_x(n=13)
    got, want = [], []
    for causal in (False, True):
        m = seeded(BlockSparseAttention, dim=32, n_heads=4, block_size=4)
        got.append(m(x, causal=causal))
        want.append(mha_from(m)(x, causal=causal))
    return torch.stack(got), torch.stack(want)


def _expanded_token_mask():
    from attnzoo.patterns import Custom

    layout = _layout()
    x = rand_x(n=15)
    tokens = layout.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :15, :15]
    got, want = [], []
    for causal in (False, True):
        m = seeded(BlockSparseAttention, dim=32, n_heads=4, block_size=4, layout=layout)
        got.append(m(x, causal=causal))

        def rule(b, h, q, kv):
            return tokens[h, q, kv]

        want.append(mha_from(m, backend="reference", pattern=Custom(rule, per_batch=False))(x, causal=causal))
    return torch.stack(got), torch.stack(want)


def _sparsity_is_dropped_blocks():
    from attnzoo.ops.layout import Shape
    from attnzoo.patterns.routed import BlockRouted

    layout = _layout(seed=3)
    m = seeded(BlockSparseAttention, dim=32, n_heads=4, block_size=4, layout=layout)
    blocks = layout.unsqueeze(0)
    measured = 1.0 - BlockRouted(blocks, 4, 4).density(Shape(1, 4, 16, 16))
    dropped = (~layout).double().mean().item()
    return torch.tensor([m.sparsity(16), measured], dtype=torch.float64), torch.tensor([dropped, dropped],
                                                                                       dtype=torch.float64)


register(
    "block_sparse", family=FAMILY, type="pattern", priority=1, papers=("baseline",),
    supports=SUPPORT, complexity="O(N^2 density)",
    backends=("reference", "gather", "blocksparse", "flex", "sdpa"),
    summary="Block-sparse executor: attention over the kept tiles of a block mask (the family's back end).",
    test_kwargs={**SMALL, "block_size": 4, "layout": _layout(nb=64)},
    reductions=(
        Reduction("all_ones_is_mha", "an all-ones mask equals dense (and causal) mha", _all_ones_is_mha),
        Reduction("expanded_token_mask", "output equals dense attention under the expanded token mask",
                  _expanded_token_mask),
        Reduction("sparsity_is_dropped_blocks", "the measured sparsity equals the fraction of dropped blocks",
                  _sparsity_is_dropped_blocks),
    ),
)(BlockSparseAttention)
