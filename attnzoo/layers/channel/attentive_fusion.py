"""``attentive_fusion``: attention-weighted fusion of M feature maps, ``F = sum_m a_m * F_m``.

``mode="afa"`` (AFA, dense prediction, M = 2): ``a = sigmoid(spatial(F_s) + channel(F_d))`` from a
spatial attention on the shallow map ``F_s`` (a 1x1 conv to one map) and a channel attention on the
deep map ``F_d`` (SE-style on its spatial mean), ``F = a * F_s + (1 - a) * F_d``. ``mode="softmax"``
(SABW-style ensembling): per-location, per-channel scores from a 1x1 conv on each source, a softmax
over the M sources. ``forward(x, *others)`` fuses ``[x, *others]``. A single map (the channel
contract's ``(B, C, H, W) -> (B, C, H, W)``) is fused with its coarse view (2 x 2 average pooling,
upsampled back: the role of the deeper, lower-resolution map), which needs ``n_sources = 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.channel._common import FAMILY, check_feature_map, spatial_mean
from attnzoo.registry import Reduction, register

__all__ = ["AttentiveFusion", "MODES"]

MODES = ("afa", "softmax")


class AttentiveFusion(nn.Module):
    """Fuse M maps ``[B, C, H, W]`` into one; ``weights(*maps)`` returns ``a`` ``[B, M, C, H, W]``."""

    def __init__(self, channels: int, *, n_sources: int = 2, mode: str = "afa", reduction: int = 4) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.n_sources = check_int("n_sources", n_sources)
        self.mode = check_choice("mode", mode, MODES)
        if mode == "afa":
            if n_sources != 2:
                raise ValueError(f"n_sources: mode='afa' fuses a shallow and a deep map (2), got {n_sources}")
            hidden = max(channels // check_int("reduction", reduction), 1)
            self.spatial = nn.Conv2d(channels, 1, 1)
            self.channel = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        else:
            self.score = nn.Conv2d(channels, channels, 1)

    def sources(self, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The maps to fuse: ``maps``, or a single map and its coarse view."""
        if len(maps) == 1 and self.n_sources == 2:
            x = maps[0]
            check_feature_map("maps[0]", x, self.channels)
            coarse = F.avg_pool2d(x, 2, ceil_mode=True)
            return x, F.interpolate(coarse, size=x.shape[-2:], mode="nearest")
        return maps

    def weights(self, *maps: torch.Tensor) -> torch.Tensor:
        """``a`` ``[B, M, C, H, W]`` for the sources of ``maps`` (see :meth:`sources`)."""
        maps = self.sources(*maps)
        if len(maps) != self.n_sources:
            raise ValueError(f"maps: expected {self.n_sources} feature maps (one only when n_sources = 2), "
                             f"got {len(maps)}")
        for i, f in enumerate(maps):
            check_feature_map(f"maps[{i}]", f, self.channels)
            if f.shape != maps[0].shape:
                raise ValueError(f"maps[{i}]: expected the shape of maps[0] {list(maps[0].shape)}, got {list(f.shape)}")
        if self.mode == "afa":
            shallow, deep = maps
            a = torch.sigmoid(self.spatial(shallow) + self.channel(spatial_mean(deep))[..., None, None])
            return torch.stack([a, 1 - a], 1)
        return torch.softmax(torch.stack([self.score(f) for f in maps], 1), 1)

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        maps = self.sources(x, *others)
        return (self.weights(*maps) * torch.stack(maps, 1)).sum(1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, n_sources={self.n_sources}, mode={self.mode!r}"


def _maps(m: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 8, 4, 5, generator=g, dtype=torch.float64) for _ in range(m)]


def _identical_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    f = _maps(1)[0]
    got = [seeded(AttentiveFusion, channels=8, mode="afa")(f, f),
           seeded(AttentiveFusion, channels=8, n_sources=3, mode="softmax")(f, f, f)]
    return torch.stack(got), torch.stack([f, f])


def _gate_one_is_shallow() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentiveFusion, channels=8, mode="afa")
    with torch.no_grad():
        m.spatial.weight.zero_()
        m.spatial.bias.fill_(200.0)
    shallow, deep = _maps(2)
    return m(shallow, deep), shallow


register(
    "attentive_fusion", family=FAMILY, type="channel", priority=3, input_kind="feature_map",
    papers=("AFA (attentive feature aggregation)", "AFA/SABW (diffusion ensembling)"), supports=frozenset(),
    complexity="O(M C HW)", backends=(), reference="the same module in float64", reference_kwargs={},
    test_kwargs={"channels": 32},
    summary="Attention-weighted fusion of feature maps: AFA's sigmoid gate from spatial (shallow) + channel (deep) "
            "attention, or a softmax over M sources per location and channel.",
    reductions=(
        Reduction("identical_inputs", "identical inputs F_m = F give F", _identical_inputs),
        Reduction("gate_one_is_shallow", "a = 1 returns the shallow features", _gate_one_is_shallow),
    ),
)(AttentiveFusion)
