"""Catalogue section 1, dense multi-head attention and its variants."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    AttentionMixer,
    MultiHeadAttention,
    build_pattern,
    check_choice,
    check_context,
    check_int,
    check_mixer_input,
    head_dim_for,
    load_shared,
    seeded,
    zero_padded,
)
from attnzoo.ops import attention, merge_partials
from attnzoo.patterns import KeyPadding, Pattern
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


def copy_mha(src: MultiHeadAttention, dst: nn.Module) -> None:
    """Load ``src``'s q/k/v/o projections into ``dst`` (same names), leaving its other parameters."""
    load_shared(src, dst)


# ------------------------------------------------------------------------------------- mha
def _mha_lse_merge() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 11, 8, generator=g,
                                                                                   dtype=torch.float64)
    parts = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 10]), torch.tensor([5, 6, 7, 8])]
    outs, lses = zip(*[attention(q, k[:, :, p], v[:, :, p], return_lse=True) for p in parts])
    return merge_partials(list(outs), list(lses))[0], attention(q, k, v)


def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: int) -> torch.Tensor:
    """One pass over key tiles of ``tile`` keys with a running max and sum (FlashAttention / FuseMax form)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    denom = torch.zeros(q.shape[:-1], dtype=q.dtype)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for start in range(0, k.shape[2], tile):
        s = q @ k[:, :, start:start + tile].transpose(-1, -2) * scale
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new.unsqueeze(-1))
        corr = torch.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr.unsqueeze(-1) + p @ v[:, :, start:start + tile]
        m = m_new
    return acc / denom.unsqueeze(-1)


def _mha_online_softmax() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 13, 8, generator=g, dtype=torch.float64) for _ in range(2))
    three_pass = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    tiles = [1, 2, 3, 5, 13, 20]
    return (torch.stack([online_softmax_attention(q, k, v, t) for t in tiles]),
            three_pass.expand(len(tiles), *three_pass.shape))


def _mha_permute_kv() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MultiHeadAttention, dim=32, n_heads=4)
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
        Reduction("online_softmax_tiles", "a 1-pass online-softmax tiled attention equals 3-pass softmax for any "
                  "tile size (1, 2, 3, 5, 13, 20)", _mha_online_softmax),
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
    g = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=4)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(g, m)
    x = _x()
    return g(x, causal=True), m(x, causal=True)


def _gqa_mqa_is_shared_kv() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=1)
    m = MultiHeadAttention(32, 4).double()
    sd = g.state_dict()
    for name in ("k_proj", "v_proj"):  # MHA whose 4 K/V heads are copies of the single shared one
        sd[f"{name}.weight"] = sd[f"{name}.weight"].repeat(4, 1)
        sd[f"{name}.bias"] = sd[f"{name}.bias"].repeat(4)
    m.load_state_dict(sd)
    x = _x()
    return g(x), m(x)


def _gqa_cache_size() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    got = []
    for g in (1, 2, 4):
        m = seeded(GroupedQueryAttention, dim=32, n_heads=4, n_kv_heads=g)
        cache = KVCache()
        m(_x(), causal=True, cache=cache)
        got.append(cache.nbytes())
    got = torch.tensor(got, dtype=torch.float64)
    return got / got[0], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)


@register(
    "gqa", family=FAMILY, type="mixer", priority=1, papers=("baseline",), supports=MIXER_SUPPORT,
    aliases={"mqa": {"n_kv_heads": 1}},
    summary="Grouped-query attention (alias mqa: one key/value head).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_kv_heads": 2},
    reductions=(
        Reduction("groups_eq_heads", "n_kv_heads = n_heads equals mha", _gqa_equals_mha),
        Reduction("mqa", "n_kv_heads = 1 equals mha with every K/V head a copy of one (MQA)", _gqa_mqa_is_shared_kv),
        Reduction("cache_size", "the KV-cache size is proportional to n_kv_heads (1, 2, 4)", _gqa_cache_size),
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
    elementwise/headwise comparison is [recalled]: the abstract only says the paper compares
    "various gating positions and computational variants", not these two by name; both
    are offered.
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
        g = seeded(GatedAttention, dim=32, n_heads=4, granularity=gran)
        g.gate_activation = torch.ones_like
        m = MultiHeadAttention(32, 4).double()
        copy_mha(g, m)
        out.append((g(x, causal=True), m(x, causal=True)))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def _gated_local_gate() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GatedAttention, dim=32, n_heads=4)
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
class GatheredCausal(Pattern):
    """Causality for gathered queries: query slot ``c`` of (batch b, head h) sits at key index ``qpos[b, h, c]``.

    ``allow = kv <= qpos[b, h, q]``; a slot with ``qpos = -1`` sees nothing (padding slots of
    the gather). Block bounds come from the per-block minimum and maximum of ``qpos``, so the
    chunked backend skips the key blocks after each query block.
    """

    per_batch = True
    per_head = True

    def __init__(self, qpos: torch.Tensor) -> None:
        self.qpos = qpos

    def allow(self, b, h, q, kv, shape):
        return kv <= self.qpos[b, h, q]

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        n = self.qpos.shape[-1]
        block = int(q_hi[0, 0] - q_lo[0, 0] + 1) if q_lo.shape[0] > 1 else n
        nqb = q_lo.shape[0]
        pad = nqb * block - n
        hi = torch.nn.functional.pad(self.qpos, (0, pad), value=-1).view(*self.qpos.shape[:2], nqb, block)
        lo = torch.nn.functional.pad(self.qpos, (0, pad), value=n + shape.n_kv).view(*self.qpos.shape[:2], nqb,
                                                                                      block)
        qmax, qmin = hi.amax(-1, keepdim=True), lo.amin(-1, keepdim=True)
        return k_lo <= qmax, k_hi <= qmin


# Gather dispatch pays when each routed head is picked by at most this fraction of the tokens
# and the call has at least this many query tokens (benchmarks/bench_moh.py, RESULTS.md).
GATHER_MAX_FRACTION = 0.4
GATHER_MIN_TOKENS = 256
GATHER_CHUNK = 128


class MixtureOfHeads(MultiHeadAttention):
    """Mixture-of-heads: per-token router gates on head outputs, ``O = Σ_h g_h(x) H_h W_O^h``.

    ``router="moh"`` (MoH, [code: MoH-ViT attention_native.py @66bb340] per the catalogue,
    not re-read here): the first ``n_shared`` heads are always on with gates
    ``softmax(W_s x)·n_shared`` (the constant 1 when ``n_shared = 1``); of the other heads
    the top ``top_k`` of ``softmax(W_r x)`` are kept, renormalised and multiplied by
    ``top_k``; two-stage weights ``w = 2·softmax(W_0 x)`` scale the shared and routed groups.
    ``aux_loss`` (set by each forward) is ``mean_e(me_e·ce_e)·E²·aux_loss_weight`` with
    ``me`` the mean routing probability and ``ce`` the fraction of tokens choosing expert e.
    Checked against the MoH abstract: "each token [selects] the appropriate attention heads"
    and "a weighted summation" replaces the sum over heads; the router details are the
    catalogue's code reading.

    ``router="drop_one"`` (MAE, "A Mixture of h-1 Heads is Better than h Heads": the abstract
    confirms "mixture of attentive experts"): expert i is MHA without head i and
    ``g = softmax(W_d x)`` over experts, so head h gets ``1 − g_h`` (every head is used).

    ``dispatch``: ``"dense"`` computes every head and multiplies the unselected ones by 0
    (what the reference code does). ``"gather"`` skips them: each routed head gathers the
    tokens that picked it (``C ≈ N·top_k/(n_heads − n_shared)`` of them), projects only
    their queries, attends them to all keys (causality through their true positions) and
    scatters ``g·O_h W_O^h`` back; shared heads stay dense. ``"auto"`` (default) gathers
    when ``top_k/(n_heads − n_shared) <= 0.4`` and the call has at least 256 query tokens,
    which is where ``benchmarks/bench_moh.py`` measured it paying off on CPU (1.0-2.2x less
    CPU time at fraction <= 1/3; mixed at 1/2, slower at 2/3; see benchmarks/RESULTS.md). The gather
    path needs ``router="moh"``, no ``pattern``/``score_mod``, ``rope`` or no q/k transform,
    and no weights capture; otherwise the dense path runs. Both give the same output.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, n_shared: int = 2, top_k: int = 2, router: str = "moh",
                 aux_loss_weight: float = 0.01, dispatch: str = "auto", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.router = check_choice("router", router, ("moh", "drop_one"))
        self.dispatch = check_choice("dispatch", dispatch, ("auto", "dense", "gather"))
        self.gather_chunk = GATHER_CHUNK
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

    # Gather dispatch ------------------------------------------------------------------------
    def gathers(self, n_tokens: int, *, return_weights: bool = False) -> bool:
        """Whether a call with ``n_tokens`` query tokens runs the gather path."""
        from attnzoo.layers.positional import RotaryEmbedding

        if self.dispatch == "dense" or self.router != "moh" or return_weights or self.capture:
            return False
        if self.pattern is not None or self.score_mod is not None:
            return False
        if self.qk_transform is not None and not isinstance(self.qk_transform, RotaryEmbedding):
            return False
        if self.dispatch == "gather":
            return True
        return self.top_k / (self.n_heads - self.n_shared) <= GATHER_MAX_FRACTION and n_tokens >= GATHER_MIN_TOKENS

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if not self.gathers(x.shape[1], return_weights=return_weights):
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   cache=cache, head_mask=head_mask, return_weights=return_weights)
        self.check_call(x, mask, causal, context, cache)
        return self._gather_forward(x, mask, causal, context, context_mask, cache, head_mask)

    def _kv_for(self, t: torch.Tensor, heads: range) -> torch.Tensor:
        """Key/value heads ``[B, len(heads), M, D]`` read by the query heads ``heads``."""
        g = self.n_heads // self.n_kv_heads
        if g == 1:
            return t[:, heads.start:heads.stop]
        idx = torch.arange(heads.start, heads.stop, device=t.device) // g
        return t.index_select(1, idx)

    def _routed_attention(self, q, k, v, qpos, causal, keep):
        """Attention of gathered queries ``q`` ``[B, R, C, D]`` at key positions ``qpos`` (−1: padding slot).

        Causal calls split the slots (sorted by position) into chunks of ``gather_chunk`` (128);
        each chunk reads only the keys up to its last position, so the routed heads do about
        half the work of a full pass, as a causal kernel would.
        """
        pad = KeyPadding(keep) if keep is not None and not bool(keep.all()) else None
        if not causal:
            return attention(q, k, v, pattern=pad, scale=self.scale, backend=self.backend)
        outs = []
        for start in range(0, q.shape[2], self.gather_chunk):
            sl = slice(start, start + self.gather_chunk)
            qp = qpos[:, :, sl]
            m = max(int(qp.max()) + 1, 1)
            pattern = GatheredCausal(qp) if pad is None else GatheredCausal(qp) & KeyPadding(keep[:, :m])
            outs.append(attention(q[:, :, sl], k[:, :, :m], v[:, :, :m], pattern=pattern, scale=self.scale,
                                  backend=self.backend))
        return torch.cat(outs, 2)

    def _gather_forward(self, x, mask, causal, context, context_mask, cache, head_mask):
        b, n, _ = x.shape
        h, s, d = self.n_heads, self.n_shared, self.head_dim
        r = h - s
        src = x if context is None else context
        k, v = self.split(self.k_proj(src), self.n_kv_heads), self.split(self.v_proj(src), self.n_kv_heads)
        wq = self.q_proj.weight.view(h, d, -1)
        bq = self.q_proj.bias.view(h, d) if self.q_proj.bias is not None else None
        q_s = self.split(nn.functional.linear(x, wq[:s].reshape(s * d, -1),
                                              None if bq is None else bq[:s].reshape(-1)), s) if s else None
        pos = cache.position if cache is not None else 0
        rope = self.qk_transform if context is None else None
        if rope is not None:
            k = rope.rotate(k, torch.arange(pos, pos + k.shape[2], device=x.device))
            if q_s is not None:
                q_s = rope.rotate(q_s, torch.arange(pos, pos + n, device=x.device))
        keep = mask if context is None else context_mask
        if cache is not None:
            k, v, keep = cache.append(k, v, keep)
            cache.advance(n)
        off = k.shape[2] - n  # key index of query 0
        gates = self.route(x)  # [B, N, H]
        if head_mask is not None:
            xi = head_mask.to(gates.dtype)
            gates = gates * (xi.view(1, 1, -1) if xi.dim() == 1 else xi.view(xi.shape[0], 1, -1))
        wo = self.o_proj.weight  # [C, H*D]
        y = x.new_zeros(b, n, wo.shape[0])
        if s:
            pattern = build_pattern(None, causal, keep)
            z_s = attention(q_s, self._kv_for(k, range(0, s)), self._kv_for(v, range(0, s)), pattern=pattern,
                            scale=self.scale, backend=self.backend)
            z_s = z_s * gates[..., :s].transpose(1, 2).unsqueeze(-1)
            y = y + nn.functional.linear(self.merge(z_s), wo[:, : s * d])
        sel = gates[..., s:] != 0  # [B, N, R]
        if mask is not None:
            sel = sel & mask.unsqueeze(-1)
        counts = sel.sum(1)  # [B, R]
        c = int(counts.max()) if counts.numel() else 0
        if c:
            ar = torch.arange(n, device=x.device).view(1, n, 1)
            idx = torch.where(sel, ar, ar + n).argsort(dim=1)[:, :c].transpose(1, 2)  # [B, R, C] token ids
            valid = torch.arange(c, device=x.device).view(1, 1, c) < counts.unsqueeze(-1)
            flat = idx.reshape(b, r * c)
            x_g = x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1])).view(b, r, c, -1)
            q_g = torch.einsum("brcx,rdx->brcd", x_g, wq[s:])
            if bq is not None:
                q_g = q_g + bq[s:].view(1, r, 1, d)
            if rope is not None:
                q_g = rope.rotate(q_g, idx + pos)
            z_g = self._routed_attention(q_g, self._kv_for(k, range(s, h)), self._kv_for(v, range(s, h)),
                                         torch.where(valid, idx + off, torch.full_like(idx, -1)), causal, keep)
            w_g = gates[..., s:].gather(1, idx.transpose(1, 2)).transpose(1, 2) * valid  # [B, R, C]
            wo_r = wo[:, s * d:].reshape(-1, r, d).permute(1, 2, 0)  # [R, D, C_out]
            contrib = torch.einsum("brcd,rde->brce", z_g * w_g.unsqueeze(-1).to(z_g.dtype), wo_r)
            y = y.scatter_add(1, flat.unsqueeze(-1).expand(-1, -1, wo.shape[0]), contrib.reshape(b, r * c, -1))
        if self.o_proj.bias is not None:
            y = y + self.o_proj.bias
        return zero_padded(y, mask)


def _moh_ones_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    got, want = [], []
    for router in ("moh", "drop_one"):
        m = seeded(MixtureOfHeads, dim=32, n_heads=4, n_shared=1, top_k=2, router=router)
        m.route = lambda t: t.new_ones(*t.shape[:2], 4)
        ref = MultiHeadAttention(32, 4).double()
        copy_mha(m, ref)
        got.append(m(x, causal=True))
        want.append(ref(x, causal=True))
    return torch.stack(got), torch.stack(want)


def _moh_nonzero_count() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3)
    gates = m.route(_x())
    return (gates != 0).sum(-1).to(torch.float64), torch.full(gates.shape[:2], 5.0, dtype=torch.float64)


def _moh_uniform_aux() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3, aux_loss_weight=1.0)
    nn.init.zeros_(m.w_routed.weight)
    m.route(_x())
    return m.aux_loss, torch.tensor(3.0, dtype=torch.float64)


def _moh_gather_equals_dense() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache
    from attnzoo.layers.positional import RotaryEmbedding

    got, want = [], []
    x = _x(n=14)
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[0, 10:] = False
    for kv_heads, rope in ((None, None), (2, RotaryEmbedding(8))):
        m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=2, n_kv_heads=kv_heads,
                   rope=rope)
        for kw in ({}, {"causal": True}, {"mask": keep}, {"causal": True, "mask": keep},
                   {"context": _x(n=9, seed=4)}):
            if rope is not None and "context" in kw:
                continue
            m.dispatch, m.gather_chunk = "gather", 3
            got.append(m(x, **kw))
            m.dispatch = "dense"
            want.append(m(x, **kw))
        for dispatch, out in (("gather", got), ("dense", want)):  # chunked KV-cache decoding
            m.dispatch, m.gather_chunk, cache, start, parts = dispatch, 2, KVCache(), 0, []
            for size in (5, 1, 8):
                parts.append(m(x[:, start:start + size], causal=True, cache=cache))
                start += size
            out.append(torch.cat(parts, 1))
    return torch.cat(got, 1), torch.cat(want, 1)


def _moh_drop_one_uniform() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=4, router="drop_one", bias=False)
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
        Reduction("gather_equals_dense", "the gather dispatch (skipping unselected heads) equals the dense one "
                  "(causal, padding, cross, GQA, rope, KV-cache decoding)", _moh_gather_equals_dense),
    ),
)
def moh(dim: int, n_heads: int = 8, *, n_shared: int = 2, top_k: int = 2, router: str = "moh",
        aux_loss_weight: float = 0.01, dispatch: str = "auto", head_dim: int | None = None,
        n_kv_heads: int | None = None, bias: bool = True, context_dim: int | None = None, pattern: Any = None,
        score_mod: Any = None, rope: Any = None, scale: float | None = None, backend: str = "auto") -> MixtureOfHeads:
    """Mixture-of-heads (:class:`MixtureOfHeads`)."""
    return MixtureOfHeads(dim, n_heads, n_shared=n_shared, top_k=top_k, router=router, dispatch=dispatch,
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
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: context_broadcast is self-attention only")
        w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        xw = x * w.unsqueeze(-1)
        if causal or cache is not None:
            s, c = xw.cumsum(1), w.cumsum(1)
            if cache is not None:
                cache.claim_batch(x.shape[0])
                prev_s, prev_c = cache.state.get("sum"), cache.state.get("count")
                if prev_s is not None:
                    s, c = s + prev_s, c + prev_c
                cache.state["sum"], cache.state["count"] = s[:, -1:], c[:, -1:]
                cache.advance(x.shape[1])
            mean = s / c.clamp(min=1).unsqueeze(-1)
        else:
            mean = xw.sum(1, keepdim=True) / w.sum(1).clamp(min=1).view(-1, 1, 1)
        return zero_padded((1 - self.alpha) * x + self.alpha * mean, mask)


def _cb_no_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    m = ContextBroadcast(32)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    return torch.tensor(float(n), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)


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
        Reduction("no_parameters", "the layer has no parameters (and no buffers)", _cb_no_parameters),
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
    s = seeded(SingleHeadSelfAttention, dim=32, ratio=1, qk_dim=32, pre_norm=False, activation=False)
    m = MultiHeadAttention(32, 1).double()
    w, b = s.qkv.weight.detach().split(32), s.qkv.bias.detach().split(32)
    m.load_state_dict({"q_proj.weight": w[0], "q_proj.bias": b[0], "k_proj.weight": w[1], "k_proj.bias": b[1],
                       "v_proj.weight": w[2], "v_proj.bias": b[2], "o_proj.weight": s.proj.weight.detach(),
                       "o_proj.bias": s.proj.bias.detach()})
    x = _x()
    return s(x, causal=True), m(x, causal=True)


def _shsa_rest_passthrough() -> tuple[torch.Tensor, torch.Tensor]:
    s = seeded(SingleHeadSelfAttention, dim=32, ratio=4, activation=False)
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
    Checked against the abstract (EfficientViT): "a cascaded group attention module feeding
    attention heads with different splits of the full feature"; the cascade sum
    ``X_j + O_{j−1}`` is the catalogue's. Causal: each head is causal, so the layer is.
    KV-cache decoding (``causal=True``) keeps one cache per head in ``cache.state``: a new
    token's ``X̃_j`` only needs the previous head's output at that token, so the cascade
    runs on the new tokens alone.
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

    def head_outputs(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                     cache: Any = None) -> list[torch.Tensor]:
        """Per-head outputs ``O_j`` ``[B, N, dim // n_heads]``."""
        from attnzoo.layers.base import build_pattern
        from attnzoo.layers.cache import KVCache, window_of

        heads = None
        if cache is not None:
            heads = cache.state.setdefault("cascaded_heads", [KVCache() for _ in range(self.n_heads)])
        outs: list[torch.Tensor] = []
        for j, chunk in enumerate(x.split(self.chunk, dim=-1)):
            xj = chunk if j == 0 else chunk + outs[-1]
            q, k, v = self.qkv[j](xj).unsqueeze(1).split([self.key_dim, self.key_dim, self.chunk], dim=-1)
            keep = mask
            if heads is not None:
                k, v, keep = heads[j].append(k, v, mask)
            pattern = build_pattern(self.pattern, causal, keep)
            outs.append(attention(q, k, v, pattern=pattern, backend=self.backend)[:, 0])
            if heads is not None:
                heads[j].advance(x.shape[1])
                bound = window_of(self.pattern)
                if bound is not None:
                    heads[j].trim(*bound)
        if cache is not None:
            cache.advance(x.shape[1])
        return outs

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        from attnzoo.layers.cache import KVCache

        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: cascaded_group_attention is self-attention only")
        if cache is not None and (not causal or not isinstance(cache, KVCache)):
            raise ValueError("cache: cascaded_group_attention decodes causally with an attnzoo KVCache "
                             f"(causal=True), got causal={causal}, cache={type(cache).__name__}")
        outs = self.head_outputs(x, mask=mask, causal=causal, cache=cache)
        return zero_padded(self.proj(self.act(torch.cat(outs, -1))), mask)


def _cga_cascade() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(CascadedGroupAttention, dim=32, n_heads=4)
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
    papers=("EfficientViT (cascaded group attention)",), supports={"self", "causal", "padding", "decoding"},
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
    Checked against the abstract (DependencyViT): "a child token in reversed attention is
    trained to attend to its parent tokens and send information following a normalized
    probability distribution rather than gathering information". Not causal by
    construction (a parent receives from every child that picks it, later tokens
    included), and the catalogue asks for no causal variant; bidirectional only.
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
    m = seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
    m.capture = True
    x = _x()
    m(x)
    v = MultiHeadAttention.split(m.v_proj(x), 4)
    return m.captured["z"].sum(2), v.sum(2)


def _rev_transposed() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
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
class PairCausal(Pattern):
    """Causality over the pair keys of tensor attention: pair ``p = j·m + k`` is visible to query ``i``
    when ``j`` and ``k`` are both ``<= i + offset`` (``m`` tokens per member, ``offset = m − n_q``)."""

    def __init__(self, m: int) -> None:
        self.m = m

    def allow(self, b, h, q, kv, shape):
        last = q + (self.m - shape.n_q)
        return (torch.div(kv, self.m, rounding_mode="floor") <= last) & (torch.remainder(kv, self.m) <= last)


class TensorAttention(MultiHeadAttention):
    """Third-order (Kronecker) softmax attention.

    ``A_i,(j,k) = softmax_{(j,k)} ⟨q_i, k1_j ⊙ k2_k⟩/√d``, ``out_i = Σ_{j,k} A_i,(j,k) (v1_j ⊙ v2_k)``:
    ordinary attention over the ``M²`` pair keys ``k1_j ⊙ k2_k`` with pair values
    ``v1_j ⊙ v2_k`` (naive cost O(N·M²), memory O(M²·d)). Padding masks a pair when
    either member is padded; ``causal=True`` keeps the pairs whose members are both at or
    before the query. Self- or cross-attention; no KV-cache decoding (the catalogue does
    not ask for it: every new token would add a row and a column of pairs). Checked
    against the abstract ("How to Capture Higher-order Correlations?"): "a generalization of attention which captures
    triple-wise correlations" whose "straightforward algorithm requires cubic time in n";
    the Kronecker form is the catalogue's.
    """

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
        check_mixer_input(x, mask, context, self.dim)
        check_context(context, context_mask, self.context_width)
        keep = mask if context is None else context_mask
        pair = None if keep is None else (keep.unsqueeze(2) & keep.unsqueeze(1)).flatten(1)
        saved = self.pattern
        parts = [p for p in (saved, PairCausal((x if context is None else context).shape[1]) if causal else None)
                 if p is not None]
        if pair is not None and not bool(pair.all()):
            parts.append(KeyPadding(pair))
        for p in parts[1:]:
            parts[0] = parts[0] & p
        self.pattern = parts[0] if parts else None
        try:
            out = super().forward(x, context=context, head_mask=head_mask, return_weights=return_weights)
        finally:
            self.pattern = saved
        if return_weights:
            return zero_padded(out[0], mask), out[1]
        return zero_padded(out, mask)


def _tensor_reduces_to_mha() -> tuple[torch.Tensor, torch.Tensor]:
    t = seeded(TensorAttention, dim=32, n_heads=4)
    for lin in (t.k2_proj, t.v2_proj):
        nn.init.zeros_(lin.weight)
        nn.init.ones_(lin.bias)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(t, m)
    x = _x()
    return t(x), m(x)


def _tensor_triple_loop() -> tuple[torch.Tensor, torch.Tensor]:
    t = seeded(TensorAttention, dim=8, n_heads=1)
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
    supports={"self", "cross", "causal", "padding", "gqa"}, complexity="O(N^3)",
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

    def __init__(self, dim: int, n_heads: int = 8, *, prior: str = "uniform", em_steps: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.prior = check_choice("prior", prior, ("uniform", "learned"))
        self.em_steps = check_int("em_steps", em_steps, minimum=0)
        self.log_sigma2 = nn.Parameter(torch.full((self.n_kv_heads,), 0.5 * math.log(self.head_dim)))
        self.prior_proj = nn.Linear(self.k_proj.in_features, self.n_kv_heads) if prior == "learned" else None

    _em_keep: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def check_call(self, x, mask, causal, context, cache) -> None:
        super().check_call(x, mask, causal, context, cache)
        if self.em_steps and (causal or cache is not None):
            raise ValueError(f"em_steps: the EM key update averages over every query, so em_steps={self.em_steps} "
                             "is non-causal and cannot decode with a cache (use em_steps=0 for causal=True or a "
                             "cache)")

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, **kw: Any) -> Any:
        """:meth:`MultiHeadAttention.forward`; the EM key update sees only unpadded queries and keys.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        self._em_keep = (mask, mask if context is None else context_mask)
        try:
            return super().forward(x, mask=mask, context=context, context_mask=context_mask, **kw)
        finally:
            self._em_keep = (None, None)

    def project(self, x, src):
        q, k, v = super().project(x, src)
        if self.em_steps:
            q_keep, k_keep = self._em_keep
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
        self._em_keep = (mask, mask)
        try:
            q, k, mu = self.project(x, x)
        finally:
            self._em_keep = (None, None)
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
    x = _x()
    none = torch.zeros(2, 10, dtype=torch.bool)
    return p.propagate(x, _x(c=16, seed=3), none, steps=3), p(x)


def _prob_vbp_closed_form() -> tuple[torch.Tensor, torch.Tensor]:
    p = seeded(ProbabilisticAttention, dim=32, n_heads=4, prior="learned", bias=False)
    x, t = _x(), _x(seed=3)
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
    x = _x()
    q, k, v = MultiHeadAttention.project(p, x, x)
    k = k / k.norm(dim=-1, keepdim=True) * 2.0  # equal-norm keys
    p.project = lambda x_, src_: (*p._augment(q, k, src_), v)
    return p(x), p.o_proj(MultiHeadAttention.merge(attention(q, k, v)))


@register(
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
    """GIN-Attention: the attention matrix as a graph adjacency for GIN (or PNA) aggregation.

    ``aggregation="gin"``: per head ``u_i = (1 + ε)·v_i + Σ_j A_ij v_j`` (``v_i`` the token's
    own value), then ``Y = MLP(Concat_h u) W_O``; ``ε`` is a learned scalar (init 0), the
    MLP is ``Linear-GELU-Linear`` (``mlp=False``: identity).

    ``aggregation="pna"`` (Principal Neighborhood Aggregation over the attention graph, as
    in the official code, lamm-mit/Graph-Aware-Transformers ``src/xgpt/Attention_GNN.py``,
    ``LlamaAttentionPNA``): per head the aggregators ``sum = A V``, ``mean = A V / deg``,
    ``max = max_{j: A_ij > 0} v_j`` (elementwise) and ``var = max(A V² / deg − mean², 0)``
    with ``deg_i = Σ_j A_ij`` (1 where 0) are concatenated and mapped back to ``head_dim``
    by a per-head MLP ``Linear(4d, 2d)-SiLU-Linear(2d, d)``, then ``W_O``. (The code's
    default adjacency is ReLU of the scores; here it is the softmax attention matrix, one of
    the code's options, so ``sum = mean``.) ``max`` costs O(N²·d) memory.

    ``threshold`` sparsifies the adjacency (keeps ``A_ij > threshold``, no
    renormalisation; needs the weights, reference backend). Checked against the abstract
    (Graph-Aware Isomorphic Attention): "Graph Isomorphism Networks (GIN) and Principal
    Neighborhood Aggregation (PNA)" and "Sparse GIN-Attention ... interpreting attention
    matrices as sparse adjacency graphs". Self-attention only.
    """

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, mlp: bool = True, threshold: float | None = None,
                 aggregation: str = "gin", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.aggregation = check_choice("aggregation", aggregation, ("gin", "pna"))
        width = self.n_heads * self.head_dim
        d, h = self.head_dim, self.n_heads
        if aggregation == "gin":
            self.eps = nn.Parameter(torch.zeros(()))
            self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)) if mlp \
                else nn.Identity()
        else:
            bound1, bound2 = 1 / math.sqrt(4 * d), 1 / math.sqrt(2 * d)
            self.pna_w1 = nn.Parameter(torch.empty(h, 4 * d, 2 * d).uniform_(-bound1, bound1))
            self.pna_b1 = nn.Parameter(torch.empty(h, 2 * d).uniform_(-bound1, bound1))
            self.pna_w2 = nn.Parameter(torch.empty(h, 2 * d, d).uniform_(-bound2, bound2))
            self.pna_b2 = nn.Parameter(torch.empty(h, d).uniform_(-bound2, bound2))
        self.threshold = threshold
        self._v: torch.Tensor | None = None

    def project(self, x, src):
        q, k, v = super().project(x, src)
        self._v = v
        return q, k, v

    def attend(self, q, k, v, pattern, want_weights):
        if self.aggregation == "gin" and self.threshold is None:
            return super().attend(q, k, v, pattern, want_weights)
        _, a = attention(q, k, v, pattern=pattern, scale=self.scale, backend="reference", return_weights=True)
        if self.threshold is not None:
            a = a * (a > self.threshold)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        if self.aggregation == "gin":
            return torch.matmul(a, v), a
        return self.pna_aggregate(a, v), a

    @staticmethod
    def pna_aggregate(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[sum, mean, max, var]`` ``[B, H, N, 4d]`` of values ``v`` ``[B, H, M, d]`` over adjacency ``a``."""
        total = torch.matmul(a, v)
        deg = a.sum(-1, keepdim=True)
        deg = torch.where(deg == 0, torch.ones_like(deg), deg)
        mean = total / deg
        var = (torch.matmul(a, v * v) / deg - mean * mean).clamp(min=0)
        valid = (a > 0).unsqueeze(-1)  # [B, H, N, M, 1]
        big = torch.finfo(v.dtype).max
        mx = torch.where(valid, v.unsqueeze(2), torch.full((), -big, dtype=v.dtype, device=v.device)).amax(3)
        mx = torch.where(valid.any(3), mx, torch.zeros_like(mx))  # a token with no neighbour gets 0
        return torch.cat([total, mean, mx, var], -1)

    def post_attention(self, z, x):
        own = self._v[:, :, -z.shape[2]:].repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        self._v = None
        if self.aggregation == "gin":
            return z + (1 + self.eps) * own
        hid = nn.functional.silu(torch.einsum("bhnf,hfg->bhng", z, self.pna_w1.to(z.dtype))
                                 + self.pna_b1.to(z.dtype).unsqueeze(1))
        return torch.einsum("bhng,hgd->bhnd", hid, self.pna_w2.to(z.dtype)) + self.pna_b2.to(z.dtype).unsqueeze(1)

    def output(self, z, x):
        if self.aggregation == "pna":
            return self.o_proj(self.merge(z))
        return self.o_proj(self.mlp(self.merge(z)))


def _gin_pna_aggregators() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=16, n_heads=2, aggregation="pna", threshold=0.15)
    x = _x(b=1, n=6, c=16)
    with torch.no_grad():
        q, k, v = g.project(x, x)
    agg = g.attend(q, k, v, None, False)[0]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    a = a * (a > 0.15)
    want = torch.empty_like(agg)
    for h in range(2):
        for i in range(6):
            nb = [j for j in range(6) if a[0, h, i, j] > 0]
            s = sum(a[0, h, i, j] * v[0, h, j] for j in range(6))
            deg = float(a[0, h, i].sum()) or 1.0
            mean = s / deg
            var = (sum(a[0, h, i, j] * v[0, h, j] ** 2 for j in range(6)) / deg - mean ** 2).clamp(min=0)
            mx = torch.stack([v[0, h, j] for j in nb]).amax(0) if nb else torch.zeros(8, dtype=torch.float64)
            want[0, h, i] = torch.cat([s, mean, mx, var])
    return agg, want


def _gin_pna_decoding() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    g = seeded(GINAttention, dim=32, n_heads=4, aggregation="pna")
    x = _x(n=9)
    full = g(x, causal=True)
    cache, parts, start = KVCache(), [], 0
    for size in (4, 1, 3, 1):
        parts.append(g(x[:, start:start + size], causal=True, cache=cache))
        start += size
    return torch.cat(parts, 1), full


def _gin_is_attention() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=32, n_heads=4, mlp=False)
    with torch.no_grad():
        g.eps.fill_(-1.0)
    m = MultiHeadAttention(32, 4).double()
    copy_mha(g, m)
    x = _x()
    return g(x, causal=True), m(x, causal=True)


def _gin_threshold() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GINAttention, dim=32, n_heads=4, threshold=0.12)
    _, a = g(_x(), return_weights=True)
    kept = a[a != 0]
    return (kept > 0.12).all().to(torch.float64), torch.tensor(1.0, dtype=torch.float64)


@register(
    "gin_attention", family=FAMILY, type="mixer", priority=3, papers=("GIN-Attention",),
    supports={"self", "causal", "padding", "decoding", "gqa"},
    summary="Attention matrix as a graph adjacency: GIN MLP((1+eps) v_i + sum_j A_ij v_j) or PNA aggregators.",
    test_kwargs=SMALL,
    reductions=(
        Reduction("identity_mlp_eps_minus_one", "MLP = identity and ε = −1 give plain attention (mha)",
                  _gin_is_attention),
        Reduction("threshold", "the sparsified adjacency keeps only entries above the threshold", _gin_threshold),
        Reduction("pna_aggregators", "PNA sum/mean/max/var over the (thresholded) attention graph match a loop",
                  _gin_pna_aggregators),
        Reduction("pna_causal_decoding", "PNA aggregation is causal: KV-cache decoding equals the full forward",
                  _gin_pna_decoding),
    ),
)
def gin_attention(dim: int, n_heads: int = 8, *, mlp: bool = True, threshold: float | None = None,
                  aggregation: str = "gin", head_dim: int | None = None, n_kv_heads: int | None = None,
                  bias: bool = True, pattern: Any = None, score_mod: Any = None, rope: Any = None,
                  backend: str = "auto") -> GINAttention:
    """GIN-Attention (:class:`GINAttention`)."""
    return GINAttention(dim, n_heads, mlp=mlp, threshold=threshold, aggregation=aggregation, head_dim=head_dim,
                        n_kv_heads=n_kv_heads, bias=bias, pattern=pattern, score_mod=score_mod, rope=rope,
                        backend=backend)


__all__ += ["copy_mha", "gqa", "mha"]


# ----------------------------------------------------------------------------------- kdgqa
def allocate_heads(ratios: torch.Tensor, n_heads: int, minimum: int = 0) -> torch.Tensor:
    """Integer head counts ``[..., G]`` summing to ``n_heads``: ``minimum`` each, the rest ∝ ``ratios``
    (largest remainder)."""
    if minimum:
        g = ratios.shape[-1]
        if minimum * g > n_heads:
            raise ValueError(f"n_heads: {n_heads} heads cannot give {g} groups {minimum} each")
        return minimum + allocate_heads(ratios, n_heads - minimum * g)
    raw = ratios / ratios.sum(-1, keepdim=True) * n_heads
    raw = torch.round(raw * 1e6) / 1e6  # equal ratios give exact integers despite rounding noise
    base = raw.floor()
    rest = (n_heads - base.sum(-1, keepdim=True)).long()
    order = torch.argsort(raw - base, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    return (base + (rank < rest).to(base.dtype)).long()


class KeyDrivenGQA(MultiHeadAttention):
    """KDGQA / DGQA: grouped-query attention with key-norm-driven head allocation.

    ``mode="kdgqa"``: in each forward pass (per batch element) every group gets one query
    head and the other ``n_heads − n_kv_heads`` are shared out ∝ the norm ratio of key
    head g (mean key norm over kept tokens), by the largest-remainder rule; heads are
    assigned to groups in order. The one-head minimum (no key/value head is left unread)
    is a choice made here; it is what makes the catalogue's "g = h gives MHA" hold. ``mode="dgqa"``: the
    ratios are an EMA (``momentum``) updated in training and used as is in eval. Checked
    against the abstract (KDGQA/DGQA/PGQA): KDGQA "looks at the ratios of the norms of the
    key heads during each forward pass", DGQA at "the ratios of the norms as they evolve
    through training". PGQA ("subtracting noise from the attention maps") is not
    implemented: the abstract does not give the noise, and the only code found was an
    unattributed excerpt (Gaussian noise with each attention-map row's mean and standard
    deviation, zero diagonal) that does not show where or when it is subtracted. The
    allocation uses the whole sequence (every key head's norm), so the layer is not causal:
    a causal variant would need a different allocation per query position, which the
    catalogue does not ask for.
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
        return allocate_heads(ratios, self.n_heads, minimum=1)

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
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=2)
    m.key_norms = lambda k, keep: k.new_ones(k.shape[0], k.shape[1])
    g = GroupedQueryAttention(32, 4, 2).double()
    copy_mha(m, g)
    x = _x()
    return m(x), g(x)


def _kdgqa_integers() -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = allocate_heads(r, 8)
    return counts.sum(-1).to(torch.float64), torch.full((50,), 8.0, dtype=torch.float64)


def _kdgqa_groups_eq_heads_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=4)
    ref = MultiHeadAttention(32, 4).double()
    copy_mha(m, ref)
    x = _x()
    return m(x), ref(x)


def _kdgqa_one_group_is_mqa() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=1)
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
        Reduction("groups_eq_heads_is_mha", "n_kv_heads = n_heads gives mha", _kdgqa_groups_eq_heads_is_mha),
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

    cross_ok = False  # its experts are self-attention (the registry spec has no 'cross')

    def __init__(self, dim: int, n_heads: int = 4, *, n_experts: int = 2, kv_shared: bool = False,
                 frozen_prior: bool = False, head_dim: int | None = None, bias: bool = True, pattern: Any = None,
                 rope: Any = None, backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
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
    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3)
    ref = MultiHeadAttention(32, 4).double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for lin in getattr(m, name):
                lin.load_state_dict(getattr(m, name)[0].state_dict())
            getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = _x()
    return m(x, causal=True), ref(x, causal=True)


def _moa_prior() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, frozen_prior=True)
    m.gates = lambda t: torch.cat([t.new_ones(*t.shape[:2], 1), t.new_zeros(*t.shape[:2], 1)], -1)
    ref = MultiHeadAttention(32, 4).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = _x()
    return m(x), ref(x)


def _moa_kv_shared_cache() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3, kv_shared=True)
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


# ------------------------------------------------------------------- attention_adversarial
class AttentionAdversarial(nn.Module):
    """Adversarial training on attention scores (Attention AT / iAT), as a score modifier.

    Host it in any attention mixer (``mha(..., score_mod=adv)``, several layers may share
    one); it adds nothing to the scores unless :meth:`training_loss` runs:

    1. a probing forward adds a zero tensor ``δ`` (requires grad) to every host call's
       logits ``s`` and gives ``L(a)``; ``g = ∂L/∂δ = ∂L/∂s``;
    2. ``r = ε·g/‖g‖`` (``variant="at"``) with the norm over the keys of each attention row
       (each softmax's logit vector gets a perturbation of norm ε; padded/masked keys get
       none), detached;
    3. a perturbed forward adds ``r`` to the same calls' logits and gives ``L(a + r)``;
    4. it returns ``L(a) + lam·L(a + r)`` (the official code's ``loss + lam_adv·loss_adv``).

    Checked against the abstract (Kitada & Iyatomi): AT "for attention mechanisms" and iAT,
    which "introduc[es] adversarial perturbation, which enhances the difference in the
    attention of the sentences". Details read in the official code
    (shunk031/attention-meets-perturbation @98a8c21, ``amep/modules/attention_layer/bc/advt.py``
    and ``amep/models/bc/at_advt.py``): the perturbation is added to the pre-softmax scores
    with ``F.normalize(grad)`` (L2 over the sequence) times ``xi``; for iAT the code builds
    the pairwise differences of the batch's attention vectors but its perturbation is
    ``xi·normalize(−∂L/∂s)`` (the difference terms enter with a zero coefficient), which is
    what ``variant="iat"`` does here. The catalogue's single-query scores become one
    perturbation per attention row ``[B, H, N, M]`` in a multi-head layer.

    After a step, ``perturbations`` holds the ``r`` of each host call.
    """

    def __init__(self, eps: float = 1.0, *, variant: str = "at", lam: float = 1.0) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
        self.eps, self.lam = float(eps), float(lam)
        self.variant = check_choice("variant", variant, ("at", "iat"))
        self._mode = "off"
        self._probes: list[torch.Tensor] = []
        self._calls = 0
        self.perturbations: list[torch.Tensor] = []

    def from_qk(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, scale: float) -> Any:
        """The per-call score modifier: nothing, a zero probe, or the stored perturbation."""
        from attnzoo.patterns import Bias

        if self._mode == "off":
            return None
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if self._mode == "probe":
            delta = torch.zeros(shape, dtype=q.dtype, device=q.device, requires_grad=True)
            self._probes.append(delta)
            return Bias(delta)
        if self._calls >= len(self.perturbations):
            raise RuntimeError("attention_adversarial: the perturbed pass made more attention calls than the probe")
        r = self.perturbations[self._calls]
        self._calls += 1
        if tuple(r.shape) != shape:
            raise RuntimeError(f"attention_adversarial: call {self._calls} has scores {list(shape)}, the probe had "
                               f"{list(r.shape)}; loss_fn must make the same calls both times")
        return Bias(r.to(q.dtype))

    def perturbation(self, grad: torch.Tensor) -> torch.Tensor:
        """``r`` from ``g = ∂L/∂s`` ``[B, H, N, M]``: ``±ε·g/‖g‖`` per attention row."""
        direction = grad if self.variant == "at" else -grad
        return self.eps * torch.nn.functional.normalize(direction, p=2.0, dim=-1)

    def losses(self, loss_fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(a), L(a + r))``; ``loss_fn()`` runs the host model(s) and returns a scalar loss."""
        self._mode, self._probes = "probe", []
        try:
            loss = loss_fn()
        finally:
            self._mode = "off"
        probes, self._probes = self._probes, []
        if not probes:
            raise RuntimeError("attention_adversarial: loss_fn made no attention call through this modifier")
        grads = torch.autograd.grad(loss, probes, retain_graph=True, allow_unused=True)
        self.perturbations = [self.perturbation(torch.zeros_like(p) if g is None else g).detach()
                              for p, g in zip(probes, grads)]
        self._mode, self._calls = "perturb", 0
        try:
            adv = loss_fn()
        finally:
            self._mode = "off"
        if self._calls != len(self.perturbations):
            raise RuntimeError("attention_adversarial: the perturbed pass made fewer attention calls than the probe")
        return loss, adv

    def training_loss(self, loss_fn: Any) -> torch.Tensor:
        """``L(a) + lam·L(a + r)``: backpropagate it instead of ``L``."""
        loss, adv = self.losses(loss_fn)
        return loss + self.lam * adv

    def extra_repr(self) -> str:
        return f"eps={self.eps}, variant={self.variant!r}, lam={self.lam}"


def _adv_setup(eps: float, variant: str = "at") -> tuple[nn.Module, AttentionAdversarial, Any]:
    adv = AttentionAdversarial(eps, variant=variant)
    m = seeded(MultiHeadAttention, dim=32, n_heads=4, score_mod=adv)
    x = _x()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    target = _x(seed=5)
    return m, adv, lambda: ((m(x, causal=True, mask=keep) - target) ** 2).sum()


def _adv_norm() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for variant in ("at", "iat"):
        m, adv, loss_fn = _adv_setup(0.7, variant)
        adv.losses(loss_fn)
        (r,) = adv.perturbations
        norms = r.norm(dim=-1)
        # rows with one visible key have ∂L/∂s = 0 (a softmax over one logit is constant), and padded
        # query rows have no loss: those get r = 0; every other row gets ‖r‖ = ε
        i = torch.arange(10).view(1, 1, -1)
        live = (i >= 1) & ((torch.arange(2).view(-1, 1, 1) == 0) | (i < 7))
        live = live.expand_as(norms)
        got.append(torch.cat([norms[live], norms[~live]]))
        want.append(torch.cat([torch.full_like(norms[live], 0.7), torch.zeros_like(norms[~live])]))
    return torch.cat(got), torch.cat(want)


def _adv_eps_zero() -> tuple[torch.Tensor, torch.Tensor]:
    m, adv, loss_fn = _adv_setup(0.0)
    loss, adv_loss = adv.losses(loss_fn)
    plain = loss_fn()
    return torch.stack([loss, adv_loss]), torch.stack([plain, plain])


def _adv_direction() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for variant, sign in (("at", 1.0), ("iat", -1.0)):
        m, adv, loss_fn = _adv_setup(0.3, variant)
        adv._mode, adv._probes = "probe", []
        g = torch.autograd.grad(loss_fn(), adv._probes)[0]
        adv._mode = "off"
        adv.losses(loss_fn)
        got.append(adv.perturbations[0] * g.norm(dim=-1, keepdim=True))
        want.append(sign * 0.3 * g)
    return torch.stack(got), torch.stack(want)


@register(
    "attention_adversarial", family=FAMILY, type="score_mod", priority=3, papers=("Attention AT/iAT",),
    supports={"self", "cross", "causal", "padding", "decoding", "gqa", "training"}, complexity="O(N^2)",
    reference="the host mha with backend='reference' in float64",
    summary="Adversarial training on attention logits: train on L(a) + L(a + eps g/|g|) (AT; iAT variant).",
    test_kwargs={"eps": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("perturbation_norm", "‖r‖ = ε for every attention row that has keys (AT and iAT)", _adv_norm),
        Reduction("eps_zero_standard_loss", "ε = 0 gives the standard loss (both passes equal L)", _adv_eps_zero),
        Reduction("direction", "r ∥ +∂L/∂s per row for AT (ascent), ∥ −∂L/∂s for iAT (the official code)",
                  _adv_direction),
    ),
)
def attention_adversarial(eps: float = 1.0, *, variant: str = "at", lam: float = 1.0) -> AttentionAdversarial:
    """Attention AT / iAT (:class:`AttentionAdversarial`); host it as ``mha(..., score_mod=...)``."""
    return AttentionAdversarial(eps, variant=variant, lam=lam)


__all__ += ["AttentionAdversarial", "GatheredCausal"]


# ----------------------------------------------------------------- deconstructed_attention
class DeconstructedAttention(AttentionMixer):
    """Deconstructing Attention: causal attention with one design principle relaxed (``mode``).

    - ``"none"``: no token mixing, ``y_t = W_O W_V x_t`` (every token attends only to itself).
    - ``"static"``: learned, sequence-independent weights ``y_t = Σ_{s≤t} W_ts V x_s`` with
      ``W = softmax`` over the allowed keys of a learned logit table ``[H, max_len, max_len]``
      (zero-initialised: a running mean); positions are absolute (``max_len`` bounds them).
    - ``"alt_score"``: a score other than dot product + softmax. The abstract does not give
      the form; here it is sigmoid weighting without normalisation,
      ``a_ij = σ(q_i·k_j/√d − log n_i)`` over the ``n_i`` keys row i may see (the
      ``−log n`` bias of sigmoid attention keeps the row mass O(1)).
    - ``"decoupled_qk"``: Q and K come from another hidden state passed as
      ``layer(x, qk_source=h)`` (a fixed other layer's output, ``qk_dim`` wide), V from
      ``x``; without ``qk_source`` it is ``mha`` on ``x``.

    Checked against the abstract (Deconstructing Attention): the four principles (token
    mixing, sequence-dependent activations, "dot-product similarities plus softmax
    weighting", queries and keys coupled to "evolving hidden states") and variants that
    relax them "applied both uniformly across all layers and in hybrid architectures"
    (stack them, or interleave with ``mha``). Every mode is causal with ``causal=True`` and
    decodes through a :class:`KVCache`. Self-attention only.
    """

    cross_ok = False
    MODES = ("none", "static", "alt_score", "decoupled_qk")

    def __init__(self, dim: int, n_heads: int = 8, *, mode: str = "static", max_len: int = 256,
                 head_dim: int | None = None, qk_dim: int | None = None, bias: bool = True, pattern: Any = None,
                 backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        super().__init__(dim, pattern=pattern, backend=backend)
        self.mode = check_choice("mode", mode, self.MODES)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.max_len = check_int("max_len", max_len)
        width = n_heads * head_dim
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.o_proj = nn.Linear(width, dim, bias=bias)
        if mode in ("alt_score", "decoupled_qk"):
            qk_in = dim if qk_dim is None else check_int("qk_dim", qk_dim)
            self.q_proj = nn.Linear(qk_in if mode == "decoupled_qk" else dim, width, bias=bias)
            self.k_proj = nn.Linear(qk_in if mode == "decoupled_qk" else dim, width, bias=bias)
        if mode == "static":
            from attnzoo.layers.cache import window_of

            if window_of(pattern) is not None:
                raise ValueError("pattern: mode='static' uses absolute positions, which a windowed (trimmed) "
                                 "cache would break")
            self.static_logits = nn.Parameter(torch.zeros(n_heads, max_len, max_len))
        self._qk_source: torch.Tensor | None = None

    def forward(self, x, *, qk_source: torch.Tensor | None = None, **kw: Any):
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``qk_source`` ``[B, N, qk_dim]`` for ``mode="decoupled_qk"``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        if qk_source is not None:
            if self.mode != "decoupled_qk":
                raise ValueError(f"qk_source: only mode='decoupled_qk' takes it, this layer has mode={self.mode!r}")
            want = (x.shape[0], x.shape[1], self.q_proj.in_features)
            if not isinstance(qk_source, torch.Tensor) or tuple(qk_source.shape) != want:
                got = list(qk_source.shape) if isinstance(qk_source, torch.Tensor) else type(qk_source).__name__
                raise ValueError(f"qk_source: expected a tensor {list(want)}, got {got}")
        elif self.mode == "decoupled_qk" and self.q_proj.in_features != self.dim:
            raise ValueError(f"qk_source: mode='decoupled_qk' with qk_dim={self.q_proj.in_features} != dim={self.dim} "
                             "needs qk_source (without it Q and K come from x, which needs qk_dim == dim)")
        self._qk_source = qk_source
        try:
            return super().forward(x, **kw)
        finally:
            self._qk_source = None

    def project(self, x, src):
        split = MultiHeadAttention.split
        v = split(self.v_proj(x), self.n_heads)
        if self.mode in ("none", "static"):
            blank = x.new_zeros(x.shape[0], self.n_heads, x.shape[1], 1)
            return blank, blank, v
        h = x if self._qk_source is None else self._qk_source.to(x.dtype)
        return split(self.q_proj(h), self.n_heads), split(self.k_proj(h), self.n_heads), v

    def attend(self, q, k, v, pattern, want_weights):
        from attnzoo.ops.layout import Shape
        from attnzoo.patterns import Bias

        b, h, n, _ = q.shape
        m = k.shape[2]
        if self.mode == "none":
            weights = None
            if want_weights:
                weights = torch.eye(m, dtype=v.dtype, device=v.device)[m - n:].expand(b, h, n, m)
            return v[:, :, m - n:], weights
        if self.mode == "static":
            if m > self.max_len:
                raise ValueError(f"x: mode='static' was built for max_len={self.max_len} positions, got {m}")
            bias = self.static_logits[:, m - n:m, :m].unsqueeze(0).to(v.dtype)
            res = attention(q, k, v, pattern=pattern, score_mod=Bias(bias), scale=1.0,
                            backend="reference" if want_weights else self.backend, return_weights=want_weights)
            return (res[0], res[1]) if want_weights else (res, None)
        if self.mode == "decoupled_qk":
            return super().attend(q, k, v, pattern, want_weights)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        allowed = (torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device) if pattern is None
                   else pattern.dense_mask(Shape(b, h, n, m), q.device))
        count = allowed.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
        a = torch.sigmoid(s - torch.log(count)) * allowed.to(s.dtype)
        return torch.matmul(a, v), (a if want_weights else None)

    def output(self, z, x):
        return self.o_proj(MultiHeadAttention.merge(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, mode={self.mode!r}"


def _deconstructed(mode: str, seed: int = 0) -> DeconstructedAttention:
    m = seeded(DeconstructedAttention, seed, dim=32, n_heads=4, mode=mode, max_len=16)
    if mode == "static":
        with torch.no_grad():
            m.static_logits.normal_(generator=torch.Generator().manual_seed(seed))
    return m


def _dec_causal() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    x, h = _x(n=12), _x(n=12, seed=7)
    for mode in DeconstructedAttention.MODES:
        m = _deconstructed(mode)
        kw = {"qk_source": h} if mode == "decoupled_qk" else {}
        y = m(x, causal=True, **kw)
        for t in (0, 4, 9):
            x2, h2 = x.clone(), h.clone()
            x2[:, t + 1:] += 1.0
            h2[:, t + 1:] -= 1.0
            kw2 = {"qk_source": h2} if mode == "decoupled_qk" else {}
            got.append(m(x2, causal=True, **kw2)[:, : t + 1])
            want.append(y[:, : t + 1])
    return torch.cat(got, 1), torch.cat(want, 1)


def _dec_decoding() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    got, want = [], []
    x, h = _x(n=11), _x(n=11, seed=7)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 3] = False
    for mode in DeconstructedAttention.MODES:
        m = _deconstructed(mode)
        kw = (lambda a, b: {"qk_source": h[:, a:b]}) if mode == "decoupled_qk" else (lambda a, b: {})
        want.append(m(x, causal=True, mask=keep, **kw(0, 11)))
        cache, start, parts = KVCache(), 0, []
        for size in (4, 1, 3, 2, 1):
            parts.append(m(x[:, start:start + size], causal=True, mask=keep[:, start:start + size], cache=cache,
                           **kw(start, start + size)))
            start += size
        got.append(torch.cat(parts, 1))
    return torch.stack(got), torch.stack(want)


def _dec_none_jacobian() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("none")
    x = _x(b=1, n=5)
    jac = torch.autograd.functional.jacobian(lambda t: m(t, causal=True), x)  # [1, 5, 32, 1, 5, 32]
    eye = torch.eye(5, dtype=torch.bool).view(1, 5, 1, 1, 5, 1)
    return jac.masked_fill(eye, 0.0), torch.zeros_like(jac)


def _dec_static_content_free() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("static")
    _, w1 = m(_x(), causal=True, return_weights=True)
    _, w2 = m(_x(seed=3) * 4.0, causal=True, return_weights=True)
    return w2, w1


def _dec_alt_score_form() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("alt_score")
    x = _x()
    q, k, _ = m.project(x, x)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    n = torch.arange(1, 11, dtype=torch.float64).view(1, 1, -1, 1)
    want = torch.sigmoid(s - n.log()) * torch.ones(10, 10, dtype=torch.bool).tril()
    return m(x, causal=True, return_weights=True)[1], want


def _dec_decoupled_self_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    d = _deconstructed("decoupled_qk")
    ref = MultiHeadAttention(32, 4).double()
    copy_mha(d, ref)
    x = _x()
    return d(x, causal=True, qk_source=x), ref(x, causal=True)


@register(
    "deconstructed_attention", family=FAMILY, type="mixer", priority=3, papers=("Deconstructing Attention",),
    supports={"self", "causal", "padding", "decoding"},
    summary="Causal attention ablations: no mixing, static learned weights, sigmoid score, decoupled Q/K source.",
    test_kwargs={"dim": 32, "n_heads": 4, "mode": "alt_score"},
    reductions=(
        Reduction("every_mode_causal", "every mode is causal (prefix outputs ignore later tokens)", _dec_causal),
        Reduction("every_mode_decodes", "every mode decodes through the KV cache exactly (with padding)",
                  _dec_decoding),
        Reduction("none_block_diagonal", "mode none has a block-diagonal Jacobian", _dec_none_jacobian),
        Reduction("static_content_free", "static weights do not change when token contents change",
                  _dec_static_content_free),
        Reduction("alt_score_form", "alt_score weights are sigmoid(q·k/√d − log n_i) on allowed keys",
                  _dec_alt_score_form),
        Reduction("decoupled_self_is_mha", "decoupled_qk with qk_source = x is mha", _dec_decoupled_self_is_mha),
    ),
)
def deconstructed_attention(dim: int, n_heads: int = 8, *, mode: str = "static", max_len: int = 256,
                            head_dim: int | None = None, qk_dim: int | None = None, bias: bool = True,
                            pattern: Any = None, backend: str = "auto") -> DeconstructedAttention:
    """Deconstructed attention ablations (:class:`DeconstructedAttention`)."""
    return DeconstructedAttention(dim, n_heads, mode=mode, max_len=max_len, head_dim=head_dim, qk_dim=qk_dim,
                                  bias=bias, pattern=pattern, backend=backend)


__all__ += ["DeconstructedAttention"]


# ------------------------------------------------------------------------------ flashblock
class BlockCausal(Pattern):
    """Block-causal (block diffusion): query at position ``p`` sees keys in blocks ``<=`` its block.

    Query ``i`` sits at key position ``i + offset`` (offset defaults to ``n_kv − n_q``, the
    KV-cache convention); blocks are ``block`` tokens long from position 0.
    """

    def __init__(self, block: int, offset: int | None = None) -> None:
        self.block = check_int("block", block)
        self.offset = offset

    def _off(self, shape) -> int:
        return shape.offset if self.offset is None else self.offset

    def allow(self, b, h, q, kv, shape):
        return torch.div(kv, self.block, rounding_mode="floor") <= torch.div(q + self._off(shape), self.block,
                                                                           rounding_mode="floor")

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off, bs = self._off(shape), self.block
        return k_lo // bs <= (q_hi + off) // bs, k_hi // bs <= (q_lo + off) // bs


class FlashBlockAttention(MultiHeadAttention):
    """FlashBlock: block-diffusion attention whose block-external part is cached across denoising steps.

    Full-sequence forward: block-causal attention (each token sees its own block
    bidirectionally and every earlier block; ``causal=True`` adds token causality), so
    the layer also trains and decodes like any mixer. Block-diffusion inference:

    - ``denoise(x_block, cache, refresh=...)`` runs one denoising step of the current block
      (tokens at positions ``cache.position ...``). Its queries attend the block itself
      (the internal part, recomputed every step) and the committed earlier blocks in
      ``cache`` (the external part). With ``refresh=True`` (or on the first step of a
      block) the external output and its row log-sum-exp are computed and stored in
      ``cache.state``; with ``refresh=False`` the stored ones are reused, skipping every
      access to the cached keys. The two parts are merged exactly by their lse
      (:func:`attnzoo.merge_partials`).
    - ``commit(x_block, cache)`` appends the final block's keys/values to the cache.

    Checked against the abstract (FlashBlock): "attention outputs from tokens outside the
    current block remain largely stable across diffusion steps, while block-internal
    attention varies", and "a cached block-external attention mechanism that reuses
    stable attention output". The lse merge is the catalogue's inference (the abstract
    does not state it); it makes ``refresh=True`` exactly full attention. Self-attention only.
    """

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 16, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        if self.pattern is not None:
            raise ValueError("pattern: flashblock's pattern is block-causal (set by block_size); got another one")

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        self.pattern = BlockCausal(self.block_size)
        try:
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   cache=cache, head_mask=head_mask, return_weights=return_weights)
        finally:
            self.pattern = None

    def denoise(self, x: torch.Tensor, cache: Any, *, refresh: bool = True,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising step of the current block ``x`` ``[B, n, C]`` (``n <= block_size``)."""
        from attnzoo.layers.cache import KVCache

        self.check_call(x, mask, False, None, cache)
        if not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected an attnzoo.layers.KVCache, got {type(cache).__name__}")
        if x.shape[1] > self.block_size or cache.position % self.block_size:
            raise ValueError(f"x: a block is at most block_size={self.block_size} tokens starting at a multiple of "
                             f"it; got {x.shape[1]} tokens at position {cache.position}")
        q, k, v = self.project(x, x)
        if self.qk_transform is not None:
            q, k = self.qk_transform(q, k, q_offset=cache.position, k_offset=cache.position)
        pad = KeyPadding(mask) if mask is not None and not bool(mask.all()) else None
        outs, lses = [], []
        o, lse = attention(q, k, v, pattern=pad, scale=self.scale, backend=self.backend, return_lse=True)
        outs.append(o)
        lses.append(lse)
        if len(cache):
            stored = cache.state.get("flashblock")
            if refresh or stored is None or stored[0].shape != o.shape:
                ext_pad = KeyPadding(cache.keep) if cache.keep is not None and not bool(cache.keep.all()) else None
                stored = attention(q, cache.k, cache.v, pattern=ext_pad, scale=self.scale, backend=self.backend,
                                   return_lse=True)
                cache.state["flashblock"] = tuple(t.detach() for t in stored)
            outs.append(stored[0])
            lses.append(stored[1])
        z = merge_partials(outs, lses)[0] if len(outs) > 1 else o
        return zero_padded(self.output(self.post_attention(z, x), x), mask)

    def commit(self, x: torch.Tensor, cache: Any, *, mask: torch.Tensor | None = None) -> None:
        """Append the final (denoised) block ``x`` to the cache and drop the stored external part."""
        self.check_call(x, mask, False, None, cache)
        _, k, v = self.project(x, x)
        if self.qk_transform is not None:
            _, k = self.qk_transform(k[:, :1], k, q_offset=cache.position, k_offset=cache.position)
        cache.append(k, v, mask)
        cache.advance(x.shape[1])
        cache.state.pop("flashblock", None)


def _fb_prefix(m: FlashBlockAttention, blocks: list[torch.Tensor]) -> Any:
    from attnzoo.layers.cache import KVCache

    cache = KVCache()
    for blk in blocks:
        m.commit(blk, cache)
    return cache


def _fb_refresh_is_full() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.positional import RotaryEmbedding

    got, want = [], []
    for rope in (None, RotaryEmbedding(8)):
        m = seeded(FlashBlockAttention, dim=32, n_heads=4, block_size=4, rope=rope)
        prefix = [_x(n=4, seed=s) for s in (1, 2)]
        cache = _fb_prefix(m, prefix)
        for step in range(3):  # three denoising steps of block 3, refreshing every time
            cur = _x(n=4, seed=10 + step)
            got.append(m.denoise(cur, cache, refresh=True))
            want.append(m(torch.cat([*prefix, cur], 1))[:, 8:])
    return torch.cat(got, 1), torch.cat(want, 1)


def _fb_lse_merge() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    inner = attention(q, k[:, :, 8:], v[:, :, 8:], return_lse=True)
    outer = attention(q, k[:, :, :8], v[:, :, :8], return_lse=True)
    out, lse = merge_partials([inner[0], outer[0]], [inner[1], outer[1]])
    full, full_lse = attention(q, k, v, return_lse=True)
    return torch.cat([out, lse.unsqueeze(-1)], -1), torch.cat([full, full_lse.unsqueeze(-1)], -1)


def _fb_reuse() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(FlashBlockAttention, dim=32, n_heads=4, block_size=4)
    cache = _fb_prefix(m, [_x(n=4, seed=1), _x(n=4, seed=2)])
    first, later = _x(n=4, seed=10), _x(n=4, seed=11)
    m.denoise(first, cache, refresh=True)
    reused = m.denoise(later, cache, refresh=False)
    # reuse = internal part of the new step merged with the external part of the first step
    q_old = m.project(first, first)[0]
    q_new, k_new, v_new = m.project(later, later)
    ext = attention(q_old, cache.k, cache.v, return_lse=True)
    inn = attention(q_new, k_new, v_new, return_lse=True)
    z = merge_partials([inn[0], ext[0]], [inn[1], ext[1]])[0]
    return reused, m.o_proj(MultiHeadAttention.merge(z))


@register(
    "flashblock", family=FAMILY, type="mixer", priority=3, papers=("FlashBlock",),
    supports={"self", "causal", "padding", "decoding", "gqa"},
    summary="Block-diffusion attention; the block-external part (and its lse) is cached across denoising steps.",
    test_kwargs={"dim": 32, "n_heads": 4, "block_size": 4},
    reductions=(
        Reduction("refresh_is_full", "refreshing the external part every step gives full attention exactly "
                  "(with and without rope)", _fb_refresh_is_full),
        Reduction("lse_merge", "the lse merge of the internal and external partials is softmax over the union",
                  _fb_lse_merge),
        Reduction("reuse_is_stale_merge", "refresh=False merges the new internal part with the stored external one",
                  _fb_reuse),
    ),
)
def flashblock(dim: int, n_heads: int = 8, *, block_size: int = 16, head_dim: int | None = None,
               n_kv_heads: int | None = None, bias: bool = True, rope: Any = None, scale: float | None = None,
               backend: str = "auto") -> FlashBlockAttention:
    """FlashBlock block-diffusion attention (:class:`FlashBlockAttention`)."""
    return FlashBlockAttention(dim, n_heads, block_size=block_size, head_dim=head_dim, n_kv_heads=n_kv_heads,
                               bias=bias, rope=rope, scale=scale, backend=backend)


__all__ += ["BlockCausal", "FlashBlockAttention"]
