"""Shared by the grid entries of local-sparse: flattening a channels-last grid, per-axis arguments and
the grid mixer base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, load_shared
from attnzoo.layers.testing import mha_from
from attnzoo.patterns import GridRelativeBias


def flatten_grid(x: torch.Tensor, mask: torch.Tensor | None, dim: int) -> tuple[tuple[int, ...], torch.Tensor,
                                                                                   torch.Tensor | None]:
    """``(spatial, x [B, N, C], mask [B, N])`` from channels-last ``x [B, *spatial, C]`` and ``mask [B, *spatial]``."""
    if not isinstance(x, torch.Tensor) or not 3 <= x.dim() <= 5 or x.shape[-1] != dim:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a channels-last tensor [B, *spatial, {dim}] with 1 to 3 spatial axes, got {got}")
    spatial = tuple(x.shape[1:-1])
    b = x.shape[0]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, *spatial):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor {[b, *spatial]}, got {got}")
        mask = mask.reshape(b, -1)
    return spatial, x.reshape(b, -1, dim), mask


def per_axis(value: int | Sequence[int], ndim: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != ndim or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name}: expected an int >= {minimum} or {ndim} of them (one per spatial axis), "
                         f"got {value!r}")
    return values


def fixed_ndim(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, (tuple, list)):
            return len(v)
    return None


class GridMixer(MultiHeadAttention):
    """Multi-head attention over a token grid with a pattern built per grid shape.

    Subclasses implement :meth:`grid_pattern` (and may set ``self.rpb``, a
    :class:`~attnzoo.patterns.GridRelativeBias`). Same projections as ``mha``
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so weights load across entries.
    """

    call_pattern = True

    cross_ok = False
    ndim: int | None = None

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.rpb: GridRelativeBias | None = None
        self._grid_cache: dict[Any, Any] = {}

    def grid_pattern(self, grid: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def grid_score_mod(self, grid: tuple[int, ...]) -> Any:
        return self.rpb.at(grid) if self.rpb is not None else None

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._grid_cache:
            self._grid_cache[key] = make()
        return self._grid_cache[key]

    def check_grid(self, grid: tuple[int, ...]) -> None:
        if self.ndim is not None and len(grid) != self.ndim:
            raise ValueError(f"x: {type(self).__name__} is configured for {self.ndim} spatial axes, got grid {grid}")

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, cache: Any = None,
                head_mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x`` ``[B, *spatial, C]`` -> same shape (and weights ``[B, H, N, N]`` with ``return_weights``).

        ``mask``: bool ``[B, *spatial]``, True = keep (a real token), False = padding.
        """
        if context is not None:
            raise ValueError(f"context: {type(self).__name__} is a self-attention grid mixer (no cross-attention)")
        if cache is not None:
            raise ValueError(f"cache: {type(self).__name__} does not decode token by token (a grid pattern needs "
                             "the whole grid)")
        grid, flat, flat_mask = flatten_grid(x, mask, self.dim)
        self.check_grid(grid)
        out = self.mix(flat, mask=flat_mask, causal=causal, head_mask=head_mask, return_weights=return_weights,
                       pattern=self._cached(("pattern", grid, self.pattern_key()), lambda: self.grid_pattern(grid)),
                       score_mod=self._cached(("mod", grid, self.pattern_key()), lambda: self.grid_score_mod(grid)),
                       extra={"grid": grid})
        y, w = out if return_weights else (out, None)
        y = y.reshape(x.shape)
        return (y, w) if return_weights else y

    def pattern_key(self) -> Any:
        """Extra cache key of the pattern (e.g. the current shift)."""
        return None


GRID_SUPPORT = {"self", "causal", "padding"}


def mha_on_grid(m: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    ref = mha_from(m, backend="reference")
    return ref(x.reshape(x.shape[0], -1, x.shape[-1]), **kw).reshape(x.shape)


def per_window(m: nn.Module, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Explicit window attention: reshape into windows, mha inside each, reshape back."""
    b, hh, ww, c = x.shape
    wh, wwin = window
    xw = x.view(b, hh // wh, wh, ww // wwin, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * wwin, c)
    ref = load_shared(m, MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim, backend="reference")).double()
    y = ref(xw)
    return y.view(b, hh // wh, ww // wwin, wh, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
