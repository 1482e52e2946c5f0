"""Block layouts: which key blocks each query block visits, consumed by the chunked backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class Shape:
    """Problem shape a pattern is evaluated on: batch, query heads, query and key lengths."""

    batch: int
    heads: int
    n_q: int
    n_kv: int

    @property
    def offset(self) -> int:
        """Position of query 0 among the keys when queries are the last ``n_q`` tokens (KV cache)."""
        return self.n_kv - self.n_q


@dataclass(frozen=True)
class Bucket:
    """Query blocks that visit the same number of key blocks.

    ``q_blocks``: ``[n]`` query block ids. ``kv_blocks``: ``[n, K]`` key block ids
    (padded slots point at block 0). ``valid``/``full``: ``[n, K]`` bool, whether the slot
    is real and whether every (q, k) pair in it is allowed for every batch and head.
    """

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    valid: torch.Tensor
    full: torch.Tensor

    @property
    def needs_mask(self) -> bool:
        return bool((self.valid & ~self.full).any())


@dataclass(frozen=True)
class BlockLayout:
    """Block classification of a pattern on one problem shape.

    ``state``: ``[B', H', n_q_blocks, n_kv_blocks]`` int8 (``EMPTY``/``PARTIAL``/``FULL``),
    ``B'`` in ``{1, B}`` and ``H'`` in ``{1, H}``. ``buckets`` is the union over batch and
    heads, grouped so that query blocks with similar key-block counts share one gather.
    """

    block_q: int
    block_kv: int
    n_q: int
    n_kv: int
    state: torch.Tensor
    buckets: tuple[Bucket, ...]

    @property
    def active_fraction(self) -> float:
        """Fraction of (query block, key block) tiles the chunked path computes."""
        total = self.state.shape[-1] * self.state.shape[-2]
        visited = sum(int(b.valid.sum()) for b in self.buckets)
        return visited / max(total, 1)

    @staticmethod
    def from_state(state: torch.Tensor, block_q: int, block_kv: int, n_q: int, n_kv: int) -> BlockLayout:
        """Build the union block lists from a ``[B', H', nqb, nkb]`` state tensor."""
        flat = state.reshape(-1, state.shape[-2], state.shape[-1])
        active = (flat != EMPTY).any(0)
        full = (flat == FULL).all(0)
        counts = active.sum(-1)
        buckets = []
        # Bucket by the next power of two of the count so padding wastes < 2x per bucket.
        ceil_pow2 = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp(min=1).double())).long(), 0)
        for size in torch.unique(ceil_pow2).tolist():
            if size == 0:
                continue
            rows = torch.nonzero(ceil_pow2 == size).flatten()
            k = int(counts[rows].max())
            order = torch.argsort((~active[rows]).to(torch.int8), dim=-1, stable=True)[:, :k]
            valid = torch.gather(active[rows], 1, order)
            kv_blocks = torch.where(valid, order, torch.zeros_like(order))
            is_full = torch.gather(full[rows], 1, order) & valid
            buckets.append(Bucket(rows, kv_blocks, valid, is_full))
        return BlockLayout(block_q, block_kv, n_q, n_kv, state, tuple(buckets))
