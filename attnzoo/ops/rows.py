"""Rows of ``[B, H, M, D]`` tensors addressed without copying them (gathers by row index from any layout)."""

from __future__ import annotations

import torch

__all__ = ["gather_rows", "row_index", "row_view"]


def row_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` ``[B, H, M, D]`` as rows ``[R, D]`` and the row coefficients ``(cb, ch, cm)``: entry ``(b, h, m)`` is row
    ``b * cb + h * ch + m * cm``. A view of ``t``'s memory when its last dimension is contiguous and every other
    stride is a multiple of ``D`` (contiguous tensors, head splits of ``[B, M, H*D]``, views of a longer cache
    buffer); else of a contiguous copy."""
    d = t.shape[-1]
    if t.numel() == 0 or d == 0:
        t = t.contiguous()
    elif t.stride(-1) == 1 and all(s % d == 0 for s in t.stride()[:3]):
        span = sum((n - 1) * s for n, s in zip(t.shape[:3], t.stride()[:3])) // d + 1
        return t.as_strided((span, d), (d, 1)), tuple(s // d for s in t.stride()[:3])
    else:
        t = t.contiguous()
    b, h, m = t.shape[:3]
    return t.view(b * h * m, d), (h * m, m, 1)


def row_index(coef: tuple[int, int, int], b: torch.Tensor | int, h: torch.Tensor | int,
              m: torch.Tensor) -> torch.Tensor:
    """Row numbers of entries ``(b, h, m)`` (broadcast) under the coefficients of :func:`row_view`."""
    return b * coef[0] + h * coef[1] + m * coef[2]


def gather_rows(t: torch.Tensor | tuple[torch.Tensor, tuple[int, int, int]], idx: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` ``[B, H, M, D]`` (or its :func:`row_view`, computed once by a caller that gathers often) at
    ``idx`` ``[B, H, ...]`` (entries in ``[0, M)``): ``[B, H, ..., D]``, whole rows by ``index_select``."""
    rows, coef = row_view(t) if isinstance(t, torch.Tensor) else t
    b, h = idx.shape[:2]
    ones = (1,) * (idx.dim() - 2)
    bi = torch.arange(b, device=idx.device).view(b, 1, *ones)
    hi = torch.arange(h, device=idx.device).view(1, h, *ones)
    return rows.index_select(0, row_index(coef, bi, hi, idx).reshape(-1)).view(*idx.shape, rows.shape[-1])
