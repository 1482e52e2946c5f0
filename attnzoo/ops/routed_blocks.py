"""Block-routed attention on PyTorch's fused CPU flash kernel (the CPU fast path of per-query block routings).

Every query ``i`` (at position ``p = i + M - N``) attends the union of its routed key blocks. The pairs split
into two kinds of dense tiles, each run by ``aten._scaled_dot_product_flash_attention_for_cpu``:

- *diagonal* (``causal`` only): the query's own key block ``p // block_k``, causal inside. Slot ``s`` of the
  tile of block ``b`` is the query at position ``b * block_k + s``, so the tile is top-left causal for every
  block at once (``[B*H, n_blocks, block_k, D]``, one call); a query that did not select its own block
  occupies an empty slot.
- *full*: a routed key block the query sees entirely (every block under non-causal calls; blocks before the
  own block under ``causal``). The queries routed to each key block are gathered (one ``index_select`` over
  all pairs, key-block-major) into units of at most ``cap`` queries (``UNIT_QUERIES`` by default), padded to
  a multiple of ``PAD_QUERIES``; units of equal padded length batch into one fused call against their key
  blocks; a ragged last key block runs with its true length.

Under ``causal`` a routed block after the query's own block is invisible and is dropped. The partials merge
per query by log-sum-exp. The backward runs the fused flash backward on the same tiles with the merged
output and log-sum-exp (each tile's probabilities are then the global ones), and scatters the tile
gradients back. Empty slots carry a zero query and a zero output gradient, so they contribute nothing.
"""

from __future__ import annotations

import torch

__all__ = ["block_routed_flash", "flash_routing_ok"]

PAD_QUERIES = 64  # a unit's query slots are padded to a multiple of this, so units batch into few fused calls
# Queries per unit by default: a busy key block splits into units of this size, which batch with others (the
# fused backward runs one thread per unit, so one big unit alone would leave the other cores idle).
UNIT_QUERIES = 512

def flash_routing_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether :func:`block_routed_flash` applies: CPU, float32/float64, equal head dims, ``N <= M`` if causal."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == v.shape[-1] and (not causal or q.shape[2] <= k.shape[2]))


class _Plan:
    """Which pairs go to which tile, for ``blocks`` bool ``[B, H, nbq, nkb]`` (built once, reused by backward).

    The *full* pairs form units (a key block and up to ``cap`` of the queries routed to it), each padded to a
    multiple of ``PAD_QUERIES`` query slots; units of equal padded length and key count are batched into one
    fused call. ``slots`` ``[T]`` lists the row of ``q.view(B*H*N, D)`` of every slot (``B*H*N``: an empty
    slot); ``calls`` holds ``(first slot, last slot, units, padded length, key count, key block rows)``.
    """

    def __init__(self, blocks: torch.Tensor, n: int, m: int, block_q: int, block_k: int, causal: bool,
                 cap: int | None) -> None:
        b, h, _, nkb = blocks.shape
        bh = b * h
        dev = blocks.device
        self.n, self.m, self.block_k, self.nkb, self.bh, self.causal = n, m, block_k, nkb, bh, causal
        sel = blocks.repeat_interleave(block_q, 2)[:, :, :n].reshape(bh, n, nkb)
        if causal:
            own = (torch.arange(n, device=dev) + (m - n)) // block_k
            full = sel & (torch.arange(nkb, device=dev).view(1, 1, -1) < own.view(1, -1, 1))
            self.diag = sel.gather(2, own.view(1, -1, 1).expand(bh, -1, 1)).squeeze(-1)  # [BH, N]
        else:
            full, self.diag = sel, None
        g, _, i = full.transpose(1, 2).nonzero(as_tuple=True)  # key-block-major: (head, key block, query)
        rows = g * n + i
        counts = full.sum(1).reshape(-1)  # [BH * nkb] queries per key block
        cap = cap or UNIT_QUERIES
        pad_to = min(PAD_QUERIES, cap)
        nseg = (counts + cap - 1) // cap
        unit_block = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), nseg)
        j = torch.arange(unit_block.numel(), device=dev) - (nseg.cumsum(0) - nseg)[unit_block]
        start = (counts.cumsum(0) - counts)[unit_block] + j * cap
        count = torch.minimum(counts[unit_block] - j * cap, torch.full_like(j, cap))
        rem = m - (nkb - 1) * block_k
        klen = torch.where(unit_block % nkb == nkb - 1, rem, block_k)
        length = (count + pad_to - 1) // pad_to * pad_to
        order = (length * (block_k + 1) + klen).argsort(stable=True)
        unit_block, start, count, klen, length = (t[order] for t in (unit_block, start, count, klen, length))
        unit_of_slot = torch.repeat_interleave(torch.arange(length.numel(), device=dev), length)
        local = torch.arange(unit_of_slot.numel(), device=dev) - (length.cumsum(0) - length)[unit_of_slot]
        ok = local < count[unit_of_slot]
        src = (start[unit_of_slot] + local).clamp(max=max(rows.numel() - 1, 0))
        self.slots = rows[src] if rows.numel() else src  # empty slots repeat a real row (masked by ``empty``)
        self.empty = ~ok
        self.diag_all = self.diag is None or bool(self.diag.all())
        self.calls = []
        keys, n_units = torch.unique_consecutive(length * (block_k + 1) + klen, return_counts=True)
        first_unit, first_slot = 0, 0
        for key, c in zip(keys.tolist(), n_units.tolist()):
            ln, kl = divmod(key, block_k + 1)
            self.calls.append((first_slot, first_slot + c * ln, c, ln, kl, unit_block[first_unit:first_unit + c]))
            first_unit, first_slot = first_unit + c, first_slot + c * ln


def _diag_layout(t: torch.Tensor, plan: _Plan, fill: float = 0.0) -> torch.Tensor:
    """Per-query rows ``t`` ``[BH, N, ...]`` in the diagonal tiles' slot layout ``[BH, nkb * block_k, ...]``."""
    if plan.n == plan.m == plan.nkb * plan.block_k:
        return t
    out = t.new_full((plan.bh, plan.nkb * plan.block_k, *t.shape[2:]), fill)
    out[:, plan.m - plan.n:plan.m] = t
    return out


def _key_blocks(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``t`` ``[BH, M, D]`` padded to ``[BH * nkb, block_k, D]``."""
    pad = plan.nkb * plan.block_k - plan.m
    return torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(plan.bh * plan.nkb, plan.block_k, t.shape[-1])


def _diag_is_identity(plan: _Plan) -> bool:
    return plan.n == plan.m == plan.nkb * plan.block_k


def _scaled_rows(o_own: torch.Tensor, w: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The own-block output (the op's ``[BH, nkb, block_k, D]``, or ``[BH, N, D]`` already in query order) times
    the per-query weights ``w`` ``[BH * N]``, as contiguous rows ``[BH * N, D]`` (one pass over the op's layout)."""
    d = o_own.shape[-1]
    out = o_own.new_empty(plan.bh * plan.n, d)
    torch.mul(o_own, w.view(*o_own.shape[:-1], 1), out=out.view(o_own.shape))
    return out


def _add_rows(dst: torch.Tensor, slots: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None, units: int,
              ln: int) -> None:
    """``dst[slots] += t (* w)`` for one fused call's ``t`` ``[1, units, ln, D]`` in whatever layout the op returned
    it (its ``[1, ln, units, D]`` memory order is read in place, with the slots permuted to match)."""
    d = t.shape[-1]
    if units > 1 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        t = t.transpose(1, 2)
        slots = slots.view(units, ln).t().reshape(-1)
        w = None if w is None else w.view(units, ln).t().reshape(-1)
    rows = t.reshape(-1, d)
    dst.index_add_(0, slots, rows if w is None else rows * w.unsqueeze(-1))


class _BlockRoutedFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        b, h, n, d = q.shape
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        qf, kf, vf = q.reshape(plan.bh, n, d), k.reshape(plan.bh, plan.m, d), v.reshape(plan.bh, plan.m, d)
        kb, vb = _key_blocks(kf, plan), _key_blocks(vf, plan)
        neg = float("-inf")
        if plan.causal:
            shape4 = (plan.bh, plan.nkb, plan.block_k, d)
            qd = _diag_layout(qf if plan.diag_all else qf * plan.diag.unsqueeze(-1).to(q.dtype), plan)
            od, ld = op(qd.view(shape4), kb.view(shape4), vb.view(shape4), 0.0, True, scale=scale)
            o_own = od if _diag_is_identity(plan) else od.reshape(plan.bh, -1, d)[:, plan.m - n:plan.m]
            l_own = ld.reshape(plan.bh, -1)[:, plan.m - n:plan.m].masked_fill(~plan.diag, neg).reshape(-1)
        qg = qf.reshape(-1, d).index_select(0, plan.slots)
        outs, lses = [], []
        for a, z, units, ln, klen, blk in plan.calls:
            o, lse = op(qg[a:z].view(1, units, ln, d), kb.index_select(0, blk)[:, :klen].unsqueeze(0),
                        vb.index_select(0, blk)[:, :klen].unsqueeze(0), 0.0, False, scale=scale)
            outs.append(o)
            lses.append(lse.reshape(-1))
        lg = (torch.cat(lses) if lses else q.new_zeros(0)).masked_fill(plan.empty, neg)
        top = l_own.clone() if plan.causal else q.new_full((plan.bh * n,), neg)
        top.scatter_reduce_(0, plan.slots, lg, "amax")
        top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        tot = torch.exp(l_own - top_safe) if plan.causal else torch.zeros_like(top)
        tot.index_add_(0, plan.slots, torch.exp(lg - top_safe[plan.slots]))
        lse_safe = torch.where(tot > 0, top_safe + torch.log(tot), torch.zeros_like(tot))
        if plan.causal:
            out = _scaled_rows(o_own, torch.exp(l_own - lse_safe), plan)
        else:
            out = q.new_zeros(plan.bh * n, d)
        w = torch.exp(lg - lse_safe[plan.slots])
        for (a, z, units, ln, _, _), o in zip(plan.calls, outs):
            _add_rows(out, plan.slots[a:z], o, w[a:z], units, ln)
        out = out.view(b, h, n, d)
        ctx.save_for_backward(q, k, v, out, lse_safe, qg)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, qg = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, n, d = q.shape
        opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        qf, kf, vf = q.reshape(plan.bh, n, d), k.reshape(plan.bh, plan.m, d), v.reshape(plan.bh, plan.m, d)
        kb, vb = _key_blocks(kf, plan), _key_blocks(vf, plan)
        do = dout.reshape(plan.bh, n, d)
        of = out.reshape(plan.bh, n, d)
        lf = lse.view(plan.bh, n)
        if plan.causal:
            shape4 = (plan.bh, plan.nkb, plan.block_k, d)
            keep = None if plan.diag_all else plan.diag.unsqueeze(-1).to(q.dtype)
            dq_d, dk_d, dv_d = opb(_diag_layout(do if keep is None else do * keep, plan).view(shape4),
                                   _diag_layout(qf if keep is None else qf * keep, plan).view(shape4),
                                   kb.view(shape4), vb.view(shape4),
                                   _diag_layout(of, plan).view(shape4), _diag_layout(lf, plan).view(shape4[:3]),
                                   0.0, True, scale=ctx.scale)
            dq = dq_d.reshape(plan.bh, -1, d)[:, plan.m - n:plan.m].reshape(-1, d).contiguous()
            dkb, dvb = dk_d.reshape(-1, plan.block_k, d), dv_d.reshape(-1, plan.block_k, d)  # the op's own tensors
        else:
            dq = q.new_zeros(plan.bh * n, d)
            dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        slots = plan.slots
        dog, og = (t.reshape(-1, d).index_select(0, slots) for t in (do, of))
        lg = lf.reshape(-1).index_select(0, slots).masked_fill(plan.empty, float("inf"))
        for a, z, units, ln, klen, blk in plan.calls:
            shape4 = (1, units, ln, d)
            gq, gk, gv = opb(dog[a:z].view(shape4), qg[a:z].view(shape4),
                             kb.index_select(0, blk)[:, :klen].unsqueeze(0),
                             vb.index_select(0, blk)[:, :klen].unsqueeze(0), og[a:z].view(shape4),
                             lg[a:z].view(1, units, ln), 0.0, False, scale=ctx.scale)
            _add_rows(dq, slots[a:z], gq, None, units, ln)
            if klen == plan.block_k:
                dkb.index_add_(0, blk, gk[0])
                dvb.index_add_(0, blk, gv[0])
            else:
                dkb[:, :klen].index_add_(0, blk, gk[0])
                dvb[:, :klen].index_add_(0, blk, gv[0])
        dk = dkb.reshape(plan.bh, -1, d)[:, :plan.m].reshape(k.shape)
        dv = dvb.reshape(plan.bh, -1, d)[:, :plan.m].reshape(v.shape)
        return dq.view(q.shape), dk, dv, None, None


def block_routed_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, block_q: int,
                       block_k: int, causal: bool = False, scale: float | None = None,
                       cap: int | None = None) -> torch.Tensor:
    """Block-routed attention on fused CPU flash tiles (see the module docstring); forward and backward.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]``, ``blocks`` bool ``[B, H, ceil(N / block_q),
    ceil(M / block_k)]`` (checked by the caller; :func:`flash_routing_ok` must hold). Work and memory are linear
    in ``N x`` selected keys. Queries that see no key return zeros and zero gradients.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        plan = _Plan(blocks, q.shape[2], k.shape[2], block_q, block_k, causal, cap)
    return _BlockRoutedFlash.apply(q, k, v, plan, scale)
