"""``pyramid_sparse``: PSA pyramid sparse attention: each query block sees each key block at full, pooled or no
resolution."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    RoutedMixer,
    block_means,
    pool_levels,
    pooled_token_weights,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.ops.routed import mask_lists, routed_reference
from attnzoo.patterns.routed import DenseRouted, key_routed_attention
from attnzoo.registry import Reduction, register

PYRAMID_BACKENDS = ("auto", "reference", "gather", "sdpa", "flex")


def pyramid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *, block_size: int,
                      keep: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
                      return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query block over its key blocks at their assigned pyramid level.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D(_v)]``, ``levels`` int64 ``[B, H, ceil(N / bs), ceil(M / bs)]``
    (``bs = block_size``): ``l >= 0`` attends key block ``j`` through its level-``l`` pooled keys (``2^l`` keys
    averaged, values too), ``-1`` drops it. A pooled key standing for ``c`` kept keys enters the softmax with
    logit ``scale · q·k̄ + log c``: a block of identical keys gives the same result at every level, and level 0
    everywhere is dense attention. ``keep`` bool ``[B, M]`` pads keys. ``backend``: ``"reference"`` (float64
    dense softmax over the concatenated pyramid), ``"gather"`` (each query gathers its selected pooled keys:
    memory linear in ``N x`` selected keys; ``"auto"``), ``"sdpa"``/``"flex"`` (the dense mask through
    :func:`attnzoo.attention`). The ``log c`` term is folded into the dot product (``q' = [q, 1]``,
    ``k' = [k̄, log c / scale]``) so every backend runs plain attention. ``return_weights``: also the
    token-level weights ``[B, H, N, M]`` (a pooled key's weight shared equally by its members), with which the
    output is exactly ``weights @ v``. Queries that see nothing return zeros.
    """
    if backend not in PYRAMID_BACKENDS:
        raise ValueError(f"backend: expected one of {list(PYRAMID_BACKENDS)}, got {backend!r}")
    b, h, n, d = q.shape
    m = k.shape[2]
    nqb, nkb = -(-n // block_size), -(-m // block_size)
    if not isinstance(levels, torch.Tensor) or levels.dtype != torch.int64 or tuple(levels.shape) != (b, h, nqb, nkb):
        got = f"{levels.dtype} {list(levels.shape)}" if isinstance(levels, torch.Tensor) else type(levels).__name__
        raise ValueError(f"levels: expected an int64 tensor [{b}, {h}, {nqb}, {nkb}], got {got}")
    n_levels = int(levels.max()) + 1 if levels.numel() else 1
    n_levels = max(n_levels, 1)
    if int(levels.min()) < -1 or block_size % (1 << (n_levels - 1)):
        raise ValueError(f"levels: entries must lie in [-1, log2(block_size)] with 2^level dividing "
                         f"block_size={block_size}, got range [{int(levels.min())}, {n_levels - 1}]")
    scale = d ** -0.5 if scale is None else scale
    pyramid = pool_levels(k, v, keep, block_size, n_levels)
    ks, vs, allows, counts = [], [], [], []
    qblock = torch.arange(n, device=q.device) // block_size
    for level, (kl, vl, cnt) in enumerate(pyramid):
        per = block_size >> level
        bias = torch.where(cnt > 0, cnt.clamp(min=1).log(), torch.zeros_like(cnt)) / scale
        ks.append(torch.cat([kl, bias.view(b, 1, -1, 1).expand(-1, h, -1, -1).to(kl.dtype)], -1))
        vs.append(vl)
        on = (levels == level).repeat_interleave(per, 3)  # [B, H, nqb, M_l]
        allows.append(on & (cnt > 0).view(b, 1, 1, -1))
        counts.append(cnt)
    kk, vv = torch.cat(ks, 2), torch.cat(vs, 2)
    block_allow = torch.cat(allows, 3)  # [B, H, nqb, M_all]
    qq = torch.cat([q, torch.ones_like(q[..., :1])], -1)
    if return_weights or backend != "gather" and backend != "auto":
        allow = block_allow[:, :, qblock]
        if return_weights or backend == "reference":
            res = attention(qq, kk, vv, pattern=DenseRouted(allow), scale=scale, backend="reference",
                            return_weights=True) if return_weights else routed_reference(qq, kk, vv, allow, scale)
        else:
            res = attention(qq, kk, vv, pattern=DenseRouted(allow), scale=scale, backend=backend)
        if not return_weights:
            return res.to(q.dtype)
        out, w = res
        return out, pooled_token_weights(w, counts, m)
    lists = mask_lists(block_allow)
    # One list per query block: each block's keys are gathered once (fused flash tiles on CPU, which need the value
    # width of the query: a zero column pads the values and is dropped; the compiled routed kernels cannot take the
    # folded width D + 1).
    vv = torch.cat([vv, vv.new_zeros(*vv.shape[:-1], 1)], -1)
    return key_routed_attention(qq, kk, vv, lists, scale=scale, backend="gather", block_q=block_size)[..., :-1]


def check_level_blocks(level_blocks: Any, block_size: int) -> tuple[int, ...]:
    """``level_blocks`` as a tuple of ints (``>= 1`` first, ``>= 0`` after) whose levels divide ``block_size``."""
    if not isinstance(level_blocks, (tuple, list)) or not level_blocks \
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in level_blocks) or level_blocks[0] < 1:
        raise ValueError(f"level_blocks: expected a non-empty tuple of ints >= 0 (the first >= 1), got "
                         f"{level_blocks!r}")
    if block_size % (1 << (len(level_blocks) - 1)):
        raise ValueError(f"block_size: must be divisible by 2^{len(level_blocks) - 1} (the coarsest of "
                         f"{len(level_blocks)} levels pools 2^{len(level_blocks) - 1} keys), got {block_size}")
    return tuple(level_blocks)


class PyramidSparseAttention(RoutedMixer):
    """PSA pyramid sparse attention: each query block attends each key block at full resolution, pooled, or not.

    The keys and values of every block of ``block_size`` tokens are pooled into a pyramid (level ``l`` averages
    groups of ``2^l``; :func:`pool_levels`). A query block scores the key blocks by ``q̄ · k̄`` (mean kept
    query of the block against mean kept key of the block), ranks them, and gives the first ``level_blocks[0]``
    level 0 (full resolution), the next ``level_blocks[1]`` level 1, ... and drops the rest. Attention then runs
    over the mixed-resolution key set (:func:`pyramid_attention`): a pooled key standing for ``c`` keys adds
    ``log c`` to its logit, so a pooled block of identical keys counts as its ``c`` members. Level 0 for every
    block (``level_blocks[0] >= #blocks``) is dense attention; a dropped block equals masking it out.

    From the paper (PSA, abstract): multi-level pooled KV per block instead of binary keep/drop masks; each
    query block gives lower pooling levels to critical KV blocks and higher levels to less important ones;
    a decoupled block-tile kernel. Ours, not the paper's: the ``log c`` logit correction (the catalogue's
    reading of what a pooled key stands for), mean pooling, the block score ``q̄ · k̄`` and the per-level block
    counts (PSA allocates levels from estimated block importance with thresholds [recalled]); the kernel is
    the routed ``gather`` path. Non-causal (a pooled block mixes positions); padded keys and queries are left
    out of every mean. The level assignment is non-differentiable; gradients reach q, k, v through the pooled
    keys and values. ``level_blocks`` counts are capped by the blocks of each call.

    Args:
        dim, n_heads: as ``mha``.
        block_size: tokens per query and key block (divisible by ``2^(len(level_blocks) - 1)``).
        level_blocks: key blocks per query block at level 0, 1, ...; the rest are dropped.
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``context_dim``, ``rope``, ``scale``, ``backend``).
    """

    refused_arguments = ("pattern", "score_mod", "n_kv_heads")
    cross_ok = True
    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 64, level_blocks: tuple[int, ...] = (2, 2, 4),
                 **kw: Any) -> None:
        if kw.get("backend", "auto") not in PYRAMID_BACKENDS:
            raise ValueError(f"backend: expected one of {list(PYRAMID_BACKENDS)}, got {kw['backend']!r}")
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        self.level_blocks = check_level_blocks(level_blocks, self.block_size)

    def assign_levels(self, q: torch.Tensor, k: torch.Tensor, q_keep: torch.Tensor | None,
                      keep: torch.Tensor | None) -> torch.Tensor:
        """Levels int64 ``[B, H, nqb, nkb]`` (-1: dropped) from block means of the kept queries and keys."""
        b = q.shape[0]
        qbar, _ = block_means(q, self.block_size, q_keep)
        kbar, valid = block_means(k, self.block_size, keep)
        scores = (qbar @ kbar.transpose(-1, -2)).masked_fill(~valid.view(b, 1, 1, -1), float("-inf"))
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=q.device)
                                                .expand_as(order).contiguous())
        bounds = torch.tensor(self.level_blocks, device=q.device).cumsum(0)
        level = torch.bucketize(rank, bounds, right=True)
        return torch.where((level < len(self.level_blocks)) & torch.isfinite(scores), level, -1)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        keep = call.kv_keep if call is not None else None
        q_keep = call.mask if call is not None else None
        with torch.no_grad():
            levels = self.assign_levels(q.detach(), k.detach(), q_keep, keep)
        backend = "reference" if want_weights else self.backend
        res = pyramid_attention(q, k, v, levels, block_size=self.block_size, keep=keep,
                                scale=self.attention_scale(q), backend=backend, return_weights=want_weights)
        return (res[0], res[1]) if want_weights else (res, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, level_blocks={self.level_blocks}"


def _level_zero_everywhere_is_mha():
    x, ctx = rand_x(n=13), rand_x(n=10, seed=1)
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 9:] = False
    m = seeded(PyramidSparseAttention, dim=32, n_heads=4, block_size=4, level_blocks=(4, 1, 1))
    d = mha_from(m)
    got = torch.stack([m(x), m(x, mask=keep), m(x, context=ctx)])
    return got, torch.stack([d(x), d(x, mask=keep), d(x, context=ctx)])


def _qkv(n: int = 16, m: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, length, 8, generator=g, dtype=torch.float64) for length in (n, m, m))


def _drop_is_masking():
    """Levels in {-1, 0} equal block-masked dense attention; with pooled levels too, a dropped block equals the
    same block masked out of the keys."""
    from attnzoo.ops.routed import block_routing_mask

    q, k, v = _qkv(15, 16)
    g = torch.Generator().manual_seed(3)
    binary = torch.where(torch.rand(2, 3, 4, 4, generator=g) < 0.6, 0, -1)
    binary[..., 0] = 0
    allow = block_routing_mask(binary >= 0, 15, 16, 4, 4)
    got = [pyramid_attention(q, k, v, binary, block_size=4, backend="reference")]
    want = [routed_reference(q, k, v, allow)]
    mixed = torch.randint(0, 3, (2, 3, 4, 4), generator=g)
    dropped = mixed.clone()
    dropped[..., 2] = -1
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[:, 8:12] = False
    got.append(pyramid_attention(q, k, v, dropped, block_size=4))
    want.append(pyramid_attention(q, k, v, mixed, block_size=4, keep=keep))
    return torch.stack(got), torch.stack(want)


def _identical_block_same_at_every_level():
    """A block of identical keys and values gives the same output at level 0, 1 and 2 (log c in the logit)."""
    q, k, v = _qkv(12, 16)
    k[:, :, 4:8], v[:, :, 4:8] = k[:, :, 4:5], v[:, :, 4:5]
    base = torch.randint(0, 3, (2, 3, 3, 4), generator=torch.Generator().manual_seed(5))
    outs = []
    for level in (0, 1, 2):
        lv = base.clone()
        lv[..., 1] = level
        outs.append(pyramid_attention(q, k, v, lv, block_size=4))
    return torch.stack(outs[1:]), torch.stack([outs[0], outs[0]])


register(
    "pyramid_sparse", family=FAMILY, type="mixer", priority=3, papers=("PSA (pyramid sparse attention)",),
    supports={"self", "cross", "padding"}, complexity="O(N^2 / pooling)",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="PSA: per query block, each key block at full resolution, pooled by 2^l (log 2^l added), or dropped.",
    test_kwargs={**SMALL, "block_size": 4, "level_blocks": (1, 1, 1)},
    reductions=(
        Reduction("level_zero_everywhere_is_mha", "level 0 for every block equals mha (self, padded, cross)",
                  _level_zero_everywhere_is_mha),
        Reduction("drop_is_masking", "'drop' equals masking that block out", _drop_is_masking),
        Reduction("identical_block_same_at_every_level", "a block of identical keys gives the same result at "
                  "every pooling level", _identical_block_same_at_every_level),
    ),
)(PyramidSparseAttention)
