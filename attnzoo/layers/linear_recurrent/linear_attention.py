"""``linear_attention``: Kernelised linear attention (identity, elu+1, relu, silu, Performer, Based
Taylor maps), normalised or not; parallel, chunked and recurrent forms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_context, check_int, check_mixer_input, head_dim_for, seeded, zero_padded
from attnzoo.layers.linear_recurrent._common import (
    FAMILY,
    PARALLEL,
    REFERENCE,
    SMALL,
    FeatureMap,
    both_forms,
    check_form,
    rand_x,
)
from attnzoo.layers.recurrent import cache_state, merge_heads, run_from_state, split_heads
from attnzoo.ops.linear import linear_attention
from attnzoo.registry import Reduction, register


class LinearAttention(nn.Module):
    """Kernelised linear attention, causal or not, normalised or not.

    ``O = φ(Q)(φ(K)ᵀV)`` (non-causal) or ``S_t = S_{t−1} + φ(k_t) v_tᵀ``, ``o_t = S_tᵀφ(q_t)``
    (causal), divided by ``φ(q_t)ᵀ z_t + eps`` with ``z_t = Σ_{s<=t} φ(k_s)`` when ``normalize``.
    Self or cross (``context``, non-causal). Queries and keys are projected to ``feature_dim``
    per head (Based uses 16 with the Taylor map) before φ; values to ``head_dim``.

    Args:
        feature_map: one of ``identity``, ``elu``, ``relu``, ``silu``, ``performer``, ``taylor``.
        normalize: divide by the kernel sum (default True).
        n_features: number of random features (``performer``; default ``2 * feature_dim``).
        scale: multiplies φ(q) (default 1).
        form / chunk_size: see :mod:`attnzoo.ops.linear`.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, head_dim: int | None = None, feature_dim: int | None = None,
                 feature_map: str = "elu", normalize: bool = True, n_features: int | None = None, eps: float = 1e-6,
                 scale: float = 1.0, bias: bool = True, context_dim: int | None = None, form: str = "chunked",
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = head_dim_for(dim, n_heads, head_dim)
        default_fd = 16 if feature_map == "taylor" else self.head_dim
        self.feature_dim = check_int("feature_dim", feature_dim if feature_dim is not None else default_fd)
        self.form, self.chunk_size = check_form(form, chunk_size)
        self.normalize, self.eps, self.scale = bool(normalize), float(eps), float(scale)
        ctx = dim if context_dim is None else check_int("context_dim", context_dim)
        self.features = FeatureMap(feature_map, n_heads, self.feature_dim, n_features=n_features)
        self.q_proj = nn.Linear(dim, n_heads * self.feature_dim, bias=bias)
        self.k_proj = nn.Linear(ctx, n_heads * self.feature_dim, bias=bias)
        self.v_proj = nn.Linear(ctx, n_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        check_context(context, context_mask, self.k_proj.in_features)
        state = cache_state(cache, "linear_attention", x.shape[0])
        if context is not None and (causal or cache is not None):
            raise ValueError("context: cross linear attention is non-causal and has no decoding state")
        src = x if context is None else context
        h = self.n_heads
        q = self.features(split_heads(self.q_proj(x), h), query=True, stabilise=self.normalize)
        k = self.features(split_heads(self.k_proj(src), h))
        v = split_heads(self.v_proj(src), h)
        keep = mask if context is None else context_mask
        if keep is not None:  # padded keys write nothing (where, not a product: exp features may be huge)
            k = torch.where(keep[:, None, :, None], k, torch.zeros((), dtype=k.dtype, device=k.device))
        n = x.shape[1]
        o = run_from_state(linear_attention, state, cache, n, q, k, v, scale=self.scale, normalize=self.normalize,
                           eps=self.eps, causal=causal, form=self.form, chunk_size=self.chunk_size)
        return zero_padded(self.o_proj(merge_heads(o)), mask)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, feature_map={self.features.kind}, "
                f"normalize={self.normalize}, form={self.form}, chunk_size={self.chunk_size}")


def _la_forms() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for fmap in ("identity", "elu", "relu", "performer", "taylor"):
        for normalize in (True, False):
            if fmap == "identity" and normalize:
                continue
            m = seeded(LinearAttention, dim=32, n_heads=4, feature_map=fmap, normalize=normalize, chunk_size=3,
                       feature_dim=4 if fmap == "taylor" else None)
            g, w = both_forms(m, rand_x(), causal=True)
            got.append(g.flatten())
            want.append(w.flatten())
    return torch.cat(got), torch.cat(want)


def _la_noncausal_formula() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(LinearAttention, dim=32, n_heads=4, feature_map="elu")
    x = rand_x()
    q = m.features(split_heads(m.q_proj(x), 4))
    k = m.features(split_heads(m.k_proj(x), 4))
    v = split_heads(m.v_proj(x), 4)
    w = q @ k.transpose(-1, -2)
    return m(x), m.o_proj(merge_heads((w @ v) / (w.sum(-1, keepdim=True) + m.eps)))


def _la_pavlovian() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    keys = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0].T[:10].reshape(1, 1, 10, 16)
    vals = torch.randn(1, 1, 10, 8, generator=g, dtype=torch.float64)
    return linear_attention(keys, keys, vals, causal=False), vals


def _la_taylor_kernel() -> tuple[torch.Tensor, torch.Tensor]:
    fm = FeatureMap("taylor", 1, 16).double()
    q, k = rand_x(b=1, n=7, c=16).unsqueeze(1), rand_x(b=1, n=9, c=16, seed=1).unsqueeze(1)
    dot = q @ k.transpose(-1, -2)
    return fm(q) @ fm(k).transpose(-1, -2), 1 + dot / 4 + dot.pow(2) / 32


register(
    "linear_attention", family=FAMILY, type="mixer", priority=1,
    papers=("baseline", "DSF (dynamical systems framework)", "Pavlovian conditioning (linear attention)"),
    supports={"self", "cross", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference=REFERENCE, reference_kwargs=PARALLEL, test_kwargs=SMALL,
    summary="Kernelised linear attention (identity, elu+1, relu, silu, Performer, Based Taylor maps), "
            "normalised or not; parallel, chunked and recurrent forms.",
    reductions=(
        Reduction("forms_agree", "recurrent = parallel = chunked for every feature map, normalised or not (DSF)",
                  _la_forms),
        Reduction("noncausal_formula", "non-causal output = φ(Q)(φ(K)ᵀV) / (φ(Q)φ(K)ᵀ1 + eps)",
                  _la_noncausal_formula),
        Reduction("pavlovian_recall", "unnormalised, n <= d_k orthonormal keys: querying k_i returns v_i exactly",
                  _la_pavlovian),
        Reduction("taylor_kernel", "Based: φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)", _la_taylor_kernel),
    ),
)(LinearAttention)
