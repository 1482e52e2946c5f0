"""The block-layout path of the ``blocksparse`` backend: visits only a pattern's active blocks.

Query blocks are grouped into buckets that visit the same number ``K`` of key blocks; a
chunk of query blocks gathers its ``K`` key blocks and runs one batched softmax over them.
The backward is FlashAttention-style: it saves only ``q, k, v, out, lse`` and recomputes
each chunk's scores, so memory stays linear in N for a fixed window, on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.ops.layout import BlockLayout, Bucket, Shape

# Score elements (per chunk, over batch and heads) computed at once.
CHUNK_ELEMENTS = 1 << 23
# Tile masks are cached per layout when they take fewer bytes than this.
MASK_CACHE_BYTES = 256 << 20


@dataclass
class LayoutPlan:
    """Everything the forward and backward share for one call."""

    layout: BlockLayout
    pattern: Any
    score_mod: Any
    shape: Shape
    scale: float
    groups: int
    masks: list[torch.Tensor | None]

    @property
    def block(self) -> int:
        return self.layout.block_q



class _Indices:
    """Broadcasting index tensors for a chunk, laid out as ``[B, H_kv, c, G, bs, K*bs]``."""

    def __init__(self, plan: LayoutPlan, bucket: Bucket, rows: slice, device: torch.device) -> None:
        s, bs, g = plan.shape, plan.block, plan.groups
        q_blocks, kv_blocks = bucket.q_blocks[rows].to(device), bucket.kv_blocks[rows].to(device)
        c, k = kv_blocks.shape
        offs = torch.arange(bs, device=device)
        q_pos = (q_blocks.view(-1, 1) * bs + offs).view(1, 1, c, 1, bs, 1)
        kv_pos = (kv_blocks.view(c, k, 1) * bs + offs).view(1, 1, c, 1, 1, k * bs)
        self.q_blocks, self.kv_blocks = q_blocks, kv_blocks
        self.b = torch.arange(s.batch, device=device).view(-1, 1, 1, 1, 1, 1)
        hkv = s.heads // g
        self.h = (torch.arange(hkv, device=device).view(-1, 1) * g + torch.arange(g, device=device)).view(
            1, hkv, 1, g, 1, 1
        )
        self.kv_real = kv_pos
        self.q = q_pos.clamp(max=s.n_q - 1)
        self.kv = kv_pos.clamp(max=s.n_kv - 1)


def _allowed(plan: LayoutPlan, bucket: Bucket, rows: slice, idx: _Indices) -> torch.Tensor | None:
    """Bool mask ``[B'|1, H_kv'|1, c, G'|1, bs, K*bs]`` or None when every score counts."""
    bs, k = plan.block, bucket.kv_blocks.shape[1]
    valid = bucket.valid[rows].to(idx.q.device)
    ragged = plan.shape.n_kv % bs != 0
    if plan.pattern is None and bool(valid.all()) and not ragged:
        return None
    slot_ok = valid.repeat_interleave(bs, dim=1).view(1, 1, -1, 1, 1, k * bs)
    ok = slot_ok & (idx.kv_real < plan.shape.n_kv)
    if plan.pattern is not None and bool((bucket.valid[rows] & ~bucket.full[rows]).any()):
        ok = ok & plan.pattern.allow(idx.b, idx.h, idx.q, idx.kv, plan.shape)
    return ok


def tile_masks(plan: LayoutPlan, device: torch.device) -> list[torch.Tensor | None]:
    """Per-bucket tile masks, built once per layout when small enough, else on the fly (None)."""
    key = ("tile_masks", plan.shape, plan.block, plan.groups, str(device))
    if plan.pattern is not None:
        cached = plan.pattern._cache_get(key)
        if cached is not None:
            return cached
    masks: list[torch.Tensor | None] = []
    for bucket in plan.layout.buckets:
        n, k = bucket.kv_blocks.shape
        bsz = plan.shape.batch if getattr(plan.pattern, "per_batch", False) else 1
        hsz = plan.shape.heads if getattr(plan.pattern, "per_head", False) else 1
        if bsz * hsz * n * plan.block * k * plan.block > MASK_CACHE_BYTES:
            masks.append(None)
            continue
        rows = slice(0, n)
        masks.append(_allowed(plan, bucket, rows, _Indices(plan, bucket, rows, device)))
    if plan.pattern is not None:
        plan.pattern._cache_put(key, masks)
    return masks


def _chunks(plan: LayoutPlan, bucket: Bucket, q_rows_per_block: int) -> list[slice]:
    n, k = bucket.kv_blocks.shape
    per_block = plan.shape.batch * (plan.shape.heads // plan.groups) * q_rows_per_block * k * plan.block
    step = max(1, CHUNK_ELEMENTS // max(per_block, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _chunk_mask(plan: LayoutPlan, b_i: int, bucket: Bucket, rows: slice, idx: _Indices) -> torch.Tensor | None:
    cached = plan.masks[b_i]
    if cached is not None:
        return cached[:, :, rows]
    return _allowed(plan, bucket, rows, idx)


def _scores(plan: LayoutPlan, qc: torch.Tensor, kc: torch.Tensor, idx: _Indices, mask: torch.Tensor | None,
            track: bool = False):
    """Raw and modified, masked scores of a chunk, viewed as ``[B, H_kv, c, G, bs, K*bs]``.

    ``qc`` is already multiplied by the softmax scale. ``track``: make the raw scores a leaf
    that requires grad, to chain gradients through the score modifier.
    """
    b, hkv, c = qc.shape[:3]
    raw = torch.matmul(qc, kc.transpose(-1, -2)).view(b, hkv, c, plan.groups, plan.block, -1)
    if plan.score_mod is None:
        return raw, raw, raw.masked_fill_(~mask, float("-inf")) if mask is not None else raw
    if track:
        raw.requires_grad_()
    mod = plan.score_mod(raw, idx.b, idx.h, idx.q, idx.kv, plan.shape)
    masked = mod.masked_fill(~mask, float("-inf")) if mask is not None else mod
    return raw, mod, masked


def _fold_q(t: torch.Tensor, plan: LayoutPlan) -> torch.Tensor:
    """``[B, H, N, D]`` -> padded, grouped ``[B, H_kv, nqb, G*bs, D]``."""
    b, h, n, d = t.shape
    bs, g = plan.block, plan.groups
    nqb = math.ceil(n / bs)
    t = torch.nn.functional.pad(t, (0, 0, 0, nqb * bs - n))
    return t.view(b, h // g, g, nqb, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, h // g, nqb, g * bs, d)


def _unfold_q(t: torch.Tensor, plan: LayoutPlan, n: int) -> torch.Tensor:
    """Inverse of :func:`_fold_q` (also for ``[..., G*bs]`` tensors without a last dim)."""
    b, hkv, nqb = t.shape[:3]
    bs, g = plan.block, plan.groups
    rest = t.shape[4:]
    t = t.view(b, hkv, nqb, g, bs, *rest).movedim(3, 2).reshape(b, hkv * g, nqb * bs, *rest)
    return t[:, :, :n]


def _fold_kv(t: torch.Tensor, plan: LayoutPlan) -> torch.Tensor:
    """``[B, H_kv, M, D]`` -> padded ``[B, H_kv, nkb, bs, D]``."""
    b, hkv, m, d = t.shape
    bs = plan.block
    nkb = math.ceil(m / bs)
    # contiguous: a pad of 0 returns t itself, and _gather_kv's blocks must merge into rows
    return torch.nn.functional.pad(t, (0, 0, 0, nkb * bs - m)).contiguous().view(b, hkv, nkb, bs, d)


def _gather_kv(t: torch.Tensor, kv_blocks: torch.Tensor) -> torch.Tensor:
    b, hkv, _, bs, d = t.shape
    c, k = kv_blocks.shape
    return t[:, :, kv_blocks.flatten()].view(b, hkv, c, k * bs, d)


def _forward(plan: LayoutPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded ``out [B, H_kv, nqb, G*bs, D_v]`` and ``lse [B, H_kv, nqb, G*bs]``."""
    qf, kf, vf = _fold_q(q * plan.scale, plan), _fold_kv(k, plan), _fold_kv(v, plan)
    out = qf.new_zeros(*qf.shape[:-1], v.shape[-1])
    lse = qf.new_full(qf.shape[:-1], float("-inf"))
    for b_i, bucket in enumerate(plan.layout.buckets):
        for rows in _chunks(plan, bucket, qf.shape[3]):
            idx = _Indices(plan, bucket, rows, q.device)
            qc = qf[:, :, idx.q_blocks]
            kc, vc = _gather_kv(kf, idx.kv_blocks), _gather_kv(vf, idx.kv_blocks)
            _, _, s = _scores(plan, qc, kc, idx, _chunk_mask(plan, b_i, bucket, rows, idx))
            s = s.flatten(3, 4)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = s.sub_(m).exp_()
            denom = p.sum(-1, keepdim=True)
            o = torch.matmul(p, vc).div_(denom.clamp_min(torch.finfo(p.dtype).tiny))
            out[:, :, idx.q_blocks] = o
            lse[:, :, idx.q_blocks] = (m + torch.log(denom)).squeeze(-1)
    return out, lse


def _backward(plan, q, k, v, out_f, lse_f, dout, dlse, mod_tensors):
    qf, kf, vf = _fold_q(q * plan.scale, plan), _fold_kv(k, plan), _fold_kv(v, plan)
    do_f = _fold_q(dout, plan)
    # d lse / d s = p, so the lse's gradient joins the row term: ds = p * (dp - (rowsum(dout * out) - dlse))
    delta = (do_f * out_f).sum(-1)
    if dlse is not None:
        delta = delta - _fold_q(dlse.unsqueeze(-1), plan).squeeze(-1)
    lse_safe = torch.where(torch.isinf(lse_f), torch.zeros_like(lse_f), lse_f)
    dq_f = torch.zeros_like(qf)
    dk_f, dv_f = torch.zeros_like(kf), torch.zeros_like(vf)
    tracked = [i for i, t in enumerate(mod_tensors) if t.requires_grad]
    mod_grads: list[torch.Tensor | None] = [None] * len(mod_tensors)
    for b_i, bucket in enumerate(plan.layout.buckets):
        for rows in _chunks(plan, bucket, qf.shape[3]):
            idx = _Indices(plan, bucket, rows, q.device)
            qc, doc = qf[:, :, idx.q_blocks], do_f[:, :, idx.q_blocks]
            kc, vc = _gather_kv(kf, idx.kv_blocks), _gather_kv(vf, idx.kv_blocks)
            mask = _chunk_mask(plan, b_i, bucket, rows, idx)
            with torch.enable_grad():
                raw, mod, s = _scores(plan, qc, kc, idx, mask, track=plan.score_mod is not None)
            s = s.detach().flatten(3, 4)
            p = (s.sub_(lse_safe[:, :, idx.q_blocks].unsqueeze(-1)) if plan.score_mod is None
                 else s - lse_safe[:, :, idx.q_blocks].unsqueeze(-1)).exp_()
            dv = torch.matmul(p.transpose(-1, -2), doc)
            ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(delta[:, :, idx.q_blocks].unsqueeze(-1)).mul_(p)
            if plan.score_mod is not None:
                grads = torch.autograd.grad(mod, [raw, *(mod_tensors[i] for i in tracked)], ds.view_as(mod))
                ds = grads[0].flatten(3, 4)
                for i, g in zip(tracked, grads[1:]):
                    mod_grads[i] = g if mod_grads[i] is None else mod_grads[i] + g
            dq_f[:, :, idx.q_blocks] = torch.matmul(ds, kc).mul_(plan.scale)
            dk = torch.matmul(ds.transpose(-1, -2), qc)
            flat = idx.kv_blocks.flatten()
            dk_f.index_add_(2, flat, dk.view(*dk.shape[:2], flat.numel(), plan.block, -1))
            dv_f.index_add_(2, flat, dv.view(*dv.shape[:2], flat.numel(), plan.block, -1))
    return dq_f, dk_f, dv_f, mod_grads


def grad_or_zeros(dout: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``dout``, or zeros ``[B, H, N, D_v]`` when only the lse reaches the loss."""
    return dout.contiguous() if dout is not None else q.new_zeros(*q.shape[:-1], v.shape[-1])


def _pattern_version(pattern: Any) -> Any:
    return pattern.data_version() if hasattr(pattern, "data_version") else None


class BlockSparseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: LayoutPlan, q, k, v, *mod_tensors):
        out_f, lse_f = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.pattern_version = _pattern_version(plan.pattern)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out_f, lse_f, *mod_tensors)
        n = q.shape[2]
        return _unfold_q(out_f, plan, n), _unfold_q(lse_f, plan, n)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_f, lse_f, *mod_tensors = ctx.saved_tensors
        plan = ctx.plan
        if _pattern_version(plan.pattern) != ctx.pattern_version:  # the backward re-evaluates the pattern
            raise RuntimeError(
                f"pattern: a tensor of {plan.pattern!r} was modified in place between the forward and the backward "
                "of blocksparse attention, so the gradient would not match the output; change it after backward()")
        dout = grad_or_zeros(dout, q, v)
        dq_f, dk_f, dv_f, mod_grads = _backward(plan, q, k, v, out_f, lse_f, dout, dlse, mod_tensors)
        m = k.shape[2]
        dq = _unfold_q(dq_f, plan, q.shape[2])
        dk = dk_f.flatten(2, 3)[:, :, :m]
        dv = dv_f.flatten(2, 3)[:, :, :m]
        return (None, dq, dk, dv, *mod_grads)
