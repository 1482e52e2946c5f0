"""``freelong``: FreeLong / FreeLong++ multi-band spectral fusion of temporal-attention branches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, load_shared, seeded
from attnzoo.layers.spatiotemporal._common import FAMILY, parse_video_grid, video_tokens
from attnzoo.patterns import SlidingWindow
from attnzoo.registry import Reduction, register


class FreeLong(nn.Module):
    """Temporal attention per location with branches of different windows fused in the frequency domain.

    ``out = iFFT_t(Σ_b M_b ⊙ FFT_t(Attn_(w_b)(x)))`` over the time axis of ``x`` ``[B, T, *space, C]``.
    Branch ``b`` is the one temporal ``mha`` (training-free: shared weights) restricted to the
    window ``windows[b]`` (``None``: the whole video; ``w``: frames with ``|t - t'| <= w``).
    The band masks ``M_b`` partition the real-FFT bins by the normalised frequency
    ``f = k / (T / 2)`` in ``[0, 1]``: branch 0 takes ``f < cutoffs[0]``, branch b takes
    ``cutoffs[b-1] <= f < cutoffs[b]``, the last takes the rest; so the low band comes from the
    first (global) branch and higher bands from shorter windows. FreeLong is
    ``windows=(None, w), cutoffs=(c,)``. Rows of padded tokens are zero.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, windows: Sequence[int | None] = (None, 2),
                 cutoffs: Sequence[float] = (0.25,), grid: Sequence[int] | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.windows = tuple(None if w is None else check_int("windows", w) for w in windows)
        if not self.windows:
            raise ValueError("windows: expected at least one branch, got ()")
        self.cutoffs = tuple(float(c) for c in cutoffs)
        if len(self.cutoffs) != len(self.windows) - 1:
            raise ValueError(f"cutoffs: expected {len(self.windows) - 1} band edges (one fewer than the windows), "
                             f"got {len(self.cutoffs)}")
        if any(not 0.0 < c <= 1.0 for c in self.cutoffs) or list(self.cutoffs) != sorted(self.cutoffs):
            raise ValueError(f"cutoffs: expected increasing normalised frequencies in (0, 1], got {cutoffs!r}")
        self.grid = parse_video_grid(grid)
        self.temporal = MultiHeadAttention(dim, n_heads, backend=backend)

    def band_masks(self, t: int, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
        """``[n_branches, T // 2 + 1]`` 0/1 masks partitioning the real-FFT bins of a length-``T`` signal."""
        f = torch.arange(t // 2 + 1, device=device, dtype=torch.float64) / max(t / 2, 1.0)
        edges = [0.0, *self.cutoffs]
        rows = []
        for b in range(len(self.windows)):
            lo = edges[b]
            m = f >= lo if b else torch.ones_like(f, dtype=torch.bool)
            if b + 1 < len(edges):
                m = m & (f < edges[b + 1])
            rows.append(m)
        return torch.stack(rows).to(dtype)

    def branch(self, x: torch.Tensor, mask: torch.Tensor | None, window: int | None) -> torch.Tensor:
        """One temporal-attention branch: ``x`` ``[B', T, C]`` -> ``[B', T, C]``."""
        return self.temporal.mix(x, mask=mask, pattern=None if window is None else SlidingWindow(window))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, T, *space, C]`` -> the same shape.

        ``mask``: bool ``[B, T, *space]``, True = keep (a real token), False = padding.
        """
        if causal:
            raise ValueError("causal: FreeLong fuses whole-video spectra, so it cannot be causal")
        if context is not None:
            raise ValueError("context: FreeLong is self-attention over time (no cross-attention)")
        if cache is not None:
            raise ValueError("cache: FreeLong does not decode token by token")
        xv, mv, _ = video_tokens(x, mask, self.dim, self.grid)
        b, t, s, c = xv.shape
        xt = xv.transpose(1, 2).reshape(b * s, t, c)
        mt = None if mv is None else mv.transpose(1, 2).reshape(b * s, t)
        masks = self.band_masks(t, torch.float64 if xt.dtype == torch.float64 else torch.float32, xt.device)
        spec = None
        for i, w in enumerate(self.windows):
            y = self.branch(xt, mt, w)
            f = torch.fft.rfft(y.to(masks.dtype), dim=1) * masks[i].view(1, -1, 1)
            spec = f if spec is None else spec + f
        out = torch.fft.irfft(spec, n=t, dim=1).to(x.dtype)
        if mt is not None:
            out = out * mt.unsqueeze(-1).to(out.dtype)
        return out.reshape(b, s, t, c).transpose(1, 2).reshape(x.shape)


def _video(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 7, 2, 2, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same_features_pass_through() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FreeLong, dim=32, n_heads=4, windows=(None, None, None), cutoffs=(0.3, 0.6))
    x = _video()
    ref = load_shared(m.temporal, MultiHeadAttention(32, 4, backend="reference")).double()
    xt = x.permute(0, 2, 3, 1, 4).reshape(8, 7, 32)
    return m(x), ref(xt).reshape(2, 2, 2, 7, 32).permute(0, 3, 1, 2, 4)


def _single_global_branch() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FreeLong, dim=32, n_heads=4, windows=(None,), cutoffs=())
    x = _video(1)
    ref = load_shared(m.temporal, MultiHeadAttention(32, 4, backend="reference")).double()
    xt = x.permute(0, 2, 3, 1, 4).reshape(8, 7, 32)
    return m(x), ref(xt).reshape(2, 2, 2, 7, 32).permute(0, 3, 1, 2, 4)


def _bands_partition() -> tuple[torch.Tensor, torch.Tensor]:
    m = FreeLong(32, 4, windows=(None, 3, 1), cutoffs=(0.2, 0.5))
    got = torch.cat([m.band_masks(t, torch.float64).sum(0) for t in (1, 2, 7, 16)])
    return got, torch.ones_like(got)


register(
    "freelong", family=FAMILY, type="mixer", priority=3, papers=("FreeLong++",), input_kind="grid3d",
    supports={"self", "padding"}, complexity="O(S·T^2·B_branches + S·T log T)",
    summary="FreeLong(++): temporal-attention branches with different windows fused band by band in the "
            "temporal spectrum (low band global, high bands local).",
    test_kwargs={"dim": 32, "n_heads": 4, "windows": (None, 2), "cutoffs": (0.4,)},
    reductions=(
        Reduction("same_features", "band masks partition the spectrum: identical branches give their features",
                  _same_features_pass_through),
        Reduction("single_global", "one global branch is plain full temporal attention", _single_global_branch),
        Reduction("bands_partition", "the band masks sum to 1 on every bin", _bands_partition),
    ),
)(FreeLong)
