"""``probabilistic_attention``: Attention weights as GMM responsibilities (keys = means, learned σ²,
priors); EM key/value updates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    Call,
    MultiHeadAttention,
    build_pattern,
    check_choice,
    check_int,
    check_mixer_input,
    seeded,
    zero_padded,
)
from attnzoo.layers.dense_multihead._common import FAMILY, MIXER_SUPPORT, rand_x
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


class ProbabilisticAttention(MultiHeadAttention):
    """Attention weights as Gaussian-mixture responsibilities, keys as the means.

    ``a_ij ∝ π_j·N(q_i; k_j, σ²I)``, i.e. logits ``q_i·k_j/σ² − ‖k_j‖²/(2σ²) + log π_j``
    (the ``‖q_i‖²`` term cancels in the softmax). Computed exactly as ordinary attention
    with one extra channel: ``q' = [q, 1]``, ``k' = [k, σ²·log π_j − ‖k_j‖²/2]``, scale
    ``1/σ²``, so every backend runs it. ``σ²`` is a learned per-head value (initialised to
    ``√d``); ``prior="learned"`` gives content-dependent priors ``log π_j = x_j·w``,
    ``"uniform"`` equal priors (the priors' normaliser cancels in the softmax, so they stay
    unnormalised and the layer stays causal and cacheable). ``em_steps`` > 0 re-estimates the keys as the
    responsibility-weighted mean of the unpadded queries (the M-step; it averages over every query, so
    ``causal=True`` and a KV cache raise with it).

    Value propagation (:meth:`propagate`): an annotator fixes the values ``t_i`` of some
    tokens; each M-step moves the value means toward the responsibility-weighted
    annotations, ``μ_j ← (λ μ_j + β Σ_i a_ij m_i t_i) / (λ + β Σ_i a_ij m_i)`` (``m_i`` = 1
    for annotated tokens, ``λ`` the prior precision of the values, ``β`` their precision),
    and the output is ``Σ_j a_ij μ_j``. Checked against the abstract (Gabbur et al.):
    "Expectation Maximization algorithms for online adaptation of key and value model
    parameters" and new information from annotators that must "propagate to other tokens";
    the update is the one of the official code (apple/ml-probabilistic-attention
    @4f27721, ``probabilisticattention.py``, ``value_belief_propagation_iters``), whose key
    adaptation without a prior is also the ``em_steps`` update above. The weights do not
    depend on the values here (no ``v_init`` term), so they are computed once.
    """

    refused_arguments = ('rope', 'scale')  # base-class arguments it sets itself or cannot honour

    def __init__(self, dim: int, n_heads: int = 8, *, prior: str = "uniform", em_steps: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.prior = check_choice("prior", prior, ("uniform", "learned"))
        self.em_steps = check_int("em_steps", em_steps, minimum=0)
        self.log_sigma2 = nn.Parameter(torch.full((self.n_kv_heads,), 0.5 * math.log(self.head_dim)))
        self.prior_proj = nn.Linear(self.k_proj.in_features, self.n_kv_heads) if prior == "learned" else None

    def check_call(self, x, mask, causal, context, cache) -> None:
        super().check_call(x, mask, causal, context, cache)
        if self.em_steps and (causal or cache is not None):
            raise ValueError(f"em_steps: the EM key update averages over every query, so em_steps={self.em_steps} "
                             "is non-causal and cannot decode with a cache (use em_steps=0 for causal=True or a "
                             "cache)")

    def project(self, x, src, call=None):
        q, k, v = super().project(x, src, call=call)
        if self.em_steps:  # the EM key update sees only unpadded queries and keys
            q_keep, k_keep = (None, None) if call is None else (call.mask, call.kv_keep)
            keys = build_pattern(None, False, k_keep)
            groups = self.n_heads // self.n_kv_heads
            for _ in range(self.em_steps):
                a = attention(*self._augment(q, k, src), v, pattern=keys, return_weights=True, backend="reference",
                              scale=1.0)[1]
                if q_keep is not None:  # padded queries do not pull the keys
                    a = a * q_keep.view(q_keep.shape[0], 1, -1, 1).to(a.dtype)
                a = a.view(a.shape[0], self.n_kv_heads, groups, *a.shape[2:])
                qg = q.view(q.shape[0], self.n_kv_heads, groups, *q.shape[2:])
                num = torch.einsum("bhgnm,bhgnd->bhmd", a, qg)
                k = num / a.sum((2, 3)).clamp_min(1e-12).unsqueeze(-1)
        q2, k2 = self._augment(q, k, src)
        return q2, k2, v

    def _augment(self, q: torch.Tensor, k: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma2 = self.log_sigma2.exp().to(q.dtype)
        groups = self.n_heads // self.n_kv_heads
        extra_k = -0.5 * (k * k).sum(-1, keepdim=True)
        if self.prior_proj is not None:
            # unnormalised log-priors: the normaliser is constant over keys and cancels in the softmax
            log_pi = self.prior_proj(src).transpose(1, 2).unsqueeze(-1)
            extra_k = extra_k + sigma2.view(1, -1, 1, 1) * log_pi
        inv = sigma2.rsqrt().view(1, -1, 1, 1)
        sq = inv.repeat_interleave(groups, 1)
        # fold 1/σ² into q and k (scale 1): q'·k' = (q·k − ‖k‖²/2 + σ² log π)/σ²
        return torch.cat([q * sq, sq * torch.ones_like(q[..., :1])], -1), torch.cat([k * inv, extra_k * inv], -1)

    def attention_scale(self, q):
        return 1.0

    def output(self, z, x):
        return self.o_proj(self.merge(z))

    def propagate(self, x: torch.Tensor, targets: torch.Tensor, known: torch.Tensor, *, steps: int = 1,
                  prior_precision: float = 1.0, value_precision: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output ``[B, N, C]`` after ``steps`` value-propagation M-steps (non-causal self-attention).

        ``targets`` ``[B, N, n_kv_heads·head_dim]``: annotated values in the value space (the
        layout of ``v_proj(x)``), read where ``known`` (bool ``[B, N]``) is True.
        ``prior_precision = 0`` replaces the values of every key reached by an annotation
        (and zeroes the others, as the official code does without a prior).
        """
        check_mixer_input(x, mask, None, self.dim)
        width = self.n_kv_heads * self.head_dim
        if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (*x.shape[:2], width):
            got = list(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets: expected a tensor [{x.shape[0]}, {x.shape[1]}, {width}], got {got}")
        if not isinstance(known, torch.Tensor) or known.dtype != torch.bool or known.shape != x.shape[:2]:
            raise ValueError(f"known: expected a bool tensor [{x.shape[0]}, {x.shape[1]}]")
        check_int("steps", steps, minimum=0)
        if not (prior_precision >= 0 and value_precision > 0):
            raise ValueError(f"prior_precision, value_precision: expected >= 0 and > 0, got {prior_precision}, "
                             f"{value_precision}")
        q, k, mu = self.project(x, x, call=Call(x=x, src=x, mask=mask, kv_keep=mask))
        pattern = build_pattern(self.pattern, False, mask)
        a = attention(q, k, mu, pattern=pattern, scale=1.0, backend="reference", return_weights=True)[1]
        b, n = x.shape[:2]
        g = self.n_heads // self.n_kv_heads
        a = a.view(b, self.n_kv_heads, g, n, -1)
        m = (known if mask is None else known & mask).to(x.dtype)
        t = self.split(targets.to(x.dtype), self.n_kv_heads)  # [B, H_kv, N, d]
        upd = torch.einsum("bhgnm,bn,bhnd->bhmd", a, m, t)
        weight = torch.einsum("bhgnm,bn->bhm", a, m).unsqueeze(-1)
        for _ in range(steps):
            mu = (prior_precision * mu + value_precision * upd) / (prior_precision + value_precision * weight + 1e-20)
        z = torch.einsum("bhgnm,bhmd->bhgnd", a, mu).reshape(b, self.n_heads, n, -1)
        return zero_padded(self.output(z, x), mask)


def _prob_vbp_no_annotation() -> tuple[torch.Tensor, torch.Tensor]:
    p = seeded(ProbabilisticAttention, dim=32, n_heads=4, n_kv_heads=2, prior="learned")
    x = rand_x()
    none = torch.zeros(2, 10, dtype=torch.bool)
    return p.propagate(x, rand_x(c=16, seed=3), none, steps=3), p(x)


def _prob_vbp_closed_form() -> tuple[torch.Tensor, torch.Tensor]:
    p = seeded(ProbabilisticAttention, dim=32, n_heads=4, prior="learned", bias=False)
    x, t = rand_x(), rand_x(seed=3)
    known = torch.zeros(2, 10, dtype=torch.bool)
    known[:, ::3] = True
    got = p.propagate(x, t, known, steps=1, prior_precision=0.0)
    q, k, v = p.project(x, x)
    a = attention(q, k, v, scale=1.0, return_weights=True)[1]  # [B, H, N, M]
    tt = MultiHeadAttention.split(t, 4) * known.view(2, 1, 10, 1)
    mu = (a.transpose(-1, -2) @ tt) / (a * known.view(2, 1, 10, 1)).sum(2).unsqueeze(-1)
    return got, p.o_proj(MultiHeadAttention.merge(a @ mu))


def _prob_equals_softmax() -> tuple[torch.Tensor, torch.Tensor]:
    p = seeded(ProbabilisticAttention, dim=32, n_heads=4, bias=False)
    with torch.no_grad():
        p.log_sigma2.fill_(0.5 * math.log(8))  # σ² = √d exactly in float64
    x = rand_x()
    q, k, v = MultiHeadAttention.project(p, x, x)
    k = k / k.norm(dim=-1, keepdim=True) * 2.0  # equal-norm keys
    p.project = lambda x_, src_, call=None: (*p._augment(q, k, src_), v)
    return p(x), p.o_proj(MultiHeadAttention.merge(attention(q, k, v)))


register(
    "probabilistic_attention", family=FAMILY, type="mixer", priority=3, papers=("Probabilistic attention",),
    supports=MIXER_SUPPORT,
    summary="Attention weights as GMM responsibilities (keys = means, learned σ², priors); EM key/value updates.",
    test_kwargs={"dim": 32, "n_heads": 4, "prior": "learned"},
    reductions=(
        Reduction("equal_priors_is_softmax",
                  "equal priors, equal-norm keys and σ² = √d give exactly softmax(QKᵀ/√d)", _prob_equals_softmax),
        Reduction("vbp_no_annotation", "value propagation with no annotated token leaves the output unchanged",
                  _prob_vbp_no_annotation),
        Reduction("vbp_closed_form", "one step without a value prior sets μ_j = Σ_i a_ij t_i / Σ_i a_ij "
                  "(annotated i)", _prob_vbp_closed_form),
    ),
)(ProbabilisticAttention)
