"""Shared by the linear-recurrent entries: the family name, forms, feature maps, pooling and depthwise convolution."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.testing import random_tokens
from attnzoo.ops.linear import FORMS

FAMILY = "linear-recurrent"
FEATURE_MAPS = ("identity", "elu", "relu", "silu", "performer", "taylor")
SMALL = {"dim": 32, "n_heads": 4, "chunk_size": 5}
PARALLEL = {"form": "parallel"}
REFERENCE = "the same module with form='parallel' (materialised N x N operator) in float64"


rand_x = partial(random_tokens, n=11)  # the family's reduction inputs [2, 11, 32]


def check_form(form: str, chunk_size: int) -> tuple[str, int]:
    return check_choice("form", form, FORMS), check_int("chunk_size", chunk_size)


def both_forms(module: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunked and recurrent outputs stacked, the parallel output twice): the DSF identity."""
    outs = {}
    for form in FORMS:
        module.form = form
        outs[form] = module(x, **kw)
    return torch.stack([outs["chunked"], outs["recurrent"]]), torch.stack([outs["parallel"]] * 2)


def _orthogonal_features(heads: int, n_features: int, d: int) -> torch.Tensor:
    """Performer's orthogonal random features ``[H, m, d]``: blocks of orthogonal rows, each row's
    norm redrawn from a chi(d) distribution so every row is marginally N(0, I) (unbiased)."""
    def haar(d: int) -> torch.Tensor:  # a uniformly random orthogonal matrix (QR with the signs of R fixed)
        qm, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        return (qm * torch.sign(torch.diagonal(r))).T

    out = []
    for _ in range(heads):
        w = torch.cat([haar(d) for _ in range(-(-n_features // d))])[:n_features]
        norms = torch.randn(n_features, d, dtype=torch.float64).norm(dim=-1, keepdim=True)
        out.append(w * norms)
    return torch.stack(out).float()


class FeatureMap(nn.Module):
    """Feature maps φ of kernelised linear attention, per head on ``[B, H, N, d]``.

    - ``identity``, ``elu`` (elu + 1), ``relu``, ``silu``: elementwise.
    - ``performer``: FAVOR+ positive random features of the softmax kernel,
      ``φ(x) = exp(ω x' - |x'|²/2) / √m`` with ``x' = x / d^{1/4}``, so
      ``E[φ(q)·φ(k)] = exp(q·k/√d)``; ``ω`` is a fixed buffer of orthogonal random features
      (:meth:`redraw` draws new ones). With ``normalize`` the query features are stabilised
      by their row maximum (it cancels exactly in the normalised output); keys are not (a key
      constant would not cancel, and a max over keys would leak future tokens); they are
      bounded by ``exp(|ω|²/2)``.
    - ``taylor`` (Based): ``φ(x) = [1, x/d^{1/4}, x_i x_j/√d (i<j), x_i²/√(2d)]``, so
      ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``, the second-order Taylor expansion of
      ``exp(q·k/√d)`` ([anchors]: the memory-saving triangle, ``1 + d + d(d+1)/2`` features).
    """

    def __init__(self, kind: str, heads: int, d: int, *, n_features: int | None = None) -> None:
        super().__init__()
        self.kind = check_choice("feature_map", kind, FEATURE_MAPS)
        self.heads, self.d = heads, d
        if kind == "performer":
            self.n_features = check_int("n_features", n_features if n_features is not None else 2 * d)
            self.register_buffer("omega", _orthogonal_features(heads, self.n_features, d))
        if kind == "taylor":
            i, j = torch.triu_indices(d, d)
            self.register_buffer("tri_i", i, persistent=False)
            self.register_buffer("tri_j", j, persistent=False)
            self.register_buffer("tri_diag", i == j, persistent=False)

    @property
    def out_dim(self) -> int:
        if self.kind == "performer":
            return self.n_features
        if self.kind == "taylor":
            return 1 + self.d + self.d * (self.d + 1) // 2
        return self.d

    def redraw(self) -> None:
        """Draw new random features (performer)."""
        if self.kind == "performer":
            self.omega.copy_(_orthogonal_features(self.heads, self.n_features, self.d).to(self.omega))

    def forward(self, x: torch.Tensor, *, query: bool = False, stabilise: bool = False) -> torch.Tensor:
        k = self.kind
        if k == "identity":
            return x
        if k == "elu":
            return F.elu(x) + 1
        if k == "relu":
            return F.relu(x)
        if k == "silu":
            return F.silu(x)
        if k == "taylor":
            xs = x / self.d ** 0.25
            off = 1.0 / math.sqrt(self.d)
            coef = self.tri_diag.to(x.dtype) * (1.0 / math.sqrt(2 * self.d) - off) + off
            quad = x[..., self.tri_i] * x[..., self.tri_j] * coef
            return torch.cat([torch.ones_like(x[..., :1]), xs, quad], dim=-1)
        xs = x / self.d ** 0.25
        proj = torch.einsum("bhnd,hmd->bhnm", xs, self.omega.to(x.dtype)) - xs.pow(2).sum(-1, keepdim=True) / 2
        if query and stabilise:
            proj = proj - proj.amax(-1, keepdim=True).detach()
        return proj.exp() / math.sqrt(self.n_features)

    def extra_repr(self) -> str:
        return f"{self.kind}, d={self.d}, out_dim={self.out_dim}"


def pool_matrix(n: int, n_out: int, keep: torch.Tensor | None, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Adaptive average pooling of ``n`` tokens into ``n_out`` as a matrix ``[B or 1, n_out, n]``.

    Segment ``i`` covers ``[floor(i n / n_out), ceil((i+1) n / n_out))`` (``adaptive_avg_pool1d``'s
    bins); with ``keep`` the mean runs over kept tokens only (an all-padded bin pools to 0).
    """
    i = torch.arange(n_out, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    start, end = (i * n) // n_out, -((-(i + 1) * n) // n_out)
    inside = ((j >= start) & (j < end)).to(dtype).unsqueeze(0)  # [1, n_out, n]
    if keep is not None:
        inside = inside * keep.to(dtype).unsqueeze(1)
    return inside / inside.sum(-1, keepdim=True).clamp(min=1)


class DepthwiseConv(nn.Module):
    """Non-causal depthwise 1-D convolution over tokens ('same' padding), for the local terms."""

    def __init__(self, channels: int, kernel: int = 3, *, name: str = "kernel") -> None:
        super().__init__()
        if check_int(name, kernel) % 2 == 0:  # 'same' padding needs a centre tap: an even kernel gives N + 1 outputs
            raise ValueError(f"{name}: expected an odd kernel size, got {kernel}")
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # [B, N, C]
        return self.conv(v.transpose(1, 2)).transpose(1, 2)


def inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))
