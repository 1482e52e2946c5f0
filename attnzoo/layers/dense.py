"""Catalogue section 1, dense multi-head attention and its variants."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    AttentionMixer,
    MultiHeadAttention,
    check_choice,
    check_int,
    check_mixer_input,
    zero_padded,
)
from attnzoo.ops import attention, merge_partials
from attnzoo.patterns import KeyPadding
from attnzoo.registry import Reduction, register

__all__ = [
    "CascadedGroupAttention", "ContextBroadcast", "GINAttention", "GatedAttention", "GroupedQueryAttention",
    "MixtureOfHeads", "ProbabilisticAttention", "ReversedAttention", "SingleHeadSelfAttention", "TensorAttention",
]

FAMILY = "dense-multihead"
MIXER_SUPPORT = {"self", "cross", "causal", "padding", "decoding", "gqa"}
SMALL = {"dim": 32, "n_heads": 4}


def _x(b: int = 2, n: int = 10, c: int = 32, seed: int = 0, **kw: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g, dtype=torch.float64, **kw)


def _seeded(factory: Any, seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**kw).double()


def copy_mha(src: MultiHeadAttention, dst: nn.Module) -> None:
    """Load ``src``'s q/k/v/o projections into ``dst`` (same names), leaving its other parameters."""
    own = dst.state_dict()
    own.update({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape})
    dst.load_state_dict(own)


# ------------------------------------------------------------------------------------- mha
def _mha_lse_merge() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 11, 8, generator=g,
                                                                                   dtype=torch.float64)
    parts = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 10]), torch.tensor([5, 6, 7, 8])]
    outs, lses = zip(*[attention(q, k[:, :, p], v[:, :, p], return_lse=True) for p in parts])
    return merge_partials(list(outs), list(lses))[0], attention(q, k, v)


def _mha_permute_kv() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(MultiHeadAttention, dim=32, n_heads=4)
    x, ctx = _x(), _x(n=13, seed=1)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(2))
    return m(x, context=ctx[:, perm]), m(x, context=ctx)


@register(
    "mha", family=FAMILY, type="mixer", priority=1, papers=("baseline",), supports=MIXER_SUPPORT,
    summary="Multi-head scaled-dot-product attention, self or cross; the oracle of every reduction.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("lse_merge", "the lse-merge of partials over a key partition equals attention over the union",
                  _mha_lse_merge),
        Reduction("permute_kv", "permuting K and V together (cross-attention, no PE) leaves the output unchanged",
                  _mha_permute_kv),
    ),
)
def mha(dim: int, n_heads: int = 8, *, head_dim: int | None = None, bias: bool = True, context_dim: int | None = None,
        pattern: Any = None, score_mod: Any = None, rope: Any = None, scale: float | None = None,
        backend: str = "auto") -> MultiHeadAttention:
    """Multi-head attention (:class:`~attnzoo.layers.base.MultiHeadAttention`)."""
    return MultiHeadAttention(dim, n_heads, head_dim=head_dim, bias=bias, context_dim=context_dim, pattern=pattern,
                              score_mod=score_mod, rope=rope, scale=scale, backend=backend)


# ------------------------------------------------------------------------------------- gqa
class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention: ``n_heads`` query heads share ``n_kv_heads`` key/value heads.

    Query head i reads key/value head ``i // (n_heads // n_kv_heads)``; the KV cache holds
    ``n_kv_heads`` heads. ``n_kv_heads = 1`` is multi-query attention (alias ``mqa``).
    """

    def __init__(self, dim: int, n_heads: int = 8, n_kv_heads: int = 2, **kw: Any) -> None:
        super().__init__(dim, n_heads, n_kv_heads=n_kv_heads, **kw)


def _gqa_equals_mha() -> tuple[torch.Tensor, torch.Tensor]:
    g = _seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=4)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(g, m)
    x = _x()
    return g(x, causal=True), m(x, causal=True)


def _gqa_mqa_is_shared_kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = _seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=1)
    m = MultiHeadAttention(32, 4).double()
    sd = g.state_dict()
    for name in ("k_proj", "v_proj"):  # MHA whose 4 K/V heads are copies of the single shared one
        sd[f"{name}.weight"] = sd[f"{name}.weight"].repeat(4, 1)
        sd[f"{name}.bias"] = sd[f"{name}.bias"].repeat(4)
    m.load_state_dict(sd)
    x = _x()
    return g(x), m(x)


@register(
    "gqa", family=FAMILY, type="mixer", priority=1, papers=("baseline",), supports=MIXER_SUPPORT,
    aliases={"mqa": {"n_kv_heads": 1}},
    summary="Grouped-query attention (alias mqa: one key/value head).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_kv_heads": 2},
    reductions=(
        Reduction("groups_eq_heads", "n_kv_heads = n_heads equals mha", _gqa_equals_mha),
        Reduction("mqa", "n_kv_heads = 1 equals mha with every K/V head a copy of one (MQA)", _gqa_mqa_is_shared_kv),
    ),
)
def gqa(dim: int, n_heads: int = 8, n_kv_heads: int = 2, *, head_dim: int | None = None, bias: bool = True,
        context_dim: int | None = None, pattern: Any = None, score_mod: Any = None, rope: Any = None,
        scale: float | None = None, backend: str = "auto") -> GroupedQueryAttention:
    """Grouped-query attention (:class:`GroupedQueryAttention`)."""
    return GroupedQueryAttention(dim, n_heads, n_kv_heads, head_dim=head_dim, bias=bias, context_dim=context_dim,
                                 pattern=pattern, score_mod=score_mod, rope=rope, scale=scale, backend=backend)


# ------------------------------------------------------------------------- gated_attention
class GatedAttention(MultiHeadAttention):
    """Gated attention: ``Y = Concat_h[SDPA_h ⊙ σ(X W_g^h)] W_O`` (gate after SDPA, before W_O).

    ``granularity="elementwise"`` gives ``head_dim`` gate values per head,
    ``"headwise"`` one scalar per head; the gate at token t depends on ``x_t`` only.
    Checked against the paper abstract (Qiu et al. 2025): "a head-specific sigmoid gate
    after the Scaled Dot-Product Attention" and query-dependent gating scores. The
    elementwise/headwise comparison is [recalled] (not in the abstract); both are offered.
    ``gate_activation`` is ``torch.sigmoid`` (replaceable, e.g. by a constant 1 in tests).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, granularity: str = "elementwise", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.granularity = check_choice("granularity", granularity, ("elementwise", "headwise"))
        width = self.n_heads * (self.head_dim if granularity == "elementwise" else 1)
        self.gate_proj = nn.Linear(dim, width, bias=True)
        self.gate_activation = torch.sigmoid

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``[B, H, N, head_dim or 1]`` from ``x`` ``[B, N, C]``."""
        return self.split(self.gate_activation(self.gate_proj(x)), self.n_heads)

    def post_attention(self, z, x):
        return z * self.gate(x)


def _gated_one_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    x = _x()
    for gran in ("elementwise", "headwise"):
        g = _seeded(GatedAttention, dim=32, n_heads=4, granularity=gran)
        g.gate_activation = torch.ones_like
        m = MultiHeadAttention(32, 4).double()
        copy_mha(g, m)
        out.append((g(x, causal=True), m(x, causal=True)))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def _gated_local_gate() -> tuple[torch.Tensor, torch.Tensor]:
    g = _seeded(GatedAttention, dim=32, n_heads=4)
    x = _x()
    x2 = x.clone()
    x2[:, 1:] += 1.0
    return g.gate(x2)[:, :, 0], g.gate(x)[:, :, 0]


@register(
    "gated_attention", family=FAMILY, type="mixer", priority=1, papers=("Gated Attention",), supports=MIXER_SUPPORT,
    summary="Head-specific sigmoid output gate after SDPA, before W_O (elementwise or headwise).",
    test_kwargs=SMALL,
    reductions=(
        Reduction("gate_one_is_mha", "gate ≡ 1 gives mha (both granularities)", _gated_one_is_mha),
        Reduction("gate_is_local", "the gate at token t is unchanged when other tokens change", _gated_local_gate),
    ),
)
def gated_attention(dim: int, n_heads: int = 8, *, granularity: str = "elementwise", head_dim: int | None = None,
                    n_kv_heads: int | None = None, bias: bool = True, context_dim: int | None = None,
                    pattern: Any = None, score_mod: Any = None, rope: Any = None, scale: float | None = None,
                    backend: str = "auto") -> GatedAttention:
    """Gated attention (:class:`GatedAttention`)."""
    return GatedAttention(dim, n_heads, granularity=granularity, head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias,
                          context_dim=context_dim, pattern=pattern, score_mod=score_mod, rope=rope, scale=scale,
                          backend=backend)


# ------------------------------------------------------------------------------------- moh
class MixtureOfHeads(MultiHeadAttention):
    """Mixture-of-heads: per-token router gates on head outputs, ``O = Σ_h g_h(x) H_h W_O^h``.

    ``router="moh"`` (MoH, [code: MoH-ViT attention_native.py @66bb340] per the catalogue,
    not re-read here): the first ``n_shared`` heads are always on with gates
    ``softmax(W_s x)·n_shared`` (the constant 1 when ``n_shared = 1``); of the other heads
    the top ``top_k`` of ``softmax(W_r x)`` are kept, renormalised and multiplied by
    ``top_k``; two-stage weights ``w = 2·softmax(W_0 x)`` scale the shared and routed groups.
    ``aux_loss`` (set by each forward) is ``mean_e(me_e·ce_e)·E²·aux_loss_weight`` with
    ``me`` the mean routing probability and ``ce`` the fraction of tokens choosing expert e.

    ``router="drop_one"`` (MAE, mixture of h−1 heads): expert i is MHA without head i and
    ``g = softmax(W_d x)`` over experts, so head h gets ``1 − g_h``.

    Every head is computed and unselected ones multiplied by zero (no gather kernel yet).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, n_shared: int = 2, top_k: int = 2, router: str = "moh",
                 aux_loss_weight: float = 0.01, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.router = check_choice("router", router, ("moh", "drop_one"))
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_loss = torch.zeros(())
        if router == "moh":
            self.n_shared = check_int("n_shared", n_shared, minimum=0)
            routed = n_heads - n_shared
            if routed < 1:
                raise ValueError(f"n_shared: must be < n_heads={n_heads}, got {n_shared}")
            self.top_k = check_int("top_k", top_k)
            if top_k > routed:
                raise ValueError(f"top_k: must be <= n_heads - n_shared = {routed}, got {top_k}")
            self.w_shared = nn.Linear(dim, n_shared, bias=False) if n_shared > 1 else None
            self.w_routed = nn.Linear(dim, routed, bias=False)
            self.w_stage = nn.Linear(dim, 2, bias=False)
        else:
            self.n_shared, self.top_k = 0, n_heads - 1
            self.w_drop = nn.Linear(dim, n_heads, bias=False)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[B, N, H]`` for tokens ``x`` ``[B, N, C]``; sets ``self.aux_loss``."""
        if self.router == "drop_one":
            return 1.0 - torch.softmax(self.w_drop(x), dim=-1)
        probs = torch.softmax(self.w_routed(x), dim=-1)
        vals, idx = probs.topk(self.top_k, dim=-1)
        vals = vals / vals.sum(-1, keepdim=True) * self.top_k
        routed = torch.zeros_like(probs).scatter(-1, idx, vals)
        if self.n_shared > 1:
            shared = torch.softmax(self.w_shared(x), dim=-1) * self.n_shared
        else:
            shared = x.new_ones(*x.shape[:2], self.n_shared)
        stage = 2.0 * torch.softmax(self.w_stage(x), dim=-1)
        e = probs.shape[-1]
        me = probs.reshape(-1, e).mean(0)
        ce = torch.zeros_like(probs).scatter(-1, idx, 1.0).reshape(-1, e).mean(0)
        self.aux_loss = (me * ce).mean() * e * e * self.aux_loss_weight
        return torch.cat([shared * stage[..., :1], routed * stage[..., 1:]], dim=-1)

    def post_attention(self, z, x):
        return z * self.route(x).transpose(1, 2).unsqueeze(-1)


def _moh_ones_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    got, want = [], []
    for router in ("moh", "drop_one"):
        m = _seeded(MixtureOfHeads, dim=32, n_heads=4, n_shared=1, top_k=2, router=router)
        m.route = lambda t: t.new_ones(*t.shape[:2], 4)
        ref = MultiHeadAttention(32, 4).double()
        copy_mha(m, ref)
        got.append(m(x, causal=True))
        want.append(ref(x, causal=True))
    return torch.stack(got), torch.stack(want)


def _moh_nonzero_count() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3)
    gates = m.route(_x())
    return (gates != 0).sum(-1).to(torch.float64), torch.full(gates.shape[:2], 5.0, dtype=torch.float64)


def _moh_uniform_aux() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3, aux_loss_weight=1.0)
    nn.init.zeros_(m.w_routed.weight)
    m.route(_x())
    return m.aux_loss, torch.tensor(3.0, dtype=torch.float64)


def _moh_drop_one_uniform() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(MixtureOfHeads, dim=32, n_heads=4, router="drop_one", bias=False)
    nn.init.zeros_(m.w_drop.weight)
    ref = MultiHeadAttention(32, 4, bias=False).double()
    copy_mha(m, ref)
    x = _x()
    return m(x), ref(x) * (3.0 / 4.0)


@register(
    "moh", family=FAMILY, type="mixer", priority=2, papers=("MoH", "MAE (mixture of h-1 heads)"),
    supports=MIXER_SUPPORT,
    summary="Mixture-of-heads: a per-token router gates head outputs (router moh or drop_one).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_shared": 1, "top_k": 2},
    reductions=(
        Reduction("gates_one_is_mha", "all gates ≡ 1 gives mha (both routers)", _moh_ones_is_mha),
        Reduction("n_nonzero", "each token has exactly n_shared + top_k nonzero gates", _moh_nonzero_count),
        Reduction("uniform_aux", "under perfectly uniform routing the aux loss equals top_k", _moh_uniform_aux),
        Reduction("drop_one_uniform", "drop_one with a uniform gate gives ((h-1)/h)·mha", _moh_drop_one_uniform),
    ),
)
def moh(dim: int, n_heads: int = 8, *, n_shared: int = 2, top_k: int = 2, router: str = "moh",
        aux_loss_weight: float = 0.01, head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True,
        context_dim: int | None = None, pattern: Any = None, score_mod: Any = None, rope: Any = None,
        scale: float | None = None, backend: str = "auto") -> MixtureOfHeads:
    """Mixture-of-heads (:class:`MixtureOfHeads`)."""
    return MixtureOfHeads(dim, n_heads, n_shared=n_shared, top_k=top_k, router=router,
                          aux_loss_weight=aux_loss_weight, head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias,
                          context_dim=context_dim, pattern=pattern, score_mod=score_mod, rope=rope, scale=scale,
                          backend=backend)


# ----------------------------------------------------------------------- context_broadcast
class ContextBroadcast(nn.Module):
    """Context broadcasting: ``x_i ← (1 − alpha)·x_i + alpha·mean_j x_j`` (parameter-free).

    The abstract (Hyeon-Woo et al.) says uniform attention is inserted with "1 line in your
    model code, no additional parameters"; it does not give the coefficient, so the
    catalogue's [recalled] 0.5 is the default of ``alpha``, not verified. The mean runs over
    kept tokens (``mask``); with ``causal=True`` it is the running mean over the prefix, and
    decoding keeps the running sum in the cache.
    """

    def __init__(self, dim: int, *, alpha: float = 0.5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a float in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: context_broadcast is self-attention only")
        w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        xw = x * w.unsqueeze(-1)
        if causal or cache is not None:
            s, c = xw.cumsum(1), w.cumsum(1)
            if cache is not None:
                prev_s, prev_c = cache.state.get("sum"), cache.state.get("count")
                if prev_s is not None:
                    s, c = s + prev_s, c + prev_c
                cache.state["sum"], cache.state["count"] = s[:, -1:], c[:, -1:]
                cache.advance(x.shape[1])
            mean = s / c.clamp(min=1).unsqueeze(-1)
        else:
            mean = xw.sum(1, keepdim=True) / w.sum(1).clamp(min=1).view(-1, 1, 1)
        return zero_padded((1 - self.alpha) * x + self.alpha * mean, mask)


def _cb_fixed_point() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x(n=1).expand(2, 9, 32).contiguous()
    return ContextBroadcast(32)(x), x


def _cb_equivariant() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    m = ContextBroadcast(32)
    return m(x[:, perm]), m(x)[:, perm]


@register(
    "context_broadcast", family=FAMILY, type="mixer", priority=3, papers=("Context Broadcasting",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="closed form (the same module) in float64", reference_kwargs={},
    summary="Parameter-free uniform attention: x_i <- 0.5 x_i + 0.5 mean_j x_j.",
    test_kwargs={"dim": 32},
    reductions=(
        Reduction("constant_fixed_point", "an input constant over tokens is a fixed point", _cb_fixed_point),
        Reduction("permutation_equivariant", "permuting tokens permutes the output", _cb_equivariant),
    ),
)
def context_broadcast(dim: int, *, alpha: float = 0.5) -> ContextBroadcast:
    """Context broadcasting (:class:`ContextBroadcast`)."""
    return ContextBroadcast(dim, alpha=alpha)


# ------------------------------------------------------------------------------------ shsa
class SingleHeadSelfAttention(AttentionMixer):
    """SHViT single-head attention on a channel subset.

    ``X_p`` = the first ``C_p = dim // ratio`` channels (pre-normalised with LayerNorm when
    ``pre_norm``); ``Y_p`` = single-head ``Attn(X_p W_q, X_p W_k, X_p W_v)`` with
    ``qk_dim``-wide queries/keys and ``C_p``-wide values; ``Y = Proj(act(Concat(Y_p, X_rest)))``.
    The abstract (Yun & Ro, SHViT) only says "a single-head attention module ... combining
    global and local information"; the split/concat layout and the ReLU before the
    projection are [recalled] from the official code, not verified here.
    """

    cross_ok = False

    def __init__(self, dim: int, *, ratio: float = 4.0, qk_dim: int = 16, pre_norm: bool = True,
                 activation: bool = True, bias: bool = True, pattern: Any = None, score_mod: Any = None,
                 backend: str = "auto") -> None:
        super().__init__(dim, pattern=pattern, score_mod=score_mod, backend=backend)
        if not ratio >= 1:
            raise ValueError(f"ratio: expected a number >= 1, got {ratio!r}")
        self.pdim = int(dim // ratio)
        if self.pdim < 1:
            raise ValueError(f"ratio: dim // ratio must be >= 1, got dim={dim}, ratio={ratio}")
        self.qk_dim = check_int("qk_dim", qk_dim)
        self.norm = nn.LayerNorm(self.pdim) if pre_norm else nn.Identity()
        self.qkv = nn.Linear(self.pdim, 2 * qk_dim + self.pdim, bias=bias)
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x, src):
        xp = self.norm(x[..., : self.pdim])
        q, k, v = self.qkv(xp).split([self.qk_dim, self.qk_dim, self.pdim], dim=-1)
        return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)

    def output(self, z, x):
        return self.proj(self.act(torch.cat([z[:, 0], x[..., self.pdim:]], dim=-1)))


def _shsa_r1_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    s = _seeded(SingleHeadSelfAttention, dim=32, ratio=1, qk_dim=32, pre_norm=False, activation=False)
    m = MultiHeadAttention(32, 1).double()
    w, b = s.qkv.weight.detach().split(32), s.qkv.bias.detach().split(32)
    m.load_state_dict({"q_proj.weight": w[0], "q_proj.bias": b[0], "k_proj.weight": w[1], "k_proj.bias": b[1],
                       "v_proj.weight": w[2], "v_proj.bias": b[2], "o_proj.weight": s.proj.weight.detach(),
                       "o_proj.bias": s.proj.bias.detach()})
    x = _x()
    return s(x, causal=True), m(x, causal=True)


def _shsa_rest_passthrough() -> tuple[torch.Tensor, torch.Tensor]:
    s = _seeded(SingleHeadSelfAttention, dim=32, ratio=4, activation=False)
    x = _x()
    s.capture = True
    s(x)
    proj_in = torch.cat([s.captured["z"][:, 0], x[..., 8:]], dim=-1)
    return s.proj(proj_in), s(x)


@register(
    "shsa", family=FAMILY, type="mixer", priority=3, papers=("SHViT",),
    supports={"self", "causal", "padding", "decoding"},
    summary="SHViT single-head self-attention on the first dim/ratio channels; the rest pass through.",
    test_kwargs={"dim": 32, "ratio": 4, "qk_dim": 8},
    reductions=(
        Reduction("ratio1_is_single_head_mha", "ratio = 1 (no norm, no activation) is single-head mha",
                  _shsa_r1_is_mha),
        Reduction("rest_passthrough", "channels outside X_p reach the final projection unchanged",
                  _shsa_rest_passthrough),
    ),
)
def shsa(dim: int, *, ratio: float = 4.0, qk_dim: int = 16, pre_norm: bool = True, activation: bool = True,
         bias: bool = True, pattern: Any = None, score_mod: Any = None,
         backend: str = "auto") -> SingleHeadSelfAttention:
    """SHViT single-head self-attention (:class:`SingleHeadSelfAttention`)."""
    return SingleHeadSelfAttention(dim, ratio=ratio, qk_dim=qk_dim, pre_norm=pre_norm, activation=activation,
                                   bias=bias, pattern=pattern, score_mod=score_mod, backend=backend)


# ------------------------------------------------------------------ cascaded_group_attention
class CascadedGroupAttention(nn.Module):
    """EfficientViT cascaded group attention.

    Channels split into ``n_heads`` chunks ``X_j``; head j takes ``X̃_j = X_j + O_{j−1}``
    (``O_0 = 0``) and computes ``O_j = Attn(X̃_j W_Q^j, X̃_j W_K^j, X̃_j W_V^j)`` with
    ``key_dim``-wide queries/keys; ``Y = act(Concat_j O_j) W_O`` (ReLU before the
    projection as in the official code when ``activation``; [recalled], not in the abstract).
    Causal: each head is causal, so the layer is; no KV-cache decoding (heads are sequential).
    """

    def __init__(self, dim: int, n_heads: int = 4, *, key_dim: int | None = None, bias: bool = True,
                 activation: bool = True, pattern: Any = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
        self.chunk = dim // n_heads
        self.key_dim = self.chunk if key_dim is None else check_int("key_dim", key_dim)
        self.qkv = nn.ModuleList(nn.Linear(self.chunk, 2 * self.key_dim + self.chunk, bias=bias)
                                 for _ in range(n_heads))
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.pattern, self.backend = pattern, backend

    def head_outputs(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                     causal: bool = False) -> list[torch.Tensor]:
        """Per-head outputs ``O_j`` ``[B, N, dim // n_heads]``."""
        from attnzoo.layers.base import build_pattern

        pattern = build_pattern(self.pattern, causal, mask)
        outs: list[torch.Tensor] = []
        for j, chunk in enumerate(x.split(self.chunk, dim=-1)):
            xj = chunk if j == 0 else chunk + outs[-1]
            q, k, v = self.qkv[j](xj).unsqueeze(1).split([self.key_dim, self.key_dim, self.chunk], dim=-1)
            outs.append(attention(q, k, v, pattern=pattern, backend=self.backend)[:, 0])
        return outs

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        check_mixer_input(x, mask, context, self.dim)
        if context is not None or cache is not None:
            raise ValueError("context/cache: cascaded_group_attention is self-attention without a KV cache")
        return zero_padded(self.proj(self.act(torch.cat(self.head_outputs(x, mask=mask, causal=causal), -1))), mask)


def _cga_cascade() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(CascadedGroupAttention, dim=32, n_heads=4)
    x = _x()
    x2 = x.clone()
    x2[..., 16:] += 1.0  # perturb chunks 2 and 3: O_0 and O_1 must not change
    a, b = m.head_outputs(x2), m.head_outputs(x)
    return torch.cat(a[:2], -1), torch.cat(b[:2], -1)


def _cga_params() -> tuple[torch.Tensor, torch.Tensor]:
    m = CascadedGroupAttention(32, 4, bias=False)
    ref = MultiHeadAttention(32, 4, bias=False)
    n = sum(p.numel() for p in m.qkv.parameters())
    n_ref = sum(p.numel() for name, p in ref.named_parameters() if name[0] in "qkv")
    return torch.tensor(float(n) * 4, dtype=torch.float64), torch.tensor(float(n_ref), dtype=torch.float64)


@register(
    "cascaded_group_attention", family=FAMILY, type="mixer", priority=3,
    papers=("EfficientViT (cascaded group attention)",), supports={"self", "causal", "padding"},
    summary="EfficientViT: head j attends on channel chunk j plus the previous head's output.",
    test_kwargs={"dim": 32, "n_heads": 4},
    reductions=(
        Reduction("cascade", "O_j is unaffected by perturbing chunks after j", _cga_cascade),
        Reduction("param_count", "Q/K/V parameter count is 1/h of mha at the same width", _cga_params),
    ),
)
def cascaded_group_attention(dim: int, n_heads: int = 4, *, key_dim: int | None = None, bias: bool = True,
                             activation: bool = True, pattern: Any = None,
                             backend: str = "auto") -> CascadedGroupAttention:
    """EfficientViT cascaded group attention (:class:`CascadedGroupAttention`)."""
    return CascadedGroupAttention(dim, n_heads, key_dim=key_dim, bias=bias, activation=activation, pattern=pattern,
                                  backend=backend)


# ---------------------------------------------------------------------- reversed_attention
class ReversedAttention(MultiHeadAttention):
    """DependencyViT reversed attention: each token sends its value to the parents it picks.

    ``P = softmax(Q Kᵀ/√d)`` (row i: child i's distribution over parents j), ``out = Pᵀ V``,
    i.e. ``out_j = Σ_i P_ij v_i``. With ``gates`` each sender i is also scaled by a
    per-head selector ``softmax_h(x_i W_s)`` and a message controller ``σ(x_i W_m)``
    ([code: timm dependencyvit.py] per the catalogue; not re-read here). Padded senders
    send nothing and padded parents receive nothing. Needs the weights: reference backend.
    """

    cross_ok = False
    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, gates: bool = True, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.gates = bool(gates)
        if gates:
            self.head_selector = nn.Linear(dim, n_heads)
            self.message_controller = nn.Linear(dim, 1)
        self._x: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def attend(self, q, k, v, pattern, want_weights):
        _, p = attention(q, k, v, pattern=pattern, scale=self.scale, backend="reference", return_weights=True)
        if self._mask is not None:
            p = p * self._mask[:, None, :, None].to(p.dtype)
        if self.gates:
            x = self._x
            send = torch.softmax(self.head_selector(x), -1).transpose(1, 2) * torch.sigmoid(
                self.message_controller(x)).transpose(1, 2)
            p = p * send.unsqueeze(-1)
        return torch.matmul(p.transpose(-1, -2), v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)), p

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None:
            raise ValueError("cache: reversed_attention has no KV-cache decoding")
        self._x, self._mask = x, mask
        try:
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   head_mask=head_mask, return_weights=return_weights)
        finally:
            self._x = self._mask = None


def _rev_mass() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
    m.capture = True
    x = _x()
    m(x)
    v = MultiHeadAttention.split(m.v_proj(x), 4)
    return m.captured["z"].sum(2), v.sum(2)


def _rev_transposed() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
    x = _x()
    q, k, v = m.project(x, x)
    p = attention(q, k, v, return_weights=True)[1]
    z = torch.matmul(p.transpose(-1, -2), v)
    return m(x), m.o_proj(MultiHeadAttention.merge(z))


@register(
    "reversed_attention", family=FAMILY, type="mixer", priority=3, papers=("DependencyViT",),
    supports={"self", "padding"}, backends=("reference",),
    summary="DependencyViT: tokens send values to the parents they choose (out = Pᵀ V).",
    test_kwargs=SMALL,
    reductions=(
        Reduction("mass_conserved", "without gates Σ_j out_j = Σ_i v_i", _rev_mass),
        Reduction("transposed_mha", "equals mha run with the transposed weight matrix", _rev_transposed),
    ),
)
def reversed_attention(dim: int, n_heads: int = 8, *, gates: bool = True, head_dim: int | None = None,
                       bias: bool = True, scale: float | None = None, backend: str = "auto") -> ReversedAttention:
    """DependencyViT reversed attention (:class:`ReversedAttention`)."""
    return ReversedAttention(dim, n_heads, gates=gates, head_dim=head_dim, bias=bias, scale=scale, backend=backend)


# ------------------------------------------------------------------------ tensor_attention
class TensorAttention(MultiHeadAttention):
    """Third-order (Kronecker) softmax attention.

    ``A_i,(j,k) = softmax_{(j,k)} ⟨q_i, k1_j ⊙ k2_k⟩/√d``, ``out_i = Σ_{j,k} A_i,(j,k) (v1_j ⊙ v2_k)``:
    ordinary attention over the ``M²`` pair keys ``k1_j ⊙ k2_k`` with pair values
    ``v1_j ⊙ v2_k`` (naive cost O(N·M²), memory O(M²·d)). Padding masks a pair when
    either member is padded. Self- or cross-attention; not causal.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        ctx = self.k_proj.in_features
        self.k2_proj = nn.Linear(ctx, self.n_kv_heads * self.head_dim, bias=self.k_proj.bias is not None)
        self.v2_proj = nn.Linear(ctx, self.n_kv_heads * self.head_dim, bias=self.v_proj.bias is not None)

    def project(self, x, src):
        q, k1, v1 = super().project(x, src)
        k2, v2 = self.split(self.k2_proj(src), self.n_kv_heads), self.split(self.v2_proj(src), self.n_kv_heads)
        b, h, m, d = k1.shape
        k = (k1.unsqueeze(3) * k2.unsqueeze(2)).reshape(b, h, m * m, d)
        v = (v1.unsqueeze(3) * v2.unsqueeze(2)).reshape(b, h, m * m, d)
        return q, k, v

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None:
            raise ValueError("cache: tensor_attention has no KV-cache decoding")
        keep = mask if context is None else context_mask
        pair = None if keep is None else (keep.unsqueeze(2) & keep.unsqueeze(1)).flatten(1)
        saved = self.pattern
        if pair is not None and not bool(pair.all()):
            self.pattern = KeyPadding(pair) if saved is None else saved & KeyPadding(pair)
        try:
            out = super().forward(x, causal=causal, context=context, head_mask=head_mask,
                                  return_weights=return_weights)
        finally:
            self.pattern = saved
        if return_weights:
            return zero_padded(out[0], mask), out[1]
        return zero_padded(out, mask)


def _tensor_reduces_to_mha() -> tuple[torch.Tensor, torch.Tensor]:
    t = _seeded(TensorAttention, dim=32, n_heads=4)
    for lin in (t.k2_proj, t.v2_proj):
        nn.init.zeros_(lin.weight)
        nn.init.ones_(lin.bias)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(t, m)
    x = _x()
    return t(x), m(x)


def _tensor_triple_loop() -> tuple[torch.Tensor, torch.Tensor]:
    t = _seeded(TensorAttention, dim=8, n_heads=1)
    x = _x(b=1, n=4, c=8)
    q = t.q_proj(x)[0]
    k1, k2, v1, v2 = (lin(x)[0] for lin in (t.k_proj, t.k2_proj, t.v_proj, t.v2_proj))
    n = 4
    rows = []
    for i in range(n):
        s = torch.stack([torch.stack([(q[i] * k1[j] * k2[kk]).sum() / math.sqrt(8) for kk in range(n)])
                         for j in range(n)])
        a = torch.softmax(s.flatten(), 0).view(n, n)
        rows.append(sum(a[j, kk] * v1[j] * v2[kk] for j in range(n) for kk in range(n)))
    want = t.o_proj(torch.stack(rows)).unsqueeze(0)
    return t(x), want


@register(
    "tensor_attention", family=FAMILY, type="mixer", priority=3, papers=("Tensor attention (Kronecker)",),
    supports={"self", "cross", "padding", "gqa"}, complexity="O(N^3)",
    summary="Third-order attention over key pairs: scores <q_i, k1_j * k2_k>, values v1_j * v2_k.",
    test_kwargs={"dim": 32, "n_heads": 4},
    reductions=(
        Reduction("ones_is_mha", "K2 = V2 = all-ones reduces exactly to mha", _tensor_reduces_to_mha),
        Reduction("triple_loop", "matches a naive triple loop (rows of the N x N² matrix sum to 1)",
                  _tensor_triple_loop),
    ),
)
def tensor_attention(dim: int, n_heads: int = 8, *, head_dim: int | None = None, n_kv_heads: int | None = None,
                     bias: bool = True, context_dim: int | None = None, scale: float | None = None,
                     backend: str = "auto") -> TensorAttention:
    """Third-order (Kronecker) attention (:class:`TensorAttention`)."""
    return TensorAttention(dim, n_heads, head_dim=head_dim, n_kv_heads=n_kv_heads, bias=bias,
                           context_dim=context_dim, scale=scale, backend=backend)


# ----------------------------------------------------------------- probabilistic_attention
class ProbabilisticAttention(MultiHeadAttention):
    """Attention weights as Gaussian-mixture responsibilities, keys as the means.

    ``a_ij ∝ π_j·N(q_i; k_j, σ²I)``, i.e. logits ``q_i·k_j/σ² − ‖k_j‖²/(2σ²) + log π_j``
    (the ``‖q_i‖²`` term cancels in the softmax). Computed exactly as ordinary attention
    with one extra channel: ``q' = [q, 1]``, ``k' = [k, σ²·log π_j − ‖k_j‖²/2]``, scale
    ``1/σ²``, so every backend runs it. ``σ²`` is a learned per-head value (initialised to
    ``√d``); ``prior="learned"`` gives content-dependent priors ``log π_j = x_j·w``,
    ``"uniform"`` equal priors (the priors' normaliser cancels in the softmax, so they stay
    unnormalised and the layer stays causal and cacheable). ``em_steps`` > 0 re-estimates the keys as the
    responsibility-weighted mean of the queries (the M-step; non-causal only). The value
    propagation of the paper's annotator setting is not implemented.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, prior: str = "uniform", em_steps: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.prior = check_choice("prior", prior, ("uniform", "learned"))
        self.em_steps = check_int("em_steps", em_steps, minimum=0)
        self.log_sigma2 = nn.Parameter(torch.full((self.n_kv_heads,), 0.5 * math.log(self.head_dim)))
        self.prior_proj = nn.Linear(self.k_proj.in_features, self.n_kv_heads) if prior == "learned" else None

    def project(self, x, src):
        q, k, v = super().project(x, src)
        if self.em_steps:
            groups = self.n_heads // self.n_kv_heads
            for _ in range(self.em_steps):
                a = attention(*self._augment(q, k, src), v, return_weights=True, backend="reference",
                              scale=1.0)[1]
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


def _prob_equals_softmax() -> tuple[torch.Tensor, torch.Tensor]:
    p = _seeded(ProbabilisticAttention, dim=32, n_heads=4, bias=False)
    with torch.no_grad():
        p.log_sigma2.fill_(0.5 * math.log(8))  # σ² = √d exactly in float64
    x = _x()
    q, k, v = MultiHeadAttention.project(p, x, x)
    k = k / k.norm(dim=-1, keepdim=True) * 2.0  # equal-norm keys
    p.project = lambda x_, src_: (*p._augment(q, k, src_), v)
    return p(x), p.o_proj(MultiHeadAttention.merge(attention(q, k, v)))


@register(
    "probabilistic_attention", family=FAMILY, type="mixer", priority=3, papers=("Probabilistic attention",),
    supports=MIXER_SUPPORT,
    summary="Attention weights as GMM posterior responsibilities (keys = means, learned σ², priors).",
    test_kwargs={"dim": 32, "n_heads": 4, "prior": "learned"},
    reductions=(
        Reduction("equal_priors_is_softmax",
                  "equal priors, equal-norm keys and σ² = √d give exactly softmax(QKᵀ/√d)", _prob_equals_softmax),
    ),
)
def probabilistic_attention(dim: int, n_heads: int = 8, *, prior: str = "uniform", em_steps: int = 0,
                            head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True,
                            context_dim: int | None = None, pattern: Any = None,
                            backend: str = "auto") -> ProbabilisticAttention:
    """Probabilistic (GMM) attention (:class:`ProbabilisticAttention`)."""
    return ProbabilisticAttention(dim, n_heads, prior=prior, em_steps=em_steps, head_dim=head_dim,
                                  n_kv_heads=n_kv_heads, bias=bias, context_dim=context_dim, pattern=pattern,
                                  backend=backend)


# --------------------------------------------------------------------------- gin_attention
class GINAttention(MultiHeadAttention):
    """GIN-Attention: the attention matrix as a graph adjacency for GIN aggregation.

    Per head ``u_i = (1 + ε)·v_i + Σ_j A_ij v_j`` (``v_i`` the token's own value), then
    ``Y = MLP(Concat_h u) W_O``; ``ε`` is a learned scalar (init 0), the MLP is
    ``Linear-GELU-Linear`` (``mlp=False``: identity). ``threshold`` sparsifies the adjacency
    (keeps ``A_ij > threshold``, no renormalisation; needs the weights, reference backend).
    The PNA aggregators are not implemented. Self-attention only.
    """

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, mlp: bool = True, threshold: float | None = None,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.eps = nn.Parameter(torch.zeros(()))
        width = self.n_heads * self.head_dim
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)) if mlp else nn.Identity()
        self.threshold = threshold
        self._v: torch.Tensor | None = None

    def project(self, x, src):
        q, k, v = super().project(x, src)
        self._v = v
        return q, k, v

    def attend(self, q, k, v, pattern, want_weights):
        if self.threshold is None:
            return super().attend(q, k, v, pattern, want_weights)
        _, a = attention(q, k, v, pattern=pattern, scale=self.scale, backend="reference", return_weights=True)
        a = a * (a > self.threshold)
        return torch.matmul(a, v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)), a

    def post_attention(self, z, x):
        own = self._v[:, :, -z.shape[2]:].repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        self._v = None
        return z + (1 + self.eps) * own

    def output(self, z, x):
        return self.o_proj(self.mlp(self.merge(z)))


def _gin_is_attention() -> tuple[torch.Tensor, torch.Tensor]:
    g = _seeded(GINAttention, dim=32, n_heads=4, mlp=False)
    with torch.no_grad():
        g.eps.fill_(-1.0)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(g, m)
    x = _x()
    return g(x, causal=True), m(x, causal=True)


def _gin_threshold() -> tuple[torch.Tensor, torch.Tensor]:
    g = _seeded(GINAttention, dim=32, n_heads=4, threshold=0.12)
    _, a = g(_x(), return_weights=True)
    kept = a[a != 0]
    return (kept > 0.12).all().to(torch.float64), torch.tensor(1.0, dtype=torch.float64)


@register(
    "gin_attention", family=FAMILY, type="mixer", priority=3, papers=("GIN-Attention",),
    supports={"self", "causal", "padding", "decoding", "gqa"},
    summary="Attention matrix as a GIN adjacency: MLP((1+eps) v_i + sum_j A_ij v_j).",
    test_kwargs=SMALL,
    reductions=(
        Reduction("identity_mlp_eps_minus_one", "MLP = identity and ε = −1 give plain attention (mha)",
                  _gin_is_attention),
        Reduction("threshold", "the sparsified adjacency keeps only entries above the threshold", _gin_threshold),
    ),
)
def gin_attention(dim: int, n_heads: int = 8, *, mlp: bool = True, threshold: float | None = None,
                  head_dim: int | None = None, n_kv_heads: int | None = None, bias: bool = True, pattern: Any = None,
                  score_mod: Any = None, rope: Any = None, backend: str = "auto") -> GINAttention:
    """GIN-Attention (:class:`GINAttention`)."""
    return GINAttention(dim, n_heads, mlp=mlp, threshold=threshold, head_dim=head_dim, n_kv_heads=n_kv_heads,
                        bias=bias, pattern=pattern, score_mod=score_mod, rope=rope, backend=backend)


__all__ += ["copy_mha", "gqa", "mha"]


# ----------------------------------------------------------------------------------- kdgqa
def allocate_heads(ratios: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Integer head counts ``[..., G]`` summing to ``n_heads``, ∝ ``ratios`` (largest remainder)."""
    raw = ratios / ratios.sum(-1, keepdim=True) * n_heads
    raw = torch.round(raw * 1e6) / 1e6  # equal ratios give exact integers despite rounding noise
    base = raw.floor()
    rest = (n_heads - base.sum(-1, keepdim=True)).long()
    order = torch.argsort(raw - base, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    return (base + (rank < rest).to(base.dtype)).long()


class KeyDrivenGQA(MultiHeadAttention):
    """KDGQA / DGQA: grouped-query attention with key-norm-driven head allocation.

    ``mode="kdgqa"``: in each forward pass (per batch element) group g gets a number of
    query heads ∝ the norm ratio of key head g (mean key norm over kept tokens), by the
    largest-remainder rule; heads are assigned to groups in order. ``mode="dgqa"``: the
    ratios are an EMA (``momentum``) updated in training and used as is in eval. PGQA
    (noise subtraction) is not implemented: its noise form is not in the abstract. The
    allocation uses the whole sequence, so the layer is not causal.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, n_kv_heads: int = 2, *, mode: str = "kdgqa",
                 momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(dim, n_heads, n_kv_heads=n_kv_heads, **kw)
        self.mode = check_choice("mode", mode, ("kdgqa", "dgqa"))
        self.momentum = float(momentum)
        self.register_buffer("ema_ratios", torch.full((n_kv_heads,), 1.0 / n_kv_heads))

    def key_norms(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Mean key norm per group ``[B, G]``."""
        norms = k.detach().norm(dim=-1)  # [B, G, M]
        w = torch.ones_like(norms) if keep is None else keep[:, None, :].to(norms.dtype).expand_as(norms)
        return (norms * w).sum(-1) / w.sum(-1).clamp(min=1)

    def allocation(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Query heads per group ``[B, G]`` (integers summing to ``n_heads``)."""
        norms = self.key_norms(k, keep)
        total = norms.sum(-1, keepdim=True)
        ratios = torch.where(total > 0, norms / total.clamp_min(torch.finfo(norms.dtype).tiny),
                             torch.full_like(norms, 1.0 / norms.shape[-1]))  # no kept token: uniform
        if self.mode == "dgqa":
            if self.training:
                with torch.no_grad():
                    self.ema_ratios.mul_(self.momentum).add_((1 - self.momentum) * ratios.mean(0).to(self.ema_ratios))
            ratios = self.ema_ratios.to(norms).expand_as(norms)
        return allocate_heads(ratios, self.n_heads)

    def attend(self, q, k, v, pattern, want_weights):
        counts = self.allocation(k, getattr(self, "_kv_keep", None))  # [B, G]
        bounds = counts.cumsum(-1)  # query head i -> first group whose cumulative count exceeds i
        heads = torch.arange(self.n_heads, device=q.device)
        group = (heads.view(1, -1, 1) >= bounds.unsqueeze(1)).sum(-1)  # [B, H]
        idx = group[:, :, None, None]
        k_full = k.gather(1, idx.expand(-1, -1, *k.shape[2:]))
        v_full = v.gather(1, idx.expand(-1, -1, *v.shape[2:]))
        return super().attend(q, k_full, v_full, pattern, want_weights)


def _kdgqa_equal_is_gqa() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=2)
    m.key_norms = lambda k, keep: k.new_ones(k.shape[0], k.shape[1])
    g = GroupedQueryAttention(32, 4, 2).double()
    copy_mha(m, g)
    x = _x()
    return m(x), g(x)


def _kdgqa_integers() -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = allocate_heads(r, 8)
    return counts.sum(-1).to(torch.float64), torch.full((50,), 8.0, dtype=torch.float64)


def _kdgqa_one_group_is_mqa() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=1)
    g = GroupedQueryAttention(32, 4, 1).double()
    copy_mha(m, g)
    x = _x()
    return m(x), g(x)


@register(
    "kdgqa", family=FAMILY, type="mixer", priority=3, papers=("KDGQA/DGQA/PGQA",),
    supports={"self", "cross", "padding", "gqa"},
    summary="GQA whose query-head-to-group allocation follows the key-head norms (KDGQA, DGQA).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_kv_heads": 2},
    reductions=(
        Reduction("equal_norms_is_gqa", "equal key norms give the uniform allocation (= gqa)", _kdgqa_equal_is_gqa),
        Reduction("integer_allocation", "allocations are integers summing to n_heads", _kdgqa_integers),
        Reduction("one_group_is_mqa", "n_kv_heads = 1 gives MQA", _kdgqa_one_group_is_mqa),
    ),
)
def kdgqa(dim: int, n_heads: int = 8, n_kv_heads: int = 2, *, mode: str = "kdgqa", momentum: float = 0.9,
          head_dim: int | None = None, bias: bool = True, context_dim: int | None = None, pattern: Any = None,
          backend: str = "auto") -> KeyDrivenGQA:
    """Key-driven GQA (:class:`KeyDrivenGQA`)."""
    return KeyDrivenGQA(dim, n_heads, n_kv_heads, mode=mode, momentum=momentum, head_dim=head_dim, bias=bias,
                        context_dim=context_dim, pattern=pattern, backend=backend)


# -------------------------------------------------------------------------------- soft_moa
class SoftMixtureOfAttention(AttentionMixer):
    """Soft mixture of attention experts: ``Y = Σ_e r_e(x)·Attn_e(x)``, ``r = softmax(x W_r)`` per token.

    Each expert has its own Q, K, V, O (``kv_shared=True``: own Q, O and one shared K, V, as
    in BAM, so the KV cache is one expert's size). ``frozen_prior=True`` freezes expert 0
    (MoA personalisation: ``Y = r·Attn_personal + (1 − r)·Attn_prior`` for two experts).
    All experts run in one attention call (expert heads are grouped-query heads).
    """

    def __init__(self, dim: int, n_heads: int = 4, *, n_experts: int = 2, kv_shared: bool = False,
                 frozen_prior: bool = False, head_dim: int | None = None, bias: bool = True, pattern: Any = None,
                 rope: Any = None, backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim: must be divisible by n_heads={n_heads} (or pass head_dim), got dim={dim}")
            head_dim = dim // n_heads
        super().__init__(dim, pattern=pattern, qk_transform=rope, backend=backend)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.n_experts, self.kv_shared = check_int("n_experts", n_experts), bool(kv_shared)
        width = n_heads * head_dim
        n_kv = 1 if kv_shared else n_experts
        self.q_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_experts))
        self.k_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_kv))
        self.v_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_kv))
        self.o_proj = nn.ModuleList(nn.Linear(width, dim, bias=bias) for _ in range(n_experts))
        self.router = nn.Linear(dim, n_experts)
        if frozen_prior:
            for mod in (self.q_proj[0], self.o_proj[0], *([] if kv_shared else [self.k_proj[0], self.v_proj[0]])):
                mod.requires_grad_(False)

    def _stack(self, projs: nn.ModuleList, t: torch.Tensor) -> torch.Tensor:
        # [B, N, E*H*D] with head index h * E + e (expert heads of one head share a kv head)
        parts = torch.stack([MultiHeadAttention.split(p(t), self.n_heads) for p in projs], dim=2)
        b, h, e, n, d = parts.shape
        return parts.reshape(b, h * e, n, d)

    def project(self, x, src):
        return self._stack(self.q_proj, x), self._stack(self.k_proj, src), self._stack(self.v_proj, src)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights ``[B, N, E]``."""
        return torch.softmax(self.router(x), dim=-1)

    def output(self, z, x):
        b, _, n, d = z.shape
        z = z.view(b, self.n_heads, self.n_experts, n, d)
        r = self.gates(x)
        return sum(r[..., e:e + 1] * self.o_proj[e](MultiHeadAttention.merge(z[:, :, e]))
                   for e in range(self.n_experts))


def _moa_identical_experts() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3)
    ref = MultiHeadAttention(32, 4).double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for lin in getattr(m, name):
                lin.load_state_dict(getattr(m, name)[0].state_dict())
            getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = _x()
    return m(x, causal=True), ref(x, causal=True)


def _moa_prior() -> tuple[torch.Tensor, torch.Tensor]:
    m = _seeded(SoftMixtureOfAttention, dim=32, n_heads=4, frozen_prior=True)
    m.gates = lambda t: torch.cat([t.new_ones(*t.shape[:2], 1), t.new_zeros(*t.shape[:2], 1)], -1)
    ref = MultiHeadAttention(32, 4).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = _x()
    return m(x), ref(x)


def _moa_kv_shared_cache() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    m = _seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3, kv_shared=True)
    cache = KVCache()
    m(_x(), causal=True, cache=cache)
    return torch.tensor(float(cache.k.shape[1]), dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)


@register(
    "soft_moa", family=FAMILY, type="mixer", priority=3, papers=("BAM", "MoA (mixture-of-attention, personalization)"),
    supports={"self", "causal", "padding", "decoding"},
    summary="Soft mixture of attention experts (router softmax per token); kv_shared, frozen prior.",
    test_kwargs={"dim": 32, "n_heads": 4, "n_experts": 2},
    reductions=(
        Reduction("identical_experts", "identical experts give one dense attention for any router",
                  _moa_identical_experts),
        Reduction("prior_only", "r = 0 on the personal expert reproduces the frozen prior exactly", _moa_prior),
        Reduction("kv_shared_cache", "with kv_shared the KV cache is one expert's size", _moa_kv_shared_cache),
    ),
)
def soft_moa(dim: int, n_heads: int = 4, *, n_experts: int = 2, kv_shared: bool = False, frozen_prior: bool = False,
             head_dim: int | None = None, bias: bool = True, pattern: Any = None, rope: Any = None,
             backend: str = "auto") -> SoftMixtureOfAttention:
    """Soft mixture of attention experts (:class:`SoftMixtureOfAttention`)."""
    return SoftMixtureOfAttention(dim, n_heads, n_experts=n_experts, kv_shared=kv_shared, frozen_prior=frozen_prior,
                                  head_dim=head_dim, bias=bias, pattern=pattern, rope=rope, backend=backend)


__all__ += ["KeyDrivenGQA", "SoftMixtureOfAttention", "allocate_heads"]
