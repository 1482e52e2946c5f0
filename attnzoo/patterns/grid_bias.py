"""Learned relative-position bias over 1-D to 3-D token grids (NATTEN RPB, Swin, MaxViT)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from attnzoo.ops.layout import Shape
from attnzoo.ops.score_mod import ScoreMod

__all__ = ["GridRelativeBias"]


class GridRelativeBias(nn.Module):
    """``s += table[h, rel(q, k)]`` with ``rel`` the per-axis grid offset ``(x_k - x_q) / step``.

    Offsets are clipped to ``[-(span - 1), span - 1]`` per axis, so the table has
    ``prod(2 * span - 1)`` entries per head: ``span = kernel_size`` (with ``step = dilation``)
    for neighbourhood attention, ``span = window`` for Swin windows (``window + halo`` with a
    halo), ``span = cells`` with ``step = extent / cells`` for MaxViT grid attention.
    The table is zero-initialised (the module starts as a no-op). Call :meth:`at` with the
    token grid of the call to get the score modifier.
    """

    def __init__(self, heads: int, span: int | Sequence[int], *, step: int | Sequence[int] = 1,
                 init_std: float = 0.0) -> None:
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads: expected a positive int, got {heads!r}")
        self.span = (span,) if isinstance(span, int) else tuple(span)
        ndim = len(self.span)
        self.step = (step,) * ndim if isinstance(step, int) else tuple(step)
        if any(s < 1 for s in self.span) or len(self.step) != ndim or any(s < 1 for s in self.step):
            raise ValueError(f"span, step: expected positive ints per axis, got span={span!r}, step={step!r}")
        self.heads = heads
        size = math.prod(2 * s - 1 for s in self.span)
        self.table = nn.Parameter(torch.randn(heads, size) * init_std if init_std else torch.zeros(heads, size))

    def at(self, grid: Sequence[int], step: Sequence[int] | None = None) -> ScoreMod:
        """The score modifier for tokens laid out row-major on ``grid`` (``step`` overrides the offset unit)."""
        grid = tuple(grid)
        if len(grid) != len(self.span):
            raise ValueError(f"grid: expected {len(self.span)} axes (as span {self.span}), got {grid}")
        return _GridBiasAt(self, grid, tuple(step) if step is not None else self.step)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, span={self.span}, step={self.step}"


class _GridBiasAt(ScoreMod):
    per_head = True
    additive = True

    def __init__(self, owner: GridRelativeBias, grid: tuple[int, ...], step: tuple[int, ...]) -> None:
        self.owner, self.grid, self.step = owner, grid, step

    def check(self, shape: Shape) -> None:
        if shape.heads != self.owner.heads:
            raise ValueError(f"GridRelativeBias: built for heads={self.owner.heads}, got {shape.heads}")
        n = math.prod(self.grid)
        if shape.n_q != n or shape.n_kv != n:
            raise ValueError(f"GridRelativeBias: grid {self.grid} has {n} tokens, got n_q={shape.n_q}, "
                             f"n_kv={shape.n_kv}")

    def tensors(self) -> list[torch.Tensor]:
        return [self.owner.table]

    def indexed_bias(self) -> torch.Tensor:
        return self.owner.table

    def index(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        idx = None
        rest_q, rest_k = q, kv
        stride = 1
        for length, span, step in zip(reversed(self.grid), reversed(self.owner.span), reversed(self.step)):
            xq, xk = torch.remainder(rest_q, length), torch.remainder(rest_k, length)
            rest_q = torch.div(rest_q, length, rounding_mode="floor")
            rest_k = torch.div(rest_k, length, rounding_mode="floor")
            rel = torch.div(xk - xq, step, rounding_mode="floor").clamp(-(span - 1), span - 1) + (span - 1)
            term = rel * stride
            idx = term if idx is None else idx + term
            stride *= 2 * span - 1
        return idx

    def __call__(self, score, b, h, q, kv, shape):
        return score + self.on(self.owner.table, score)[h, self.index(q, kv)]
