"""Block-routed attention on PyTorch's fused CPU flash kernel (the CPU path of block routings where attnzoo's
compiled routed kernels, :mod:`attnzoo.ops.routed_blocks_native`, cannot run: no C++ compiler, head dims that are
not a multiple of 16 floats, ``ATTNZOO_NATIVE=0``).

Every query ``i`` (at position ``p = i + M - N``) attends the union of its routed key blocks. The pairs split
into two kinds of dense tiles, each run by ``aten._scaled_dot_product_flash_attention_for_cpu``:

- *diagonal* (``causal`` only): the query's own key block ``p // block_k``, causal inside. Slot ``s`` of the
  tile of block ``b`` is the query at position ``b * block_k + s``, so the tile is top-left causal for every
  block at once (``[H, n_blocks, block_k, D]`` per batch row, one call each); a query that did not select its
  own block occupies an empty slot.
- *full*: a routed key block the query sees entirely (every block under non-causal calls; blocks before the
  own block under ``causal``). The queries routed to each key block are gathered (one ``index_select`` over
  all pairs, key-block-major) into units of at most ``cap`` queries (``UNIT_QUERIES`` by default), padded to
  a multiple of ``PAD_QUERIES``; units of equal padded length batch into one fused call against their key
  blocks; a ragged last key block runs with its true length.

Under ``causal`` a routed block after the query's own block is invisible and is dropped. The partials merge
per query by log-sum-exp. The backward runs the fused flash backward on the same tiles with the merged
output and log-sum-exp (each tile's probabilities are then the global ones), and scatters the tile
gradients back. Empty slots carry a zero query and a zero output gradient, so they contribute nothing.

Layout: ``q``, the output and the gradients are read and written in the memory order they arrive in. The
heads of a mixer are views of its projections (``[B, N, H, D]`` memory, *token-major*); rows are then
addressed in that order, so neither the head split nor the head merge (nor their backward) copies.
The routing is read as a bool block mask or, without building one, as int64 block lists.
"""

from __future__ import annotations

import torch

from attnzoo.ops.routed import block_pairs
from attnzoo.ops.rows import row_index, row_view

__all__ = ["block_routed_flash", "flash_routing_ok"]

PAD_QUERIES = 64  # a unit's query slots are padded to a multiple of this, so units batch into few fused calls
# Queries per unit by default: a busy key block splits into units of this size, which batch with others (the
# fused kernel takes 256-query steps from 768 queries on; the backward runs one thread per unit, so one big unit
# alone would leave the other cores idle).
UNIT_QUERIES = 1024


def flash_routing_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether :func:`block_routed_flash` applies: CPU, float32/float64, equal head dims, ``N <= M`` if causal."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == v.shape[-1] and (not causal or q.shape[2] <= k.shape[2]))


class _Plan:
    """Which pairs go to which tile, for ``blocks`` bool ``[B, H, nbq, nkb]`` or int64 block lists
    ``[B, H, nbq, K]`` (built once, reused by backward).

    The *full* pairs form units (a key block and up to ``cap`` of the queries routed to it), each padded to a
    multiple of ``PAD_QUERIES`` query slots; units of equal padded length and key count are batched into one
    fused call. ``slots`` ``[T]`` lists the token-major row ``(b * N + i) * H + h`` of every slot (an empty slot
    repeats a real row and is flagged in ``empty``); ``calls`` holds ``(first slot, last slot, units, padded
    length, key count, key block rows)``.
    """

    def __init__(self, blocks: torch.Tensor, n: int, m: int, block_q: int, block_k: int, causal: bool,
                 cap: int | None) -> None:
        b, h = blocks.shape[:2]
        bh = b * h
        dev = blocks.device
        nkb = -(-m // block_k)
        self.b, self.h = b, h
        self.n, self.m, self.block_k, self.nkb, self.bh, self.causal = n, m, block_k, nkb, bh, causal
        g, i, kb = block_pairs(blocks, n, block_q)
        self.diag = None
        if causal:
            own = (i + (m - n)) // block_k
            diag = torch.zeros(bh * n, dtype=torch.bool, device=dev)
            diag[(g * n + i)[kb == own]] = True
            self.diag = diag.view(bh, n)  # [BH, N]: the query selected its own block
            before = kb < own
            g, i, kb = g[before], i[before], kb[before]
        bucket, order = (g * nkb + kb).sort(stable=True)  # key-block-major, queries ascending within a block
        g, i = g[order], i[order]
        rows = ((g // h) * n + i) * h + g % h  # token-major: row of (b, i, h) in [B*N*H, D]
        counts = torch.bincount(bucket, minlength=bh * nkb)  # [BH * nkb] queries per key block
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
        ok_slot = local < count[unit_of_slot]
        src = (start[unit_of_slot] + local).clamp(max=max(rows.numel() - 1, 0))
        self.slots = rows[src] if rows.numel() else src  # empty slots repeat a real row (masked by ``empty``)
        self.empty = ~ok_slot
        self.diag_all = self.diag is None or bool(self.diag.all())
        self.calls = []
        keys, n_units = torch.unique_consecutive(length * (block_k + 1) + klen, return_counts=True)
        first_unit, first_slot = 0, 0
        for key, c in zip(keys.tolist(), n_units.tolist()):
            ln, kl = divmod(key, block_k + 1)
            self.calls.append((first_slot, first_slot + c * ln, c, ln, kl, unit_block[first_unit:first_unit + c]))
            first_unit, first_slot = first_unit + c, first_slot + c * ln

    @property
    def first_diag(self) -> int:
        """The first key block holding a query: the diagonal tiles are blocks ``first_diag .. nkb - 1`` (all of
        them in training, the last one or two when decoding)."""
        return (self.m - self.n) // self.block_k

    @property
    def n_diag(self) -> int:
        return self.nkb - self.first_diag


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, H, N, D]`` as token-major rows ``[B*N*H, D]``: a view when ``t`` is a head split of
    ``[B, N, H*D]`` memory (a mixer's projections), else one copy."""
    return t.transpose(1, 2).reshape(-1, t.shape[-1])


def _heads_view(rows: torch.Tensor, b: int, h: int, n: int) -> torch.Tensor:
    """Token-major rows ``[B*N*H, D]`` as ``[B, H, N, D]`` (a view)."""
    return rows.view(b, n, h, rows.shape[-1]).transpose(1, 2)


def _tiles(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The last ``L`` positions of the sequence, ``t`` ``[B, H, L, ...]`` (any layout), as the diagonal tiles
    ``[B*n_diag, H, block_k, ...]`` (slot ``s`` of tile ``j``: position ``(first_diag + j) * block_k + s``): a view
    of token-major memory that fills the tiles exactly, else a zero-padded copy of the positions the tiles hold.
    The flash kernel returns its results and gradients in ``[B*n_diag, block_k, H, ...]`` memory (token-major)."""
    b, h, length = t.shape[:3]
    extra = t.shape[3:]
    bk, nd, start = plan.block_k, plan.n_diag, plan.first_diag * plan.block_k
    if start == plan.m - length and length == nd * bk and t.transpose(1, 2).is_contiguous():
        return t.transpose(1, 2).reshape(b * nd, bk, h, *extra).transpose(1, 2)
    full = t.new_zeros(b, nd * bk, h, *extra)
    lo = max(start, plan.m - length)  # the first position both hold
    full[:, lo - start:plan.m - start] = t[:, :, lo - (plan.m - length):].transpose(1, 2)
    return full.view(b * nd, bk, h, *extra).transpose(1, 2)


def _untile(tiles: torch.Tensor, length: int, plan: _Plan) -> torch.Tensor:
    """Token-major rows ``[B*L*H, ...]`` of the last ``length`` positions from diagonal tiles ``[B*n_diag, H,
    block_k, ...]`` (a view when the tiles are in the kernel's memory order and hold exactly those positions;
    positions before the tiles get zeros)."""
    rows = tiles.transpose(1, 2)
    extra = tiles.shape[3:]
    bk, start = plan.block_k, plan.first_diag * plan.block_k
    if start == plan.m - length and length == plan.n_diag * bk:
        return rows.reshape(-1, *extra)
    full = rows.reshape(plan.b, plan.n_diag * bk, plan.h, *extra)
    lo = max(start, plan.m - length)
    part = full[:, lo - start:plan.m - start]
    if lo == plan.m - length:
        return part.reshape(-1, *extra)
    out = tiles.new_zeros(plan.b, length, plan.h, *extra)
    out[:, lo - (plan.m - length):] = part
    return out.view(-1, *extra)


def _unit_keys(src: tuple[torch.Tensor, tuple[int, int, int]], blk: torch.Tensor, klen: int,
               plan: _Plan) -> torch.Tensor:
    """The first ``klen`` keys of the key blocks ``blk`` (indices ``(b * H + h) * nkb + key block``) from the rows
    ``src`` (:func:`~attnzoo.ops.rows.row_view` of ``[B, H, M, D]``): ``[units, klen, D]``."""
    rows, coef = src
    g, kb = blk // plan.nkb, blk % plan.nkb
    pos = kb.view(-1, 1) * plan.block_k + torch.arange(klen, device=blk.device).view(1, -1)
    idx = row_index(coef, (g // plan.h).view(-1, 1), (g % plan.h).view(-1, 1), pos)
    return rows.index_select(0, idx.reshape(-1)).view(blk.numel(), klen, rows.shape[-1])


def _add_rows(dst: torch.Tensor, slots: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None, units: int,
              ln: int) -> None:
    """``dst[slots] += t (* w)`` for one fused call's ``t`` ``[1, units, ln, D]`` in whatever layout the op returned
    it (its ``[1, ln, units, D]`` memory order is read in place, with the slots permuted to match); a weighted ``t``
    is scaled in place (it is the kernel's fresh output, used once)."""
    d = t.shape[-1]
    if units > 1 and not t.is_contiguous() and t.transpose(1, 2).is_contiguous():
        t = t.transpose(1, 2)
        slots = slots.view(units, ln).t().reshape(-1)
        w = None if w is None else w.view(units, ln).t().reshape(-1)
    rows = t.reshape(-1, d)
    dst.index_add_(0, slots, rows if w is None else rows.mul_(w.unsqueeze(-1)))  # ``t``: the kernel's own output


def _key_rows(blk: torch.Tensor, klen: int, plan: _Plan) -> torch.Tensor:
    """Token-major rows of ``[B*M*H, D]`` of the first ``klen`` keys of the key blocks ``blk`` (indices
    ``(b * H + h) * nkb + key block``), key position first: ``[klen, units]``."""
    g, kb = blk // plan.nkb, blk % plan.nkb
    pos = kb.view(1, -1) * plan.block_k + torch.arange(klen, device=blk.device).view(-1, 1)
    return (((g // plan.h) * plan.m).view(1, -1) + pos) * plan.h + (g % plan.h).view(1, -1)


def _keep_rows(plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """``[B*N*H, 1]`` token-major: 1 for a query whose routing includes its own block."""
    return plan.diag.view(plan.b, plan.h, plan.n).transpose(1, 2).reshape(-1, 1).to(dtype)


class _BlockRoutedFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        d = q.shape[-1]
        n = plan.n
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        neg = float("-inf")
        q_rows = _token_rows(q)
        k_src, v_src = row_view(k), row_view(v)
        slots = plan.slots
        if plan.causal:
            qd = q if plan.diag_all else _heads_view(q_rows * _keep_rows(plan, q.dtype), plan.b, plan.h, n)
            od, ld = op(_tiles(qd, plan), _tiles(k, plan), _tiles(v, plan), 0.0, True, scale=scale)
            l_own = _untile(ld.unsqueeze(-1), n, plan).view(-1)
            if not plan.diag_all:
                l_own = l_own.masked_fill(~_keep_rows(plan, torch.bool).view(-1), neg)
            o_own = _untile(od, n, plan)
        qg = q_rows.index_select(0, slots)
        outs, lses = [], []
        for a, z, units, ln, klen, blk in plan.calls:
            o, lse = op(qg[a:z].view(1, units, ln, d), _unit_keys(k_src, blk, klen, plan).unsqueeze(0),
                        _unit_keys(v_src, blk, klen, plan).unsqueeze(0), 0.0, False, scale=scale)
            outs.append(o)
            lses.append(lse.reshape(-1))
        lg = (torch.cat(lses) if lses else q.new_zeros(0)).masked_fill(plan.empty, neg)
        top = l_own.clone() if plan.causal else q.new_full((plan.bh * n,), neg)
        top.scatter_reduce_(0, slots, lg, "amax")
        top_safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        tot = torch.exp(l_own - top_safe) if plan.causal else torch.zeros_like(top)
        tot.index_add_(0, slots, torch.exp(lg - top_safe[slots]))
        lse_safe = torch.where(tot > 0, top_safe + torch.log(tot), torch.zeros_like(tot))
        if plan.causal:
            out_rows = o_own.contiguous()  # the kernel's own output (a fresh tensor): scaled in place
            out_rows.mul_(torch.exp(l_own - lse_safe).unsqueeze(-1))
        else:
            out_rows = q.new_zeros(q_rows.shape)
        w = torch.exp(lg - lse_safe[slots])
        for (a, z, units, ln, _, _), o in zip(plan.calls, outs):
            _add_rows(out_rows, slots[a:z], o, w[a:z], units, ln)
        ctx.save_for_backward(q, k, v, out_rows, lse_safe, qg)
        ctx.plan, ctx.scale = plan, scale
        return _heads_view(out_rows, plan.b, plan.h, n)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out_rows, lse, qg = ctx.saved_tensors
        plan: _Plan = ctx.plan
        d = q.shape[-1]
        b, h, n, m = plan.b, plan.h, plan.n, plan.m
        opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        q_rows, do_rows = _token_rows(q), _token_rows(dout)
        k_src, v_src = row_view(k), row_view(v)
        if plan.causal:
            keep = None if plan.diag_all else _keep_rows(plan, q.dtype)
            do4 = dout if keep is None else _heads_view(do_rows * keep, b, h, n)
            q4 = q if keep is None else _heads_view(q_rows * keep, b, h, n)
            lse4 = _heads_view(lse.view(-1, 1), b, h, n)
            gq, gk, gv = opb(_tiles(do4, plan), _tiles(q4, plan), _tiles(k, plan), _tiles(v, plan),
                             _tiles(_heads_view(out_rows, b, h, n), plan), _tiles(lse4, plan).squeeze(-1),
                             0.0, True, scale=ctx.scale)
            dq_rows, dk_rows, dv_rows = (_untile(g, length, plan).contiguous()
                                         for g, length in ((gq, n), (gk, m), (gv, m)))
        else:
            dq_rows = q.new_zeros(q_rows.shape)
            dk_rows, dv_rows = q.new_zeros(b * m * h, d), q.new_zeros(b * m * h, d)
        slots = plan.slots
        dog, og = do_rows.index_select(0, slots), out_rows.index_select(0, slots)
        lg = lse.index_select(0, slots).masked_fill(plan.empty, float("inf"))
        for a, z, units, ln, klen, blk in plan.calls:
            shape4 = (1, units, ln, d)
            gq, gk, gv = opb(dog[a:z].view(shape4), qg[a:z].view(shape4),
                             _unit_keys(k_src, blk, klen, plan).unsqueeze(0),
                             _unit_keys(v_src, blk, klen, plan).unsqueeze(0), og[a:z].view(shape4),
                             lg[a:z].view(1, units, ln), 0.0, False, scale=ctx.scale)
            _add_rows(dq_rows, slots[a:z], gq, None, units, ln)
            key_rows = _key_rows(blk, klen, plan)  # [klen, units]
            for grad, dst in ((gk[0], dk_rows), (gv[0], dv_rows)):
                if grad.transpose(0, 1).is_contiguous():
                    dst.index_add_(0, key_rows.reshape(-1), grad.transpose(0, 1).reshape(-1, d))
                else:
                    dst.index_add_(0, key_rows.t().reshape(-1), grad.reshape(-1, d))
        return (_heads_view(dq_rows, b, h, n), _heads_view(dk_rows, b, h, m), _heads_view(dv_rows, b, h, m),
                None, None)


def block_routed_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, block_q: int,
                       block_k: int, causal: bool = False, scale: float | None = None,
                       cap: int | None = None) -> torch.Tensor:
    """Block-routed attention on fused CPU flash tiles (see the module docstring); forward and backward.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]``, ``blocks`` bool ``[B, H, ceil(N / block_q),
    ceil(M / block_k)]`` or int64 block lists ``[B, H, ceil(N / block_q), K]`` (-1: empty; checked by the
    caller; :func:`flash_routing_ok` must hold). Work and memory are linear in ``N x`` selected keys. Queries
    that see no key return zeros and zero gradients. The output (and ``q``'s gradient) has ``q``'s memory order
    when ``q`` is token-major (a head split of ``[B, N, H*D]``), else is contiguous.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        plan = _Plan(blocks, q.shape[2], k.shape[2], block_q, block_k, causal, cap)
    return _BlockRoutedFlash.apply(q, k, v, plan, scale)
