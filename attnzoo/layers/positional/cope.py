"""``cope``: Contextual position encoding: positions are sums of sigmoid gates, interpolated embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int
from attnzoo.layers.positional._common import FAMILY, HOST_SUPPORT, rand_qk
from attnzoo.registry import Reduction, register


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
    q, k = rand_qk(n=6)
    c = ContextualPosition(8).double()
    c.gate = torch.ones_like
    p = c.positions(q, k, None, 0.3)
    i, j = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    want = torch.where(j <= i, (i - j + 1).to(torch.float64), torch.zeros((), dtype=torch.float64))
    return p, want.expand_as(p)


def _cope_monotone() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk(n=7)
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


register(
    "cope", family=FAMILY, type="score_mod", priority=2, papers=("CoPE",), supports=HOST_SUPPORT,
    reference="the host mha with backend='reference' in float64",
    summary="Contextual position encoding: positions are sums of sigmoid gates, interpolated embeddings.",
    test_kwargs={"head_dim": 8, "npos_max": 8, "init_std": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("gates_one_relative", "all gates = 1 gives p_ij = i − j + 1 (relative positions)", _cope_ones),
        Reduction("non_increasing", "p_ij is non-increasing in j", _cope_monotone),
        Reduction("zero_table_noop", "a zero position table leaves mha unchanged", _cope_zero_table),
    ),
)(ContextualPosition)
