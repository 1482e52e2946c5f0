"""``delta_net``: DeltaNet / Gated DeltaNet: delta-rule linear attention, chunked WY form (alias gated_delta_net)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int, check_mixer_input, head_dim_for, seeded, zero_padded
from attnzoo.layers.linear_recurrent._common import (
    FAMILY,
    PARALLEL,
    REFERENCE,
    SMALL,
    FeatureMap,
    both_forms,
    check_form,
    inv_softplus,
    rand_x,
)
from attnzoo.layers.recurrent import HeadRMSNorm, ShortConv, cache_state, merge_heads, run_from_state, split_heads
from attnzoo.ops.linear import FORMS, delta_rule
from attnzoo.registry import Reduction, register


class DeltaNet(nn.Module):
    """DeltaNet and Gated DeltaNet: linear attention with the delta rule.

    ``S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ`` and ``o_t = S_t q_t / √d`` (catalogue
    notation), ``β_t = σ(x_t W_β)``; ``gate="scalar"`` (Gated DeltaNet) uses
    ``α_t = exp(−exp(A_log) · softplus(x_t W_α + dt_bias))`` per head, ``gate="none"`` α ≡ 1.
    ``q, k`` pass a short causal convolution + SiLU (``conv_size``; 0 disables it: then the
    ``qk_activation``) and an L2 norm (``qk_norm``); ``v`` the convolution + SiLU. Output: a
    per-head RMSNorm, times ``silu(x W_g)`` when ``output_gate`` (default: on for the gated
    variant), then ``W_O``. Layout and initialisations follow the ``flash-linear-attention``
    layers [recalled]; the chunked form is the WY representation (:func:`attnzoo.ops.linear.delta_rule`).
    """

    def __init__(self, dim: int, n_heads: int = 4, *, head_dim: int | None = None, gate: str = "none",
                 conv_size: int = 4, qk_activation: str = "silu", qk_norm: bool = True,
                 output_gate: bool | None = None, norm: bool = True, bias: bool = False, form: str = "chunked",
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = hd = head_dim_for(dim, n_heads, head_dim)
        self.gate = check_choice("gate", gate, ("none", "scalar"))
        self.form, self.chunk_size = check_form(form, chunk_size)
        self.qk_norm = bool(qk_norm)
        self.act = FeatureMap(check_choice("qk_activation", qk_activation, ("silu", "elu", "relu", "identity")),
                              n_heads, hd)
        width = n_heads * hd
        self.q_proj = nn.Linear(dim, width, bias=bias)
        self.k_proj = nn.Linear(dim, width, bias=bias)
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.b_proj = nn.Linear(dim, n_heads, bias=True)
        self.conv_size = check_int("conv_size", conv_size, minimum=0)
        if self.conv_size:
            self.q_conv, self.k_conv, self.v_conv = (ShortConv(width, self.conv_size) for _ in range(3))
        if self.gate == "scalar":
            self.a_proj = nn.Linear(dim, n_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(1, 16).log())
            dt = torch.exp(torch.rand(n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(inv_softplus(dt))
        self.norm = HeadRMSNorm(hd) if norm else None
        self.output_gate = self.gate == "scalar" if output_gate is None else bool(output_gate)
        self.g_proj = nn.Linear(dim, width, bias=bias) if self.output_gate else None
        self.o_proj = nn.Linear(width, dim, bias=bias)

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """``log α_t`` ``[B, H, N]`` (None without a gate)."""
        if self.gate == "none":
            return None
        return (-self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None, write: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.

        ``write`` ``[B, N]`` (0..1, a router's hook) scales each token's write strength β and its
        decay exponent: 0 makes the token an identity step (it only reads).
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: delta_net is a causal self-attention mixer")
        state = cache_state(cache, "delta_net", x.shape[0])
        b, n, _ = x.shape
        h = self.n_heads
        if mask is not None:
            x = zero_padded(x, mask)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv_size:
            prev = state.get("conv", (None, None, None)) if state is not None else (None, None, None)
            (q, pq), (k, pk), (v, pv) = self.q_conv(q, prev[0]), self.k_conv(k, prev[1]), self.v_conv(v, prev[2])
            if state is not None:
                state["conv"] = (pq, pk, pv)
        else:
            q, k, v = self.act(q), self.act(k), F.silu(v)
        q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, N]
        g = self.log_decay(x)
        if mask is not None or write is not None:  # padded (or unrouted) tokens: no write, no decay
            keep = torch.ones_like(beta[:, 0]) if mask is None else mask.to(beta.dtype)
            if write is not None:
                keep = keep * write.to(beta.dtype)
            beta = beta * keep[:, None, :]
            g = None if g is None else g * keep[:, None, :]
        o = run_from_state(delta_rule, state, cache, n, q, k, v, beta, log_decay=g, scale=self.head_dim ** -0.5,
                           form=self.form, chunk_size=self.chunk_size)
        if self.norm is not None:
            o = self.norm(o)
        o = merge_heads(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x))
        return zero_padded(self.o_proj(o), mask)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, gate={self.gate}, conv_size={self.conv_size}, "
                f"form={self.form}, chunk_size={self.chunk_size}")


def _delta_forms() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for gate in ("none", "scalar"):
        g, w = both_forms(seeded(DeltaNet, dim=32, n_heads=4, gate=gate, chunk_size=3), rand_x())
        got.append(g)
        want.append(w)
    return torch.stack(got), torch.stack(want)


def _delta_overwrite() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    d = 8
    keys = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T[:6].reshape(1, 1, 6, d)
    vals = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64)
    s0 = torch.randn(1, 1, d, 4, generator=g, dtype=torch.float64)
    out = []
    for form in FORMS:
        _, s = delta_rule(keys, keys, vals, 1.0, initial_state=s0, output_final_state=True, form=form, chunk_size=4)
        out.append(keys @ s)  # S k_i for every written key
    return torch.stack(out), vals.expand(3, 1, 1, 6, 4)


register(
    "delta_net", family=FAMILY, type="memory", priority=1, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference=REFERENCE, reference_kwargs=PARALLEL, test_kwargs={**SMALL, "gate": "scalar"},
    aliases={"gated_delta_net": {"gate": "scalar"}},
    summary="DeltaNet / Gated DeltaNet: delta-rule linear attention, chunked WY form (alias gated_delta_net).",
    reductions=(
        Reduction("forms_agree", "chunked (WY) = recurrent = parallel, with and without the gate", _delta_forms),
        Reduction("overwrite", "β = 1 with orthonormal keys overwrites exactly: S k_i = v_i", _delta_overwrite),
    ),
)(DeltaNet)
