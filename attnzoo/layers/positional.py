"""Catalogue section 2, positional encodings: rotary embedding, learned relative bias, ComplexFormer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import AttentionMixer, MultiHeadAttention, check_int, head_dim_for
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
    if init_std < 0:
        raise ValueError(f"init_std: expected a standard deviation >= 0, got {init_std}")
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
        if init_std < 0:
            raise ValueError(f"init_std: expected a standard deviation >= 0, got {init_std}")
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


# ------------------------------------------------------------------------------- rope_buckets
class AttentionBuckets(nn.Module):
    """Attention Buckets: an inference-time ensemble of one model run with several RoPE bases.

    The model runs once per base ``b`` in ``bases`` with every
    :class:`RotaryEmbedding` inside it re-based to ``b`` (restored afterwards), and the
    output distributions are averaged: ``p = mean_b softmax(model_b(...))`` over the last
    dimension. ``forward`` returns ``log p`` (logits whose softmax is the aggregated
    distribution), so it drops in wherever the model's logits were used. Checked against
    the abstract (Chen et al., Attention Buckets): "multiple parallel processes", "each ...
    a distinct base angle for the rotary position embedding", an attention trough of one
    compensated by a peak of another. The abstract does not say how the outputs are
    aggregated or which bases are used: the mean of the distributions is the catalogue's
    "aggregate the B output distributions", and the default bases ``(1, 1.25, 1.5, 1.75, 2)``
    times the model's own base are a choice made here. The runs are sequential (one
    forward per base); pass no KV caches through it (each base needs its own).
    """

    def __init__(self, model: nn.Module, bases: Any = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        ropes = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        if not ropes:
            raise ValueError("model: contains no RotaryEmbedding to re-base (rope_buckets steers RoPE models)")
        self.model = model
        if bases is None:
            bases = [ropes[0].base * f for f in (1.0, 1.25, 1.5, 1.75, 2.0)]
        bases = [float(b) for b in bases]
        if not bases or any(not b > 1.0 for b in bases):
            raise ValueError(f"bases: expected a non-empty list of RoPE bases > 1, got {bases!r}")
        self.bases = tuple(bases)

    def _ropes(self) -> list[RotaryEmbedding]:
        return [m for m in self.model.modules() if isinstance(m, RotaryEmbedding)]

    @staticmethod
    def _set_base(rope: RotaryEmbedding, base: float) -> None:
        rope.base = base
        d = rope.rotary_dim
        rope.inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=rope.inv_freq.device) / d)

    def bucket_logits(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The model's output under each base (the model is left as it was)."""
        ropes = self._ropes()
        saved = [(r.base, r.inv_freq) for r in ropes]
        outs = []
        try:
            for base in self.bases:
                for r in ropes:
                    self._set_base(r, base)
                outs.append(self.model(*args, **kwargs))
        finally:
            for r, (base, inv) in zip(ropes, saved):
                r.base, r.inv_freq = base, inv
        return outs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log mean_b softmax(model_b(*args, **kwargs))`` over the last dimension."""
        logps = torch.stack([torch.log_softmax(y, dim=-1) for y in self.bucket_logits(*args, **kwargs)])
        return torch.logsumexp(logps, dim=0) - math.log(len(self.bases))


def _tiny_lm(seed: int = 0, **kw: Any) -> nn.Module:
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(seed)
    return TinyLM(**kw).double()


def _tokens(b: int = 2, n: int = 9, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def _buckets_one_is_base() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    t = _tokens()
    steered = AttentionBuckets(lm, bases=[10000.0])
    return steered(t).exp(), torch.softmax(lm(t), -1)


def _buckets_distribution() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    p = AttentionBuckets(lm, bases=[5000.0, 10000.0, 40000.0])(_tokens()).exp()
    ok = (p >= 0).all().to(torch.float64)
    return torch.cat([p.sum(-1).flatten(), ok.view(1)]), torch.ones(p[..., 0].numel() + 1, dtype=torch.float64)


def _buckets_is_mean() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    t = _tokens()
    steered = AttentionBuckets(lm, bases=[3000.0, 10000.0, 30000.0])
    each = []
    for base in steered.bases:  # each bucket = a model built with that base
        other = _tiny_lm()
        for r in other.modules():
            if isinstance(r, RotaryEmbedding):
                AttentionBuckets._set_base(r, base)
        each.append(torch.softmax(other(t), -1))
    return steered(t).exp(), torch.stack(each).mean(0)


@register(
    "rope_buckets", family=FAMILY, type="steering", priority=3, papers=("Attention Buckets",),
    supports={"self", "causal", "padding"}, complexity="B x the model", backends=(),
    reference="the wrapped model's float64 reference (backend='reference'), run once per base",
    summary="Attention Buckets: run a RoPE model with several bases and average the output distributions.",
    test_kwargs={"bases": (10000.0, 20000.0, 40000.0)},
    reductions=(
        Reduction("one_bucket_is_base", "B = 1 with the default base gives the base model's distribution",
                  _buckets_one_is_base),
        Reduction("valid_distribution", "the aggregated output is a valid distribution (>= 0, rows sum to 1)",
                  _buckets_distribution),
        Reduction("mean_of_buckets", "the output is the mean of the distributions of models built with each base",
                  _buckets_is_mean),
    ),
)
def rope_buckets(model: nn.Module, *, bases: Any = None) -> AttentionBuckets:
    """Attention Buckets (:class:`AttentionBuckets`) around ``model`` (any module with RotaryEmbeddings)."""
    return AttentionBuckets(model, bases=bases)


# ------------------------------------------------------------------------------------ rcmha
def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-XL sinusoids ``[..., dim]``: ``[sin(p·f), cos(p·f)]`` with ``f_k = 10000^(−2k/dim)``."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    ang = pos.to(torch.float64).unsqueeze(-1) * inv
    return torch.cat([ang.sin(), ang.cos()], -1)[..., :dim]


class RelativeConvMHA(AttentionMixer):
    """RCMHA: relative convolutional multi-head attention.

    Q, K and V are each followed by a depthwise convolution along the sequence (one kernel
    of ``kernel_size`` taps per channel, Multi-DConv-Head style; causal, i.e. left-padded,
    by default), and the scores get a Transformer-XL relative-position term:
    ``s_ij = (q_i·k_j + u·k_j + (q_i + w)·W_R r_{i−j}) / √d`` with ``r`` the sinusoids of
    the distance, ``W_R`` a learned projection and ``u, w`` learned per-head vectors. The
    relative term is an additive score modifier built per call, so every backend runs it.
    Padded tokens are zeroed before the convolutions (nothing leaks from them).
    Convolution kernels start as the identity (delta) and ``u, w`` at zero.

    Checked against the abstract (RCMHA): "the application of the Depth-Wise Convolutional
    Layer to the input embedding, encompassing Query, Key, and Value parameters" and "the
    incorporation of Relative Positional Encoding into the attention scoring phase" in
    the manner of "Transformer-XL or Relative Multi-Head Attention (RMHA)". That the
    convolutions follow the projections (rather than precede them) is the catalogue's
    reading; kernel size 3 is the Primer MDHA choice, not from the abstract.
    ``conv_causal=False`` centres the kernels (then the layer is not causal and does not
    decode). KV-cache decoding keeps the last ``kernel_size − 1`` projections in the cache.
    """

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int = 3, conv_causal: bool = True,
                 head_dim: int | None = None, bias: bool = True, backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        super().__init__(dim, backend=backend)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.conv_causal = bool(conv_causal)
        if not conv_causal and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: a centred (conv_causal=False) kernel must be odd, got {kernel_size}")
        self.causal_ok = self.conv_causal
        width = n_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=bias)
        self.conv = nn.Conv1d(3 * width, 3 * width, kernel_size, groups=3 * width, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, kernel_size - 1 if conv_causal else kernel_size // 2] = 1.0
        self.o_proj = nn.Linear(width, dim, bias=bias)
        self.r_proj = nn.Linear(dim, width, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.w = nn.Parameter(torch.zeros(n_heads, head_dim))
        self._cache: Any = None
        self._keep: torch.Tensor | None = None

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None and not self.conv_causal:
            raise ValueError("cache: rcmha with conv_causal=False cannot decode (its kernels read later tokens)")
        self._cache, self._keep = cache, mask
        try:
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   cache=cache, head_mask=head_mask, return_weights=return_weights)
        finally:
            self._cache = self._keep = None

    def project(self, x, src):
        p = self.qkv(x)
        if self._keep is not None:
            p = p * self._keep.unsqueeze(-1).to(p.dtype)
        t = p.transpose(1, 2)  # [B, 3W, N]
        k = self.kernel_size
        if self.conv_causal:
            if self._cache is not None:
                self._cache.claim_batch(t.shape[0])
            tail = None if self._cache is None else self._cache.state.get("rcmha_tail")
            left = tail.to(t.dtype) if tail is not None else t.new_zeros(t.shape[0], t.shape[1], k - 1)
            full = torch.cat([left, t], -1)
            if self._cache is not None:
                self._cache.state["rcmha_tail"] = full[..., full.shape[-1] - (k - 1):] if k > 1 else full[..., :0]
        else:
            full = nn.functional.pad(t, (k // 2, k // 2))
        y = nn.functional.conv1d(full, self.conv.weight.to(t.dtype), groups=t.shape[1]).transpose(1, 2)
        q, kk, v = y.split(self.n_heads * self.head_dim, dim=-1)
        split = MultiHeadAttention.split
        return split(q, self.n_heads), split(kk, self.n_heads), split(v, self.n_heads)

    def score_mod_for(self, q, k):
        from attnzoo.patterns import Bias

        n, m = q.shape[2], k.shape[2]
        scale = 1.0 / math.sqrt(self.head_dim)
        dist = torch.arange(1 - n, m, device=q.device)  # every value of i_abs − j: (m − n) + i − j
        rel = self.r_proj(sinusoid(dist, self.dim).to(q.dtype))  # [D, H*d]
        rel = rel.view(-1, self.n_heads, self.head_dim).transpose(0, 1)  # [H, D, d]
        pos_term = torch.matmul(q + self.w.to(q.dtype).view(1, -1, 1, self.head_dim), rel.transpose(-1, -2))
        i = torch.arange(n, device=q.device).view(-1, 1)
        j = torch.arange(m, device=q.device).view(1, -1)
        idx = ((m - n) + i - j) - (1 - n)  # [N, M] into dist
        pos_term = pos_term.gather(-1, idx.expand(*pos_term.shape[:2], n, m))
        content = torch.matmul(self.u.to(q.dtype).view(1, -1, 1, self.head_dim), k.transpose(-1, -2))  # [B, H, 1, M]
        return Bias((pos_term + content) * scale)

    def output(self, z, x):
        return self.o_proj(MultiHeadAttention.merge(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, kernel_size={self.kernel_size}, causal={self.conv_causal}"


def _rcmha_to_mha(m: RelativeConvMHA) -> MultiHeadAttention:
    ref = MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim).double()
    w, b = m.qkv.weight.detach().chunk(3), m.qkv.bias.detach().chunk(3)
    ref.load_state_dict({"q_proj.weight": w[0], "q_proj.bias": b[0], "k_proj.weight": w[1], "k_proj.bias": b[1],
                         "v_proj.weight": w[2], "v_proj.bias": b[2], "o_proj.weight": m.o_proj.weight.detach(),
                         "o_proj.bias": m.o_proj.bias.detach()})
    return ref


def _rcmha_identity_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for conv_causal in (True, False):
        torch.manual_seed(0)
        m = RelativeConvMHA(32, 4, conv_causal=conv_causal).double()
        nn.init.zeros_(m.r_proj.weight)  # zero relative term (u = w = 0 at init); kernels start as deltas
        ref = _rcmha_to_mha(m)
        got.append(m(x))
        want.append(ref(x))
    return torch.stack(got), torch.stack(want)


def _rcmha_conv_causal() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = RelativeConvMHA(32, 4, kernel_size=4).double()
    with torch.no_grad():
        m.conv.weight.normal_()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    return torch.stack([t[:, :, :6] for t in m.project(x2, x2)]), torch.stack([t[:, :, :6] for t in m.project(x, x)])


def _rcmha_relative_form() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = RelativeConvMHA(32, 4).double()
    with torch.no_grad():
        m.u.normal_()
        m.w.normal_()
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, k, _ = m.project(x, x)
    bias = m.score_mod_for(q, k).bias
    want = torch.empty_like(bias)
    for h in range(4):
        for i in range(6):
            for j in range(6):
                r = m.r_proj(sinusoid(torch.tensor(float(i - j)), 32).double()).view(4, 8)[h]
                want[0, h, i, j] = (m.u[h] @ k[0, h, j] + (q[0, h, i] + m.w[h]) @ r) / math.sqrt(8)
    return bias, want


@register(
    "rcmha", family=FAMILY, type="mixer", priority=3, papers=("RCMHA",), supports={"self", "causal", "padding",
                                                                                  "decoding"},
    summary="MHA with depthwise convolutions after Q/K/V and a Transformer-XL relative-position score term.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3},
    reductions=(
        Reduction("identity_kernels_is_mha", "delta kernels and a zero relative term give mha (causal and centred)",
                  _rcmha_identity_is_mha),
        Reduction("causal_conv", "the causal depthwise convolution keeps Q/K/V at t independent of later tokens",
                  _rcmha_conv_causal),
        Reduction("relative_term", "the score term is (u·k_j + (q_i + w)·W_R r_{i−j})/√d (explicit loop)",
                  _rcmha_relative_form),
    ),
)
def rcmha(dim: int, n_heads: int = 8, *, kernel_size: int = 3, conv_causal: bool = True, head_dim: int | None = None,
          bias: bool = True, backend: str = "auto") -> RelativeConvMHA:
    """Relative convolutional MHA (:class:`RelativeConvMHA`)."""
    return RelativeConvMHA(dim, n_heads, kernel_size=kernel_size, conv_causal=conv_causal, head_dim=head_dim,
                           bias=bias, backend=backend)


__all__ += ["AttentionBuckets", "RelativeConvMHA", "rcmha", "rope_buckets", "sinusoid"]
