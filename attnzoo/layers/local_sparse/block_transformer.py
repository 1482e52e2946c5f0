"""``block_transformer``: Block Transformer: causal attention over block embeddings, then token
attention inside the block plus one context prefix (local KV cache of L_B + 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.cache import KVCache
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.ops import attention
from attnzoo.patterns import Causal, KeyPadding, Pattern
from attnzoo.registry import Reduction, register


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
    m = seeded(BlockTransformerAttention, dim=32, n_heads=4, block_size=3)
    x = rand_x(n=23)
    cache = KVCache()
    for t in range(23):
        m(x[:, t:t + 1], cache=cache)
    return torch.tensor([float(cache.state["max_local"])], dtype=torch.float64), torch.tensor([4.0],
                                                                                             dtype=torch.float64)


def _bt_context_causal():
    m = seeded(BlockTransformerAttention, dim=32, n_heads=4, block_size=3)
    x = rand_x(n=15)
    x2 = x.clone()
    x2[:, 9:] += 1.0  # blocks 3 and 4
    return m.contexts(x2)[:, :3], m.contexts(x)[:, :3]


register(
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
)(BlockTransformerAttention)
