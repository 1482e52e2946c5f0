"""Block-routed attention on attnzoo's compiled CPU kernels (``backends/routed_kernels.cpp``): the CPU fast path of
block routings when the kernels can be built.

Every query ``i`` (at position ``p = i + M - N``) attends the union of its routed key blocks. The pairs are grouped
into *units*: per (batch, head), each key block with the queries routed to it, and under ``causal`` each query's
own block as a unit of its own, causal inside (a routed block after the own block is invisible and dropped). The
kernel reads the rows of ``q``, ``k``, ``v`` where they are (head splits of a projection's memory, views of a cache
buffer), runs the units of a head with an online softmax per query and writes the output and its log-sum-exp in
place: no gathered copies of queries or keys, no partial outputs to merge. A causal strip of queries computes only
the keys up to its last query, so the own block costs about half a tile. The backward recomputes the probabilities
from the saved log-sum-exp and adds into ``dq``, ``dk``, ``dv``. Threads split the (batch, head) pairs.

:func:`native_routing_reason` says when the kernels do not apply (then the fused flash tiles of
:mod:`attnzoo.ops.routed_blocks` run).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

from attnzoo.ops import native
from attnzoo.ops.routed import block_pairs
from attnzoo.ops.rows import row_view

__all__ = ["Units", "block_routed_native", "key_block_native", "key_list_units", "native_routing_reason",
           "routing_units"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FORWARD_ARGS = [_P] * 13 + [_I] * 7 + [ctypes.c_double, ctypes.c_int]
_BACKWARD_ARGS = [_P] * 17 + [_I] * 7 + [ctypes.c_double, ctypes.c_int]


def native_routing_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """Why :func:`block_routed_native` cannot run these tensors (None when it can; builds the kernels if needed)."""
    if q.device.type != "cpu":
        return f"the compiled routed kernels run on CPU tensors, got device {q.device}"
    if q.dtype not in (torch.float32, torch.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the compiled routed kernels run float32 and float64, got {q.dtype}, {k.dtype}, {v.dtype}"
    width = 8 if q.dtype == torch.float64 else 16
    if q.shape[-1] % width or v.shape[-1] % width:
        return (f"the compiled routed kernels need head dims that are multiples of {width} for {q.dtype}, got "
                f"D={q.shape[-1]}, D_v={v.shape[-1]}")
    if causal and q.shape[2] > k.shape[2]:
        return f"causal calls need N <= M (the queries are the last N positions), got N={q.shape[2]}, M={k.shape[2]}"
    return native.unavailable("routed")


class Units(NamedTuple):
    """The pairs of a routing as the kernels read them: the units of batch x head ``g`` are
    ``g_start[g] .. g_start[g + 1]``; unit ``u`` holds the queries ``q_pos[unit_start[u] .. unit_start[u + 1]]``
    (ascending) and hides from each query the keys after its position when ``unit_causal[u]``. Its keys: key block
    ``unit_kb[u]`` (``width`` = ``block_k``; block routings), or with ``key_pos`` the positions
    ``key_pos[key_start[u] .. key_start[u + 1]]`` (ascending; ``width`` the most of a unit; key lists)."""

    g_start: torch.Tensor
    unit_kb: torch.Tensor
    unit_causal: torch.Tensor
    unit_start: torch.Tensor
    q_pos: torch.Tensor
    width: int
    key_start: torch.Tensor | None = None
    key_pos: torch.Tensor | None = None


def routing_units(blocks: torch.Tensor, n: int, m: int, block_q: int, block_k: int, causal: bool) -> Units:
    """The units of ``blocks`` bool ``[B, H, ceil(N / block_q), ceil(M / block_k)]`` or int64 block lists
    ``[B, H, ceil(N / block_q), K]`` (-1: empty slot)."""
    b, h = blocks.shape[:2]
    nkb = -(-m // block_k)
    g, i, kb = block_pairs(blocks, n, block_q)
    kind = torch.zeros_like(kb)
    if causal:
        own = (i + (m - n)) // block_k
        seen = kb <= own
        g, i, kb, own = g[seen], i[seen], kb[seen], own[seen]
        kind = (kb == own).to(kb.dtype)
    key, order = ((g * nkb + kb) * 2 + kind).sort(stable=True)  # (head, key block, kind), queries ascending
    keys, counts = torch.unique_consecutive(key, return_counts=True)
    unit_start = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    g_start = torch.searchsorted(keys // (2 * nkb), torch.arange(b * h + 1, device=keys.device))
    return Units(g_start.contiguous(), ((keys // 2) % nkb).contiguous(), (keys % 2).to(torch.uint8).contiguous(),
                 unit_start.contiguous(), i[order].contiguous(), block_k)


def key_list_units(keys: torch.Tensor, n: int, block_q: int, causal: bool) -> Units:
    """The units of a key routing shared by blocks of queries, ``keys`` int64 ``[B, H, ceil(N / block_q), K]``
    (-1: empty slot; no key twice in a list): one unit per block of queries that lists a key, with the listed keys
    in ascending order."""
    b, h, nbq, width = keys.shape
    listed = keys.sort(-1).values.reshape(b * h * nbq, width)  # empty slots (-1) first
    valid = listed >= 0
    counts = valid.sum(-1)
    rows = counts.nonzero().squeeze(-1)  # g * nbq + query block, of the blocks that list a key
    block = rows % nbq
    n_queries = (n - block * block_q).clamp(max=block_q)
    unit_start = torch.cat([n_queries.new_zeros(1), n_queries.cumsum(0)])
    first = torch.repeat_interleave(block * block_q - unit_start[:-1], n_queries)
    q_pos = first + torch.arange(int(unit_start[-1]), device=keys.device)
    key_start = torch.cat([counts.new_zeros(1), counts[rows].cumsum(0)])
    g_start = torch.searchsorted(rows // nbq, torch.arange(b * h + 1, device=keys.device))
    flags = torch.full((rows.numel(),), int(causal), dtype=torch.uint8, device=keys.device)
    return Units(g_start.contiguous(), torch.zeros_like(rows), flags, unit_start.contiguous(), q_pos.contiguous(),
                 max(int(counts.max()) if counts.numel() else 1, 1), key_start.contiguous(),
                 listed[valid].contiguous())


def _functions(dtype: torch.dtype):
    suffix = "f64" if dtype == torch.float64 else "f32"
    return native.kernel_pair("routed", "attnzoo_routed", suffix, _FORWARD_ARGS, _BACKWARD_ARGS)


def _unit_args(units: Units) -> tuple[int | None, ...]:
    """The kernels' ``g_start, unit_kb, unit_causal, unit_start, q_pos, key_start, key_pos`` pointers."""
    return (*(t.data_ptr() for t in units[:5]), *(None if t is None else t.data_ptr() for t in units[6:]))


def _token_major(t: torch.Tensor, b: int, length: int, h: int, width: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A fresh ``[B, L, H, width]`` buffer (filled by the kernel) and its row coefficients."""
    return t.new_empty(b, length, h, width), (length * h, 1, h)


class _BlockRoutedNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, units: Units, scale: float):
        b, h, n, d = q.shape
        m, dv = k.shape[2], v.shape[-1]
        (q_rows, qc), (k_rows, kc), (v_rows, vc) = row_view(q), row_view(k), row_view(v)
        out, oc = _token_major(q, b, n, h, dv)
        lse = q.new_empty(b, n, h)
        coef = torch.tensor([*qc, *kc, *vc, *oc], dtype=torch.int64)
        fwd, _ = _functions(q.dtype)
        fwd(q_rows.data_ptr(), k_rows.data_ptr(), v_rows.data_ptr(), out.data_ptr(), lse.data_ptr(), coef.data_ptr(),
            *_unit_args(units), b, h, n, m, d, dv, units.width, scale, torch.get_num_threads())
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.units, ctx.scale = units, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        m, dv = k.shape[2], v.shape[-1]
        (q_rows, qc), (k_rows, kc), (v_rows, vc) = row_view(q), row_view(k), row_view(v)
        do_rows, doc = row_view(dout)
        dq, dqc = _token_major(q, b, n, h, d)
        dk, dkc = _token_major(k, b, m, h, d)
        dvv, dvc = _token_major(v, b, m, h, dv)
        coef = torch.tensor([*qc, *kc, *vc, n * h, 1, h, *doc, *dqc, *dkc, *dvc], dtype=torch.int64)
        _, bwd = _functions(q.dtype)
        bwd(q_rows.data_ptr(), k_rows.data_ptr(), v_rows.data_ptr(), out.data_ptr(), lse.data_ptr(),
            do_rows.data_ptr(), dq.data_ptr(), dk.data_ptr(), dvv.data_ptr(), coef.data_ptr(), *_unit_args(ctx.units),
            b, h, n, m, d, dv, ctx.units.width, ctx.scale, torch.get_num_threads())
        return dq.transpose(1, 2), dk.transpose(1, 2), dvv.transpose(1, 2), None, None


def block_routed_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, block_q: int,
                        block_k: int, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Block-routed attention on the compiled kernels (see the module docstring); forward and backward.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]`` / ``[B, H, M, D_v]``, ``blocks`` bool ``[B, H, ceil(N /
    block_q), ceil(M / block_k)]`` or int64 block lists ``[B, H, ceil(N / block_q), K]`` (-1: empty; checked by the
    caller; :func:`native_routing_reason` must be None). Work is linear in ``N x`` selected keys, memory in ``N``.
    Queries that see no key return zeros and zero gradients. The output and the gradients are token-major
    (``[B, N, H, D]`` memory seen as ``[B, H, N, D]``), as a mixer's head merge reads them without a copy.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        units = routing_units(blocks, q.shape[2], k.shape[2], block_q, block_k, causal)
    return _BlockRoutedNative.apply(q, k, v, units, float(scale))


def key_block_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *, block_q: int,
                     causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention of every block of ``block_q`` queries over the keys it lists, on the compiled kernels (one unit per
    block: its keys read in place, no gathered tiles or masks); forward and backward.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]`` / ``[B, H, M, D_v]``, ``keys`` int64 ``[B, H, ceil(N /
    block_q), K]`` (-1: empty; checked by the caller; :func:`native_routing_reason` must be None). ``causal``: query
    ``i`` drops keys after position ``i + M - N``. Queries that see no key return zeros and zero gradients; outputs
    and gradients are token-major, as in :func:`block_routed_native`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        units = key_list_units(keys, q.shape[2], block_q, causal)
    return _BlockRoutedNative.apply(q, k, v, units, float(scale))
