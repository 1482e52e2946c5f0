"""``squeeze_excite``: squeeze-and-excitation channel gating, with an optional condition and a contrast statistic.

``s = sigmoid(W_2 relu(W_1 [pool(x); c])) in (0, 1)^C`` and ``y = s * x``, broadcast over space or
time. ``stat="mean"`` pools by the spatial mean; ``stat="contrast"`` by mean + standard deviation
(IMDN's contrast-aware channel attention). ``cond_dim`` adds a condition vector ``c`` ``[B, cond_dim]``
(e.g. a sentence embedding, Sentence Attention Block), concatenated to the pooled statistic.
Feature maps of any rank: ``[B, C, L]`` (ECAPA's SE-Res2Net), ``[B, C, H, W]``, ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.channel._common import FAMILY, check_feature_map, spatial_mean
from attnzoo.registry import Reduction, register

__all__ = ["SqueezeExcite", "STATS"]

STATS = ("mean", "contrast")


class SqueezeExcite(nn.Module):
    """SE gating ``[B, C, *spatial] -> [B, C, *spatial]`` (``cond`` ``[B, cond_dim]`` when built with ``cond_dim``)."""

    def __init__(self, channels: int, *, reduction: int = 4, stat: str = "mean", cond_dim: int | None = None) -> None:
        super().__init__()
        self.channels = check_int("channels", channels)
        self.stat = check_choice("stat", stat, STATS)
        self.cond_dim = None if cond_dim is None else check_int("cond_dim", cond_dim)
        hidden = max(channels // check_int("reduction", reduction), 1)
        self.fc1 = nn.Linear(channels + (self.cond_dim or 0), hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gates(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The gates ``s`` ``[B, C]`` in (0, 1)."""
        check_feature_map("x", x, self.channels, (1, 2, 3))
        pooled = spatial_mean(x)
        if self.stat == "contrast":
            pooled = pooled + x.flatten(2).std(-1, unbiased=False)
        if self.cond_dim is not None:
            if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (x.shape[0], self.cond_dim):
                got = list(cond.shape) if isinstance(cond, torch.Tensor) else cond
                raise ValueError(f"cond: expected a tensor [{x.shape[0]}, {self.cond_dim}], got {got}")
            pooled = torch.cat([pooled, cond.to(pooled.dtype)], -1)
        elif cond is not None:
            raise ValueError("cond: this squeeze_excite was built without cond_dim; got a cond tensor")
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Gate ``x`` ``[B, C, *spatial]`` channel-wise."""
        s = self.gates(x, cond)
        return x * s.view(*s.shape, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stat={self.stat!r}, cond_dim={self.cond_dim}"


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _constant_condition_is_plain_se() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SqueezeExcite, channels=8, reduction=2, cond_dim=3)
    plain = seeded(SqueezeExcite, channels=8, reduction=2)
    c = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64).expand(2, 3)
    with torch.no_grad():
        plain.fc1.weight.copy_(m.fc1.weight[:, :8])
        plain.fc1.bias.copy_(m.fc1.bias + m.fc1.weight[:, 8:] @ c[0])
        plain.fc2.load_state_dict(m.fc2.state_dict())
    x = _x()
    return m(x, c), plain(x)


def _zero_std_contrast_is_mean() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SqueezeExcite, channels=8, reduction=2, stat="contrast")
    plain = seeded(SqueezeExcite, channels=8, reduction=2)
    x = _x()[:, :, :1, :1].expand(2, 8, 5, 6)
    return m(x), plain(x)


register(
    "squeeze_excite", family=FAMILY, type="channel", priority=2, input_kind="feature_map",
    papers=("baseline", "Sentence Attention Block"), supports=frozenset(), complexity="O(C HW)", backends=(),
    reference="the same module in float64", reference_kwargs={}, test_kwargs={"channels": 32},
    summary="Squeeze-and-excitation gates sigmoid(W2 relu(W1 [pool(x); c])) with a contrast (mean + std) statistic "
            "and an optional condition; 1-D, 2-D and 3-D maps.",
    reductions=(
        Reduction("constant_condition_is_plain_se", "a constant condition gives plain SE",
                  _constant_condition_is_plain_se),
        Reduction("zero_std_contrast_is_mean", "with std = 0 the contrast statistic reduces to the mean",
                  _zero_std_contrast_is_mean),
    ),
)(SqueezeExcite)
