"""Key routings shared by blocks of queries, on PyTorch's fused CPU flash kernel (where attnzoo's compiled routed
kernels cannot run: :func:`attnzoo.ops.routed_blocks_native.key_block_native` is the default CPU path).

A block of ``block_q`` consecutive queries shares one list of ``K`` keys (HiP's query blocks). Each block's keys
are gathered once (``index_select`` of whole rows) into a tile ``[block_q, K]``, and every tile runs in one call of
``aten._scaled_dot_product_flash_attention_for_cpu`` with an additive mask: ``-inf`` for an empty slot and, under
``causal``, for a key after the query. The fused backward runs on the same tiles and scatters the key and value
gradients back by row (``index_add_``). A query that sees none of its block's keys returns zeros and zero gradients.
Work and memory are linear in ``N x K`` (``K`` rows gathered per block, a ``block_q x K`` mask per block).
"""

from __future__ import annotations

import torch

from attnzoo.ops.rows import gather_rows

__all__ = ["key_block_flash", "key_block_flash_ok"]


def key_block_flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`key_block_flash` applies: CPU, float32/float64, equal head dims."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == v.shape[-1])


def _tiles(t: torch.Tensor, block_q: int, n_blocks: int) -> torch.Tensor:
    """``t`` ``[B, H, N, ...]`` as query tiles ``[B*H, n_blocks, block_q, ...]`` (zero-padded, contiguous)."""
    b, h, n = t.shape[:3]
    flat = t.reshape(b * h, n, *t.shape[3:])
    pad = n_blocks * block_q - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(b * h, pad, *t.shape[3:])], 1)
    return flat.reshape(b * h, n_blocks, block_q, *t.shape[3:])


class _KeyBlockFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keys, block_q: int, causal: bool, scale: float):
        b, h, n, d = q.shape
        m, nbq, kk = k.shape[2], keys.shape[2], keys.shape[3]
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        idx = keys.reshape(b * h, nbq, kk)
        rows = (idx.clamp(min=0) + (torch.arange(b * h, device=q.device) * m).view(-1, 1, 1)).reshape(-1)
        kg, vg = (gather_rows(t, keys.clamp(min=0)).view(b * h, nbq, kk, d) for t in (k, v))  # in place, any layout
        allow = (idx >= 0).unsqueeze(2)  # [BH, nbq, 1, K]
        if causal:
            pos = torch.arange(nbq * block_q, device=q.device).view(1, nbq, block_q, 1) + (m - n)
            allow = allow & (idx.unsqueeze(2) <= pos)
        allow = allow.expand(b * h, nbq, block_q, kk)
        mask = torch.zeros(allow.shape, dtype=q.dtype, device=q.device).masked_fill_(~allow, float("-inf"))
        seen = allow.any(-1, keepdim=True)  # [BH, nbq, block_q, 1]
        qt = _tiles(q, block_q, nbq)
        o, lse = op(qt, kg, vg, 0.0, False, attn_mask=mask, scale=scale)
        o = torch.where(seen, o, torch.zeros_like(o))
        lse = torch.where(seen.squeeze(-1), lse, torch.zeros_like(lse))
        ctx.save_for_backward(qt, kg, vg, o, lse, mask, seen, rows)
        ctx.shapes, ctx.scale = (b, h, n, m, d), scale
        return o.reshape(b * h, nbq * block_q, d)[:, :n].reshape(b, h, n, d)

    @staticmethod
    def backward(ctx, dout):
        qt, kg, vg, o, lse, mask, seen, rows = ctx.saved_tensors
        b, h, n, m, d = ctx.shapes
        opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dot = _tiles(dout, qt.shape[2], qt.shape[1])
        dot = torch.where(seen, dot, torch.zeros_like(dot))
        gq, gk, gv = opb(dot, qt, kg, vg, o, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        dq = gq.reshape(b * h, -1, d)[:, :n].reshape(b, h, n, d)
        dk = qt.new_zeros(b * h * m, d).index_add_(0, rows, gk.reshape(-1, d))
        dv = qt.new_zeros(b * h * m, d).index_add_(0, rows, gv.reshape(-1, d))
        return dq, dk.view(b, h, m, d), dv.view(b, h, m, d), None, None, None, None


def key_block_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *, block_q: int,
                    causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention of every block of ``block_q`` queries over its listed keys, on fused CPU flash tiles.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]``, ``keys`` int64 ``[B, H, ceil(N / block_q), K]`` (-1:
    empty; checked by the caller; :func:`key_block_flash_ok` must hold). ``causal``: query ``i`` drops keys after
    position ``i + M - N``. Forward and backward; queries that see no key return zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _KeyBlockFlash.apply(q, k, v, keys, block_q, causal, scale)
