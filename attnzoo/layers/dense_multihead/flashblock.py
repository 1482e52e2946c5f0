"""``flashblock``: Block-diffusion attention; the block-external part (and its lse) is cached across denoising steps."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded, zero_padded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.ops import attention, merge_partials
from attnzoo.patterns import KeyPadding, Pattern
from attnzoo.registry import Reduction, register


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

    call_pattern = True

    refused_arguments = ('context_dim', 'pattern', 'score_mod')  # base-class arguments it sets itself or cannot honour

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 16, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        if self.pattern is not None:
            raise ValueError("pattern: flashblock's pattern is block-causal (set by block_size); got another one")

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        return self.mix(x, mask=mask, causal=causal, context=context, context_mask=context_mask, cache=cache,
                        head_mask=head_mask, return_weights=return_weights, pattern=BlockCausal(self.block_size))

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
    from attnzoo.layers.rotary import RotaryEmbedding

    got, want = [], []
    for rope in (None, RotaryEmbedding(8)):
        m = seeded(FlashBlockAttention, dim=32, n_heads=4, block_size=4, rope=rope)
        prefix = [rand_x(n=4, seed=s) for s in (1, 2)]
        cache = _fb_prefix(m, prefix)
        for step in range(3):  # three denoising steps of block 3, refreshing every time
            cur = rand_x(n=4, seed=10 + step)
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
    cache = _fb_prefix(m, [rand_x(n=4, seed=1), rand_x(n=4, seed=2)])
    first, later = rand_x(n=4, seed=10), rand_x(n=4, seed=11)
    m.denoise(first, cache, refresh=True)
    reused = m.denoise(later, cache, refresh=False)
    # reuse = internal part of the new step merged with the external part of the first step
    q_old = m.project(first, first)[0]
    q_new, k_new, v_new = m.project(later, later)
    ext = attention(q_old, cache.k, cache.v, return_lse=True)
    inn = attention(q_new, k_new, v_new, return_lse=True)
    z = merge_partials([inn[0], ext[0]], [inn[1], ext[1]])[0]
    return reused, m.o_proj(MultiHeadAttention.merge(z))


register(
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
)(FlashBlockAttention)


