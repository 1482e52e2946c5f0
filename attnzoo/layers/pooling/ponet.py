"""``ponet``: PoNet, a linear-time multi-granularity pooling token mixer.

Six projections ``H_1..H_6`` of X feed three branches [recalled from the PoNet paper; the exact
fusion is not in the abstract]: global aggregation (``g = mean(H_1)`` over the kept tokens
attends over keys ``H_2`` and values ``H_3``, giving ``g'``; ``o^G_i = H_4,i * g'``), segment
max-pooling (``s_k = max`` of ``H_5`` over segment k of ``segment`` tokens; ``o^S_i = H_4,i * s_{k(i)}``)
and local max-pooling (``o^L_i = max`` of ``H_6`` over a ``window`` centred at i). The output is
``W_o (o^G + o^S + o^L)``. O(N); padded tokens are left out of every pooling and give zero rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, zero_padded
from attnzoo.layers.pooling._common import FAMILY, masked_softmax
from attnzoo.registry import Reduction, register

__all__ = ["PoNet"]

_NEG = float("-inf")


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


class PoNet(nn.Module):
    """PoNet mixer ``[B, N, C] -> [B, N, C]``; :meth:`branches` returns ``(o^G, o^S, o^L)``."""

    def __init__(self, dim: int, *, segment: int = 16, window: int = 3) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.segment = check_int("segment", segment)
        self.window = check_int("window", window)
        if window % 2 == 0:
            raise ValueError(f"window: expected an odd size (centred), got {window}")
        self.proj = nn.Linear(dim, 6 * dim)
        self.o = nn.Linear(dim, dim)

    def branches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The global, segment and local branch outputs, each ``[B, N, C]``."""
        check_mixer_input(x, mask, None, self.dim)
        b, n, c = x.shape
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        x = x.masked_fill(~keep.unsqueeze(-1), 0)
        h1, h2, h3, h4, h5, h6 = self.proj(x).chunk(6, -1)
        kf = keep.unsqueeze(-1).to(x.dtype)
        g = (h1 * kf).sum(1) / kf.sum(1).clamp(min=1)                                   # [B, C]
        a = masked_softmax((h2 @ g.unsqueeze(-1))[..., 0] / math.sqrt(c), keep, 1)      # [B, N]
        o_g = h4 * torch.einsum("bn,bnc->bc", a, h3).unsqueeze(1)
        seg = self.segment
        pad = (-n) % seg
        h5m = F.pad(h5.masked_fill(~keep.unsqueeze(-1), _NEG), (0, 0, 0, pad), value=_NEG)
        s = _finite(h5m.view(b, -1, seg, c).amax(2))                                   # [B, N / seg, C]
        o_s = h4 * s.repeat_interleave(seg, 1)[:, :n]
        r = self.window // 2
        h6m = F.pad(h6.masked_fill(~keep.unsqueeze(-1), _NEG), (0, 0, r, r), value=_NEG)
        o_l = _finite(h6m.unfold(1, self.window, 1).amax(-1))
        return o_g, o_s, o_l

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``mask`` bool ``[B, N]``, True = keep (padding comes out as
        zeros and is never pooled). ``causal`` and ``context`` are refused."""
        if causal:
            raise ValueError("causal: ponet's global and segment branches read the whole sequence; no causal form")
        if context is not None:
            raise ValueError("context: ponet mixes the tokens of x only; it takes no context")
        o_g, o_s, o_l = self.branches(x, mask)
        return zero_padded(self.o(o_g + o_s + o_l), mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, segment={self.segment}, window={self.window}"


def _local_segment_locality() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = PoNet(8, segment=4, window=3).double()
    x = torch.randn(1, 12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, s1, l1 = m.branches(x)
    _, s2, l2 = m.branches(x2)
    # segment branch: positions 0..7 (segments 0 and 1) see no token of segment 2 beyond the H_4 factor of their own
    # token; local branch: positions 0..6 see only tokens <= 7
    return torch.cat([s1[:, :8], l1[:, :7]], 1), torch.cat([s2[:, :8], l2[:, :7]], 1)


register(
    "ponet", family=FAMILY, type="mixer", priority=3, input_kind="sequence", papers=("PoNet",),
    supports={"self", "padding"}, complexity="O(N)", backends=(), reference="the same module in float64",
    reference_kwargs={}, test_kwargs={"dim": 32, "segment": 4},
    summary="PoNet: global aggregation (a pooled query attending over the tokens), segment max-pooling and local "
            "max-pooling fused multiplicatively and additively; linear in N (fusion recalled, not in the abstract).",
    reductions=(Reduction("branch_locality", "the local and segment branches ignore tokens outside their window or "
                          "segment", _local_segment_locality),),
)(PoNet)
