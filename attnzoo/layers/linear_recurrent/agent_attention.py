"""``agent_attention``: Agent attention: softmax aggregation into n pooled agent tokens, then softmax broadcast back."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, head_dim_for, zero_padded
from attnzoo.layers.linear_recurrent._common import FAMILY, DepthwiseConv, pool_matrix, rand_x
from attnzoo.layers.recurrent import merge_heads, split_heads
from attnzoo.ops import attention
from attnzoo.ops.linear import linear_attention
from attnzoo.patterns import KeyPadding
from attnzoo.registry import Reduction, register


class AgentAttention(nn.Module):
    """Agent attention: two softmax attentions through ``n_agents`` agent tokens.

    Agents ``A`` = adaptive average pooling of the queries over the sequence ([code/recalled]:
    the official model pools a 2-D query map). Aggregation ``V_A = softmax(A Kᵀ/√d) V``,
    broadcast ``O = softmax(Q Aᵀ/√d) V_A``: linear attention with ``φ(Q) = softmax(QAᵀ)``
    and ``φ(K) = softmax(AKᵀ)ᵀ``, cost ``O(N n d)``. ``dwc`` adds a depthwise convolution of
    ``V`` (kernel ``dwc_kernel``) to the output [recalled]; the official agent biases are not
    included. Non-causal; padded keys are masked and padded queries are left out of the pooling.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, n_agents: int = 16, head_dim: int | None = None,
                 dwc: bool = True, dwc_kernel: int = 3, bias: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = head_dim_for(dim, n_heads, head_dim)
        self.n_agents = check_int("n_agents", n_agents)
        width = n_heads * self.head_dim
        self.q_proj = nn.Linear(dim, width, bias=bias)
        self.k_proj = nn.Linear(dim, width, bias=bias)
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.o_proj = nn.Linear(width, dim, bias=bias)
        self.dwc = DepthwiseConv(width, dwc_kernel, name="dwc_kernel") if dwc else None
        self.backend = backend

    def agents(self, q: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``A`` ``[B, H, n, D]`` pooled from ``q`` ``[B, H, N, D]``."""
        pool = pool_matrix(q.shape[2], self.n_agents, keep, q.dtype, q.device)  # [B|1, n, N]
        return pool.unsqueeze(1) @ q

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None, return_weights: bool = False) -> Any:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (and the composite weights ``[B, H, N, N]``).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if causal or context is not None or cache is not None:
            raise ValueError("causal/context/cache: agent_attention is non-causal self-attention (agents pool "
                             "every query)")
        h = self.n_heads
        v_flat = zero_padded(self.v_proj(x), mask)
        q, k, v = split_heads(self.q_proj(x), h), split_heads(self.k_proj(x), h), split_heads(v_flat, h)
        a = self.agents(q, mask)
        pattern = KeyPadding(mask) if mask is not None and not bool(mask.all()) else None
        backend = "reference" if return_weights else self.backend
        res = attention(a, k, v, pattern=pattern, backend=backend, return_weights=return_weights)
        v_a, w_agg = res if return_weights else (res, None)
        res = attention(q, a, v_a, backend=backend, return_weights=return_weights)
        o, w_bc = res if return_weights else (res, None)
        o = merge_heads(o)
        if self.dwc is not None:
            o = o + self.dwc(v_flat)
        y = zero_padded(self.o_proj(o), mask)
        return (y, w_bc @ w_agg) if return_weights else y


def _agent(seed: int = 0, **kw: Any) -> AgentAttention:
    torch.manual_seed(seed)
    return AgentAttention(**{"dim": 32, "n_heads": 4, "n_agents": 4, "dwc": False, **kw}).double()


def _agent_rows_sum_to_one() -> tuple[torch.Tensor, torch.Tensor]:
    _, w = _agent()(rand_x(), return_weights=True)
    return w.sum(-1), torch.ones(w.shape[:-1], dtype=torch.float64)


def _agent_one_agent() -> tuple[torch.Tensor, torch.Tensor]:
    m = _agent(n_agents=1)
    y = m(rand_x())
    return y, y[:, :1].expand_as(y)


def _agent_is_linear_attention() -> tuple[torch.Tensor, torch.Tensor]:
    """φ(Q) = softmax(QAᵀ/√d), φ(K) = softmax(AKᵀ/√d)ᵀ in (non-causal) linear attention."""
    m = _agent()
    x = rand_x()
    q, k, v = (split_heads(p(x), 4) for p in (m.q_proj, m.k_proj, m.v_proj))
    a = m.agents(q, None)
    s = 1 / math.sqrt(m.head_dim)
    phi_q = torch.softmax(q @ a.transpose(-1, -2) * s, -1)
    phi_k = torch.softmax(a @ k.transpose(-1, -2) * s, -1).transpose(-1, -2)
    return m(x), m.o_proj(merge_heads(linear_attention(phi_q, phi_k, v, causal=False)))


register(
    "agent_attention", family=FAMILY, type="mixer", priority=2, papers=("Agent Attention",),
    supports={"self", "padding"}, complexity="O(N n d)", backends=("reference", "sdpa", "flex", "blocksparse"),
    test_kwargs={"dim": 32, "n_heads": 4, "n_agents": 4},
    summary="Agent attention: softmax aggregation into n pooled agent tokens, then softmax broadcast back.",
    reductions=(
        Reduction("rows_sum_to_one", "rows of softmax(QAᵀ)·softmax(AKᵀ) sum to 1 (outputs in the convex hull of V)",
                  _agent_rows_sum_to_one),
        Reduction("one_agent", "with n = 1 every query gets the same output", _agent_one_agent),
        Reduction("is_linear_attention", "equals linear attention with φ(Q)=softmax(QAᵀ), φ(K)=softmax(AKᵀ)ᵀ",
                  _agent_is_linear_attention),
    ),
)(AgentAttention)
