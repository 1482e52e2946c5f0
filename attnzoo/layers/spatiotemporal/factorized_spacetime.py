"""``factorized_spacetime``: space-time attention over video tokens: divided (space, then time) or joint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, load_shared, seeded
from attnzoo.layers.spatiotemporal._common import FAMILY, VIDEO_SUPPORT, parse_video_grid, video_tokens
from attnzoo.patterns import Custom
from attnzoo.registry import Reduction, register


def _frame_causal(s: int) -> Custom:
    """Joint attention causal over frames: a query at frame t sees every token of frames <= t."""
    return Custom(lambda b, h, q, k: torch.div(k, s, rounding_mode="floor") <= torch.div(q, s, rounding_mode="floor"),
                  per_batch=False, per_head=False, name=f"frame_causal(s={s})")


class FactorizedSpaceTime(nn.Module):
    """Space-time attention for video tokens ``x`` ``[B, T, *space, C]`` (0 to 2 spatial axes).

    ``mode="divided"``: ``Y = TemporalAttn_(over T, per location)(SpatialAttn_(over space, per frame)(X))``
    (two attention layers, no residual in between); ``mode="joint"``: the spatial layer over all
    ``T·S`` tokens (so ``T = 1`` gives spatial attention). The spatial stage is ``mha`` or any
    registered grid entry named by ``spatial`` (e.g. ``"neighborhood"``, ``"swin_window"``; built
    with ``dim``, ``n_heads``, ``backend`` and ``spatial_kwargs``) run on each frame's grid; the
    temporal stage is ``mha`` per location. ``causal_time``: the temporal stage (joint: frame order)
    is causal. ``causal=True`` in a call is raster-order causality (both stages causal).
    ``grid=(T, H, W)`` fixes the video shape (a call whose T/H/W differ is refused, a flattened
    ``[B, T·H·W, C]`` input is unflattened). Rows of padded tokens are zero.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, mode: str = "divided", causal_time: bool = False,
                 spatial: str = "mha", spatial_kwargs: dict[str, Any] | None = None,
                 grid: Sequence[int] | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, ("divided", "joint"))
        self.causal_time = bool(causal_time)
        self.grid = parse_video_grid(grid)
        self.spatial_kind = spatial
        if spatial == "mha":
            if spatial_kwargs:
                raise ValueError(f"spatial_kwargs: the mha spatial stage takes none, got {sorted(spatial_kwargs)}")
            self.spatial = MultiHeadAttention(dim, n_heads, backend=backend)
        else:
            import attnzoo

            spec = attnzoo.spec(spatial)
            if not spec.input_kind.startswith("grid") or spec.type not in ("mixer", "pattern"):
                raise ValueError(f"spatial: expected 'mha' or a grid mixer entry, got {spatial!r} "
                                 f"(type {spec.type}, input {spec.input_kind})")
            if mode == "joint" and causal_time:
                raise ValueError("causal_time: joint mode with frame-causal attention needs spatial='mha'")
            self.spatial = attnzoo.create(spatial, dim=dim, n_heads=n_heads, backend=backend,
                                          **(spatial_kwargs or {}))
        self.temporal = MultiHeadAttention(dim, n_heads, backend=backend) if mode == "divided" else None

    def _spatial(self, x: torch.Tensor, mask: torch.Tensor | None, space: tuple[int, ...], causal: bool
                 ) -> torch.Tensor:
        """``x`` ``[B', S, C]`` per frame -> ``[B', S, C]``."""
        if self.spatial_kind == "mha":
            return self.spatial(x, mask=mask, causal=causal)
        shape = space or (1,)
        y = self.spatial(x.reshape(x.shape[0], *shape, self.dim), causal=causal,
                         mask=None if mask is None else mask.reshape(x.shape[0], *shape))
        return y.reshape(x.shape)

    def spatial_stage(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, causal: bool = False,
                      space: tuple[int, ...] = ()) -> torch.Tensor:
        """The spatial stage of divided mode: ``x`` ``[B, T, S, C]`` -> ``[B, T, S, C]``, each frame alone."""
        b, t, s, c = x.shape
        y = self._spatial(x.reshape(b * t, s, c), None if mask is None else mask.reshape(b * t, s), space, causal)
        return y.reshape(b, t, s, c)

    def temporal_stage(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, causal: bool = False
                       ) -> torch.Tensor:
        """The temporal stage of divided mode: ``x`` ``[B, T, S, C]`` -> ``[B, T, S, C]``, each location alone."""
        b, t, s, c = x.shape
        xt = x.transpose(1, 2).reshape(b * s, t, c)
        mt = None if mask is None else mask.transpose(1, 2).reshape(b * s, t)
        y = self.temporal(xt, mask=mt, causal=causal or self.causal_time)
        return y.reshape(b, s, t, c).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, T, *space, C]`` -> the same shape.

        ``mask``: bool ``[B, T, *space]``, True = keep (a real token), False = padding.
        """
        if context is not None:
            raise ValueError("context: FactorizedSpaceTime is self-attention over video tokens (no cross-attention)")
        if cache is not None:
            raise ValueError("cache: FactorizedSpaceTime does not decode token by token")
        xv, mv, shape = video_tokens(x, mask, self.dim, self.grid)
        b, t, s, c = xv.shape
        if self.mode == "divided":
            y = self.temporal_stage(self.spatial_stage(xv, mv, causal=causal, space=shape[1:]), mv, causal=causal)
            return y.reshape(x.shape)
        flat_mask = None if mv is None else mv.reshape(b, t * s)
        if self.spatial_kind == "mha":
            pattern = _frame_causal(s) if self.causal_time and not causal else None
            y = self.spatial.mix(xv.reshape(b, t * s, c), mask=flat_mask, causal=causal, pattern=pattern)
        else:
            y = self.spatial(xv.reshape(b, *shape, c), causal=causal,
                             mask=None if mv is None else mv.reshape(b, *shape))
        return y.reshape(x.shape)


def _video(b: int = 2, t: int = 3, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, t, h, w, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _divided_is_space_then_time() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FactorizedSpaceTime, dim=32, n_heads=4, causal_time=True)
    x = _video()
    sp = load_shared(m.spatial, MultiHeadAttention(32, 4, backend="reference")).double()
    tp = load_shared(m.temporal, MultiHeadAttention(32, 4, backend="reference")).double()
    frames = torch.stack([sp(x[:, i].reshape(2, 6, 32)).reshape(2, 2, 3, 32) for i in range(3)], 1)
    out = torch.empty_like(x)
    for i in range(2):
        for j in range(3):
            out[:, :, i, j] = tp(frames[:, :, i, j], causal=True)
    return m(x), out


def _joint_one_frame_is_spatial() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FactorizedSpaceTime, dim=32, n_heads=4, mode="joint")
    x = _video(t=1)
    ref = load_shared(m.spatial, MultiHeadAttention(32, 4, backend="reference")).double()
    return m(x), ref(x.reshape(2, 6, 32)).reshape(x.shape)


def _joint_is_mha_over_all_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FactorizedSpaceTime, dim=32, n_heads=4, mode="joint")
    x = _video()
    ref = load_shared(m.spatial, MultiHeadAttention(32, 4, backend="reference")).double()
    return m(x), ref(x.reshape(2, 18, 32)).reshape(x.shape)


register(
    "factorized_spacetime", family=FAMILY, type="mixer", priority=2, papers=("baseline",), input_kind="grid3d",
    supports=VIDEO_SUPPORT, complexity="O(T·S^2 + S·T^2) divided, O((T·S)^2) joint",
    summary="Space-time attention over video tokens: divided (spatial per frame, then temporal per location) "
            "or joint; the spatial stage on any grid entry.",
    test_kwargs={"dim": 32, "n_heads": 4},
    reductions=(
        Reduction("divided_is_space_then_time", "divided = per-frame mha, then per-location causal-in-time mha",
                  _divided_is_space_then_time),
        Reduction("joint_one_frame", "T = 1 makes joint equal to spatial attention", _joint_one_frame_is_spatial),
        Reduction("joint_is_mha", "joint = mha over all T·S tokens", _joint_is_mha_over_all_tokens),
    ),
)(FactorizedSpaceTime)
