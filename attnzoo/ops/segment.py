"""Segment operations over packed bags: softmax, sums and maxima per segment, with float64 references.

A packed batch stores ``S`` bags (sets, sequences) one after another along the first axis of
``x`` ``[T, ...]``; ``cu_seqlens`` ``[S + 1]`` (int, ``cu_seqlens[0] = 0``, non-decreasing, last
entry ``T``) gives their boundaries, and :func:`segment_ids` turns it into a segment id per row.
Every op here costs memory linear in ``T`` (no padding to the longest bag): a segment softmax is a
scatter-max, a gather and an ``index_add``. An empty segment gives zeros (never NaN).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "check_cu_seqlens", "segment_ids", "segment_lengths", "segment_softmax", "segment_sum", "segment_max",
    "segment_softmax_reference", "segment_sum_reference",
]


def check_cu_seqlens(cu_seqlens: Any, total: int) -> torch.Tensor:
    """Validate ``cu_seqlens``: a 1-D integer tensor starting at 0, non-decreasing, ending at ``total``."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else (
            type(cu_seqlens).__name__)
        raise ValueError(f"cu_seqlens: expected a 1-D integer tensor [S + 1] with S >= 1, got {got}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"cu_seqlens: expected an integer dtype, got {cu_seqlens.dtype}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {first}")
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((steps < 0).any()):
        at = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"cu_seqlens: expected non-decreasing boundaries, got cu_seqlens[{at}] = "
                         f"{int(cu_seqlens[at])} > cu_seqlens[{at + 1}] = {int(cu_seqlens[at + 1])}")
    if last != total:
        raise ValueError(f"cu_seqlens: expected the last boundary to equal the number of rows N = {total}, got {last}")
    return cu_seqlens.long()


def segment_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[S]`` lengths of the segments given by ``cu_seqlens`` ``[S + 1]``."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def segment_ids(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``[T]`` int64 segment id of each row (``T = cu_seqlens[-1]``)."""
    lengths = segment_lengths(cu_seqlens.long())
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=total)


def _expand(ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return ids.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def segment_max(x: torch.Tensor, ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Per-segment maximum ``[S, ...]`` of ``x`` ``[T, ...]`` (``-inf`` for an empty segment)."""
    out = torch.full((n_segments, *x.shape[1:]), float("-inf"), dtype=x.dtype, device=x.device)
    return out.scatter_reduce(0, _expand(ids, x), x, reduce="amax", include_self=True)


def segment_sum(x: torch.Tensor, ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Per-segment sum ``[S, ...]`` of ``x`` ``[T, ...]`` (zeros for an empty segment)."""
    return x.new_zeros((n_segments, *x.shape[1:])).index_add(0, ids, x)


def segment_softmax(scores: torch.Tensor, ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` ``[T, ...]`` over the rows of each segment (per trailing index).

    The per-segment maximum only stabilises the exponentials and is detached (softmax does not
    depend on it), so gradients flow exactly as through ``torch.softmax`` of each segment.
    """
    top = segment_max(scores.detach(), ids, n_segments)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top.index_select(0, ids))
    den = segment_sum(e, ids, n_segments)
    return e / den.index_select(0, ids)


def segment_softmax_reference(scores: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Float64 oracle of :func:`segment_softmax`: ``torch.softmax`` of each segment in a loop."""
    s = scores.double()
    parts = [torch.softmax(s[int(a):int(b)], dim=0) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
    return torch.cat(parts, 0) if parts else s


def segment_sum_reference(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Float64 oracle of :func:`segment_sum`: a sum per segment in a loop."""
    xd = x.double()
    return torch.stack([xd[int(a):int(b)].sum(0) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)])
