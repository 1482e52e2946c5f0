"""Context-parallel (ring) attention over ``torch.distributed``.

Each of the ``P`` processes of a group holds a shard of the sequence (``layout``: ``contiguous`` or
``zigzag``, see :mod:`attnzoo.parallel.layout`). At step ``t`` process ``r`` computes its queries
against the keys/values of process ``r - t`` (mod ``P``) while the keys/values of step ``t + 1``
are in flight (``isend`` / ``irecv`` through ``batch_isend_irecv``), and the partial results are merged
exactly by their log-sum-exp. The pattern is read on global positions: a (query chunk, key chunk)
pair with no allowed entry is neither computed nor sent, a chunk is sent only to the processes that
need it, and a step nobody needs is skipped, so a sliding window exchanges with its neighbours only.

The backward recomputes each block's partial (through the :func:`attnzoo.attention` backends, with the
gradient of its log-sum-exp) and sends the key/value gradients back to their owners: the same ring in
reverse. Every process must pass the same pattern and score modifier (of the whole sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from attnzoo.ops import attention
from attnzoo.ops.layout import EMPTY, FULL, Shape
from attnzoo.ops.problem import make_problem
from attnzoo.parallel.layout import check_layout, chunks_per_rank, segments
from attnzoo.parallel.views import pattern_block, score_mod_block

__all__ = ["reset_traffic", "ring_attention", "traffic"]

_TRAFFIC = {"bytes_sent": 0, "messages_sent": 0, "bytes_received": 0}


def traffic() -> dict[str, int]:
    """Bytes and messages this process has sent (and bytes received) in ring attention since the last
    :func:`reset_traffic`, forward and backward."""
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    """Set the counters of :func:`traffic` to zero."""
    for key in _TRAFFIC:
        _TRAFFIC[key] = 0


# Keys are sent in spans of whole blocks of at least this many tokens (when the shard allows): a sliding window
# gets the window's edge of its neighbours' shards, not the shards.
SPAN_BLOCK_MIN = 64
# At most this many span blocks per chunk (the pattern's block layout at that size is built once per call shape).
SPAN_BLOCKS_MAX = 256


@dataclass
class _Span:
    """Tokens ``[offset, offset + length)`` of a process's shard, at global positions from ``start``."""

    offset: int
    length: int
    start: int


@dataclass
class _Step:
    """Step ``t``: key/value spans ``recv`` of process ``src`` come in (step 0: our own chunks) and our spans ``send``
    go to ``dst``; ``pairs``: (our query chunk, index into ``recv``, whole block allowed)."""

    src: int
    dst: int
    recv: list[_Span]
    send: list[_Span]
    pairs: list[tuple[int, int, bool]] = field(default_factory=list)

    def positions(self, own: bool) -> list[int]:
        """Where each received span starts in the key tensor it is read from (ours at step 0, else the buffer)."""
        if own:
            return [s.offset for s in self.recv]
        out, at = [], 0
        for s in self.recv:
            out.append(at)
            at += s.length
        return out


@dataclass
class _Plan:
    group: Any
    rank: int
    world: int
    peers: list[int]          # global rank of each group rank
    layout: str
    seg: int                  # tokens per chunk
    global_shape: Shape
    pattern: Any
    score_mod: Any
    scale: float
    steps: list[_Step]
    causal: bool = False      # the pattern is top-left causal on the whole sequence
    flash: bool = False       # whole blocks (and causal diagonal ones) run on PyTorch's CPU flash kernels


def _span_block(seg: int) -> int:
    fine = seg
    while fine % 2 == 0 and fine // 2 >= SPAN_BLOCK_MIN and seg // fine < SPAN_BLOCKS_MAX:
        fine //= 2
    return fine


def _block_states(pattern: Any, shape: Shape, fine: int, device: torch.device):
    """``(any, full)`` bool ``[N / fine, N / fine]`` over batch and heads: the blocks with an allowed entry and the
    blocks allowed entirely (None, None for full attention)."""
    if pattern is None:
        return None, None
    state = pattern.block_layout(shape, fine, fine, device).state.cpu()
    n = shape.n_q // fine
    state = state.reshape(-1, n, n)
    return (state != EMPTY).any(0), (state == FULL).all(0)


def _make_plan(group, rank, world, layout, seg, shape, pattern, score_mod, scale, device) -> _Plan:
    import torch.distributed as dist

    fine = _span_block(seg)
    m = seg // fine
    any_, full = _block_states(pattern, shape, fine, device)
    chunks = [segments(r, world, layout) for r in range(world)]

    def rows(q_rank: int) -> torch.Tensor:
        return torch.cat([torch.arange(a * m, (a + 1) * m) for a in chunks[q_rank]])

    def needed(q_rank: int, kv_rank: int) -> list[_Span]:
        spans = []
        for j, c in enumerate(chunks[kv_rank]):
            if any_ is None:
                lo, hi = 0, m
            else:
                cols = any_[rows(q_rank)][:, c * m:(c + 1) * m].any(0).nonzero().flatten()
                if not len(cols):
                    continue
                lo, hi = int(cols.min()), int(cols.max()) + 1
            spans.append(_Span(j * seg + lo * fine, (hi - lo) * fine, c * seg + lo * fine))
        return spans

    steps = []
    for t in range(world):
        src, dst = (rank - t) % world, (rank + t) % world
        if t:
            step = _Step(src, dst, needed(rank, src), needed(dst, rank))
        else:
            step = _Step(rank, rank, [_Span(j * seg, seg, c * seg) for j, c in enumerate(chunks[rank])], [])
        for i, a in enumerate(chunks[rank]):
            for slot, span in enumerate(step.recv):
                if any_ is None:
                    step.pairs.append((i, slot, True))
                    continue
                r = slice(a * m, (a + 1) * m)
                c = slice(span.start // fine, (span.start + span.length) // fine)
                if bool(any_[r, c].any()):
                    step.pairs.append((i, slot, bool(full[r, c].all())))
        steps.append(step)
    peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)] if world > 1 else [0]
    plan = _Plan(group, rank, world, peers, layout, seg, shape, pattern, score_mod, scale, steps)
    plan.causal = pattern is not None and pattern.sdpa_hint(shape) == "causal"
    return plan


def _pack(k: torch.Tensor, v: torch.Tensor, spans: list[_Span]) -> list[torch.Tensor]:
    """The spans of ``k`` and ``v`` (along dim 2) as two contiguous messages (no copy when they are the whole
    contiguous shard)."""
    if len(spans) == 1 or _tokens(spans) == k.shape[2]:
        lo, n = spans[0].offset, _tokens(spans)
        return [k.narrow(2, lo, n).contiguous(), v.narrow(2, lo, n).contiguous()]
    return [torch.cat([t.narrow(2, s.offset, s.length) for s in spans], dim=2) for t in (k, v)]


def _tokens(spans: list[_Span]) -> int:
    return sum(s.length for s in spans)


def _exchange(plan: _Plan, send: list[torch.Tensor] | None, dst: int, recv_like: list[torch.Tensor] | None,
              recv_tokens: int, src: int, tag: int) -> tuple[list[Any], list[torch.Tensor] | None]:
    """Post the tensors ``send`` to ``dst``, and receives from ``src`` of tensors shaped like ``recv_like`` with
    ``recv_tokens`` tokens (either side may be absent)."""
    import torch.distributed as dist

    ops, bufs = [], None
    for i, t in enumerate(send or []):
        ops.append(dist.P2POp(dist.isend, t, plan.peers[dst], plan.group, tag + i))
        _TRAFFIC["bytes_sent"] += t.numel() * t.element_size()
        _TRAFFIC["messages_sent"] += 1
    if recv_tokens:
        bufs = [like.new_empty(*like.shape[:2], recv_tokens, like.shape[-1]) for like in recv_like]
        for i, buf in enumerate(bufs):
            ops.append(dist.P2POp(dist.irecv, buf, plan.peers[src], plan.group, tag + i))
            _TRAFFIC["bytes_received"] += buf.numel() * buf.element_size()
    return (dist.batch_isend_irecv(ops) if ops else []), bufs


def _post_kv(plan: _Plan, t: int, k: torch.Tensor, v: torch.Tensor):
    """Start step ``t``'s key/value exchange; ``(works, received [k, v] or None, sent tensors)``."""
    step = plan.steps[t]
    send = _pack(k, v, step.send) if step.send else None
    works, bufs = _exchange(plan, send, step.dst, [k, v], _tokens(step.recv), step.src, 4 * t)
    return works, bufs, send


def _wait(works: list[Any]) -> None:
    for w in works:
        w.wait()


def _block_args(plan: _Plan, step: _Step, i: int, slot: int, at: int, full: bool, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor):
    """Our query chunk ``i`` and the received span ``slot`` (at ``at`` in ``k``, ``v``), with the pattern and the
    score modifier read at their global positions."""
    seg, span = plan.seg, step.recv[slot]
    q_start = segments(plan.rank, plan.world, plan.layout)[i] * seg
    qi = q.narrow(2, i * seg, seg)
    kj, vj = k.narrow(2, at, span.length), v.narrow(2, at, span.length)
    pattern = None if full or plan.pattern is None else pattern_block(plan.pattern, plan.global_shape, q_start,
                                                                      span.start)
    mod = None if plan.score_mod is None else score_mod_block(plan.score_mod, plan.global_shape, q_start, span.start)
    return qi, kj, vj, pattern, mod


_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _flash_ok(q: torch.Tensor, v: torch.Tensor, score_mod: Any) -> bool:
    """Whether PyTorch's CPU flash kernels (out and log-sum-exp forward, a backward that takes the merged out and
    log-sum-exp) can run the unmasked and causal-diagonal blocks: memory linear in the block, no materialised
    scores."""
    return (q.device.type == "cpu" and score_mod is None and q.dtype in _FLASH_DTYPES
            and v.shape[-1] == q.shape[-1])


def _flash_causal(plan: _Plan, step: _Step, i: int, slot: int, full: bool) -> bool | None:
    """``False``: the block is unmasked; ``True``: it is the causal diagonal; None: it needs the general path."""
    if not plan.flash:
        return None
    if full:
        return False
    span = step.recv[slot]
    q_start = segments(plan.rank, plan.world, plan.layout)[i] * plan.seg
    if plan.causal and span.start == q_start and span.length == plan.seg:
        return True
    return None


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold_kv(g: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return g
    b, h, n, d = g.shape
    return g.view(b, h // groups, groups, n, d).sum(2)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _step_keys(plan: _Plan, t: int, k: torch.Tensor, v: torch.Tensor, pending):
    """``(keys, values, next pending exchange)`` of step ``t`` (keys None: nothing came in)."""
    if t == 0:
        return k, v, pending
    works, bufs, _ = pending
    _wait(works)
    nxt = _post_kv(plan, t + 1, k, v) if t + 1 < plan.world else None
    if bufs is None:
        return None, None, nxt
    return bufs[0], bufs[1], nxt


def _merge_into(out: torch.Tensor, run: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, first: bool) -> None:
    """Fold the partial ``(o, lse)`` into the running ``(out, run)`` in place (:func:`attnzoo.ops.merge_partials` for
    two partials, without its temporaries); rows masked in both stay zero with ``lse = -inf``."""
    if first:
        out.copy_(o)
        run.copy_(lse)
        return
    new = torch.logaddexp(run, lse)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    out.mul_(torch.exp(run - safe).unsqueeze(-1)).addcmul_(o, torch.exp(lse - safe).unsqueeze(-1))
    run.copy_(new)


def _forward(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    seg = plan.seg
    dt = _acc_dtype(q.dtype)
    b, h, n, _ = q.shape
    out = q.new_zeros(b, h, n, v.shape[-1], dtype=dt)
    lse_all = q.new_full((b, h, n), -math.inf, dtype=dt)
    first = [True] * chunks_per_rank(plan.layout)
    pending = _post_kv(plan, 1, k, v) if plan.world > 1 else None
    for t, step in enumerate(plan.steps):
        kk, vv, pending = _step_keys(plan, t, k, v, pending)
        if kk is None:
            continue
        at = step.positions(own=t == 0)
        for i, slot, full in step.pairs:
            qi, kj, vj, pattern, mod = _block_args(plan, step, i, slot, at[slot], full, q, kk, vv)
            causal = _flash_causal(plan, step, i, slot, full)
            if causal is not None:
                groups = q.shape[1] // k.shape[1]
                o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qi, _expand_kv(kj, groups), _expand_kv(vj, groups), 0.0, causal, scale=plan.scale)
            else:
                o, lse = attention(qi, kj, vj, pattern=pattern, score_mod=mod, scale=plan.scale, return_lse=True)
            _merge_into(out.narrow(2, i * seg, seg), lse_all.narrow(2, i * seg, seg), o, lse.to(dt), first[i])
            first[i] = False
    return out.to(q.dtype), lse_all


def _backward(plan: _Plan, q, k, v, out, lse, dout, mod_tensors):
    seg = plan.seg
    dt = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=k.device)
    dv = torch.zeros(v.shape, dtype=dt, device=v.device)
    mod_grads: list[torch.Tensor | None] = [None] * len(mod_tensors)
    wanted = [i for i, t in enumerate(mod_tensors) if t.requires_grad]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dout_q = dout.to(q.dtype)
    dout, out_d = dout.to(dt), out.to(dt)
    groups = q.shape[1] // k.shape[1]
    returning = None  # the gradient exchange of the previous step, settled after the next step's compute

    def settle(back) -> None:
        works, bufs, spans = back
        _wait(works)
        if bufs is not None:
            gk, gv = bufs
            at = 0
            for span in spans:
                dk.narrow(2, span.offset, span.length).add_(gk.narrow(2, at, span.length))
                dv.narrow(2, span.offset, span.length).add_(gv.narrow(2, at, span.length))
                at += span.length

    pending = _post_kv(plan, 1, k, v) if plan.world > 1 else None
    for t, step in enumerate(plan.steps):
        kk, vv, pending = _step_keys(plan, t, k, v, pending)
        own = t == 0
        gk = gv = None
        if kk is not None:
            gk, gv = (dk, dv) if own else (torch.zeros(kk.shape, dtype=dt, device=k.device),
                                           torch.zeros(vv.shape, dtype=dt, device=v.device))
            at = step.positions(own)
            for i, slot, full in step.pairs:
                qi, kj, vj, pattern, mod = _block_args(plan, step, i, slot, at[slot], full, q, kk, vv)
                rows = slice(i * seg, (i + 1) * seg)
                length = step.recv[slot].length
                causal = _flash_causal(plan, step, i, slot, full)
                if causal is not None:
                    # With the merged out and lse, the flash backward gives this block's share of the gradients.
                    gq_b, gk_b, gv_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        dout_q[:, :, rows].contiguous(), qi.contiguous(), _expand_kv(kj, groups).contiguous(),
                        _expand_kv(vj, groups).contiguous(), out[:, :, rows].contiguous(),
                        lse[:, :, rows].to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous(),
                        0.0, causal, scale=plan.scale)
                    dq[:, :, rows] += gq_b
                    gk.narrow(2, at[slot], length).add_(_fold_kv(gk_b, groups))
                    gv.narrow(2, at[slot], length).add_(_fold_kv(gv_b, groups))
                    continue
                qi, kj, vj = (x.detach().requires_grad_(True) for x in (qi, kj, vj))
                with torch.enable_grad():
                    o, lse_b = attention(qi, kj, vj, pattern=pattern, score_mod=mod, scale=plan.scale,
                                         return_lse=True)
                # out = sum_b exp(lse_b - lse) o_b: the gradients reaching this block's (o_b, lse_b)
                w = torch.exp(lse_b.to(dt) - lse_safe[:, :, rows])
                d_o = dout[:, :, rows]
                g_out = (w.unsqueeze(-1) * d_o).to(o.dtype)
                g_lse = (w * (d_o * (o.to(dt) - out_d[:, :, rows])).sum(-1)).to(lse_b.dtype)
                inputs = [qi, kj, vj, *(mod_tensors[m] for m in wanted)]
                grads = torch.autograd.grad((o, lse_b), inputs, (g_out, g_lse), allow_unused=True)
                if grads[0] is not None:
                    dq[:, :, rows] += grads[0]
                for target, g in ((gk, grads[1]), (gv, grads[2])):
                    if g is not None:
                        target.narrow(2, at[slot], length).add_(g)
                for m, g in zip(wanted, grads[3:]):
                    if g is not None:
                        mod_grads[m] = g if mod_grads[m] is None else mod_grads[m] + g
        if own:
            continue
        # Return step t's key/value gradients to their owner; collect ours from the process we sent to.
        if returning is not None:
            settle(returning)
        send = None if gk is None else [gk.to(k.dtype), gv.to(v.dtype)]
        works, bufs = _exchange(plan, send, step.src, [k, v], _tokens(step.send), step.dst, 4 * t + 2)
        returning = (works, bufs, step.send)
    if returning is not None:
        settle(returning)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), mod_grads


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, *mod_tensors):
        out, lse = _forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mod_tensors = mod_tensors
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, mod_grads = _backward(ctx.plan, q, k, v, out, lse, dout, ctx.mod_tensors)
        return (None, dq, dk, dv, *mod_grads)


def _check_same_shapes(q, k, v, group, world) -> None:
    """Every process of the group must hold shards of the same shape (one small ``all_gather``)."""
    import torch.distributed as dist

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    mine = torch.tensor([*q.shape, *k.shape, *v.shape, dtypes.index(q.dtype)], dtype=torch.int64, device=q.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    for r, other in enumerate(every):
        if not torch.equal(other, mine):
            got = other.tolist()
            raise ValueError(
                f"q, k, v: every process must hold shards of the same shapes and dtype; this process has q "
                f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} ({q.dtype}), process {r} of the group has "
                f"q {got[0:4]}, k {got[4:8]}, v {got[8:12]} ({dtypes[got[12]]})")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Any = None,
    score_mod: Any = None,
    scale: float | None = None,
    group: Any = None,
    layout: str = "contiguous",
) -> torch.Tensor:
    """Softmax attention of a sequence sharded across the processes of ``group`` (context parallelism).

    ``q`` ``[B, H, N/P, D]``, ``k`` ``[B, H_kv, N/P, D]``, ``v`` ``[B, H_kv, N/P, D_v]``: this process's shards
    (from :func:`attnzoo.parallel.shard` with the same ``layout``) of a self-attention over ``N`` tokens split
    across the ``P`` processes of ``group`` (default: the world) in rank order. ``pattern`` and ``score_mod``
    are those of the whole ``N``-token sequence (e.g. ``KeyPadding`` with the full ``[B, N]`` mask) and must be
    the same on every process. Returns this process's output shard ``[B, H, N/P, D_v]``; differentiable in
    ``q``, ``k``, ``v`` and the score modifier's tensors (each process gets the gradients of its shards and its
    share of the modifier's). Query rows that see no key return zeros. Without an initialised
    ``torch.distributed`` it runs as one process (``P = 1``).

    Collective: every process of ``group`` must call it with shards of the same shapes.
    """
    import torch.distributed as dist

    check_layout(layout)
    problem = make_problem(q, k, v, pattern=None, score_mod=None, scale=scale, return_weights=False,
                           return_lse=False)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"k: ring attention is self-attention over one sharded sequence: expected {q.shape[2]} "
                         f"tokens (the shard length of q), got {k.shape[2]}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError("group: this process is not a member of the group")
    elif group is not None:
        raise RuntimeError("group: given but torch.distributed is not initialised")
    else:
        rank, world = 0, 1
    per = chunks_per_rank(layout)
    n_local = q.shape[2]
    if n_local % per:
        raise ValueError(f"q: a zigzag shard holds two equal chunks, so its length must be even, got {n_local}")
    if world > 1:
        _check_same_shapes(q, k, v, group, world)
    seg = n_local // per
    shape = Shape(q.shape[0], q.shape[1], n_local * world, n_local * world)
    if pattern is not None:
        if not hasattr(pattern, "allow"):
            raise TypeError(f"pattern: expected an attnzoo Pattern or None, got {type(pattern).__name__}")
        pattern.check(shape)
    if score_mod is not None:
        from attnzoo.ops.score_mod import as_score_mod

        score_mod = as_score_mod(score_mod)
        score_mod.check(shape)
    plan = _make_plan(group, rank, world, layout, seg, shape, pattern, score_mod, problem.scale, q.device)
    plan.flash = _flash_ok(q, v, score_mod)
    mod_tensors = score_mod.tensors() if score_mod is not None else []
    return _RingAttention.apply(plan, q, k, v, *mod_tensors)
