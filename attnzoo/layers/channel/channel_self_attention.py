"""``channel_self_attention``: transposed (channel) self-attention, channels as tokens, a ``C_g x C_g`` map per group.

Per channel group g (``groups`` of ``C_g = C / groups`` channels): ``Q, K, V = X W_q, X W_k, X W_v``
(``projections=False``: all equal to X, DANet-style), ``A = act(tau * Q̂^T K̂)`` ``[C_g, C_g]``
computed over all N positions, ``out = V A^T`` ``[N, C_g]``; the groups are concatenated and
projected by ``W_o`` (when ``projections``). ``l2norm``: Q̂ and K̂ are Q and K L2-normalised over the
positions with a learnable temperature ``tau`` per group (MDTA / Restormer); without it ``tau`` is
``1 / sqrt(N)``. ``act="softmax"`` (DaViT channel-group attention, MDTA) or ``"relu"`` (DLGSANet's
SparseGSA: negative similarities become exact zeros, rows are not normalised). ``gamma``: the
output is ``x + gamma * out`` (the multi-scale guided attention paper's residual; ``gamma = 0``
is the identity). Padded positions are left out of every sum over N and their output rows are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.channel._common import FAMILY
from attnzoo.registry import Reduction, register

__all__ = ["ChannelSelfAttention", "ACTS"]

ACTS = ("softmax", "relu")


class ChannelSelfAttention(nn.Module):
    """Channel self-attention token mixer ``[B, N, C] -> [B, N, C]`` (``mask`` bool ``[B, N]``)."""

    def __init__(self, dim: int, groups: int = 4, *, projections: bool = True, l2norm: bool = True,
                 act: str = "softmax", gamma: float | None = None, learn_gamma: bool = False) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.groups = check_int("groups", groups)
        if dim % groups:
            raise ValueError(f"groups: must divide dim={dim}, got groups={groups}")
        self.act = check_choice("act", act, ACTS)
        self.projections, self.l2norm = bool(projections), bool(l2norm)
        if projections:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.o = nn.Linear(dim, dim)
        if l2norm:
            self.temperature = nn.Parameter(torch.ones(groups))
        if gamma is None and learn_gamma:
            raise ValueError("learn_gamma: needs an initial gamma (e.g. gamma=0.0)")
        self.gamma = None if gamma is None else nn.Parameter(torch.tensor(float(gamma)), requires_grad=learn_gamma)

    def attention_map(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The maps ``A`` ``[B, groups, C_g, C_g]``."""
        return self._attend(x, mask)[1]

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        x = zero_padded(x, mask)
        if self.projections:
            q, k, v = (zero_padded(t, mask) for t in self.qkv(x).chunk(3, -1))
        else:
            q = k = v = x
        split = (self.groups, c // self.groups)
        q, k, v = (t.unflatten(-1, split).permute(0, 2, 3, 1) for t in (q, k, v))     # [B, G, C_g, N]
        if self.l2norm:
            q, k = F.normalize(q, dim=-1, eps=1e-12), F.normalize(k, dim=-1, eps=1e-12)
            scale = self.temperature.to(x.dtype).view(1, -1, 1, 1)
        else:
            kept = torch.full((b,), n, device=x.device) if mask is None else mask.sum(1).clamp(min=1)
            scale = kept.to(x.dtype).rsqrt().view(-1, 1, 1, 1)
        s = (q @ k.transpose(-1, -2)) * scale                                          # [B, G, C_g, C_g]
        a = torch.softmax(s.float() if s.dtype == torch.bfloat16 else s, -1).to(s.dtype) if self.act == "softmax" \
            else torch.relu(s)
        out = (a @ v).permute(0, 3, 1, 2).flatten(-2)                                  # [B, N, C]
        if self.projections:
            out = self.o(out)
        return out, a

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``mask`` bool ``[B, N]``, True = keep (padding gets no weight and
        comes out as zeros). ``causal`` and ``context`` are refused (every output channel reads all N)."""
        check_mixer_input(x, mask, None, self.dim)
        if causal:
            raise ValueError("causal: channel_self_attention sums over every position; it has no causal form")
        if context is not None:
            raise ValueError("context: channel_self_attention is a self-attention mixer; it takes no context")
        out, _ = self._attend(x, mask)
        if self.gamma is not None:
            out = x + self.gamma.to(x.dtype) * out
        return zero_padded(out, mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, act={self.act!r}, l2norm={self.l2norm}"


def _x(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gamma0_is_identity() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ChannelSelfAttention, dim=8, groups=2, gamma=0.0)
    x = _x()
    return m(x), x


def _softmax_is_mdta() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ChannelSelfAttention, dim=8, groups=2, act="relu")
    mdta = seeded(ChannelSelfAttention, dim=8, groups=2, act="softmax")
    mdta.load_state_dict(m.state_dict())
    x = _x()
    q, k, v = mdta.qkv(x).chunk(3, -1)
    outs = []
    for g in range(2):
        sl = slice(4 * g, 4 * g + 4)
        qh, kh = F.normalize(q[..., sl], dim=1), F.normalize(k[..., sl], dim=1)
        a = torch.softmax(mdta.temperature[g] * qh.transpose(1, 2) @ kh, -1)
        outs.append(v[..., sl] @ a.transpose(1, 2))
    m.act = "softmax"
    return m(x), mdta.o(torch.cat(outs, -1))


def _spatial_permutation() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ChannelSelfAttention, dim=8, groups=2, act="relu", l2norm=False, gamma=0.5)
    x = _x()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    return m(x[:, perm]), m(x)[:, perm]


register(
    "channel_self_attention", family=FAMILY, type="mixer", priority=2, input_kind="sequence",
    papers=("DaViT", "DLGSANet", "Multi-scale self-guided attention"), supports={"self", "padding"},
    complexity="O(N C^2 / groups)", backends=(), reference="the same module in float64", reference_kwargs={},
    test_kwargs={"dim": 32, "groups": 4},
    summary="Transposed (channel) attention: a C_g x C_g map per channel group over all positions, softmax (DaViT, "
            "MDTA with L2-normalised Q/K and a learned temperature) or ReLU (DLGSANet), optional x + gamma * out.",
    reductions=(
        Reduction("gamma0_is_identity", "gamma = 0 is the identity", _gamma0_is_identity),
        Reduction("relu_to_softmax_is_mdta", "the ReLU variant with act switched to softmax equals MDTA",
                  _softmax_is_mdta),
        Reduction("spatial_permutation", "equivariant to permuting the spatial positions", _spatial_permutation),
    ),
)(ChannelSelfAttention)
