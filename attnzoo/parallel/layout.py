"""How a sequence is split across the processes of a group: ``contiguous`` or ``zigzag``.

``contiguous``: process ``r`` of ``P`` holds chunk ``r`` of ``P`` equal chunks. ``zigzag``: the
sequence is cut into ``2P`` chunks and process ``r`` holds chunks ``r`` and ``2P - 1 - r`` (one early
and one late chunk, so that every process does the same causal work). The length must be divisible
by ``P`` (contiguous) or ``2P`` (zigzag); anything else is refused.
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUTS = ("contiguous", "zigzag")

__all__ = ["LAYOUTS", "check_layout", "group_info", "positions", "segments", "shard", "unshard"]


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def check_length(n: int, world_size: int, layout: str, name: str = "x") -> int:
    """The chunk length of an ``n``-token sequence split over ``world_size`` processes (``ValueError`` when
    ``n`` is not divisible by ``world_size`` times the layout's chunks per process)."""
    parts = world_size * chunks_per_rank(layout)
    if n % parts or n == 0:
        raise ValueError(f"{name}: a {layout} split over {world_size} processes needs a length divisible by {parts}, "
                         f"got {n}")
    return n // parts


def segments(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The chunk ids process ``rank`` holds, in the order they appear in its shard."""
    check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def group_info(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the whole world); needs an initialised
    ``torch.distributed`` process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first "
                           "(e.g. run under torchrun), or pass rank and world_size")
    return dist.get_rank(group), dist.get_world_size(group)


def _rank_world(rank: int | None, world_size: int | None, group: Any) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank, world_size: give both or neither, got rank={rank!r}, world_size={world_size!r}")
    if rank is None:
        return group_info(group)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
    return rank, world_size


def positions(n: int, layout: str = "contiguous", *, rank: int | None = None, world_size: int | None = None,
              group: Any = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions ``[n / P]`` (int64) of the tokens process ``rank`` holds of an ``n``-token sequence."""
    rank, world_size = _rank_world(rank, world_size, group)
    size = check_length(n, world_size, layout, "n")
    return torch.cat([torch.arange(c * size, (c + 1) * size, device=device)
                      for c in segments(rank, world_size, layout)])


def shard(x: torch.Tensor, dim: int, layout: str = "contiguous", *, rank: int | None = None,
          world_size: int | None = None, group: Any = None) -> torch.Tensor:
    """This process's shard of the full tensor ``x`` along ``dim`` (``x.shape[dim] / P`` long).

    ``rank`` and ``world_size`` default to this process's place in ``group``.
    """
    rank, world_size = _rank_world(rank, world_size, group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    dim = dim % x.dim() if x.dim() else 0
    size = check_length(x.shape[dim], world_size, layout)
    parts = [x.narrow(dim, c * size, size) for c in segments(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def assemble(shards: list[torch.Tensor], dim: int, layout: str = "contiguous") -> torch.Tensor:
    """The full tensor from every process's shard (``shards[r]``: the shard of rank ``r``)."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards: expected one shard per process, got none")
    dim = dim % shards[0].dim()
    per = chunks_per_rank(layout)
    n = shards[0].shape[dim]
    if n % per:
        raise ValueError(f"shards: a {layout} shard holds {per} equal chunks, got a length of {n}")
    for r, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(f"shards: expected every shard to have shape {list(shards[0].shape)}, "
                             f"shard {r} has {list(s.shape)}")
    size = n // per
    chunks: list[torch.Tensor | None] = [None] * (world_size * per)
    for r, s in enumerate(shards):
        for i, c in enumerate(segments(r, world_size, layout)):
            chunks[c] = s.narrow(dim, i * size, size)
    return torch.cat(chunks, dim=dim)


def unshard(x: torch.Tensor, dim: int, layout: str = "contiguous", *, group: Any = None) -> torch.Tensor:
    """The full tensor along ``dim`` from this process's shard ``x``: every process of ``group`` calls it
    (an ``all_gather``) and gets the whole tensor. Not differentiable."""
    import torch.distributed as dist

    _, world_size = group_info(group)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return assemble(parts, dim, layout)
