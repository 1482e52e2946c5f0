"""Rotary position embedding (RoPE), shared by every mixer that takes ``rope``; the ``rope`` entry registers it."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int


def _positions(n: int, offset: int | torch.Tensor, pos: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if pos is not None:
        return pos.to(device)
    if isinstance(offset, torch.Tensor):
        return offset.to(device).view(-1, 1) + torch.arange(n, device=device)
    return torch.arange(offset, offset + n, device=device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) applied to q and k.

    ``q̃_m = R(m·θ) q_m`` with ``θ_i = base^(−2i/rotary_dim)`` on channel pairs of the first
    ``rotary_dim`` channels (the rest pass unchanged). Pairs are ``(x_i, x_{i + r/2})``
    (GPT-NeoX "half" layout) or adjacent ``(x_{2i}, x_{2i+1})`` with ``interleaved=True``.
    ``scaling`` divides positions (linear position interpolation). Positions are
    ``offset + arange(N)`` (``offset`` int or ``[B]``, the KV-cache length) or explicit
    ``pos`` ``[N]`` / ``[B, N]``. No parameters; frequencies are computed in float64.

    Call: ``rope(q, k, q_offset=0, k_offset=0)`` with ``q`` ``[B, H, N, D]``, ``k``
    ``[B, H_kv, M, D]`` returns the rotated pair; pass it to ``mha(..., rope=...)``.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, rotary_dim: int | None = None,
                 scaling: float = 1.0, interleaved: bool = False) -> None:
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim)
        rotary_dim = head_dim if rotary_dim is None else check_int("rotary_dim", rotary_dim)
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim: expected an even integer <= head_dim={head_dim}, got {rotary_dim}")
        if not base > 0 or not scaling > 0:
            raise ValueError(f"base, scaling: expected positive numbers, got base={base!r}, scaling={scaling!r}")
        self.rotary_dim, self.base, self.scaling = rotary_dim, float(base), float(scaling)
        self.interleaved = interleaved
        inv = self.base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _angles(self, pos: torch.Tensor) -> torch.Tensor:
        return (pos.to(torch.float64) / self.scaling).unsqueeze(-1) * self.inv_freq.to(torch.float64)

    def rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, N, D]`` at positions ``pos`` ``[N]`` or ``[B, N]``."""
        ang = self._angles(pos)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        if cos.dim() == 3:  # [B, N, r/2]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        r = self.rotary_dim
        xr, rest = x[..., :r], x[..., r:]
        if self.interleaved:
            a, b = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        else:
            a, b = xr[..., : r // 2], xr[..., r // 2:]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, q_offset: int | torch.Tensor = 0,
                k_offset: int | torch.Tensor = 0, q_pos: torch.Tensor | None = None,
                k_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``(q, k)``, same shapes."""
        qp = _positions(q.shape[2], q_offset, q_pos, q.device)
        kp = _positions(k.shape[2], k_offset, k_pos, k.device)
        return self.rotate(q, qp), self.rotate(k, kp)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, scaling={self.scaling}"
