"""``inline_attention``: InLine: injective linear attention normalised by subtraction (rows sum to 1,
not scale invariant).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, head_dim_for, zero_padded
from attnzoo.layers.linear_recurrent._common import FAMILY, DepthwiseConv, FeatureMap, check_form, rand_x
from attnzoo.layers.recurrent import cache_state, merge_heads, split_heads, step_form
from attnzoo.ops.linear import linear_attention
from attnzoo.registry import Reduction, register


class InLineAttention(nn.Module):
    """InLine attention: injective linear attention, normalised by subtraction.

    ``w_ij = φ(q_i)ᵀφ(k_j) − (1/N)Σ_s φ(q_i)ᵀφ(k_s) + 1/N`` [recalled], computed in linear time
    as ``φ(q_i)ᵀ(φ(K)ᵀV) − (φ(q_i)ᵀΣ_s φ(k_s))·mean(V) + mean(V)``. Rows sum to 1 for any φ,
    and (unlike division) scaling ``q`` changes the output. ``N`` counts kept tokens; with
    ``causal=True`` the sums and the mean run over the prefix (``N = t``), and decoding keeps
    ``(φ(K)ᵀ[V, 1], Σ v, count)`` as its state. ``local`` adds a depthwise convolution of ``V``
    (non-causal only; the paper's local-modelling term [recalled]).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, head_dim: int | None = None, feature_map: str = "identity",
                 scale: float | None = None, local: bool = False, local_kernel: int = 3, bias: bool = True,
                 form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = hd = head_dim_for(dim, n_heads, head_dim)
        self.form, self.chunk_size = check_form(form, chunk_size)
        self.features = FeatureMap(feature_map, n_heads, hd)
        self.scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
        width = n_heads * hd
        self.q_proj = nn.Linear(dim, width, bias=bias)
        self.k_proj = nn.Linear(dim, width, bias=bias)
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.o_proj = nn.Linear(width, dim, bias=bias)
        self.local = DepthwiseConv(width, local_kernel, name="local_kernel") if local else None

    def project(self, x: torch.Tensor, mask: torch.Tensor | None):
        h = self.n_heads
        q = self.features(split_heads(self.q_proj(x), h))
        k = self.features(split_heads(self.k_proj(x), h))
        v = split_heads(zero_padded(self.v_proj(x), mask), h)
        if mask is not None:
            k = torch.where(mask[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
        return q, k, v

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """The explicit weight matrix ``[B, H, N, N]`` (quadratic; for tests and inspection)."""
        q, k, _ = self.project(x, mask)
        n = x.shape[1]
        keep = torch.ones(x.shape[:2], dtype=q.dtype, device=q.device) if mask is None else mask.to(q.dtype)
        allowed = keep[:, None, None, :].expand(-1, 1, n, n)
        if causal:
            allowed = allowed * torch.ones(n, n, dtype=q.dtype, device=q.device).tril()
        count = allowed.sum(-1, keepdim=True)
        s = (q @ k.transpose(-1, -2)) * self.scale * allowed
        w = s - s.sum(-1, keepdim=True) / count.clamp(min=1) + allowed / count.clamp(min=1)
        return w * allowed

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: inline_attention is self-attention")
        if self.local is not None and (causal or cache is not None):
            raise ValueError("local: the depthwise local term is non-causal; build with local=False")
        state = cache_state(cache, "inline_attention", x.shape[0])
        b, n, _ = x.shape
        q, k, v = self.project(x, mask)
        keep = torch.ones(b, n, dtype=q.dtype, device=q.device) if mask is None else mask.to(q.dtype)
        v1 = torch.cat([v, keep[:, None, :, None].expand(b, self.n_heads, n, 1)], -1)  # [V, keep]: Σ v, count
        form = step_form(self.form, n) if state is not None else self.form
        run_causal = causal or state is not None
        # the kernel part φ(q)ᵀ Σ φ(k)[v, 1] and the mean part Σ [v, keep]: two linear-attention calls
        kern = linear_attention(q, k, torch.cat([v, torch.ones_like(v[..., :1])], -1), scale=self.scale,
                                causal=run_causal, form=form, chunk_size=self.chunk_size,
                                initial_state=None if state is None else state.get("S"),
                                output_final_state=state is not None)
        ones = torch.ones_like(q[..., :1])
        sums = linear_attention(ones, ones, v1, causal=run_causal, form=form, chunk_size=self.chunk_size,
                                initial_state=None if state is None else state.get("sum"),
                                output_final_state=state is not None)
        if state is not None:
            (kern, state["S"]), (sums, state["sum"]) = kern, sums
            cache.advance(n)
        qkv, qz = kern[..., :self.head_dim], kern[..., -1:]  # φ(q)ᵀφ(K)ᵀV and φ(q)ᵀΣφ(k)
        sum_v, count = sums[..., :self.head_dim], sums[..., -1:]
        mean_v = sum_v / count.clamp(min=1)
        o = qkv - qz * mean_v + mean_v
        o = merge_heads(o)
        if self.local is not None:
            o = o + self.local(merge_heads(v))
        return zero_padded(self.o_proj(o), mask)


def _inline(seed: int = 0, **kw: Any) -> InLineAttention:
    torch.manual_seed(seed)
    return InLineAttention(**{"dim": 32, "n_heads": 4, **kw}).double()


def _inline_rows_sum_to_one() -> tuple[torch.Tensor, torch.Tensor]:
    m = _inline(feature_map="relu")
    x = rand_x()
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 7:] = False
    ws = [m.weights(x, keep, causal) for causal in (False, True)]
    sums = torch.stack([w.sum(-1)[:, :, :7] for w in ws])
    return sums, torch.ones_like(sums)


def _inline_matches_weights() -> tuple[torch.Tensor, torch.Tensor]:
    m = _inline(feature_map="relu")
    x = rand_x()
    out = []
    for causal in (False, True):
        w = m.weights(x, None, causal)
        v = split_heads(m.v_proj(x), 4)
        out.append((m(x, causal=causal), m.o_proj(merge_heads(w @ v))))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def _inline_injective() -> tuple[torch.Tensor, torch.Tensor]:
    """Identity φ: o(c·q) − mean(V) = c·(o(q) − mean(V)); scaling q changes the output (c ≠ 1)."""
    m = _inline()
    x = rand_x()
    v = split_heads(m.v_proj(x), 4)
    base = m.o_proj(merge_heads(v.mean(2, keepdim=True).expand_as(v)))  # the output for mean(V)
    out = []
    for c in (1.0, 2.5):
        m.scale = c
        out.append(m(x) - base)
    return out[1], 2.5 * out[0]


register(
    "inline_attention", family=FAMILY, type="mixer", priority=3, papers=("InLine",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="the same module with form='parallel' (materialised) in float64", reference_kwargs={"form": "parallel"},
    test_kwargs={"dim": 32, "n_heads": 4, "chunk_size": 5},
    summary="InLine: injective linear attention normalised by subtraction (rows sum to 1, not scale invariant).",
    reductions=(
        Reduction("rows_sum_to_one", "every weight row sums to 1 (non-causal and causal, with padding)",
                  _inline_rows_sum_to_one),
        Reduction("linear_time_equals_weights", "the linear-time output equals the explicit weight matrix times V",
                  _inline_matches_weights),
        Reduction("injective_in_scale", "identity φ: o(cq) − mean V = c(o(q) − mean V), unlike division",
                  _inline_injective),
    ),
)(InLineAttention)
