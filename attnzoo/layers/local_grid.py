"""Catalogue section 3, grid mixers: neighbourhood (NA, DiNA), Swin / HaloNet / GC ViT windows, MaxViT.

Grid mixers take channels-last input ``x`` ``[B, *spatial, C]`` with 1, 2 or 3 spatial axes
(``[B, N, C]`` is a 1-D grid) and return the same shape; ``mask`` is bool ``[B, *spatial]``
(True = keep). Their patterns are :mod:`attnzoo.patterns` objects over the row-major token
order, so every backend runs them; on the chunked backend they run through the patterns'
tile plans (spatial tiles for neighbourhoods, a token permutation into windows for Swin
and MaxViT). ``causal=True`` adds raster-order causality to the grid pattern.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, load_shared, seeded, zero_padded
from attnzoo.ops import attention
from attnzoo.ops.score_mod import ScoreMod
from attnzoo.patterns import Bias, GridPartition, GridRelativeBias, KeyPadding, Neighborhood, WindowPartition
from attnzoo.patterns.windows import QuerySubset
from attnzoo.registry import Reduction, register

__all__ = [
    "DilatedNeighborhoodAttention", "GridGroupAttention", "GridMixer", "MultiAxisAttention", "NeighborhoodAttention",
    "SwinWindowAttention", "dinat_dilations", "flatten_grid", "msw_shift_schedule",
]


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


def _fixed_ndim(*values: Any) -> int | None:
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

    cross_ok = False
    ndim: int | None = None

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.rpb: GridRelativeBias | None = None
        self._grid_cache: dict[Any, Any] = {}
        self._grid: tuple[int, ...] | None = None

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
        self._grid = grid
        self.pattern = self._cached(("pattern", grid, self.pattern_key()), lambda: self.grid_pattern(grid))
        self.score_mod = self._cached(("mod", grid, self.pattern_key()), lambda: self.grid_score_mod(grid))
        out = super().forward(flat, mask=flat_mask, causal=causal, head_mask=head_mask, return_weights=return_weights)
        y, w = out if return_weights else (out, None)
        y = y.reshape(x.shape)
        return (y, w) if return_weights else y

    def pattern_key(self) -> Any:
        """Extra cache key of the pattern (e.g. the current shift)."""
        return None


# --------------------------------------------------------------------------------- neighbourhood
class NeighborhoodAttention(GridMixer):
    """Neighbourhood attention (NA, NATTEN semantics) over 1-D, 2-D or 3-D grids.

    Each token attends to the ``kernel_size`` nearest tokens per axis; at borders the window
    is shifted, so every query sees exactly ``prod(kernel_size)`` keys. ``dilation`` (DiNA),
    ``stride`` (GNA: groups of ``stride`` queries share a window; ``stride = kernel_size``
    is blocked attention) and ``causal_axes`` (NATTEN's per-axis causal mode) are per axis.
    ``rpb`` adds NATTEN's learned relative-position bias (``(2k-1)`` offsets per axis).
    ``output_stride`` (TiC MSA-Conv) evaluates NA only at every ``output_stride``-th
    position per axis: the output grid is ``ceil(extent / output_stride)``.
    Integer arguments apply to every axis; tuples fix the number of spatial axes (``ndim``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                 dilation: int | Sequence[int] = 1, stride: int | Sequence[int] = 1,
                 causal_axes: bool | Sequence[bool] = False, rpb: bool = False,
                 output_stride: int | Sequence[int] = 1, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        fixed = _fixed_ndim(kernel_size, dilation, stride, causal_axes, output_stride)
        if ndim is not None:
            check_int("ndim", ndim)
            if ndim > 3 or (fixed is not None and fixed != ndim):
                raise ValueError(f"ndim: expected 1, 2 or 3 matching the per-axis arguments, got {ndim}")
        self.ndim = ndim or fixed
        self.kernel_size, self.dilation, self.stride = kernel_size, dilation, stride
        self.causal_axes, self.output_stride = causal_axes, output_stride
        if self.ndim is not None:  # validate per-axis arguments now
            self._axes(self.ndim)
        if rpb:
            nd = self.ndim or 2
            self.ndim = nd
            k, d, _, _, _ = self._axes(nd)
            self.rpb = GridRelativeBias(n_heads, k, step=d)

    def _axes(self, nd: int):
        k = per_axis(self.kernel_size, nd, "kernel_size")
        d = per_axis(self.dilation, nd, "dilation")
        s = per_axis(self.stride, nd, "stride")
        c = (self.causal_axes,) * nd if isinstance(self.causal_axes, bool) else tuple(bool(v) for v in self.causal_axes)
        if len(c) != nd:
            raise ValueError(f"causal_axes: expected a bool or {nd} bools, got {self.causal_axes!r}")
        o = per_axis(self.output_stride, nd, "output_stride")
        return k, d, s, c, o

    def grid_pattern(self, grid):
        k, d, s, c, _ = self._axes(len(grid))
        return Neighborhood(k, dilation=d, stride=s, causal=c, grid=grid)

    def grid_score_mod(self, grid):
        if self.rpb is None:
            return None
        return self.rpb.at(grid, self._axes(len(grid))[1])

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if isinstance(x, torch.Tensor) and 3 <= x.dim() <= 5:
            self.check_grid(tuple(x.shape[1:-1]))
            os_ = self._axes(x.dim() - 2)[4]
            if any(o > 1 for o in os_):
                return self._strided_forward(x, mask, causal, context, cache, os_)
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask, cache=cache,
                               head_mask=head_mask, return_weights=return_weights)

    def _strided_forward(self, x, mask, causal, context, cache, os_):
        if causal or context is not None or cache is not None:
            raise ValueError("output_stride: strided neighbourhood attention runs without causal, context or cache")
        grid, flat, keep = flatten_grid(x, mask, self.dim)
        self.check_grid(grid)
        axes = [torch.arange(0, n, o) for n, o in zip(grid, os_)]
        out_grid = tuple(len(a) for a in axes)
        strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]
        pos = torch.zeros(1, dtype=torch.long)
        for a, st in zip(axes, strides):
            pos = (pos.view(-1, 1) + (a * st).view(1, -1)).flatten()
        pos = pos.to(x.device)
        q, k, v = self.project(flat, flat)
        q = q[:, :, pos]
        pattern = QuerySubset(self._cached(("pattern", grid, None), lambda: self.grid_pattern(grid)), pos)
        if keep is not None and not bool(keep.all()):
            pattern = pattern & KeyPadding(keep)
        mod = self.grid_score_mod(grid)
        if mod is not None:
            mod = _AtQueries(mod, pos)
        z = attention(q, k, v, pattern=pattern, score_mod=mod, scale=self.scale,
                      backend=self.backend)
        y = self.output(z, flat)
        if keep is not None:
            y = zero_padded(y, keep[:, pos])
        return y.reshape(x.shape[0], *out_grid, self.dim)


class _AtQueries(ScoreMod):
    """A grid score modifier evaluated at query positions ``pos[q]`` (strided outputs)."""

    additive = True
    per_head = True

    def __init__(self, inner: ScoreMod, pos: torch.Tensor) -> None:
        self.inner, self.pos = inner, pos

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()

    def __call__(self, score, b, h, q, kv, shape):
        return self.inner(score, b, h, self.pos.to(q.device)[q], kv, shape)


def dinat_dilations(grid: Sequence[int], kernel_size: int | Sequence[int], depth: int) -> list[tuple[int, ...]]:
    """DiNAT's NA/DiNA alternation: even layers dilation 1, odd layers the largest dilation
    that keeps ``kernel_size`` keys per axis (``extent // kernel_size``), so the receptive field
    grows exponentially with depth."""
    grid = tuple(grid)
    k = per_axis(kernel_size, len(grid), "kernel_size")
    sparse = tuple(max(1, n // kk) for n, kk in zip(grid, k))
    return [(1,) * len(grid) if i % 2 == 0 else sparse for i in range(check_int("depth", depth))]


class DilatedNeighborhoodAttention(NeighborhoodAttention):
    """Dilated neighbourhood attention (DiNA): the ``kernel_size`` nearest tokens on the
    dilation-``dilation`` sub-grid of the query (keys congruent to the query modulo the
    dilation, windows shifted inside the sub-grid at borders). ``dilation = 1`` is NA;
    :func:`dinat_dilations` gives DiNAT's per-layer alternation."""

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                 dilation: int | Sequence[int] = 2, **kw: Any) -> None:
        super().__init__(dim, n_heads, kernel_size=kernel_size, dilation=dilation, **kw)


# ------------------------------------------------------------------------------------- windows
def msw_shift_schedule(window: int | Sequence[int], ndim: int = 2) -> Callable[[int], tuple[int, ...]]:
    """HiDiffusion MSW-MSA style schedule: the shift cycles through the corners of a half-window
    (``(0, 0), (w/2, 0), (0, w/2), (w/2, w/2)`` in 2-D) as the denoising step advances."""
    w = per_axis(window, ndim, "window")
    corners = [tuple((w[a] // 2) * ((i >> a) & 1) for a in range(ndim)) for i in range(2 ** ndim)]
    return lambda step: corners[int(step) % len(corners)]


class SwinWindowAttention(GridMixer):
    """Window attention: Swin (shifted windows), HaloNet (halo), SwinV2 (cosine logits), GC ViT
    (global queries), DaViT spatial branch (the plain case). Projections as ``mha``.

    The grid is cut into ``window`` tokens per axis (rectangular windows allowed; the window
    must divide each extent) and attention runs inside each window
    (:class:`~attnzoo.patterns.WindowPartition`). ``shift`` is Swin's cyclic shift with its
    boundary mask; ``shift_schedule(step) -> shift`` overrides it per call from the module
    attribute ``step`` (HiDiffusion MSW-MSA, see :func:`msw_shift_schedule`). ``halo`` grows
    each window's keys by ``halo`` per side; ``halo_padding="zeros"`` makes keys beyond the
    border zero vectors that take softmax mass, as HaloNet's zero-padded feature map does
    (``"none"``: they do not exist). ``cosine``: ``s = cos(q, k) * exp(logit_scale_h)``
    (SwinV2, learned per-head ``logit_scale`` clamped at ``log(100)``). ``query="global"``
    (GC ViT): queries come from a global query generator (the map average-pooled to the
    window size, projected by ``q_proj``) shared by every window; a token's query is the global query at
    its offset in its window. ``rpb``: learned relative-position bias inside the window.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 7,
                 shift: int | Sequence[int] = 0, shift_schedule: Callable[[int], Any] | None = None,
                 halo: int | Sequence[int] = 0, halo_padding: str = "none", cosine: bool = False,
                 query: str = "local", rpb: bool = False, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        fixed = _fixed_ndim(window, shift, halo)
        self.ndim = ndim or fixed
        self.window, self.shift, self.halo = window, shift, halo
        self.shift_schedule = shift_schedule
        self.halo_padding = check_choice("halo_padding", halo_padding, ("none", "zeros"))
        self.query = check_choice("query", query, ("local", "global"))
        self.cosine = bool(cosine)
        self.step = 0
        if shift_schedule is not None and not callable(shift_schedule):
            raise ValueError(f"shift_schedule: expected a callable step -> shift, got {shift_schedule!r}")
        if self.ndim is not None:
            self._axes(self.ndim, self.shift)
        if cosine:
            self.logit_scale = nn.Parameter(torch.full((n_heads,), math.log(10.0)))
        if rpb:
            nd = self.ndim or 2
            self.ndim = nd
            w, _, eta = self._axes(nd, self.shift)
            self.rpb = GridRelativeBias(n_heads, tuple(a + b for a, b in zip(w, eta)))

    def _axes(self, nd: int, shift: Any) -> tuple[tuple[int, ...], ...]:
        return (per_axis(self.window, nd, "window"), per_axis(shift, nd, "shift", 0),
                per_axis(self.halo, nd, "halo", 0))

    def current_shift(self) -> Any:
        return self.shift_schedule(self.step) if self.shift_schedule is not None else self.shift

    def pattern_key(self):
        return self.current_shift()

    def grid_pattern(self, grid):
        w, s, eta = self._axes(len(grid), self.current_shift())
        return WindowPartition(w, grid=grid, shift=s, halo=eta)

    def attention_scale(self, q):
        return 1.0 if self.cosine else self.scale

    def project(self, x, src):
        q, k, v = super().project(x, src)
        if self.query == "global":
            q = self.split(self.q_proj(self._global_tokens(x)), self.n_heads)  # [B, H, prod(window), D]
            q = q[:, :, self._window_offsets(q.device)]
        if self.cosine:
            ls = self.logit_scale.clamp(max=math.log(100.0)).exp().to(q.dtype).view(1, -1, 1, 1)
            q = F.normalize(q, dim=-1) * ls
            k = F.normalize(k, dim=-1)
        return q, k, v

    def _global_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The map average-pooled to the window size (over kept tokens): ``[B, prod(window), C]``."""
        grid = self._grid
        w = per_axis(self.window, len(grid), "window")
        b, n, c = x.shape
        keep = getattr(self, "_pool_keep", None)
        xs = x.view(b, *grid, c).movedim(-1, 1)
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(grid)]
        if keep is None:
            pooled = pool(xs, w)
        else:
            m = keep.view(b, 1, *grid).to(x.dtype)
            den = pool(m, w)
            # a cell with no kept token pools to 0; dividing by 1 there, not by a tiny clamp, keeps its gradient
            # finite (1 / tiny overflows, and inf * 0 at the padded tokens gave NaN)
            pooled = pool(xs * m, w) / torch.where(den > 0, den, torch.ones_like(den))
        return pooled.flatten(2).transpose(1, 2)

    def _window_offsets(self, device: torch.device) -> torch.Tensor:
        """Each token's row-major offset inside its (shifted) window."""
        grid = self._grid
        w, s, _ = self._axes(len(grid), self.current_shift())

        def make():
            idx = torch.zeros(1, dtype=torch.long)
            for length, ww, ss in zip(grid, w, s):
                off = torch.remainder(torch.arange(length) - ss, ww)
                idx = (idx.view(-1, 1) * ww + off.view(1, -1)).flatten()
            return idx.to(device)

        return self._cached(("offsets", grid, tuple(s), str(device)), make)

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        eta = per_axis(self.halo, x.dim() - 2, "halo", 0) if isinstance(x, torch.Tensor) and 3 <= x.dim() <= 5 else ()
        self._pool_keep = None
        if self.query == "global" and mask is not None:
            self._pool_keep = mask.reshape(mask.shape[0], -1)
        try:
            if self.halo_padding == "zeros" and any(eta):
                return self._zero_halo_forward(x, mask, causal, context, cache, return_weights)
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   cache=cache, head_mask=head_mask, return_weights=return_weights)
        finally:
            self._pool_keep = None

    def _zero_halo_forward(self, x, mask, causal, context, cache, return_weights):
        """HaloNet: blocks attend to their halo-grown neighbourhood of a zero-padded map (unfold path)."""
        if causal or context is not None or cache is not None or return_weights:
            raise ValueError("halo_padding='zeros': runs without causal, context, cache or return_weights")
        grid, flat, keep = flatten_grid(x, mask, self.dim)
        self.check_grid(grid)
        nd = len(grid)
        w, s, eta = self._axes(nd, self.current_shift())
        if any(s):
            raise ValueError(f"halo_padding='zeros': HaloNet blocks are unshifted, got shift {s}")
        WindowPartition(w, grid=grid, halo=eta)  # validates window / grid
        self._grid = grid
        q, k, v = self.project(flat, flat)
        b, h = q.shape[:2]
        kh = k.shape[1]
        win = _Windows(grid, w, eta)
        qw = win.queries(q)  # [B*nW, H, prod(w), D]
        kw, vw = win.keys(k), win.keys(v)  # [B*nW, H, prod(w + 2 eta), D]
        pattern = None
        if keep is not None and not bool(keep.all()):
            kk = win.keys(keep.view(b, 1, -1, 1).to(q.dtype)).squeeze(1).squeeze(-1)  # padded map: zeros = real keys
            inside = win.keys(torch.ones(b, 1, flat.shape[1], 1, dtype=q.dtype, device=q.device)).squeeze(1).squeeze(-1)
            pattern = KeyPadding((kk > 0) | (inside == 0))
        mod = None
        if self.rpb is not None:
            mod = Bias(self.rpb.table[:, win.rel_index(w, eta).to(q.device)].unsqueeze(0).to(q.dtype))
        z = attention(qw, kw, vw, pattern=pattern, score_mod=mod, scale=self.attention_scale(qw), backend=self.backend)
        z = win.unwindow(z, b)
        del kh
        y = zero_padded(self.output(z, flat), keep)
        return y.reshape(x.shape)


class _Windows:
    """Window partition with halo on a zero-padded map: ``[B, H, N, D]`` <-> ``[B * nW, H, tokens, D]``."""

    def __init__(self, grid: tuple[int, ...], w: tuple[int, ...], eta: tuple[int, ...]) -> None:
        self.grid, self.w, self.eta = grid, w, eta
        self.n_windows = tuple(n // ww for n, ww in zip(grid, w))

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        b, h, _, d = t.shape
        nd = len(self.grid)
        x = t.reshape(b, h, *[v for n, ww in zip(self.n_windows, self.w) for v in (n, ww)], d)
        perm = [0, *[2 + 2 * a for a in range(nd)], 1, *[3 + 2 * a for a in range(nd)], 2 + 2 * nd]
        return x.permute(perm).reshape(b * math.prod(self.n_windows), h, math.prod(self.w), d)

    def unwindow(self, t: torch.Tensor, b: int) -> torch.Tensor:
        h, d = t.shape[1], t.shape[-1]
        nd = len(self.grid)
        x = t.reshape(b, *self.n_windows, h, *self.w, d)
        perm = [0, nd + 1, *[v for a in range(nd) for v in (1 + a, nd + 2 + a)], 2 * nd + 2]
        return x.permute(perm).reshape(b, h, -1, d)

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        b, h, _, d = t.shape
        nd = len(self.grid)
        x = t.reshape(b * h, *self.grid, d).movedim(-1, 1)  # [BH, D, *grid]
        pad = [p for e in reversed(self.eta) for p in (e, e)]
        x = F.pad(x, pad)
        for a in range(nd):  # unfold each spatial axis: window w + 2 eta, step w
            x = x.unfold(2 + a, self.w[a] + 2 * self.eta[a], self.w[a])
        # x: [BH, D, *nW, *(w + 2 eta)]
        x = x.reshape(b, h, d, math.prod(self.n_windows), -1).permute(0, 3, 1, 4, 2)
        return x.reshape(b * math.prod(self.n_windows), h, -1, d)

    @staticmethod
    def rel_index(w: tuple[int, ...], eta: tuple[int, ...]) -> torch.Tensor:
        """Relative-bias table index ``[prod(w), prod(w + 2 eta)]`` (span ``w + eta`` per axis)."""
        qc = torch.cartesian_prod(*[torch.arange(ww) for ww in w]).view(-1, len(w))
        kc = torch.cartesian_prod(*[torch.arange(ww + 2 * e) - e for ww, e in zip(w, eta)]).view(-1, len(w))
        idx = torch.zeros(qc.shape[0], kc.shape[0], dtype=torch.long)
        for a, (ww, e) in enumerate(zip(w, eta)):
            span = ww + e
            idx = idx * (2 * span - 1) + (kc[:, a].view(1, -1) - qc[:, a].view(-1, 1) + span - 1)
        return idx


class GridGroupAttention(GridMixer):
    """MaxViT grid attention: tokens attend within their dilated grid group
    (:class:`~attnzoo.patterns.GridPartition`, ``cells`` per axis). ``rpb``: learned bias over
    the group offsets."""

    def __init__(self, dim: int, n_heads: int = 8, *, cells: int | Sequence[int] = 7, rpb: bool = False,
                 ndim: int | None = None, head_dim: int | None = None, bias: bool = True, scale: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        self.cells = cells
        self.ndim = ndim or _fixed_ndim(cells)
        if self.ndim is not None:
            per_axis(cells, self.ndim, "cells")
        if rpb:
            self.ndim = self.ndim or 2
            self.rpb = GridRelativeBias(n_heads, per_axis(cells, self.ndim, "cells"))

    def grid_pattern(self, grid):
        return GridPartition(per_axis(self.cells, len(grid), "cells"), grid=grid)

    def grid_score_mod(self, grid):
        if self.rpb is None:
            return None
        cells = per_axis(self.cells, len(grid), "cells")
        return self.rpb.at(grid, tuple(max(1, n // c) for n, c in zip(grid, cells)))


class MultiAxisAttention(nn.Module):
    """MaxViT multi-axis attention: block attention (``block`` tokens per axis) then grid
    attention (``grid`` cells per axis), each with its own projections (and ``rpb``).

    ``mode="block+grid"`` returns ``y`` with ``x + y`` equal to the two residual sub-layers
    of a MaxViT stage without norms and MLPs: ``h = x + block(x)``, ``x + y = h + grid(h)``.
    ``mode="block"`` / ``"grid"``: one sub-layer's output. Both patterns must divide the grid.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, block: int | Sequence[int] = 7, grid: int | Sequence[int] = 7,
                 mode: str = "block+grid", rpb: bool = False, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, ("block+grid", "block", "grid"))
        kw = dict(head_dim=head_dim, bias=bias, scale=scale, backend=backend, rpb=rpb, ndim=ndim)
        self.block_attn = SwinWindowAttention(dim, n_heads, window=block, **kw)
        self.grid_attn = GridGroupAttention(dim, n_heads, cells=grid, **kw)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, *spatial, C]`` -> same shape.

        ``mask``: bool ``[B, *spatial]``, True = keep (a real token), False = padding.
        """
        if causal:
            raise ValueError("causal: MultiAxisAttention (MaxViT) does not support causal attention")
        kw = dict(mask=mask, context=context, cache=cache)
        if self.mode == "block":
            return self.block_attn(x, **kw)
        if self.mode == "grid":
            return self.grid_attn(x, **kw)
        h = x + self.block_attn(x, **kw)
        return h + self.grid_attn(h, **kw) - x


# ------------------------------------------------------------------------------ registrations
FAMILY = "local-sparse"
GRID_SUPPORT = {"self", "causal", "padding"}


def _grid_x(b: int = 2, grid: tuple[int, ...] = (6, 8), c: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *grid, c, generator=g, dtype=torch.float64)


def _mha_on_grid(m: nn.Module, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    ref = load_shared(m, MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim, backend="reference")).double()
    return ref(x.reshape(x.shape[0], -1, x.shape[-1]), **kw).reshape(x.shape)


def _per_window(m: nn.Module, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Explicit window attention: reshape into windows, mha inside each, reshape back."""
    b, hh, ww, c = x.shape
    wh, wwin = window
    xw = x.view(b, hh // wh, wh, ww // wwin, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * wwin, c)
    ref = load_shared(m, MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim, backend="reference")).double()
    y = ref(xw)
    return y.view(b, hh // wh, ww // wwin, wh, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)


def _na_full_kernel_is_dense():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(6, 8))
    x = _grid_x()
    return m(x), _mha_on_grid(m, x)


def _na_stride_kernel_is_window():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(3, 4), stride=(3, 4))
    x = _grid_x()
    return m(x), _per_window(m, x, (3, 4))


def _na_tiled_equals_dense_mask():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=(5, 3), dilation=(1, 2),
               backend="blocksparse")
    ref = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=(5, 3), dilation=(1, 2),
                                               backend="reference")).double()
    x = _grid_x(grid=(10, 12))
    keep = torch.ones(2, 10, 12, dtype=torch.bool)
    keep[1, 7:] = False
    return torch.stack([m(x), m(x, mask=keep), m(x, causal=True)]), torch.stack([ref(x), ref(x, mask=keep),
                                                                                  ref(x, causal=True)])


def _na_output_stride():
    m = seeded(NeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, output_stride=(2, 3))
    full = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=3)).double()
    x = _grid_x(grid=(7, 9))
    return m(x), full(x)[:, ::2, ::3]


@register(
    "neighborhood", family=FAMILY, type="pattern", priority=1, input_kind="grid2d",
    papers=("Faster Neighborhood Attention (FNA)", "Generalized Neighborhood Attention (GNA)", "TiC (MSA-Conv)"),
    supports=GRID_SUPPORT, complexity="O(N k^D)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather", "triton"),
    summary="Neighbourhood attention 1-D/2-D/3-D (NATTEN borders), per-axis kernel/dilation/stride/causal, RPB, "
            "TiC output stride; spatial tiles on the chunked path.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3},
    reductions=(
        Reduction("full_kernel_is_dense", "k = input extent with dilation 1 gives dense attention",
                  _na_full_kernel_is_dense),
        Reduction("stride_kernel_is_windows", "stride = k gives block-diagonal (window) attention",
                  _na_stride_kernel_is_window),
        Reduction("tiled_equals_dense_mask", "the tiled kernel equals dense attention under the NA mask "
                  "(padding and raster-causal too)", _na_tiled_equals_dense_mask),
        Reduction("output_stride", "TiC output_stride equals NA sampled at the strided positions", _na_output_stride),
    ),
)
def neighborhood(dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                 dilation: int | Sequence[int] = 1, stride: int | Sequence[int] = 1,
                 causal_axes: bool | Sequence[bool] = False, rpb: bool = False,
                 output_stride: int | Sequence[int] = 1, ndim: int | None = None, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> NeighborhoodAttention:
    """Neighbourhood attention (:class:`NeighborhoodAttention`)."""
    return NeighborhoodAttention(dim, n_heads, kernel_size=kernel_size, dilation=dilation, stride=stride,
                                 causal_axes=causal_axes, rpb=rpb, output_stride=output_stride, ndim=ndim,
                                 head_dim=head_dim, bias=bias, scale=scale, backend=backend)


def _dina_one_is_na():
    m = seeded(DilatedNeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, dilation=1)
    na = load_shared(m, NeighborhoodAttention(32, 4, kernel_size=3)).double()
    x = _grid_x()
    return m(x), na(x)


def _dina_congruent_keys():
    m = seeded(DilatedNeighborhoodAttention, dim=32, n_heads=4, kernel_size=3, dilation=2, backend="reference")
    x = _grid_x(b=1, grid=(7, 8))
    _, w = m(x, return_weights=True)
    seen = w[0] > 0  # [H, N, N]
    c = torch.cartesian_prod(torch.arange(7), torch.arange(8))
    congruent = ((c.view(-1, 1, 2) - c.view(1, -1, 2)) % 2 == 0).all(-1)
    counts = seen.sum(-1).double()
    off_grid = (seen & ~congruent).sum().double()
    return torch.cat([counts.flatten(), off_grid.view(1)]), torch.cat([torch.full((counts.numel(),), 9.0,
                                                                                 dtype=torch.float64),
                                                                      torch.zeros(1, dtype=torch.float64)])


@register(
    "dilated_neighborhood", family=FAMILY, type="pattern", priority=2, input_kind="grid2d", papers=("DiNAT",),
    supports=GRID_SUPPORT, complexity="O(N k^D)",
    backends=("reference", "sdpa", "flex", "blocksparse", "gather"),
    summary="Dilated neighbourhood attention (DiNA) with NATTEN borders per dilation group; DiNAT alternation "
            "via dinat_dilations.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3, "dilation": 2},
    reductions=(
        Reduction("dilation_one_is_na", "dilation 1 equals neighborhood", _dina_one_is_na),
        Reduction("k_congruent_keys", "each query attends exactly k^D keys, all congruent to it mod dilation",
                  _dina_congruent_keys),
    ),
)
def dilated_neighborhood(dim: int, n_heads: int = 8, *, kernel_size: int | Sequence[int] = 7,
                         dilation: int | Sequence[int] = 2, rpb: bool = False, ndim: int | None = None,
                         head_dim: int | None = None, bias: bool = True, scale: float | None = None,
                         backend: str = "auto") -> DilatedNeighborhoodAttention:
    """Dilated neighbourhood attention (:class:`DilatedNeighborhoodAttention`)."""
    return DilatedNeighborhoodAttention(dim, n_heads, kernel_size=kernel_size, dilation=dilation, rpb=rpb, ndim=ndim,
                                        head_dim=head_dim, bias=bias, scale=scale, backend=backend)


def _swin_full_window():
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(6, 8))
    x = _grid_x()
    return m(x), _mha_on_grid(m, x)


def _swin_shift_zero():
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(3, 4), shift=0)
    x = _grid_x()
    return m(x), _per_window(m, x, (3, 4))


def _swin_roll_and_mask():
    """Swin's own recipe: roll(-s), window attention with the region mask, roll(+s)."""
    from attnzoo.patterns import Custom

    window, shift = (3, 4), (1, 2)
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=window, shift=shift)
    x = _grid_x()
    b, hh, ww, c = x.shape
    rolled = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    region = torch.zeros(hh, ww, dtype=torch.long)
    cnt = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            region[hs, ws] = cnt
            cnt += 1
    q, k, v = m.project(rolled.view(b, -1, c), rolled.view(b, -1, c))
    z = torch.zeros_like(q)
    idx = torch.arange(hh * ww).view(hh, ww)
    for wy in range(hh // window[0]):
        for wx in range(ww // window[1]):
            sl = (slice(wy * window[0], (wy + 1) * window[0]), slice(wx * window[1], (wx + 1) * window[1]))
            toks, reg = idx[sl].flatten(), region[sl].flatten()
            same = reg.view(-1, 1) == reg.view(1, -1)
            pat = Custom(lambda bb, h, qq, kk, same=same: same[qq, kk], per_batch=False, per_head=False)
            z[:, :, toks] = attention(q[:, :, toks], k[:, :, toks], v[:, :, toks], pattern=pat, backend="reference")
    y = m.output(z, rolled.view(b, -1, c)).view(b, hh, ww, c)
    return m(x), torch.roll(y, shifts=shift, dims=(1, 2))


def _swin_halo_locality():
    outs, want = [], []
    for padding in ("none", "zeros"):
        m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(2, 4), halo=1, halo_padding=padding, rpb=True)
        with torch.no_grad():
            m.rpb.table.normal_()
        x = _grid_x(grid=(6, 8))
        x2 = x.clone()
        x2[:, 3:] += 1.0  # rows >= 3 lie outside block (0, 0)'s halo (rows 0..2, cols 0..4)
        x2[:, :, 5:] -= 1.0
        outs.append(m(x2)[:, :2, :4])
        want.append(m(x)[:, :2, :4])
    return torch.stack(outs), torch.stack(want)


def _swin_cosine_and_global():
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(3, 4), cosine=True, query="global")
    with torch.no_grad():
        m.logit_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x = _grid_x()
    b, hh, ww, c = x.shape
    pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), (3, 4)).flatten(2).transpose(1, 2)  # [B, 12, C]
    qg = F.normalize(m.split(m.q_proj(pooled), 4), dim=-1)
    k = F.normalize(m.split(m.k_proj(x.view(b, -1, c)), 4), dim=-1)
    v = m.split(m.v_proj(x.view(b, -1, c)), 4)
    ls = m.logit_scale.clamp(max=math.log(100.0)).exp().view(1, 4, 1, 1)
    z = torch.zeros(b, 4, hh * ww, 8, dtype=torch.float64)
    idx = torch.arange(hh * ww).view(hh, ww)
    for wy in range(2):
        for wx in range(2):
            toks = idx[wy * 3:(wy + 1) * 3, wx * 4:(wx + 1) * 4].flatten()
            p = torch.softmax((qg @ k[:, :, toks].transpose(-1, -2)) * ls, -1)
            z[:, :, toks] = p @ v[:, :, toks]
    return m(x), m.o_proj(m.merge(z)).view(x.shape)


@register(
    "swin_window", family=FAMILY, type="pattern", priority=1, input_kind="grid2d",
    papers=("HaloNet", "HiDiffusion (MSW-MSA)", "GC ViT", "DaViT"),
    supports=GRID_SUPPORT, complexity="O(N w^D)",
    summary="Window attention: Swin shift (+ mask), HaloNet halo, rectangular windows, SwinV2 cosine logits, "
            "GC ViT global queries, shift schedules; a token permutation into windows on the chunked path.",
    test_kwargs={"dim": 32, "n_heads": 4, "window": 4, "shift": 2},
    reductions=(
        Reduction("full_window_is_global", "a window as large as the map gives global attention", _swin_full_window),
        Reduction("shift_zero_is_unshifted", "shift = 0 equals explicit (reshaped) window attention",
                  _swin_shift_zero),
        Reduction("roll_and_region_mask", "shift equals Swin's roll, region-masked windows, roll back",
                  _swin_roll_and_mask),
        Reduction("halo_locality", "a halo block's output depends only on pixels inside its halo (both paddings)",
                  _swin_halo_locality),
        Reduction("cosine_global_queries", "SwinV2 cosine logits with GC ViT global queries equal the explicit "
                  "computation", _swin_cosine_and_global),
    ),
)
def swin_window(dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 7, shift: int | Sequence[int] = 0,
                shift_schedule: Callable[[int], Any] | None = None, halo: int | Sequence[int] = 0,
                halo_padding: str = "none", cosine: bool = False, query: str = "local", rpb: bool = False,
                ndim: int | None = None, head_dim: int | None = None, bias: bool = True, scale: float | None = None,
                backend: str = "auto") -> SwinWindowAttention:
    """Window attention (:class:`SwinWindowAttention`)."""
    return SwinWindowAttention(dim, n_heads, window=window, shift=shift, shift_schedule=shift_schedule, halo=halo,
                               halo_padding=halo_padding, cosine=cosine, query=query, rpb=rpb, ndim=ndim,
                               head_dim=head_dim, bias=bias, scale=scale, backend=backend)


def _maxvit_full():
    x = _grid_x(grid=(6, 6))
    m_block = seeded(MultiAxisAttention, dim=32, n_heads=4, block=6, grid=2, mode="block")
    m_grid = seeded(MultiAxisAttention, dim=32, n_heads=4, block=2, grid=6, mode="grid")
    return (torch.stack([m_block(x), m_grid(x)]),
            torch.stack([_mha_on_grid(m_block.block_attn, x), _mha_on_grid(m_grid.grid_attn, x)]))


def _maxvit_grid_is_permuted_block():
    m = seeded(MultiAxisAttention, dim=32, n_heads=4, block=3, grid=(2, 4), mode="grid")
    block = load_shared(m.grid_attn, SwinWindowAttention(32, 4, window=(2, 4))).double()
    x = _grid_x(grid=(6, 8))
    b, c = x.shape[0], x.shape[-1]
    # y = g * P + i  ->  y' = i * G + g   (P = extent / G)
    xp = x.view(b, 2, 3, 4, 2, c).permute(0, 2, 1, 4, 3, 5).reshape(b, 6, 8, c)
    yp = block(xp)
    y = yp.view(b, 3, 2, 2, 4, c).permute(0, 2, 1, 4, 3, 5).reshape(b, 6, 8, c)
    return m(x), y


def _maxvit_stage():
    m = seeded(MultiAxisAttention, dim=32, n_heads=4, block=(3, 4), grid=2)
    x = _grid_x()
    h = x + m.block_attn(x)
    return x + m(x), h + m.grid_attn(h)


@register(
    "multi_axis", family=FAMILY, type="pattern", priority=2, input_kind="grid2d", papers=("MaxViT",),
    supports={"self", "padding"}, complexity="O(N (P^2 + G^2))",
    summary="MaxViT multi-axis attention: block (P x P windows) then grid (G x G dilated groups), with RPB.",
    test_kwargs={"dim": 32, "n_heads": 4, "block": 4, "grid": 3},
    reductions=(
        Reduction("full_block_and_grid", "P = H = W and G = H both give full attention", _maxvit_full),
        Reduction("grid_is_permuted_block", "grid attention = block attention between an axis permutation and its "
                  "inverse", _maxvit_grid_is_permuted_block),
        Reduction("stage", "x + y equals the residual block then grid sub-layers", _maxvit_stage),
    ),
)
def multi_axis(dim: int, n_heads: int = 8, *, block: int | Sequence[int] = 7, grid: int | Sequence[int] = 7,
               mode: str = "block+grid", rpb: bool = False, ndim: int | None = None, head_dim: int | None = None,
               bias: bool = True, scale: float | None = None, backend: str = "auto") -> MultiAxisAttention:
    """MaxViT multi-axis attention (:class:`MultiAxisAttention`)."""
    return MultiAxisAttention(dim, n_heads, block=block, grid=grid, mode=mode, rpb=rpb, ndim=ndim, head_dim=head_dim,
                              bias=bias, scale=scale, backend=backend)
