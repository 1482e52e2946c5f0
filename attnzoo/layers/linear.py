"""Catalogue section 5 (linear-recurrent): linear attention, Lightning, DeltaNet, selective SSM.

Every mixer here runs on :mod:`attnzoo.ops.linear` and has a ``form`` argument:
``"chunked"`` (default, training), ``"parallel"`` (the materialised float64 reference the
conformance suite compares against) or ``"recurrent"``. Decoding passes a
:class:`~attnzoo.layers.recurrent.RecurrentState` (or any KV cache) as ``cache``; the layer
keeps a fixed-size state in it. ``lightning``, ``delta_net`` and ``selective_ssm`` are causal
by construction: ``causal=False`` gives the same (causal) output. Padded tokens (``mask``)
are identity steps of the recurrence (no write, no decay), so kept outputs do not depend
on them, and their output rows are zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import (
    check_choice,
    check_context,
    check_int,
    check_mixer_input,
    head_dim_for,
    load_shared,
    seeded,
    zero_padded,
)
from attnzoo.layers.recurrent import (
    HeadRMSNorm,
    ShortConv,
    cache_state,
    merge_heads,
    run_from_state,
    split_heads,
    step_form,
)
from attnzoo.ops.linear import FORMS, delta_rule, linear_attention, selective_scan
from attnzoo.patterns.score_mods import alibi_slopes
from attnzoo.registry import Reduction, register

__all__ = ["DeltaNet", "FeatureMap", "Lightning", "LinearAttention", "SelectiveSSM", "lightning_decay"]

FAMILY = "linear-recurrent"
FEATURE_MAPS = ("identity", "elu", "relu", "silu", "performer", "taylor")
SMALL = {"dim": 32, "n_heads": 4, "chunk_size": 5}
PARALLEL = {"form": "parallel"}
REFERENCE = "the same module with form='parallel' (materialised N x N operator) in float64"


def _x(b: int = 2, n: int = 11, c: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)


def _check_form(form: str, chunk_size: int) -> tuple[str, int]:
    return check_choice("form", form, FORMS), check_int("chunk_size", chunk_size)


def _forms(module: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunked and recurrent outputs stacked, the parallel output twice): the DSF identity."""
    outs = {}
    for form in FORMS:
        module.form = form
        outs[form] = module(x, **kw)
    return torch.stack([outs["chunked"], outs["recurrent"]]), torch.stack([outs["parallel"]] * 2)


# ------------------------------------------------------------------------------ feature maps
def _orthogonal_features(heads: int, n_features: int, d: int) -> torch.Tensor:
    """Performer's orthogonal random features ``[H, m, d]``: blocks of orthogonal rows, each row's
    norm redrawn from a chi(d) distribution so every row is marginally N(0, I) (unbiased)."""
    def haar(d: int) -> torch.Tensor:  # a uniformly random orthogonal matrix (QR with the signs of R fixed)
        qm, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        return (qm * torch.sign(torch.diagonal(r))).T

    out = []
    for _ in range(heads):
        w = torch.cat([haar(d) for _ in range(-(-n_features // d))])[:n_features]
        norms = torch.randn(n_features, d, dtype=torch.float64).norm(dim=-1, keepdim=True)
        out.append(w * norms)
    return torch.stack(out).float()


class FeatureMap(nn.Module):
    """Feature maps φ of kernelised linear attention, per head on ``[B, H, N, d]``.

    - ``identity``, ``elu`` (elu + 1), ``relu``, ``silu``: elementwise.
    - ``performer``: FAVOR+ positive random features of the softmax kernel,
      ``φ(x) = exp(ω x' - |x'|²/2) / √m`` with ``x' = x / d^{1/4}``, so
      ``E[φ(q)·φ(k)] = exp(q·k/√d)``; ``ω`` is a fixed buffer of orthogonal random features
      (:meth:`redraw` draws new ones). With ``normalize`` the query features are stabilised
      by their row maximum (it cancels exactly in the normalised output); keys are not (a key
      constant would not cancel, and a max over keys would leak future tokens); they are
      bounded by ``exp(|ω|²/2)``.
    - ``taylor`` (Based): ``φ(x) = [1, x/d^{1/4}, x_i x_j/√d (i<j), x_i²/√(2d)]``, so
      ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``, the second-order Taylor expansion of
      ``exp(q·k/√d)`` ([anchors]: the memory-saving triangle, ``1 + d + d(d+1)/2`` features).
    """

    def __init__(self, kind: str, heads: int, d: int, *, n_features: int | None = None) -> None:
        super().__init__()
        self.kind = check_choice("feature_map", kind, FEATURE_MAPS)
        self.heads, self.d = heads, d
        if kind == "performer":
            self.n_features = check_int("n_features", n_features if n_features is not None else 2 * d)
            self.register_buffer("omega", _orthogonal_features(heads, self.n_features, d))
        if kind == "taylor":
            i, j = torch.triu_indices(d, d)
            self.register_buffer("tri_i", i, persistent=False)
            self.register_buffer("tri_j", j, persistent=False)
            self.register_buffer("tri_diag", i == j, persistent=False)

    @property
    def out_dim(self) -> int:
        if self.kind == "performer":
            return self.n_features
        if self.kind == "taylor":
            return 1 + self.d + self.d * (self.d + 1) // 2
        return self.d

    def redraw(self) -> None:
        """Draw new random features (performer)."""
        if self.kind == "performer":
            self.omega.copy_(_orthogonal_features(self.heads, self.n_features, self.d).to(self.omega))

    def forward(self, x: torch.Tensor, *, query: bool = False, stabilise: bool = False) -> torch.Tensor:
        k = self.kind
        if k == "identity":
            return x
        if k == "elu":
            return F.elu(x) + 1
        if k == "relu":
            return F.relu(x)
        if k == "silu":
            return F.silu(x)
        if k == "taylor":
            xs = x / self.d ** 0.25
            off = 1.0 / math.sqrt(self.d)
            coef = self.tri_diag.to(x.dtype) * (1.0 / math.sqrt(2 * self.d) - off) + off
            quad = x[..., self.tri_i] * x[..., self.tri_j] * coef
            return torch.cat([torch.ones_like(x[..., :1]), xs, quad], dim=-1)
        xs = x / self.d ** 0.25
        proj = torch.einsum("bhnd,hmd->bhnm", xs, self.omega.to(x.dtype)) - xs.pow(2).sum(-1, keepdim=True) / 2
        if query and stabilise:
            proj = proj - proj.amax(-1, keepdim=True).detach()
        return proj.exp() / math.sqrt(self.n_features)

    def extra_repr(self) -> str:
        return f"{self.kind}, d={self.d}, out_dim={self.out_dim}"


# ---------------------------------------------------------------------------- linear_attention
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
        self.form, self.chunk_size = _check_form(form, chunk_size)
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
            g, w = _forms(m, _x(), causal=True)
            got.append(g.flatten())
            want.append(w.flatten())
    return torch.cat(got), torch.cat(want)


def _la_noncausal_formula() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(LinearAttention, dim=32, n_heads=4, feature_map="elu")
    x = _x()
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
    q, k = _x(1, 7, 16).unsqueeze(1), _x(1, 9, 16, seed=1).unsqueeze(1)
    dot = q @ k.transpose(-1, -2)
    return fm(q) @ fm(k).transpose(-1, -2), 1 + dot / 4 + dot.pow(2) / 32


@register(
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
)
def linear_attention_entry(dim: int, n_heads: int = 8, *, head_dim: int | None = None, feature_dim: int | None = None,
                           feature_map: str = "elu", normalize: bool = True, n_features: int | None = None,
                           eps: float = 1e-6, scale: float = 1.0, bias: bool = True, context_dim: int | None = None,
                           form: str = "chunked", chunk_size: int = 64) -> LinearAttention:
    """Kernelised linear attention (:class:`LinearAttention`)."""
    return LinearAttention(dim, n_heads, head_dim=head_dim, feature_dim=feature_dim, feature_map=feature_map,
                           normalize=normalize, n_features=n_features, eps=eps, scale=scale, bias=bias,
                           context_dim=context_dim, form=form, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------- lightning
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
        self.form, self.chunk_size = _check_form(form, chunk_size)
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
    x = _x()
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
    return _forms(m, _x())


@register(
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
)
def lightning(dim: int, n_heads: int = 8, *, head_dim: int | None = None, decay: Any = None, layer_idx: int = 0,
              n_layers: int = 1, learn_decay: bool = False, activation: str = "silu", value_activation: bool = True,
              norm: bool = True, gate: bool = True, bias: bool = False, form: str = "chunked",
              chunk_size: int = 64) -> Lightning:
    """Lightning Attention (:class:`Lightning`)."""
    return Lightning(dim, n_heads, head_dim=head_dim, decay=decay, layer_idx=layer_idx, n_layers=n_layers,
                     learn_decay=learn_decay, activation=activation, value_activation=value_activation, norm=norm,
                     gate=gate, bias=bias, form=form, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------- delta_net
def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


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
        self.form, self.chunk_size = _check_form(form, chunk_size)
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
            self.dt_bias = nn.Parameter(_inv_softplus(dt))
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
        g, w = _forms(seeded(DeltaNet, dim=32, n_heads=4, gate=gate, chunk_size=3), _x())
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


@register(
    "delta_net", family=FAMILY, type="memory", priority=1, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference=REFERENCE, reference_kwargs=PARALLEL, test_kwargs={**SMALL, "gate": "scalar"},
    aliases={"gated_delta_net": {"gate": "scalar"}},
    summary="DeltaNet / Gated DeltaNet: delta-rule linear attention, chunked WY form (alias gated_delta_net).",
    reductions=(
        Reduction("forms_agree", "chunked (WY) = recurrent = parallel, with and without the gate", _delta_forms),
        Reduction("overwrite", "β = 1 with orthonormal keys overwrites exactly: S k_i = v_i", _delta_overwrite),
    ),
)
def delta_net(dim: int, n_heads: int = 4, *, head_dim: int | None = None, gate: str = "none", conv_size: int = 4,
              qk_activation: str = "silu", qk_norm: bool = True, output_gate: bool | None = None, norm: bool = True,
              bias: bool = False, form: str = "chunked", chunk_size: int = 64) -> DeltaNet:
    """DeltaNet / Gated DeltaNet (:class:`DeltaNet`)."""
    return DeltaNet(dim, n_heads, head_dim=head_dim, gate=gate, conv_size=conv_size, qk_activation=qk_activation,
                    qk_norm=qk_norm, output_gate=output_gate, norm=norm, bias=bias, form=form, chunk_size=chunk_size)


# ------------------------------------------------------------------------------- selective_ssm
class SelectiveSSM(nn.Module):
    """Mamba-style selective SSM block.

    ``[x, z] = X W_in``; ``x ← silu(causal depthwise conv(x))``; ``Δ, B, C`` from ``x``
    (``Δ = softplus(W_Δ (x W_r))`` through a rank-``dt_rank`` bottleneck); then per channel and
    state ``h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t``, ``y_t = C_tᵀ h_t + D x_t``; output
    ``(y ⊙ silu(z)) W_out``. ``A = −exp(A_log)`` with the S4D-real init ``A_log[c, s] = log(s+1)``,
    ``D = 1``, ``Δ`` bias initialised so that ``softplus`` of it is log-uniform in
    ``[dt_min, dt_max]`` (Mamba's initialisation [recalled]).
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, bias: bool = False, conv_bias: bool = True,
                 form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.d_state = check_int("d_state", d_state)
        self.d_inner = e = check_int("expand", expand) * dim
        self.dt_rank = check_int("dt_rank", dt_rank if dt_rank is not None else math.ceil(dim / 16))
        self.form, self.chunk_size = _check_form(form, chunk_size)
        self.in_proj = nn.Linear(dim, 2 * e, bias=bias)
        self.conv = ShortConv(e, check_int("d_conv", d_conv), bias=conv_bias)
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, e, bias=True)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_inv_softplus(dt))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, dim, bias=bias)

    def ssm_inputs(self, x: torch.Tensor, mask: torch.Tensor | None, conv_prev: torch.Tensor | None
                   ) -> tuple[torch.Tensor, ...]:
        """``(u, Δ, B, C, z, new_conv_prev)`` for ``x`` ``[B, N, C]`` (padded tokens get Δ = 0)."""
        if mask is not None:
            x = zero_padded(x, mask)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, conv_prev = self.conv(u, conv_prev)
        dt_low, bm, cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        if mask is not None:
            dt = dt * mask.unsqueeze(-1).to(dt.dtype)
        return u, dt, bm, cm, z, conv_prev

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: selective_ssm is a causal sequence mixer")
        state = cache_state(cache, "selective_ssm", x.shape[0])
        n = x.shape[1]
        u, dt, bm, cm, z, conv_prev = self.ssm_inputs(x, mask, None if state is None else state.get("conv"))
        form = step_form(self.form, n) if state is not None else self.form
        res = selective_scan(u, dt, -self.A_log.exp(), bm, cm, self.D, form=form, chunk_size=self.chunk_size,
                             initial_state=None if state is None else state.get("h"),
                             output_final_state=state is not None)
        if state is not None:
            y, state["h"] = res
            state["conv"] = conv_prev
            cache.advance(n)
        else:
            y = res
        return zero_padded(self.out_proj(y * F.silu(z)), mask)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"form={self.form}, chunk_size={self.chunk_size}")


def _ssm_forms() -> tuple[torch.Tensor, torch.Tensor]:
    return _forms(seeded(SelectiveSSM, dim=32, d_state=4, chunk_size=3), _x())


def _ssm_zero_b_is_skip() -> tuple[torch.Tensor, torch.Tensor]:
    """With B ≡ 0 the state stays zero and y = D x: the block reduces to its gated skip path."""
    m = seeded(SelectiveSSM, dim=32, d_state=4)
    with torch.no_grad():
        m.x_proj.weight[m.dt_rank:m.dt_rank + m.d_state] = 0
    x = _x()
    u, _, _, _, z, _ = m.ssm_inputs(x, None, None)
    return m(x), m.out_proj(u * m.D * F.silu(z))


@register(
    "selective_ssm", family=FAMILY, type="memory", priority=2, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="the same module with form='parallel' (materialised scan) in float64", reference_kwargs=PARALLEL,
    test_kwargs={"dim": 32, "d_state": 4, "chunk_size": 5},
    summary="Mamba-style selective state-space block (input-dependent Δ, B, C; chunked scan).",
    reductions=(
        Reduction("scan_equals_recurrence", "step-by-step recurrence = chunked scan = materialised scan", _ssm_forms),
        Reduction("zero_b_is_skip", "B ≡ 0 leaves the state at zero: y = D x (the gated skip path)",
                  _ssm_zero_b_is_skip),
    ),
)
def selective_ssm(dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                  dt_min: float = 1e-3, dt_max: float = 0.1, bias: bool = False, conv_bias: bool = True,
                  form: str = "chunked", chunk_size: int = 64) -> SelectiveSSM:
    """Selective SSM (:class:`SelectiveSSM`)."""
    return SelectiveSSM(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                        dt_max=dt_max, bias=bias, conv_bias=conv_bias, form=form, chunk_size=chunk_size)


# The rest of section 5 lives in sibling modules that build on this one; importing them here
# registers every section-5 entry when attnzoo.layers imports this module.
from attnzoo.layers import hybrid, linear_variants, memory  # noqa: E402, F401
