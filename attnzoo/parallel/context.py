"""``sequence_sharded``: the switch under which attention mixers run as ring attention over a group."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from attnzoo.parallel.layout import check_layout, group_info

__all__ = ["SequenceSharding", "current", "sequence_sharded"]


@dataclass(frozen=True)
class SequenceSharding:
    """The process group a sequence is split across, this process's place in it, and the layout."""

    group: Any
    rank: int
    world_size: int
    layout: str


_ACTIVE: list[SequenceSharding] = []


def current() -> SequenceSharding | None:
    """The innermost active :func:`sequence_sharded` setting, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def sequence_sharded(group: Any = None, layout: str = "contiguous") -> Iterator[SequenceSharding]:
    """Inside this block the inputs of a model are this process's shards of the sequence (``layout``), split
    across ``group`` (default: the world): the attention mixers (:class:`attnzoo.layers.AttentionMixer`) run
    :func:`~attnzoo.parallel.ring_attention` with global positions, and the models of :mod:`attnzoo.bench`
    add the positional embeddings of the global positions. The backward may run after the block.

    Mixers that cannot run sharded (other token mixers, a KV cache, cross-attention, captured weights)
    raise ``ValueError`` rather than attend within their shard only.
    """
    check_layout(layout)
    rank, world = group_info(group)
    setting = SequenceSharding(group, rank, world, layout)
    _ACTIVE.append(setting)
    try:
        yield setting
    finally:
        _ACTIVE.pop()
