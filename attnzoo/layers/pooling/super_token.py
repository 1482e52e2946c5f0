"""``super_token``: SViT super-token attention, soft clustering into super tokens, MHSA on them, mapping back.

On a channels-last grid ``[B, H, W, C]`` (``[B, N, C]`` as a 1 x N grid) with super-token stride
``s`` (H and W multiples of s): super tokens start as the ``s x s`` cell averages [recalled]. Each
token is associated with the (up to) 9 super tokens of the 3 x 3 cells around its own:
``Q_ij = softmax_j(x_i . S_j / sqrt(C))`` over those candidates. ``n_iter`` soft k-means steps set
``S_j = sum_i Q_ij x_i / sum_i Q_ij`` (column-normalised); then ``S' = MHSA(S)`` and
``X'_i = sum_j Q_ij S'_j``. Cost linear in N for a fixed stride.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY
from attnzoo.registry import Reduction, register

__all__ = ["SuperTokenAttention"]

_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


class SuperTokenAttention(nn.Module):
    """Super-token attention mixer ``[B, H, W, C]`` (or ``[B, N, C]``) -> same shape."""

    def __init__(self, dim: int, n_heads: int = 4, *, stride: int = 2, n_iter: int = 1, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.stride = check_int("stride", stride)
        self.n_iter = check_int("n_iter", n_iter, minimum=0)
        self.attn = MultiHeadAttention(dim, n_heads, backend=backend)

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-1] != self.dim:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, N, {self.dim}] or [B, H, W, {self.dim}] (1 or 2 spatial axes), "
                             f"got {got}")
        g = x.unsqueeze(1) if x.dim() == 3 else x
        hs = 1 if x.dim() == 3 else self.stride
        if g.shape[1] % hs or g.shape[2] % self.stride:
            raise ValueError(f"x: grid extent {tuple(g.shape[1:3])} must be a multiple of the stride "
                             f"{(hs, self.stride)}")
        return g, hs, self.stride

    def _candidates(self, s: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
        """The 9 candidate super tokens of every token: ``[B, H, W, 9, C]`` (zeros outside the grid)."""
        sp = F.pad(s, (0, 0, 1, 1, 1, 1))
        h, w = s.shape[1], s.shape[2]
        out = [sp[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr, dc in _OFFSETS]
        return torch.stack(out, 3).repeat_interleave(hs, 1).repeat_interleave(ws, 2)

    def _valid(self, h: int, w: int, hs: int, ws: int, device: torch.device) -> torch.Tensor:
        r, c = torch.arange(h, device=device), torch.arange(w, device=device)
        ok = [((r + dr >= 0) & (r + dr < h))[:, None] & ((c + dc >= 0) & (c + dc < w))[None] for dr, dc in _OFFSETS]
        return torch.stack(ok, -1).repeat_interleave(hs, 0).repeat_interleave(ws, 1)   # [H, W, 9]

    def association(self, g: torch.Tensor, s: torch.Tensor, hs: int, ws: int) -> torch.Tensor:
        """``Q`` ``[B, H, W, 9]``: each token's softmax over its candidate super tokens (rows sum to 1)."""
        cand = self._candidates(s, hs, ws)
        logits = (g.unsqueeze(3) * cand).sum(-1) / math.sqrt(self.dim)
        valid = self._valid(s.shape[1], s.shape[2], hs, ws, g.device)
        return torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)

    def _update(self, g: torch.Tensor, q: torch.Tensor, hs: int, ws: int, h: int, w: int) -> torch.Tensor:
        b, c = g.shape[0], g.shape[-1]
        num = g.new_zeros(b, h + 2, w + 2, c)
        den = g.new_zeros(b, h + 2, w + 2, 1)
        for o, (dr, dc) in enumerate(_OFFSETS):
            qo = q[..., o:o + 1]
            blk = (qo * g).view(b, h, hs, w, ws, c).sum((2, 4))
            num[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] += blk
            den[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] += qo.view(b, h, hs, w, ws, 1).sum((2, 4))
        num, den = num[:, 1:-1, 1:-1], den[:, 1:-1, 1:-1]
        return num / torch.where(den > 0, den, torch.ones_like(den))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``x``; ``mask``, ``causal`` and ``context`` are refused (the clustering reads every token)."""
        if mask is not None:
            raise ValueError("mask: super_token clusters every grid cell; padding is not supported")
        if causal:
            raise ValueError("causal: super_token's clustering reads the whole grid; it has no causal form")
        if context is not None:
            raise ValueError("context: super_token is a self-attention mixer; it takes no context")
        g, hs, ws = self._grid(x)
        b, hh, ww, c = g.shape
        h, w = hh // hs, ww // ws
        s = g.view(b, h, hs, w, ws, c).mean((2, 4))
        for _ in range(self.n_iter):
            s = self._update(g, self.association(g, s, hs, ws), hs, ws, h, w)
        q = self.association(g, s, hs, ws)
        s2 = self.attn(s.reshape(b, h * w, c)).view(b, h, w, c)
        out = (q.unsqueeze(-1) * self._candidates(s2, hs, ws)).sum(3)
        return out.view_as(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, stride={self.stride}, n_iter={self.n_iter}"


def _one_super_token() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SuperTokenAttention, dim=8, n_heads=2, stride=4, backend="reference")
    x = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = x.mean((1, 2))
    want = m.attn.o_proj(m.attn.v_proj(mean))[:, None, None].expand_as(x)
    return m(x), want


register(
    "super_token", family=FAMILY, type="mixer", priority=3, input_kind="grid2d",
    papers=("SViT (super token attention)",), supports={"self"}, complexity="O(N (9 + (N / s^2)^2 / N))",
    reference="the same module with its MHSA on backend='reference' in float64",
    reference_kwargs={"backend": "reference"}, test_kwargs={"dim": 32, "n_heads": 4, "stride": 2},
    summary="SViT super-token attention: tokens softly assigned to the 3 x 3 neighbouring super tokens (soft "
            "k-means refinement), MHSA among the super tokens, mapped back by the association.",
    reductions=(Reduction("one_super_token", "one super token (stride = the grid) gives every token W_O W_V mean(X)",
                          _one_super_token),),
)(SuperTokenAttention)
