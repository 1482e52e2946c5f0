"""``lightning``: Lightning Attention: tiled causal linear attention with a per-head decay
(intra/inter-block, log-space decays).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import (
    check_choice,
    check_int,
    check_mixer_input,
    head_dim_for,
    load_shared,
    seeded,
    zero_padded,
)
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
from attnzoo.layers.linear_recurrent.linear_attention import LinearAttention
from attnzoo.layers.recurrent import HeadRMSNorm, cache_state, merge_heads, run_from_state, split_heads
from attnzoo.ops.linear import linear_attention
from attnzoo.patterns.score_mods import alibi_slopes
from attnzoo.registry import Reduction, register


def lightning_decay(n_heads: int, layer_idx: int = 0, n_layers: int = 1) -> torch.Tensor:
    """Per-head decays λ_h = exp(−s_h (1 − l/(L−1) + 1e-5)), s_h the ALiBi slopes.

    [code: the ``_build_slope_tensor`` / ``slope_rate`` schedule of the Lightning Attention /
    MiniMax-01 code, found by search; not checked against the papers]. ``L = 1`` uses
    ``s_h (1 + 1e-5)``.
    """
    if not 0 <= layer_idx < max(n_layers, 1):
        raise ValueError(f"layer_idx: expected 0 <= layer_idx < n_layers={n_layers}, got {layer_idx}")
    slopes = alibi_slopes(n_heads).double()
    factor = 1 + 1e-5 if n_layers <= 1 else 1 - layer_idx / (n_layers - 1) + 1e-5
    return torch.exp(-slopes * factor)


class Lightning(nn.Module):
    """Lightning Attention (1 and 2): causal linear attention with one decay λ_h per head, tiled.

    ``O = Norm([(Q Kᵀ) ⊙ D] V) ⊙ σ(X W_g)``, then ``W_O``, with ``D_ts = λ^(t−s)`` (``s <= t``),
    ``Q, K, V = act(X W_{Q,K,V})`` (SiLU; ``value_activation=False`` leaves V linear), ``Norm``
    an RMSNorm over all heads. The chunked form is Lightning-2's intra-block (masked, decayed
    ``Q_i K_iᵀ``) plus inter-block (``(Λ Q_i) KV`` with ``KV ← λ^B KV + (decayed K_i)ᵀ V_i``)
    computation, in log space.

    Args:
        decay: ``None`` (the schedule of :func:`lightning_decay` for ``layer_idx`` of ``n_layers``),
            a float or a list of per-head λ in ``(0, 1]``.
        learn_decay: make the per-head log decays trainable (``g = −softplus(θ)``; needs λ < 1).
        norm, gate: the output RMSNorm and the sigmoid output gate ([code: MiniMax-01 layer], [recalled]).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, head_dim: int | None = None, decay: Any = None,
                 layer_idx: int = 0, n_layers: int = 1, learn_decay: bool = False, activation: str = "silu",
                 value_activation: bool = True, norm: bool = True, gate: bool = True, bias: bool = False,
                 form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = hd = head_dim_for(dim, n_heads, head_dim)
        self.form, self.chunk_size = check_form(form, chunk_size)
        self.act = FeatureMap(check_choice("activation", activation, ("silu", "elu", "relu", "identity")), n_heads, hd)
        self.value_activation = bool(value_activation)
        if decay is None:
            layer_idx, n_layers = check_int("layer_idx", layer_idx, minimum=0), check_int("n_layers", n_layers)
            lam = lightning_decay(n_heads, layer_idx, n_layers)
        else:
            lam = torch.as_tensor(decay, dtype=torch.float64).flatten()
            if lam.numel() == 1:
                lam = lam.expand(n_heads).clone()
            if lam.numel() != n_heads or bool(((lam <= 0) | (lam > 1)).any()):
                raise ValueError(f"decay: expected a float or {n_heads} per-head values in (0, 1], got {decay!r}")
        self.learn_decay = bool(learn_decay)
        if self.learn_decay:
            if bool((lam >= 1).any()):
                raise ValueError("decay: learn_decay needs every λ < 1 (g = -softplus(θ) is never 0)")
            # -softplus(θ) = log λ  <=>  θ = log(expm1(-log λ))
            self.decay_logit = nn.Parameter(torch.log(torch.expm1(-lam.log())).float())
        else:
            self.register_buffer("log_decay", lam.log().float())
        self.q_proj = nn.Linear(dim, n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(dim, n_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, n_heads * hd, bias=bias)
        self.norm = HeadRMSNorm(n_heads * hd) if norm else None
        self.gate_proj = nn.Linear(dim, n_heads * hd, bias=bias) if gate else None
        self.o_proj = nn.Linear(n_heads * hd, dim, bias=bias)

    def head_log_decay(self) -> torch.Tensor:
        """``log λ_h`` ``[H]`` (<= 0)."""
        return -F.softplus(self.decay_logit) if self.learn_decay else self.log_decay

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: lightning is a causal self-attention mixer")
        state = cache_state(cache, "lightning", x.shape[0])
        b, n, _ = x.shape
        h = self.n_heads
        q = self.act(split_heads(self.q_proj(x), h))
        k = self.act(split_heads(self.k_proj(x), h))
        v = split_heads(self.v_proj(x), h)
        if self.value_activation:
            v = self.act(v)
        g = self.head_log_decay().to(x.dtype).view(1, h, 1).expand(b, h, n)
        if mask is not None:  # padded tokens: no write, no decay
            keep = mask[:, None, :]
            k = torch.where(keep.unsqueeze(-1), k, torch.zeros((), dtype=k.dtype, device=k.device))
            g = g * keep.to(g.dtype)
        o = run_from_state(linear_attention, state, cache, n, q, k, v, log_decay=g, form=self.form,
                           chunk_size=self.chunk_size)
        o = merge_heads(o)
        if self.norm is not None:
            o = self.norm(o)
        if self.gate_proj is not None:
            o = o * torch.sigmoid(self.gate_proj(x))
        return zero_padded(self.o_proj(o), mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, form={self.form}, chunk_size={self.chunk_size}"


def _lightning_decay_one() -> tuple[torch.Tensor, torch.Tensor]:
    li = seeded(Lightning, dim=32, n_heads=4, decay=1.0, norm=False, gate=False, value_activation=False,
                chunk_size=4)
    la = seeded(LinearAttention, seed=1, dim=32, n_heads=4, feature_map="silu", normalize=False, bias=False)
    load_shared(li, la)
    x = rand_x()
    return li(x), la(x, causal=True)


def _lightning_naive() -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked output and its gradients = naive [(QKᵀ) ⊙ D] V, D_ts = λ^(t−s), for several block sizes."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 19, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lam = lightning_decay(4)
    i = torch.arange(19, dtype=torch.float64)
    d = lam.view(4, 1, 1) ** (i.view(-1, 1) - i.view(1, -1)).clamp(min=0) * torch.ones(19, 19).tril()
    naive = ((q @ k.transpose(-1, -2)) * d) @ v
    dout = torch.randn(naive.shape, generator=g, dtype=torch.float64)
    want = torch.cat([naive.flatten(), *(t.flatten() for t in torch.autograd.grad(naive, (q, k, v), dout))])
    got = []
    for block in (1, 4, 8, 32):
        o = linear_attention(q, k, v, log_decay=lam.log(), chunk_size=block)
        got.append(torch.cat([o.flatten(), *(t.flatten() for t in torch.autograd.grad(o, (q, k, v), dout))]))
    return torch.stack(got).detach(), want.detach().expand(4, -1)


def _lightning_forms() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(Lightning, dim=32, n_heads=4, chunk_size=3, learn_decay=True)
    return both_forms(m, rand_x())


register(
    "lightning", family=FAMILY, type="mixer", priority=1,
    papers=("Lightning Attention (TransNormerLLM)", "Lightning Attention-2"),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference=REFERENCE, reference_kwargs=PARALLEL, test_kwargs={**SMALL, "learn_decay": True},
    summary="Lightning Attention: tiled causal linear attention with a per-head decay (intra/inter-block, "
            "log-space decays).",
    reductions=(
        Reduction("decay_one_is_linear_attention", "λ = 1 (no norm, no gate) gives causal linear_attention",
                  _lightning_decay_one),
        Reduction("blocked_equals_naive", "blocked output and gradients = naive [(QKᵀ) ⊙ D]V for any block size",
                  _lightning_naive),
        Reduction("forms_agree", "chunked = recurrent = parallel (learnable decays)", _lightning_forms),
    ),
)(Lightning)
