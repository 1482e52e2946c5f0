"""Catalogue section 2, positional encodings: rotary embedding, learned relative bias, ComplexFormer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int
from attnzoo.ops.layout import Shape
from attnzoo.patterns import RelativePositionBias
from attnzoo.registry import Reduction, register

__all__ = ["ComplexRotation", "ContextualPosition", "RotaryEmbedding", "relative_position_bias", "rope"]

FAMILY = "positional"
HOST_SUPPORT = {"self", "causal", "padding", "decoding", "gqa"}


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


def _qk(seed: int = 0, d: int = 8, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64),
            torch.randn(2, 3, n, d, generator=g, dtype=torch.float64))


def _rope_shift() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk()
    outs = []
    for r in (RotaryEmbedding(8), RotaryEmbedding(8, rotary_dim=4, interleaved=True)):
        a = r(q, k)
        b = r(q, k, q_offset=37, k_offset=37)
        outs.append((a[0] @ a[1].transpose(-1, -2), b[0] @ b[1].transpose(-1, -2)))
    return torch.stack([o[1] for o in outs]), torch.stack([o[0] for o in outs])


def _rope_zero_identity() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk(n=1)
    return RotaryEmbedding(8)(q, k)[0], q


def _rope_norm() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk()
    return RotaryEmbedding(8)(q, k, q_offset=5)[0].norm(dim=-1), q.norm(dim=-1)


@register(
    "rope", family=FAMILY, type="score_mod", priority=1, papers=("baseline",), supports=HOST_SUPPORT,
    complexity="O(N d)", reference="the host mha with backend='reference' in float64",
    summary="Rotary position embedding on q/k (base, rotary_dim, scaling, KV-cache offsets).",
    test_kwargs={"head_dim": 8}, host=lambda m: {"rope": m},
    reductions=(
        Reduction("shift_invariant", "adding the same offset to every position leaves the scores unchanged",
                  _rope_shift),
        Reduction("position_zero_identity", "position 0 is the identity rotation", _rope_zero_identity),
        Reduction("norm_preserving", "rotations preserve the norm of q", _rope_norm),
    ),
)
def rope(head_dim: int, *, base: float = 10000.0, rotary_dim: int | None = None, scaling: float = 1.0,
         interleaved: bool = False) -> RotaryEmbedding:
    """Rotary position embedding (:class:`RotaryEmbedding`); use it as ``mha(..., rope=rope(head_dim))``."""
    return RotaryEmbedding(head_dim, base=base, rotary_dim=rotary_dim, scaling=scaling, interleaved=interleaved)


# ------------------------------------------------------------------ relative_position_bias
def _rpb_zero_noop() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, score_mod=RelativePositionBias(4, max_distance=8)).double()
    ref = MultiHeadAttention(32, 4).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "table" not in k})
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    return m(x, causal=True), ref(x, causal=True)


def _rpb_shift() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    rpb = RelativePositionBias(2, max_distance=5).double()
    nn.init.normal_(rpb.table)
    zero = torch.zeros((), dtype=torch.float64)
    q = torch.arange(6).view(-1, 1)
    kv = torch.arange(6).view(1, -1)
    h = torch.arange(2).view(-1, 1, 1)
    shape = Shape(1, 2, 6, 6)
    return rpb(zero, 0, h, q + 11, kv + 11, shape), rpb(zero, 0, h, q, kv, shape)


@register(
    "relative_position_bias", family=FAMILY, type="score_mod", priority=1, papers=("baseline",),
    supports=HOST_SUPPORT, complexity="O(N^2)", reference="the host mha with backend='reference' in float64",
    summary="Learned per-head relative-position bias: 1-D clipped table or 2-D (2M-1)^2 Swin table.",
    test_kwargs={"heads": 4, "max_distance": 8, "init_std": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("zero_table_noop", "an all-zero table is a no-op", _rpb_zero_noop),
        Reduction("shift_invariant", "scores are unchanged when all positions shift together", _rpb_shift),
    ),
)
def relative_position_bias(heads: int, *, max_distance: int = 128, grid: tuple[int, int] | None = None,
                           init_std: float = 0.0) -> RelativePositionBias:
    """:class:`attnzoo.patterns.RelativePositionBias` (zero table, or normal with ``init_std``)."""
    check_int("max_distance", max_distance)
    if grid is not None:
        if len(grid) != 2:
            raise ValueError(f"grid: expected (Wh, Ww), got {grid!r}")
        for i, g in enumerate(grid):
            check_int(f"grid[{i}]", g)
    m = RelativePositionBias(heads, max_distance=max_distance, grid=grid)
    if init_std:
        nn.init.normal_(m.table, std=init_std)
    return m


# ------------------------------------------------------------------------ complex_attention
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
    q, k = _qk()
    c = ComplexRotation(8, 3).double()
    a = c(q, k, q_offset=3, k_offset=3)
    b = RotaryEmbedding(8)(q, k, q_offset=3, k_offset=3)
    return a[0] @ a[1].transpose(-1, -2), b[0] @ b[1].transpose(-1, -2)


def _complex_relative() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk()
    torch.manual_seed(0)
    c = ComplexRotation(8, 3).double()
    with torch.no_grad():
        c.alpha.uniform_(0.5, 1.5)
        c.beta.uniform_(0.5, 1.5)
    a, b = c(q, k), c(q, k, q_offset=9, k_offset=9)
    return b[0] @ b[1].transpose(-1, -2), a[0] @ a[1].transpose(-1, -2)


@register(
    "complex_attention", family=FAMILY, type="score_mod", priority=3, papers=("ComplexFormer",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N d)",
    reference="the host mha with backend='reference' in float64",
    summary="ComplexFormer: polar q/k with head-specific angle adaptation and relative-position rotation.",
    test_kwargs={"head_dim": 8, "n_heads": 4}, host=lambda m: {"rope": m},
    reductions=(
        Reduction("adapt_identity_is_rope", "Adapt = identity with a linear Δ (α = β = 1) is rope", _complex_is_rope),
        Reduction("relative_only", "positions enter only through m − n", _complex_relative),
    ),
)
def complex_attention(head_dim: int, n_heads: int, *, base: float = 10000.0) -> ComplexRotation:
    """ComplexFormer complex attention (:class:`ComplexRotation`); use as ``mha(..., rope=...)``."""
    return ComplexRotation(head_dim, n_heads, base=base)



# ------------------------------------------------------------------------------------ cope
class ContextualPosition(nn.Module):
    """CoPE, contextual position encoding: positions counted by content gates.

    ``g_ij = σ(s_ij)`` with ``s_ij = q_i·k_j·scale``; ``p_ij = Σ_{t=j..i} g_it`` over keys
    at or before the query (``p_ij = 0`` for later keys, and padded keys count 0);
    ``p`` is clamped to ``npos_max − 1`` and ``e[p]`` interpolated between ``e[⌊p⌋]`` and
    ``e[⌈p⌉]``; the logit gets ``q_i·e[p_ij]``. Checked against the abstract (Golovneva et
    al.): "incrementing position only on certain tokens determined by the model" via
    context-dependent gates; the sigmoid gate and the interpolation are as in the
    catalogue [paper/code] and the official code's zero-initialised ``pos_emb``
    ``[head_dim, npos_max]`` shared by the heads. Used as ``mha(..., score_mod=cope)``:
    the host calls :meth:`from_qk` on every call (an additive bias, any backend).
    """

    def __init__(self, head_dim: int, *, npos_max: int = 16, init_std: float = 0.0) -> None:
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim)
        self.npos_max = check_int("npos_max", npos_max)
        self.pos_emb = nn.Parameter(torch.zeros(head_dim, npos_max))
        if init_std:
            nn.init.normal_(self.pos_emb, std=init_std)
        self.gate = torch.sigmoid

    def positions(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Contextual positions ``p`` ``[B, H, N, M]`` (queries are the last N of M tokens)."""
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        n, m = q.shape[2], k.shape[2]
        g = self.gate(torch.matmul(q, k.transpose(-1, -2)) * scale)
        allowed = torch.arange(m, device=q.device).view(1, -1) <= torch.arange(n, device=q.device).view(-1, 1) + m - n
        g = g * allowed
        if keep is not None:
            g = g * keep[:, None, None, :].to(g.dtype)
        return g.flip(-1).cumsum(-1).flip(-1)

    def from_qk(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, scale: float) -> Any:
        """An additive :class:`~attnzoo.patterns.Bias` ``[B, H, N, M]`` for this call."""
        from attnzoo.patterns import Bias

        p = self.positions(q, k, keep, scale).clamp(max=self.npos_max - 1)
        lo = p.floor()
        w = p - lo
        table = torch.matmul(q, self.pos_emb.to(q.dtype))  # [B, H, N, npos]
        e_lo = table.gather(-1, lo.long())
        e_hi = table.gather(-1, p.ceil().long())
        return Bias(e_hi * w + e_lo * (1 - w))

    def forward(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
        """The bias tensor ``[B, H, N, M]``."""
        return self.from_qk(q, k, keep, 1.0 / q.shape[-1] ** 0.5 if scale is None else scale).bias


def _cope_ones() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk(n=6)
    c = ContextualPosition(8).double()
    c.gate = torch.ones_like
    p = c.positions(q, k, None, 0.3)
    i, j = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    want = torch.where(j <= i, (i - j + 1).to(torch.float64), torch.zeros((), dtype=torch.float64))
    return p, want.expand_as(p)


def _cope_monotone() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _qk(n=7)
    p = ContextualPosition(8).double().positions(q, k, None, 0.35)
    ok = (p[..., 1:] <= p[..., :-1]).all().to(torch.float64)
    return ok, torch.tensor(1.0, dtype=torch.float64)


def _cope_zero_table() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, score_mod=ContextualPosition(8)).double()
    ref = MultiHeadAttention(32, 4).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "pos_emb" not in k})
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    return m(x, causal=True), ref(x, causal=True)


@register(
    "cope", family=FAMILY, type="score_mod", priority=2, papers=("CoPE",), supports=HOST_SUPPORT,
    reference="the host mha with backend='reference' in float64",
    summary="Contextual position encoding: positions are sums of sigmoid gates, interpolated embeddings.",
    test_kwargs={"head_dim": 8, "npos_max": 8, "init_std": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("gates_one_relative", "all gates = 1 gives p_ij = i − j + 1 (relative positions)", _cope_ones),
        Reduction("non_increasing", "p_ij is non-increasing in j", _cope_monotone),
        Reduction("zero_table_noop", "a zero position table leaves mha unchanged", _cope_zero_table),
    ),
)
def cope(head_dim: int, *, npos_max: int = 16, init_std: float = 0.0) -> ContextualPosition:
    """CoPE (:class:`ContextualPosition`); use as ``mha(..., score_mod=cope(head_dim))``."""
    return ContextualPosition(head_dim, npos_max=npos_max, init_std=init_std)
