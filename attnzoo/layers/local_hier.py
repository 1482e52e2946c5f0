"""Catalogue section 3, hierarchical mixers: Combiner (full support through region abstractions) and
Block Transformer (global block decoder, local token decoder)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, check_mixer_input, zero_padded
from attnzoo.layers.cache import KVCache
from attnzoo.ops import attention
from attnzoo.ops.score_mod import ScoreMod
from attnzoo.patterns import Causal, KeyPadding, Pattern
from attnzoo.registry import Reduction, register

__all__ = ["BlockTransformerAttention", "CombinerAttention"]

FAMILY = "local-sparse"


# ----------------------------------------------------------------------------------- Combiner
class _CombinerPattern(Pattern):
    """Keys ``[tokens (m) ; regions (r)]``: query ``i`` (position ``q + m - n``) sees the tokens of its
    own region directly (causal: ``j <= i``) and every other region's abstraction (causal: earlier regions)."""

    def __init__(self, m: int, block: int, causal: bool) -> None:
        self.m, self.block, self.causal = m, block, causal

    def allow(self, b, h, q, kv, shape):
        i = q + (self.m - shape.n_q)
        own = torch.div(i, self.block, rounding_mode="floor")
        direct = (kv < self.m) & (torch.div(kv, self.block, rounding_mode="floor") == own)
        region = kv - self.m
        abstract = (kv >= self.m) & ((region < own) if self.causal else (region != own))
        if self.causal:
            direct = direct & (kv <= i)
        return direct | abstract

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        off = self.m - shape.n_q
        i_lo, i_hi = q_lo + off, q_hi + off
        o_lo, o_hi = i_lo // self.block, i_hi // self.block
        t_lo, t_hi = k_lo, k_hi.clamp(max=self.m - 1)
        d_any = (k_lo < self.m) & (t_lo // self.block <= o_hi) & (t_hi // self.block >= o_lo)
        d_all = (k_hi < self.m) & (o_lo == o_hi) & (k_lo // self.block == o_lo) & (k_hi // self.block == o_lo)
        if self.causal:
            d_any, d_all = d_any & (k_lo <= i_hi), d_all & (k_hi <= i_lo)
        r_lo, r_hi = (k_lo - self.m).clamp(min=0), k_hi - self.m
        if self.causal:
            a_any = (k_hi >= self.m) & (r_lo < o_hi)
            a_all = (k_lo >= self.m) & (r_hi < o_lo)
        else:
            a_any = (k_hi >= self.m) & ~((r_lo == r_hi) & (o_lo == o_hi) & (r_lo == o_lo))
            a_all = (k_lo >= self.m) & ((r_hi < o_lo) | (r_lo > o_hi))
        return d_any | a_any, d_all | a_all


class _RegionLogSize(ScoreMod):
    """``s += log |region|`` on the region keys (the abstraction stands for that many tokens)."""

    additive = True
    per_batch = True

    def __init__(self, log_size: torch.Tensor, m: int) -> None:
        self.log_size, self.m = log_size, m  # [B, R]

    def __call__(self, score, b, h, q, kv, shape):
        ls = self.on(self.log_size, score)
        region = (kv - self.m).clamp(min=0, max=ls.shape[1] - 1)
        return score + torch.where(kv >= self.m, ls[b, region], torch.zeros((), dtype=score.dtype, device=score.device))


class CombinerAttention(MultiHeadAttention):
    """Combiner (fixed partition): full-support attention in O(N b + N^2 / b).

    Tokens are split into regions of ``block`` tokens. Query ``i`` attends directly to the
    tokens of its own region (causal: up to ``i``) and to one abstraction per other region
    (causal: per earlier region): ``k_r = sum_j q(j|r) k_j``, ``v_r = sum_j q(j|r) v_j`` with
    ``q(j|r) = softmax_{j in r}(k_j . u_h / sqrt(d))`` (``u_h`` learned, zero-initialised: the
    mean) and logit ``q_i . k_r / sqrt(d) + log |r|``. One softmax over both, so the effective
    weight of token ``j`` in region ``r`` is ``p(r | i) q(j | r)``: every allowed position gets
    positive weight and the weights sum to 1. ``block = 1`` (singleton regions) is exact full
    attention. Padded tokens are left out of the abstractions.
    """

    cross_ok = False  # regions partition one sequence: no cross-attention

    def __init__(self, dim: int, n_heads: int = 8, *, block: int = 16, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"n_kv_heads: Combiner needs n_kv_heads = n_heads, got {self.n_kv_heads}")
        self.block = check_int("block", block)
        self.region_query = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def abstractions(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None):
        """``(k_r [B, H, R, D], v_r, q(j|r) [B, H, R, block], region sizes [B, R])``."""
        b, h, m, d = k.shape
        r = math.ceil(m / self.block)
        pad = r * self.block - m
        kg = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, r, self.block, d)
        vg = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(b, h, r, self.block, -1)
        real = torch.nn.functional.pad(torch.ones(b, m, dtype=torch.bool, device=k.device) if keep is None else keep,
                                       (0, pad)).view(b, 1, r, self.block)
        logits = (kg * self.region_query.to(k.dtype).view(1, h, 1, 1, d)).sum(-1) / math.sqrt(d)
        logits = logits.masked_fill(~real, float("-inf"))
        any_real = real.any(-1, keepdim=True)
        w = torch.softmax(torch.where(any_real, logits, torch.zeros_like(logits)), -1) * any_real
        size = real[:, 0].sum(-1)  # [B, R]
        return (w.unsqueeze(-1) * kg).sum(-2), (w.unsqueeze(-1) * vg).sum(-2), w, size

    def _extended(self, q, k, v, pattern):
        b, h, n, _ = q.shape
        m = k.shape[2]
        causal = _has_causal(pattern)
        keep = _keep(pattern)
        kr, vr, w, size = self.abstractions(k, v, keep)
        keys = torch.cat([k, kr], 2)
        vals = torch.cat([v, vr], 2)
        pat: Pattern = _CombinerPattern(m, self.block, causal)
        valid = torch.cat([torch.ones(b, m, dtype=torch.bool, device=q.device) if keep is None else keep, size > 0], 1)
        if not bool(valid.all()):
            pat = pat & KeyPadding(valid)
        mod = _RegionLogSize(torch.log(size.clamp(min=1).to(q.dtype)), m)
        return keys, vals, pat, mod, w

    def attend(self, q, k, v, pattern, want_weights):
        keys, vals, pat, mod, _ = self._extended(q, k, v, pattern)
        res = attention(q, keys, vals, pattern=pat, score_mod=mod, scale=self.attention_scale(q),
                        backend="reference" if want_weights else self.backend, return_weights=want_weights)
        if not want_weights:
            return res, None
        return res[0], self._effective(res[1], pattern, k, v)

    def _effective(self, w_ext: torch.Tensor, pattern, k, v) -> torch.Tensor:
        """Effective weights ``[B, H, N, M]`` over tokens: direct weights plus ``p(r | i) q(j | r)``."""
        m = k.shape[2]
        _, _, _, _, qjr = self._extended(k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[-1]), k, v, pattern)
        direct, region = w_ext[..., :m], w_ext[..., m:]  # [B, H, N, M], [B, H, N, R]
        spread = (region.unsqueeze(-1) * qjr.unsqueeze(2)).flatten(-2)[..., :m]
        return direct + spread

    def effective_weights(self, x: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """``[B, H, N, N]``: the attention each token gives to each token, abstractions expanded."""
        return self(x, causal=causal, return_weights=True)[1]


def _has_causal(pattern: Any) -> bool:
    from attnzoo.patterns import And

    if isinstance(pattern, Causal):
        return True
    return isinstance(pattern, And) and (_has_causal(pattern.a) or _has_causal(pattern.b))


def _keep(pattern: Any) -> torch.Tensor | None:
    from attnzoo.patterns import And

    if isinstance(pattern, KeyPadding):
        return pattern.mask
    if isinstance(pattern, And):
        a = _keep(pattern.a)
        return a if a is not None else _keep(pattern.b)
    return None


def _x(b: int = 2, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _seeded(cls: Any, seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw).double()


def _mha_of(m: nn.Module) -> MultiHeadAttention:
    ref = MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim, backend="reference").double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k in ref.state_dict()})
    return ref


def _combiner_singletons():
    m = _seeded(CombinerAttention, dim=32, n_heads=4, block=1)
    with torch.no_grad():
        m.region_query.normal_()
    x = _x()
    return torch.stack([m(x), m(x, causal=True)]), torch.stack([_mha_of(m)(x), _mha_of(m)(x, causal=True)])


def _combiner_weights():
    m = _seeded(CombinerAttention, dim=32, n_heads=4, block=4)
    with torch.no_grad():
        m.region_query.normal_()
    x = _x(n=14)
    got, want = [], []
    for causal in (False, True):
        w = m.effective_weights(x, causal=causal)
        support = torch.ones(14, 14, dtype=torch.bool)
        if causal:
            support = torch.tril(support)
        got += [w.sum(-1).flatten(), (w > 0).eq(support).double().flatten()]
        want += [torch.ones(w.shape[:-1], dtype=torch.float64).flatten(), torch.ones_like(w).flatten()]
    return torch.cat(got), torch.cat(want)


@register(
    "combiner", family=FAMILY, type="mixer", priority=3, papers=("Combiner",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N b + N^2 / b)",
    summary="Combiner (fixed partition): direct attention in the own region, one learned-weighted abstraction "
            "per other region, in one softmax: full support.",
    test_kwargs={"dim": 32, "n_heads": 4, "block": 4},
    reductions=(
        Reduction("singletons_are_full", "singleton regions give full (and causal) attention", _combiner_singletons),
        Reduction("full_support_sums_to_one", "effective weights are positive on every allowed position and sum to 1",
                  _combiner_weights),
    ),
)
def combiner(dim: int, n_heads: int = 8, *, block: int = 16, head_dim: int | None = None, bias: bool = True,
             rope: Any = None, scale: float | None = None, backend: str = "auto") -> CombinerAttention:
    """Combiner attention (:class:`CombinerAttention`)."""
    return CombinerAttention(dim, n_heads, block=block, head_dim=head_dim, bias=bias, rope=rope, scale=scale,
                             backend=backend)


# --------------------------------------------------------------------------- Block Transformer
class _BlockLocal(Pattern):
    """Keys ``[prefixes (n_blocks) ; tokens]``: token ``i`` sees its block's prefix and the earlier
    tokens of its block."""

    def __init__(self, block: int, n_blocks: int) -> None:
        self.block, self.n_blocks = block, n_blocks

    def allow(self, b, h, q, kv, shape):
        own = torch.div(q, self.block, rounding_mode="floor")
        j = kv - self.n_blocks
        tok = (kv >= self.n_blocks) & (torch.div(j, self.block, rounding_mode="floor") == own) & (j <= q)
        return tok | (kv == own)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        nb = self.n_blocks
        o_lo, o_hi = q_lo // self.block, q_hi // self.block
        p_any = (k_lo < nb) & (k_lo <= o_hi) & (k_hi.clamp(max=nb - 1) >= o_lo)
        p_all = (k_hi < nb) & (k_lo == k_hi) & (o_lo == o_hi) & (k_lo == o_lo)
        j_lo, j_hi = (k_lo - nb).clamp(min=0), k_hi - nb
        t_any = (k_hi >= nb) & (j_lo // self.block <= o_hi) & (j_hi // self.block >= o_lo) & (j_lo <= q_hi)
        t_all = (k_lo >= nb) & (o_lo == o_hi) & (j_lo // self.block == o_lo) & (j_hi // self.block == o_lo) & (
            j_hi <= q_lo)
        return p_any | t_any, p_all | t_all


class BlockTransformerAttention(nn.Module):
    """Block Transformer (global-to-local), as one causal token mixer.

    Block decoder (lower): each block of ``block_size`` tokens is embedded into one vector
    (a linear map of the concatenated tokens) and causal attention runs over the block
    sequence, giving context ``c_b`` (``c_b = e_b + attn(e_{<=b})``). Token decoder (upper):
    token ``t`` of block ``b`` attends only to the tokens of its block up to ``t`` plus one
    context-embedding prefix, ``W_p c_{b-1}`` (a learned start vector for block 0). So the
    upper layer's KV cache holds at most ``block_size + 1`` entries whatever the context
    length. Always causal (``causal`` is accepted and has no further effect).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 4, head_dim: int | None = None,
                 bias: bool = True, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.block_size = check_int("block_size", block_size)
        self.embed = nn.Linear(block_size * dim, dim, bias=bias)
        self.block_attn = MultiHeadAttention(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale, backend=backend)
        self.prefix = nn.Linear(dim, dim, bias=bias)
        self.start = nn.Parameter(torch.zeros(dim))
        self.token_attn = MultiHeadAttention(dim, n_heads, head_dim=head_dim, bias=bias, scale=scale,
                                             backend=backend)

    def contexts(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Block-decoder contexts ``c`` ``[B, n_blocks, C]`` (``c_b`` depends on blocks ``<= b`` only)."""
        b, n, c = x.shape
        nb = math.ceil(n / self.block_size)
        xm = x if keep is None else x * keep.unsqueeze(-1).to(x.dtype)
        xm = torch.nn.functional.pad(xm, (0, 0, 0, nb * self.block_size - n))
        e = self.embed(xm.reshape(b, nb, self.block_size * c))
        return e + self.block_attn(e, causal=True)

    def prefixes(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prefix vectors ``[B, n_blocks, C]``: the start vector, then ``W_p c_{b-1}``."""
        start = self.start.to(ctx.dtype).view(1, 1, -1).expand(ctx.shape[0], 1, -1)
        return torch.cat([start, self.prefix(ctx[:, :-1])], 1)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = True,
                context: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, None, self.dim)
        if context is not None:
            raise ValueError("context: BlockTransformerAttention is a causal self-attention decoder")
        if cache is not None:
            if mask is not None:
                raise ValueError("mask: KV-cache decoding of BlockTransformerAttention takes no padding mask")
            return self._decode(x, cache)
        b, n, _ = x.shape
        nb = math.ceil(n / self.block_size)
        pre = self.prefixes(self.contexts(x, mask))
        ta = self.token_attn
        q = ta.split(ta.q_proj(x), ta.n_heads)
        src = torch.cat([pre, x], 1)
        k, v = ta.split(ta.k_proj(src), ta.n_kv_heads), ta.split(ta.v_proj(src), ta.n_kv_heads)
        pattern: Pattern = _BlockLocal(self.block_size, nb)
        if mask is not None and not bool(mask.all()):
            pattern = pattern & KeyPadding(torch.cat([torch.ones(b, nb, dtype=torch.bool, device=x.device), mask], 1))
        z = attention(q, k, v, pattern=pattern, scale=ta.scale, backend=ta.backend)
        return zero_padded(ta.output(z, x), mask)

    def _decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        st = cache.state
        outs, start = [], 0
        ta = self.token_attn
        while start < x.shape[1]:
            filled = st["tokens"].shape[1] if "tokens" in st else 0
            take = min(self.block_size - filled, x.shape[1] - start)
            chunk = x[:, start:start + take]
            if filled == 0:  # a new block: its prefix opens the local cache
                st["local"] = KVCache()
                pre = st.get("next_prefix")
                if pre is None:
                    pre = self.start.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
                st["local"].append(ta.split(ta.k_proj(pre), ta.n_kv_heads), ta.split(ta.v_proj(pre), ta.n_kv_heads))
            local: KVCache = st["local"]
            q = ta.split(ta.q_proj(chunk), ta.n_heads)
            k, v, _ = local.append(ta.split(ta.k_proj(chunk), ta.n_kv_heads), ta.split(ta.v_proj(chunk), ta.n_kv_heads))
            z = attention(q, k, v, pattern=Causal(), scale=ta.scale, backend=ta.backend)
            outs.append(ta.output(z, chunk))
            st["tokens"] = chunk if filled == 0 else torch.cat([st["tokens"], chunk], 1)
            st["max_local"] = max(st.get("max_local", 0), len(local))
            if st["tokens"].shape[1] == self.block_size:  # block complete: one block-decoder step
                e = self.embed(st["tokens"].reshape(x.shape[0], 1, -1))
                blocks = st.setdefault("blocks", KVCache())
                c = e + self.block_attn(e, causal=True, cache=blocks)
                st["next_prefix"] = self.prefix(c)
                del st["tokens"]
            start += take
        cache.advance(x.shape[1])
        return torch.cat(outs, 1)


def _bt_local_cache_bound():
    m = _seeded(BlockTransformerAttention, dim=32, n_heads=4, block_size=3)
    x = _x(n=23)
    cache = KVCache()
    for t in range(23):
        m(x[:, t:t + 1], cache=cache)
    return torch.tensor([float(cache.state["max_local"])], dtype=torch.float64), torch.tensor([4.0],
                                                                                             dtype=torch.float64)


def _bt_context_causal():
    m = _seeded(BlockTransformerAttention, dim=32, n_heads=4, block_size=3)
    x = _x(n=15)
    x2 = x.clone()
    x2[:, 9:] += 1.0  # blocks 3 and 4
    return m.contexts(x2)[:, :3], m.contexts(x)[:, :3]


@register(
    "block_transformer", family=FAMILY, type="mixer", priority=3, papers=("Block Transformer",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N^2 / L_B^2 + N L_B)",
    summary="Block Transformer: causal attention over block embeddings, then token attention inside the block "
            "plus one context prefix (local KV cache of L_B + 1).",
    test_kwargs={"dim": 32, "n_heads": 4, "block_size": 3},
    reductions=(
        Reduction("local_cache_bound", "the upper-layer KV cache holds at most L_B + 1 entries at any length",
                  _bt_local_cache_bound),
        Reduction("context_causal", "block i's context is unchanged when later blocks change", _bt_context_causal),
    ),
)
def block_transformer(dim: int, n_heads: int = 8, *, block_size: int = 4, head_dim: int | None = None,
                      bias: bool = True, scale: float | None = None,
                      backend: str = "auto") -> BlockTransformerAttention:
    """Block Transformer attention (:class:`BlockTransformerAttention`)."""
    return BlockTransformerAttention(dim, n_heads, block_size=block_size, head_dim=head_dim, bias=bias, scale=scale,
                                     backend=backend)
