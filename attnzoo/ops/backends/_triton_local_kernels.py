"""Triton kernels of the ``triton`` backend: windowed attention over interval patterns.

Imported only by :mod:`attnzoo.ops.backends.triton_local` when a call runs (never at package
import): it imports Triton at module level.

The pattern reaches the kernels as per-axis tables (see ``triton_local._Plan``). Tokens are a
row-major ``rows x cols`` grid (a 1-D sequence is one row). Query ``(r, c)`` may attend key
``(r', c')`` iff ``RF[r] <= r' <= RL[r]`` and ``CF[c] <= c' <= CL[c]``: one key interval per
axis and query coordinate, the exact mask, evaluated in the kernel from integer arithmetic.

Kernels (launch grid in brackets):

- ``_fwd`` [query tiles, B*H]: a query tile is a ``TA x TB`` rectangle of the query grid
  (``1 x BLOCK_M`` for 1-D). It reads the key box ``[RKLO, RKHI] x [CKLO, CKHI]`` that holds
  every key its queries may see, flattened row-major and cut into chunks of ``BLOCK_N`` keys
  (each box row is a contiguous run of keys in memory), with an online softmax (exp2, fp32
  statistics). Writes ``out`` and the natural-log ``lse`` (``-inf`` for rows that see no key,
  whose output is 0).
- ``_bwd_dq`` [query tiles, B*H]: recomputes the same tiles; ``dq = scale * dS K``.
- ``_bwd_dkdv`` [key tiles, B*H_kv]: a ``KA x KB`` key tile visits the query box
  ``[RQLO, RQHI] x [CQLO, CQHI]`` of the queries that may see it, for every query head of
  its group (GQA without atomics); ``dv = P^T dO``, ``dk = scale * dS^T Q``.

``delta = rowsum(dO * O) - dlse`` comes in precomputed (the ``- dlse`` term is the gradient
through the returned log-sum-exp: ``d lse / d s = p``).

All tile sizes are ``tl.constexpr``: a GPU session can sweep them (or wrap the launches in
``triton.autotune``); the defaults in ``triton_local.choose_config`` are untuned guesses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``UPCAST`` (the interpreter with bfloat16, whose ``tl.dot``
    on bf16 returns garbage) multiplies the same bf16-rounded values in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _query_tile(pid, n_ct, Lqr, Lqc, RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI, TA: tl.constexpr, TB: tl.constexpr):
    """The ``TA x TB`` query tile ``pid``: token ids, validity, each query's key interval per axis
    (rows ``rf..rl``, columns ``cf..cl``) and the tile's key box (origin ``r0, c0``, width ``bw``, size)."""
    ti = pid // n_ct
    tj = pid % n_ct
    i = tl.arange(0, TA * TB)
    qr = ti * TA + i // TB
    qc = tj * TB + i % TB
    q_ok = (qr < Lqr) & (qc < Lqc)
    qtok = (qr * Lqc + qc).to(tl.int64)
    cf = tl.load(CF + qc, mask=q_ok, other=1)
    cl = tl.load(CL + qc, mask=q_ok, other=0)
    rf = tl.load(RF + qr, mask=q_ok, other=1)
    rl = tl.load(RL + qr, mask=q_ok, other=0)
    r0 = tl.load(RKLO + ti)
    c0 = tl.load(CKLO + tj)
    bw = tl.maximum(tl.load(CKHI + tj) - c0 + 1, 0)
    nbox = bw * tl.maximum(tl.load(RKHI + ti) - r0 + 1, 0)
    return qtok, q_ok, rf, rl, cf, cl, r0, c0, bw, nbox


@triton.jit
def _box_keys(j0, nbox, r0, c0, bw, Lkc, rf, rl, cf, cl, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr):
    """Keys ``j0 .. j0 + BLOCK_N`` of a tile's key box: token ids, validity and the exact mask ``[M, BLOCK_N]``."""
    j = j0 + tl.arange(0, BLOCK_N)
    k_ok = j < nbox
    if ONE_ROW:
        kc = c0 + j
        ktok = (r0 * Lkc + kc).to(tl.int64)
        allowed = (kc[None, :] >= cf[:, None]) & (kc[None, :] <= cl[:, None]) & k_ok[None, :]
    else:
        kr = r0 + j // bw
        kc = c0 + j % bw
        ktok = (kr * Lkc + kc).to(tl.int64)
        allowed = ((kc[None, :] >= cf[:, None]) & (kc[None, :] <= cl[:, None])
                   & (kr[None, :] >= rf[:, None]) & (kr[None, :] <= rl[:, None]) & k_ok[None, :])
    return ktok, k_ok, allowed


@triton.jit
def _query_program(Q, K, V, sqb, sqh, sqn, skb, skh, svb, svh, RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI,
                   H, G, Lqr, Lqc, n_ct, D: tl.constexpr, BD: tl.constexpr, TA: tl.constexpr, TB: tl.constexpr):
    """This program's query tile (axis 0) and batch x head (axis 1): batch ``b``, head ``h``, the tile
    (:func:`_query_tile`), its queries ``q [TA * TB, BD]`` and the base pointers of its K / V head."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    qtok, q_ok, rf, rl, cf, cl, r0, c0, bw, nbox = _query_tile(tl.program_id(0), n_ct, Lqr, Lqc, RF, RL, CF, CL,
                                                               RKLO, RKHI, CKLO, CKHI, TA, TB)
    d = tl.arange(0, BD)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + qtok[:, None] * sqn + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    return b, h, qtok, q_ok, rf, rl, cf, cl, r0, c0, bw, nbox, q, k_base, v_base


@triton.jit
def _fwd(
    Q, K, V, OUT, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI,
    H, G, Lqr, Lqc, Lkc, n_ct, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    TA: tl.constexpr, TB: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TA * TB
    b, h, qtok, q_ok, rf, rl, cf, cl, r0, c0, bw, nbox, q, k_base, v_base = _query_program(
        Q, K, V, sqb, sqh, sqn, skb, skh, svb, svh, RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI, H, G, Lqr, Lqc, n_ct,
        D, BD, TA, TB)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    for j0 in range(0, nbox, BLOCK_N):
        ktok, k_ok, allowed = _box_keys(j0, nbox, r0, c0, bw, Lkc, rf, rl, cf, cl, BLOCK_N, ONE_ROW)
        kt = tl.load(k_base + ktok[None, :] * skn + d[:, None], mask=k_ok[None, :] & (d[:, None] < D), other=0.0)
        s = _mm(q, kt, PREC, UPCAST) * qk_scale
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_base + ktok[:, None] * svn + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(vv.dtype), vv, PREC, UPCAST)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_base = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(o_base + qtok[:, None] * son + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=q_ok[:, None] & (dv[None, :] < DV))
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + qtok, lse, mask=q_ok)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh, sdqb, sdqh, sdqn,
    RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI,
    H, G, Lqr, Lqc, Lkc, n_ct, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    TA: tl.constexpr, TB: tl.constexpr, BLOCK_N: tl.constexpr, ONE_ROW: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TA * TB
    b, h, qtok, q_ok, rf, rl, cf, cl, r0, c0, bw, nbox, q, k_base, v_base = _query_program(
        Q, K, V, sqb, sqh, sqn, skb, skh, svb, svh, RF, RL, CF, CL, RKLO, RKHI, CKLO, CKHI, H, G, Lqr, Lqc, n_ct,
        D, BD, TA, TB)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + qtok[:, None] * sdon + dv[None, :],
                 mask=q_ok[:, None] & (dv[None, :] < DV), other=0.0)
    row = b.to(tl.int64) * slb + h.to(tl.int64) * slh + qtok
    lse2 = tl.load(LSE + row, mask=q_ok, other=float("-inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that see no key: p = 0
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BD], dtype=tl.float32)
    for j0 in range(0, nbox, BLOCK_N):
        ktok, k_ok, allowed = _box_keys(j0, nbox, r0, c0, bw, Lkc, rf, rl, cf, cl, BLOCK_N, ONE_ROW)
        kk = tl.load(k_base + ktok[:, None] * skn + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)
        vt = tl.load(v_base + ktok[None, :] * svn + dv[:, None], mask=k_ok[None, :] & (dv[:, None] < DV), other=0.0)
        s = _mm(q, tl.trans(kk), PREC, UPCAST) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kk.dtype), kk, PREC, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + qtok[:, None] * sdqn + d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, slb, slh,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    RF, RL, CF, CL, RQLO, RQHI, CQLO, CQHI,
    HKV, G, Lqc, Lkr, Lkc, n_kct, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    KA: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, ONE_ROW: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_N: tl.constexpr = KA * KB
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    ti = pid // n_kct
    tj = pid % n_kct

    jn = tl.arange(0, BLOCK_N)
    kr = ti * KA + jn // KB
    kc = tj * KB + jn % KB
    k_ok = (kr < Lkr) & (kc < Lkc)
    ktok = (kr * Lkc + kc).to(tl.int64)

    q0 = tl.load(RQLO + ti)
    q1 = tl.load(RQHI + ti)
    c0 = tl.load(CQLO + tj)
    c1 = tl.load(CQHI + tj)
    bw = tl.maximum(c1 - c0 + 1, 0)
    nbox = bw * tl.maximum(q1 - q0 + 1, 0)

    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    kk = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + ktok[:, None] * skn + d[None, :],
                 mask=k_ok[:, None] & (d[None, :] < D), other=0.0)
    vv = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + ktok[:, None] * svn + dv[None, :],
                 mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)

    dk = tl.zeros([BLOCK_N, BD], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        row_base = b.to(tl.int64) * slb + h.to(tl.int64) * slh
        for i0 in range(0, nbox, BLOCK_M):
            i = i0 + tl.arange(0, BLOCK_M)
            q_ok = i < nbox
            if ONE_ROW:
                qc = c0 + i
                qtok = (q0 * Lqc + qc).to(tl.int64)
                cf = tl.load(CF + qc, mask=q_ok, other=1)
                cl = tl.load(CL + qc, mask=q_ok, other=0)
                allowed = (kc[:, None] >= cf[None, :]) & (kc[:, None] <= cl[None, :]) & k_ok[:, None]
            else:
                qr = q0 + i // bw
                qc = c0 + i % bw
                qtok = (qr * Lqc + qc).to(tl.int64)
                cf = tl.load(CF + qc, mask=q_ok, other=1)
                cl = tl.load(CL + qc, mask=q_ok, other=0)
                rf = tl.load(RF + qr, mask=q_ok, other=1)
                rl = tl.load(RL + qr, mask=q_ok, other=0)
                allowed = ((kc[:, None] >= cf[None, :]) & (kc[:, None] <= cl[None, :])
                           & (kr[:, None] >= rf[None, :]) & (kr[:, None] <= rl[None, :]) & k_ok[:, None])
            qq = tl.load(q_base + qtok[:, None] * sqn + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)
            do = tl.load(do_base + qtok[:, None] * sdon + dv[None, :], mask=q_ok[:, None] & (dv[None, :] < DV),
                         other=0.0)
            lse2 = tl.load(LSE + row_base + qtok, mask=q_ok, other=float("-inf")) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
            delta = tl.load(DELTA + row_base + qtok, mask=q_ok, other=0.0)
            st = _mm(kk, tl.trans(qq), PREC, UPCAST) * qk_scale
            pt = tl.where(allowed, tl.exp2(st - lse2[None, :]), 0.0)
            dvacc += _mm(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _mm(vv, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst.to(qq.dtype), qq, PREC, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + ktok[:, None] * sdkn + d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))
    tl.store(DV_ + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + ktok[:, None] * sdvn + dv[None, :],
             dvacc.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (dv[None, :] < DV))


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _upcast(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def forward(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, N, D_v], lse [B, H, N] float32)``; ``q, k, v`` have unit stride on the last axis."""
    b, h, n, d = q.shape
    dv = v.shape[-1]
    cfg, t = plan.config, plan.fwd
    out = torch.empty(b, h, n, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    rows, cols = plan.rows, plan.cols
    _fwd[(t.n_rows * t.n_cols, b * h)](
        q, k, v, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        rows.first, rows.last, cols.first, cols.last, t.row_lo, t.row_hi, t.col_lo, t.col_hi,
        h, plan.groups, rows.n_q, cols.n_q, cols.n_k, t.n_cols, plan.scale * LOG2E,
        D=d, DV=dv, BD=_pow2(d), BDV=_pow2(dv), TA=cfg.fwd_tile[0], TB=cfg.fwd_tile[1], BLOCK_N=cfg.fwd_block_n,
        ONE_ROW=plan.one_row, PREC=_precision(q.dtype), UPCAST=_upcast(q),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    return out, lse


def backward(plan, q, k, v, lse, delta, dout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the dtypes of ``q, k, v``; ``delta = rowsum(dout * out) - dlse`` (float32)."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    dv_dim = v.shape[-1]
    cfg, rows, cols = plan.config, plan.rows, plan.cols
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(D=d, DV=dv_dim, BD=_pow2(d), BDV=_pow2(dv_dim), ONE_ROW=plan.one_row, PREC=_precision(q.dtype),
                  UPCAST=_upcast(q),
                  num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)
    t = plan.dq
    _bwd_dq[(t.n_rows * t.n_cols, b * h)](
        q, k, v, dout, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride()[:2], *dq.stride()[:3],
        rows.first, rows.last, cols.first, cols.last, t.row_lo, t.row_hi, t.col_lo, t.col_hi,
        h, plan.groups, rows.n_q, cols.n_q, cols.n_k, t.n_cols, plan.scale * LOG2E, plan.scale,
        TA=cfg.dq_tile[0], TB=cfg.dq_tile[1], BLOCK_N=cfg.dq_block_n, **common,
    )
    t = plan.dkv
    _bwd_dkdv[(t.n_rows * t.n_cols, b * hkv)](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *lse.stride()[:2],
        *dk.stride()[:3], *dv.stride()[:3],
        rows.first, rows.last, cols.first, cols.last, t.row_lo, t.row_hi, t.col_lo, t.col_hi,
        hkv, plan.groups, cols.n_q, rows.n_k, cols.n_k, t.n_cols, plan.scale * LOG2E, plan.scale,
        KA=cfg.dkv_tile[0], KB=cfg.dkv_tile[1], BLOCK_M=cfg.dkv_block_m, **common,
    )
    return dq, dk, dv
