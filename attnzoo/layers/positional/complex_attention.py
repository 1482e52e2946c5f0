"""``complex_attention``: ComplexFormer: polar q/k with head-specific angle adaptation and relative-
position rotation.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.positional._common import FAMILY, rand_qk
from attnzoo.layers.rotary import RotaryEmbedding
from attnzoo.registry import Reduction, register


class ComplexRotation(nn.Module):
    """ComplexFormer-style head-specific complex attention, as a q/k transform.

    Channel pairs of q and k become polar complex numbers ``r·e^{iφ}`` (Euler transform).
    The score of a pair is ``Σ_c r_q r_k cos(Adapt_h(φ_q − φ_k) + Δ_h(m − n))`` with a
    head-specific linear ``Adapt_h(a) = α_h·a`` and ``Δ_h(P) = β_h·ω_c·P`` (``ω_c`` the
    RoPE frequencies). Because both are linear the score factorises, so q and k are
    rotated to ``r·e^{i(α_h φ + β_h ω_c·pos)}`` and any attention backend runs it; a
    nonlinear Adapt (which the paper allows; its exact form is not in the abstract) would
    need O(N²d) memory and is not implemented. ``α = β = 1`` is exactly ``rope``.
    """

    def __init__(self, head_dim: int, n_heads: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.n_heads = check_int("head_dim", head_dim), check_int("n_heads", n_heads)
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even integer, got {head_dim}")
        self.alpha = nn.Parameter(torch.ones(n_heads))
        self.beta = nn.Parameter(torch.ones(n_heads))
        inv = float(base) ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def transform(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, H', N, D]`` (``H'`` divides ``n_heads``; kv heads use the group's first head)."""
        h = x.shape[1]
        idx = torch.arange(h, device=x.device) * (self.n_heads // h)
        alpha = self.alpha[idx].to(x.dtype).view(1, h, 1, 1)
        beta = self.beta[idx].to(x.dtype).view(1, h, 1, 1)
        half = self.head_dim // 2
        a, b = x[..., :half], x[..., half:]
        r = torch.sqrt(a * a + b * b + torch.finfo(x.dtype).tiny)
        phi = torch.atan2(b, a)
        ang = alpha * phi + beta * (pos.to(torch.float64).unsqueeze(-1) * self.inv_freq).to(x.dtype)
        return torch.cat([r * torch.cos(ang), r * torch.sin(ang)], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, q_offset: int = 0,
                k_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed ``(q, k)``, same shapes."""
        if k.shape[1] != q.shape[1] and (q.shape[1] % k.shape[1]):
            raise ValueError("k: kv heads must divide query heads")
        if k.shape[1] != q.shape[1]:
            raise ValueError("complex_attention: needs n_kv_heads == n_heads (Adapt is head-specific)")
        qp = torch.arange(q_offset, q_offset + q.shape[2], device=q.device)
        kp = torch.arange(k_offset, k_offset + k.shape[2], device=k.device)
        return self.transform(q, qp), self.transform(k, kp)


def _complex_is_rope() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk()
    c = ComplexRotation(8, 3).double()
    a = c(q, k, q_offset=3, k_offset=3)
    b = RotaryEmbedding(8)(q, k, q_offset=3, k_offset=3)
    return a[0] @ a[1].transpose(-1, -2), b[0] @ b[1].transpose(-1, -2)


def _complex_relative() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk()
    torch.manual_seed(0)
    c = ComplexRotation(8, 3).double()
    with torch.no_grad():
        c.alpha.uniform_(0.5, 1.5)
        c.beta.uniform_(0.5, 1.5)
    a, b = c(q, k), c(q, k, q_offset=9, k_offset=9)
    return b[0] @ b[1].transpose(-1, -2), a[0] @ a[1].transpose(-1, -2)


register(
    "complex_attention", family=FAMILY, type="score_mod", priority=3, papers=("ComplexFormer",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N d)",
    reference="the host mha with backend='reference' in float64",
    summary="ComplexFormer: polar q/k with head-specific angle adaptation and relative-position rotation.",
    test_kwargs={"head_dim": 8, "n_heads": 4}, host=lambda m: {"rope": m},
    reductions=(
        Reduction("adapt_identity_is_rope", "Adapt = identity with a linear Δ (α = β = 1) is rope", _complex_is_rope),
        Reduction("relative_only", "positions enter only through m − n", _complex_relative),
    ),
)(ComplexRotation)
