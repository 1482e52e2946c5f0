"""``varied_size_window``: VSA, window attention whose key/value window is regressed per head (scale and offset) and
bilinearly sampled at a fixed number of points; queries stay in their default window."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import AttentionMixer, load_shared, seeded
from attnzoo.layers.dynamic_sparse._common import FAMILY
from attnzoo.layers.local_sparse._grid import GridMixer, per_axis
from attnzoo.layers.testing import random_grid, random_tokens
from attnzoo.patterns import WindowPartition
from attnzoo.registry import Reduction, register


def bilinear_sample(t: torch.Tensor, pos: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``t`` ``[B, H, h*w, D]`` (a raster ``h x w`` map per head) read at pixel positions ``pos`` ``[B, H, P, 2]``
    (row, column; float) by bilinear interpolation, zero outside the map -> ``[B, H, P, D]``.

    Equal to ``F.grid_sample(..., align_corners=True, padding_mode="zeros")``; differentiable in ``t`` and ``pos``
    (almost everywhere: not at integer positions, where the interpolation has a kink).
    """
    hh, ww = hw
    d = t.shape[-1]
    r, c = pos[..., 0], pos[..., 1]
    r0, c0 = r.detach().floor(), c.detach().floor()
    fr, fc = r - r0, c - c0
    out = t.new_zeros(*pos.shape[:-1], d)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < hh) & (cc >= 0) & (cc < ww)
            idx = (rr.clamp(0, hh - 1) * ww + cc.clamp(0, ww - 1)).long()
            g = t.gather(2, idx.unsqueeze(-1).expand(*idx.shape, d))
            out = out + g * (wr * wc * inside).to(t.dtype).unsqueeze(-1)
    return out


class VariedSizeWindowAttention(GridMixer):
    """Varied-size window attention (VSA) on a channels-last grid ``[B, H, W, C]`` (``[B, N, C]`` is a
    ``1 x N`` map).

    Queries stay in the default non-overlapping ``window`` (as ``swin_window``). Per default window and head a
    window-regression module (the window's mean token, LeakyReLU, a linear layer: VSA's avg-pool + 1x1 conv)
    predicts a scale ``s`` and an offset ``o`` per axis; the key/value window becomes the default one scaled
    about its centre by ``1 + s`` and moved by ``o`` half-windows: the ``prod(window)`` sample points
    ``p = centre + (u - centre)·(1 + s) + o·window/2`` (``u`` the default window's token positions). K and V
    are read at those points by bilinear interpolation, zero outside the map, and every query attends the
    samples of its window. The number of sampled keys is ``prod(window)`` whatever the predicted size, so the
    cost does not depend on it; the output is differentiable in ``s`` and ``o`` (through the interpolation).
    The regression layers start at zero: ``s = 0``, ``o = 0`` samples the default window exactly, i.e. plain
    ``swin_window`` with the same weights (``q_proj, k_proj, v_proj, o_proj``).

    From the authors' code (ViTAE-Transformer/ViTAE-VSA ``vsa.py``, read): avg-pool over each window, LeakyReLU,
    1x1 conv to ``2·heads`` offsets and ``2·heads`` scales, zero-initialised; sample coordinates
    ``window centre + base·(1 + scale) + offset`` with ``grid_sample(align_corners=True, padding="zeros")``
    on per-head K and V; the offset there is divided by the number of windows in normalised coordinates (about
    half a window, the unit taken here). Not implemented: VSA's relative position bias. Padding (``mask``):
    padded tokens are read as zeros by the sampling (as the map's border is) and do not enter the window
    means, so padded content changes nothing; with a mask a zero regression therefore differs from
    ``swin_window``, which drops padded keys instead. No causal attention (vision windows), 1 or 2 spatial
    axes. ``return_weights`` gives the weights over each window's sampled key slots (slot ``m`` is the sample
    of token ``m``'s position).

    Args:
        dim, n_heads: as ``mha``.
        window: default window per axis (``int`` or ``(h, w)``; a sequence uses its last entry); each extent
            must be a multiple of it.
        head_dim, bias, scale, backend: as ``mha``.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, window: int | Sequence[int] = 7, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        self.window = per_axis(window, 2, "window")
        self.scale_head = nn.Linear(dim, n_heads * 2)
        self.offset_head = nn.Linear(dim, n_heads * 2)
        for lin in (self.scale_head, self.offset_head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def call_window(self, grid: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(map, window)``: the call's map as ``(h, w)`` and its window (a sequence is a ``1 x N`` map)."""
        if len(grid) == 1:
            return (1, grid[0]), (1, self.window[1])
        return (grid[0], grid[1]), self.window

    def check_grid(self, grid: tuple[int, ...]) -> None:
        if len(grid) > 2:
            raise ValueError(f"x: varied_size_window takes 1 or 2 spatial axes, got grid {grid}")
        hw, w = self.call_window(grid)
        if hw[0] % w[0] or hw[1] % w[1]:
            raise ValueError(f"x: grid extent {hw} must be a multiple of the window {w} on every axis")

    def grid_pattern(self, grid):
        return None  # the window pattern is applied to the sampled keys in attend

    def regress(self, x: torch.Tensor, grid: tuple[int, ...], keep: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window regression: ``(s, o)`` ``[B, H, nWh, nWw, 2]`` from ``x`` ``[B, N, C]`` (means over kept tokens)."""
        (hh, ww), (wh, wwin) = self.call_window(grid)
        b, _, c = x.shape
        w = torch.ones(b, hh * ww, 1, dtype=x.dtype, device=x.device) if keep is None else \
            keep.view(b, -1, 1).to(x.dtype)

        def pool(t):
            return t.view(b, hh // wh, wh, ww // wwin, wwin, -1).sum((2, 4))

        den = pool(w)
        pooled = F.leaky_relu(pool(x * w) / torch.where(den > 0, den, torch.ones_like(den)))
        nh = self.n_heads

        def head(lin):
            return lin(pooled).view(b, hh // wh, ww // wwin, nh, 2).permute(0, 3, 1, 2, 4)

        return head(self.scale_head), head(self.offset_head)

    def sample_positions(self, s: torch.Tensor, o: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Pixel positions ``[B, H, N, 2]`` (row, column) of every token's key sample: the token's position in its
        default window scaled by ``1 + s`` about the window centre and moved by ``o`` half-windows."""
        (hh, ww), (wh, wwin) = self.call_window(grid)
        dev, dt = s.device, torch.promote_types(s.dtype, torch.float32)  # positions of large maps need float32
        s, o = s.to(dt), o.to(dt)
        rows = torch.arange(hh, device=dev).view(-1, 1).expand(hh, ww).flatten()
        cols = torch.arange(ww, device=dev).view(1, -1).expand(hh, ww).flatten()
        win = torch.stack([rows // wh, cols // wwin], -1)  # [N, 2]
        size = torch.tensor([wh, wwin], device=dev, dtype=dt)
        u = torch.stack([rows, cols], -1).to(dt)
        centre = win.to(dt) * size + (size - 1) / 2
        s_tok = s[:, :, win[:, 0], win[:, 1]]  # [B, H, N, 2]
        o_tok = o[:, :, win[:, 0], win[:, 1]]
        return centre + (u - centre) * (1 + s_tok) + o_tok * size / 2

    def window_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, o: torch.Tensor,
                      grid: tuple[int, ...], keep: torch.Tensor | None = None, want_weights: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q`` ``[B, H, N, D]`` over the keys/values ``k``, ``v`` sampled at the windows given by
        ``s``, ``o`` ``[B, H, nWh, nWw, 2]``; padded tokens (``keep`` False) read as zeros."""
        hw, w = self.call_window(grid)
        if keep is not None:
            k = k * keep.view(keep.shape[0], 1, -1, 1).to(k.dtype)
            v = v * keep.view(keep.shape[0], 1, -1, 1).to(v.dtype)
        pos = self.sample_positions(s, o, grid)
        ks, vs = bilinear_sample(k, pos, hw), bilinear_sample(v, pos, hw)
        pattern = self._cached(("windows", hw, w), lambda: WindowPartition(w, grid=hw))
        return AttentionMixer.attend(self, q, ks, vs, pattern, want_weights)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if call is None or "grid" not in call.extra:
            raise ValueError("call: varied_size_window attends with the call's grid")
        grid = call.extra["grid"]
        s, o = self.regress(call.x, grid, call.mask)
        return self.window_attend(q, k, v, s, o, grid, call.kv_keep, want_weights)

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        """``x`` ``[B, H, W, C]`` or ``[B, N, C]`` -> the same shape (and weights over each window's sampled key
        slots ``[B, heads, N, N]`` with ``return_weights``). ``mask``: bool ``[B, *spatial]``, True = keep."""
        if causal:
            raise ValueError("causal: varied_size_window does not support causal attention (vision windows)")
        return super().forward(x, mask=mask, context=context, context_mask=context_mask, cache=cache,
                               head_mask=head_mask, return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


# Reductions -------------------------------------------------------------------------------------
def _swin(m: VariedSizeWindowAttention, window: Any) -> nn.Module:
    from attnzoo.layers.local_sparse.swin_window import SwinWindowAttention

    return load_shared(m, SwinWindowAttention(32, 4, window=window).double())


def _zero_regression_is_swin_window():
    got, want = [], []
    m = seeded(VariedSizeWindowAttention, dim=32, n_heads=4, window=(3, 4))
    x = random_grid(grid=(6, 8))
    got.append(m(x).flatten())
    want.append(_swin(m, (3, 4))(x).flatten())
    s = random_tokens(n=12)
    got.append(m(s).flatten())
    want.append(_swin(m, 4)(s).flatten())
    return torch.cat(got), torch.cat(want)


def _offset_of_two_is_the_next_window():
    """``o = (0, 2)`` moves every key window by one window to the right (exact pixels); the last column of
    windows reads zeros (beyond the border)."""
    m = seeded(VariedSizeWindowAttention, dim=32, n_heads=4, window=(3, 4))
    with torch.no_grad():
        m.offset_head.bias.copy_(torch.tensor([0.0, 2.0] * 4))
    x = random_grid(grid=(6, 8))
    flat = x.reshape(2, -1, 32)
    q, k, v = m.project(flat, flat)
    shifted = [torch.cat([t.view(2, 4, 6, 8, 8)[:, :, :, 4:], torch.zeros_like(t.view(2, 4, 6, 8, 8)[:, :, :, 4:])],
                         3).reshape(2, 4, 48, 8) for t in (k, v)]
    from attnzoo.ops import attention

    z = attention(q, *shifted, pattern=WindowPartition((3, 4), grid=(6, 8)), backend="reference")
    return m(x), m.o_proj(m.merge(z)).view(x.shape)


register(
    "varied_size_window", family=FAMILY, type="mixer", priority=3, input_kind="grid2d", papers=("VSA",),
    supports={"self", "padding"}, complexity="O(N w^2)",
    summary="VSA: per-head regressed key/value windows (scale, offset) bilinearly sampled at a fixed number of "
            "points; queries in the default window; zero regression = swin_window.",
    test_kwargs={"dim": 32, "n_heads": 4, "window": 4},
    reductions=(
        Reduction("zero_regression_is_swin_window", "zero regression (scale 1, offset 0) equals swin_window with "
                  "the same weights (2-D grid and a sequence)", _zero_regression_is_swin_window),
        Reduction("offset_two_is_next_window", "an offset of two half-windows reads the next window's keys exactly "
                  "(zeros beyond the border)", _offset_of_two_is_the_next_window),
    ),
)(VariedSizeWindowAttention)
