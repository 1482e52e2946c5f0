"""``swin_window``: Window attention: Swin shift (+ mask), HaloNet halo, rectangular windows, SwinV2
cosine logits, GC ViT global queries, shift schedules; a token permutation into windows on the
chunked path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import Call, check_choice, seeded, zero_padded
from attnzoo.layers.local_sparse._common import FAMILY
from attnzoo.layers.local_sparse._grid import (
    GRID_SUPPORT,
    GridMixer,
    fixed_ndim,
    flatten_grid,
    mha_on_grid,
    per_axis,
    per_window,
)
from attnzoo.layers.testing import random_grid
from attnzoo.ops import attention
from attnzoo.patterns import Bias, GridRelativeBias, KeyPadding, WindowPartition
from attnzoo.registry import Reduction, register


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
        fixed = fixed_ndim(window, shift, halo)
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

    def project(self, x, src, call=None):
        q, k, v = super().project(x, src, call=call)
        if self.query == "global":
            if call is None or "grid" not in call.extra:
                raise ValueError("call: query='global' projects with the call's grid")
            grid = call.extra["grid"]
            q = self.split(self.q_proj(self._global_tokens(x, grid, call.mask)), self.n_heads)  # [B, H, prod(w), D]
            q = q[:, :, self._window_offsets(q.device, grid)]
        if self.cosine:
            ls = self.logit_scale.clamp(max=math.log(100.0)).exp().to(q.dtype).view(1, -1, 1, 1)
            q = F.normalize(q, dim=-1) * ls
            k = F.normalize(k, dim=-1)
        return q, k, v

    def _global_tokens(self, x: torch.Tensor, grid: tuple[int, ...], keep: torch.Tensor | None) -> torch.Tensor:
        """The map average-pooled to the window size (over kept tokens): ``[B, prod(window), C]``."""
        w = per_axis(self.window, len(grid), "window")
        b, n, c = x.shape
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

    def _window_offsets(self, device: torch.device, grid: tuple[int, ...]) -> torch.Tensor:
        """Each token's row-major offset inside its (shifted) window."""
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
        if self.halo_padding == "zeros" and any(eta):
            return self._zero_halo_forward(x, mask, causal, context, cache, return_weights)
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                               cache=cache, head_mask=head_mask, return_weights=return_weights)

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
        q, k, v = self.project(flat, flat, call=Call(x=flat, src=flat, mask=keep, kv_keep=keep, extra={"grid": grid}))
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


def _swin_full_window():
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(6, 8))
    x = random_grid()
    return m(x), mha_on_grid(m, x)


def _swin_shift_zero():
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=(3, 4), shift=0)
    x = random_grid()
    return m(x), per_window(m, x, (3, 4))


def _swin_roll_and_mask():
    """Swin's own recipe: roll(-s), window attention with the region mask, roll(+s)."""
    from attnzoo.patterns import Custom

    window, shift = (3, 4), (1, 2)
    m = seeded(SwinWindowAttention, dim=32, n_heads=4, window=window, shift=shift)
    x = random_grid()
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
        x = random_grid(grid=(6, 8))
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
    x = random_grid()
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


register(
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
)(SwinWindowAttention)
