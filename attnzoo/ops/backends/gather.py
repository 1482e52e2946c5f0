"""``gather``: compiled CPU kernels for patterns that give every query a short, fixed key list.

A pattern that implements :meth:`~attnzoo.patterns.base.Pattern.key_table` (``[N, K]`` key
indices, -1 for none: :class:`~attnzoo.patterns.Neighborhood` in 1-D, 2-D and 3-D with any
kernel, dilation, stride and causal axes; :class:`~attnzoo.patterns.SlidingWindow` with one
window for all heads, sinks and offsets; :class:`~attnzoo.patterns.DilatedWindow`; ``&`` of one of
these with batch-independent patterns, e.g. ``Causal()``), optionally ``&`` a
:class:`~attnzoo.patterns.KeyPadding` (passed to the kernels as a per-batch key mask), and
optionally with a score modifier that is an additive per-head table read at an index of the pair
(``ScoreMod.pair_bias_index`` / ``pair_bias_table``: :class:`~attnzoo.patterns.grid_bias.GridRelativeBias`,
the NAT / DiNAT relative-position bias, and ALiBi; the table's gradient is summed per (batch, head) in
the backward), runs here as
per-query work: ``K`` dot products, a softmax, ``K`` weighted rows of ``V``, nothing else.
Tile-based paths compute whole key boxes instead (a 7 x 7 neighbourhood in 4 x 4 query tiles
wastes half of its products, in 8 x 8 tiles three quarters), and small batched products are
slow on a CPU.

Kernels: ``gather_kernels.cpp`` (C ABI, float32 and float64; float16 / bfloat16 are computed
in float32), built at first use by :mod:`attnzoo.ops.native`; OpenMP over batch x heads; queries in
blocks of 16, each step for the whole block. The forward writes the log-sum-exp and, when autograd
needs it and it is small (:func:`keeps_probs`: at most four times the memory of ``q``), the attention
probabilities. The backward (OpenMP over batch x key heads) reads those probabilities or recomputes
them, computes ``rowsum(dout * out)`` itself, writes dQ per query, and sums dK / dV per key over the
queries that see it, read from the inverse of the key table (:class:`KeyTables`): no atomics, no
read-modify-write per (query, key) pair, no zero-filled gradient buffers. Rows with no key return
zeros and zero gradients.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import Any, NamedTuple

import torch

from attnzoo.ops import native
from attnzoo.ops.backends import tile_native
from attnzoo.ops.backends.base import DENSE_FRACTION, Backend, Result, compute_dtype
from attnzoo.ops.layout import Shape
from attnzoo.ops.native import PairBias, pair_bias_args, ptr
from attnzoo.ops.problem import Problem

# The most keys per query for which auto prefers gather to the tiles of blocksparse (measured on CPU, one
# thread, H=8, D=64: benchmarks/RESULTS.md, run F). Against the compiled tile kernels: 1-D band tiles waste
# little, so gather wins only on short windows; on 2-D / 3-D grids the tiles compute whole key boxes, and
# gather keeps the forward up to 729 keys but loses the backward from about 441.
MAX_KEYS_AUTO_1D = 160
MAX_KEYS_AUTO = 768
MAX_KEYS_AUTO_TRAIN = 400
# Against the PyTorch tile path (the tile kernels cannot take the call: bfloat16, head dims that are not
# multiples of 16 / 8): gather wins further.
MAX_KEYS_AUTO_1D_TORCH_TILES = 256
# The forward keeps the probabilities for the backward up to this many (padded) keys per query per head dim: at
# most the memory of q, k, v and out together, which autograd holds anyway.
KEEP_PROBS_KEYS_PER_DIM = 4


def _grid_ndim(pattern: Any) -> int:
    """Grid dimensions of a pattern (1 for sequences; compositions: the most of their parts)."""
    parts = [getattr(pattern, name, None) for name in ("a", "b")]
    if any(part is not None for part in parts):
        return max(_grid_ndim(part) for part in parts if part is not None)
    return getattr(pattern, "ndim", 1)


def max_keys_auto(pattern: Any, *, tile_kernels: bool = True, needs_grad: bool = False) -> int:
    """The most keys per query for which ``auto`` prefers ``gather`` to tiles: on a 1-D or a grid
    ``pattern``, against the compiled tile kernels or the PyTorch tile path, with or without a backward."""
    if _grid_ndim(pattern) == 1:
        return MAX_KEYS_AUTO_1D if tile_kernels else MAX_KEYS_AUTO_1D_TORCH_TILES
    return MAX_KEYS_AUTO_TRAIN if tile_kernels and needs_grad else MAX_KEYS_AUTO


def auto_skip_reason(keys: int, n_kv: int, pattern: Any, *, tile_kernels: bool = True,
                     needs_grad: bool = False) -> str | None:
    """Why ``auto`` passes over ``gather`` for ``keys`` keys per query out of ``n_kv`` (None: it picks it).

    Above :func:`max_keys_auto` the tiles are cheaper; from :data:`DENSE_FRACTION` of the keys on, a dense
    masked kernel wastes little enough of its products to beat a per-query loop."""
    bound = max_keys_auto(pattern, tile_kernels=tile_kernels, needs_grad=needs_grad)
    if keys > bound:
        tiles = "the compiled tile kernels are" if tile_kernels else "the tiled blocksparse path is"
        train = " with a backward" if tile_kernels and needs_grad and _grid_ndim(pattern) > 1 else ""
        return (f"{keys} keys per query: above {bound}{train} {tiles} cheaper "
                "(pass backend='gather' to use it anyway)")
    if keys >= DENSE_FRACTION * n_kv:
        return (f"{keys} keys per query out of {n_kv}: from {DENSE_FRACTION:.0%} of the keys on, the dense or "
                "tiled paths are cheaper (pass backend='gather' to use it anyway)")
    return None


def problem_skip_reason(p: Problem, keys: int) -> str | None:
    """:func:`auto_skip_reason` for the call ``p`` (whether the tile kernels take its tensors, whether a
    backward follows)."""
    # Up to MAX_KEYS_AUTO_1D keys (the lowest bound) the answer does not depend on the tile kernels: no build.
    tile_kernels = keys <= MAX_KEYS_AUTO_1D or tile_native.tensor_reason(p.q, p.v) is None
    return auto_skip_reason(keys, p.shape.n_kv, p.pattern, tile_kernels=tile_kernels, needs_grad=p.needs_grad)


_P, _I = ctypes.c_void_p, ctypes.c_int64
_FORWARD_ARGS = [_P] * 7 + [_I] + [_P] * 3 + [_I] * 7 + [ctypes.c_double, ctypes.c_int]
_BACKWARD_ARGS = [_P] * 7 + [_I] + [_P] * 12 + [_I] * 7 + [ctypes.c_double, ctypes.c_int]


def _functions(dtype: torch.dtype) -> tuple[Any, Any]:
    suffix = "f64" if dtype == torch.float64 else "f32"
    return native.kernel_pair("gather", "attnzoo_gather", suffix, _FORWARD_ARGS, _BACKWARD_ARGS)


class KeyTables(NamedTuple):
    """A pattern's key table and its inverse (CSR by key), as the kernels read them.

    ``table`` ``[N, K4]`` int32 (``K4`` a multiple of 4, padded with -1); for key ``j``,
    ``inv_pos[inv_off[j]:inv_off[j + 1]]`` are the flat positions ``n * K4 + t`` with
    ``table[n, t] == j`` and ``inv_q`` their queries ``n``. ``key_ok``: uint8 ``[B, M]`` key padding
    (0 = hidden from every query of that batch element), or None.
    """

    table: torch.Tensor
    inv_off: torch.Tensor
    inv_pos: torch.Tensor
    inv_q: torch.Tensor
    key_ok: torch.Tensor | None = None


def build_tables(table: torch.Tensor, n_kv: int) -> KeyTables:
    """:class:`KeyTables` from a key table ``[N, K]`` (int, -1 for none) over ``n_kv`` keys."""
    pad = (-table.shape[1]) % 4
    table = torch.nn.functional.pad(table, (0, pad), value=-1).to(torch.int32).contiguous()
    flat = table.flatten().long()
    pos = torch.nonzero(flat >= 0).flatten()
    keys = flat[pos]
    inv_pos = pos[torch.argsort(keys, stable=True)]
    inv_off = torch.cat([keys.new_zeros(1), torch.cumsum(torch.bincount(keys, minlength=n_kv), 0)])
    inv_q = torch.div(inv_pos, table.shape[1], rounding_mode="floor")
    return KeyTables(table, *(t.to(torch.int32).contiguous() for t in (inv_off, inv_pos, inv_q)))


def gather_form(pattern: Any, shape: Shape) -> tuple[Any, torch.Tensor | None] | None:
    """``(table pattern, key padding mask [B, M] or None)`` when ``pattern`` is a batch-independent
    pattern with a key table, optionally ``&`` a key padding; else None."""
    if pattern is None or pattern.per_head:
        return None
    mask = None
    if pattern.per_batch:
        split = pattern.key_padding()
        if split is None or split[0] is None or split[0].per_batch or split[0].per_head:
            return None
        pattern, mask = split
    return None if pattern.key_table(shape) is None else (pattern, mask)


# KeyTables of recently used key tables, by the identity and version of the table tensor (kept alive here,
# so its id is not reused): compositions rebuilt on every call return their parts' cached tables.
_RECENT: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, KeyTables]] = OrderedDict()
_RECENT_SIZE = 8


def key_tables(pattern: Any, shape: Shape) -> KeyTables:
    """The kernels' tables for ``pattern`` at ``shape``."""
    form = gather_form(pattern, shape)
    if form is None:
        raise ValueError(f"gather: {pattern_reason(pattern, shape)}")
    base, mask = form
    table = base.key_table(shape)
    key = (id(table), table._version, shape.n_kv)
    hit = _RECENT.get(key)
    if hit is not None and hit[0] is table:
        _RECENT.move_to_end(key)
        cached = hit[1]
    else:
        cached = build_tables(table, shape.n_kv)
        _RECENT[key] = (table, cached)
        if len(_RECENT) > _RECENT_SIZE:
            _RECENT.popitem(last=False)
    if mask is None:
        return cached
    return cached._replace(key_ok=mask.to(device="cpu", dtype=torch.uint8).contiguous())


def _sizes(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> list[int]:
    b, h, n, d = q.shape
    return [b, h, k.shape[1], n, k.shape[2], d, table.shape[1]]


def gather_forward(q, k, v, tables: KeyTables, scale: float, bias: PairBias | None = None, keep_probs: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``out`` ``[B, H, N, D]``, ``lse`` ``[B, H, N]`` (-inf for rows with no key) and, with ``keep_probs``, the
    attention probabilities ``[B, H, N, K4]`` over the table's slots (0 where there is no key; else None);
    contiguous float32/64 inputs."""
    fwd, _ = _functions(q.dtype)
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3])
    probs = q.new_empty(*q.shape[:3], tables.table.shape[1]) if keep_probs else None
    fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.table.data_ptr(), ptr(tables.key_ok), *pair_bias_args(bias),
        out.data_ptr(), lse.data_ptr(), ptr(probs), *_sizes(q, k, tables.table), scale, torch.get_num_threads())
    return out, lse, probs


def gather_backward(q, k, v, tables: KeyTables, lse, out, dout, scale: float, bias: PairBias | None = None,
                    dlse: torch.Tensor | None = None, probs: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``dq, dk, dv`` (and ``dbias`` ``[H, T]`` with a bias) from the forward's ``out``, ``lse`` and optionally
    ``probs`` (else recomputed), the output gradient ``dout`` ``[B, H, N, D]`` and optionally the gradient of
    ``lse`` ``dlse`` ``[B, H, N]`` (all contiguous)."""
    _, bwd = _functions(q.dtype)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = q.new_zeros(q.shape[0], q.shape[1], bias.table.shape[1]) if bias is not None else None
    bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.table.data_ptr(), ptr(tables.key_ok), *pair_bias_args(bias),
        ptr(dbias), tables.inv_off.data_ptr(), tables.inv_pos.data_ptr(), tables.inv_q.data_ptr(), lse.data_ptr(),
        ptr(probs), out.data_ptr(), dout.data_ptr(), ptr(dlse), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        *_sizes(q, k, tables.table), scale, torch.get_num_threads())
    return (dq, dk, dv) if dbias is None else (dq, dk, dv, dbias.sum(0))


def keeps_probs(keys: int, head_dim: int) -> bool:
    """Whether the forward keeps the probabilities for the backward: when a query's padded key count is at
    most :data:`KEEP_PROBS_KEYS_PER_DIM` x the head dim (they then take at most that many times the memory of
    ``q``); the backward then skips recomputing the scores (benchmarks/RESULTS.md)."""
    return keys <= KEEP_PROBS_KEYS_PER_DIM * head_dim


class _GatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tables: KeyTables, scale: float, bias_index, q, k, v, bias_table):
        bias = PairBias(bias_table, bias_index) if bias_table is not None else None
        keep = keeps_probs(tables.table.shape[1], q.shape[-1])
        out, lse, probs = gather_forward(q, k, v, tables, scale, bias, keep_probs=keep)
        ctx.save_for_backward(q, k, v, out, lse, probs)
        ctx.tables, ctx.scale, ctx.bias = tables, scale, bias
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, probs = ctx.saved_tensors
        dlse = None if dlse is None else dlse.contiguous()
        grads = gather_backward(q, k, v, ctx.tables, lse, out, dout.contiguous(), ctx.scale, ctx.bias, dlse, probs)
        return None, None, None, *grads[:3], (grads[3] if ctx.bias is not None else None)


def pattern_reason(pattern: Any, shape: Shape) -> str | None:
    """Why the pattern has no key table for ``shape`` (None when it has one)."""
    if pattern is None:
        return "no pattern (full attention): the gather backend runs patterns with a short key list per query"
    if gather_form(pattern, shape) is None:
        return (f"{type(pattern).__name__} has no per-query key table (the gather backend runs Neighborhood "
                "1-D to 3-D, SlidingWindow with one window for all heads, DilatedWindow, and their "
                "compositions with batch-independent patterns and key padding)")
    return None


class Gather(Backend):
    """Compiled per-query kernels for key-table patterns on CPU (module docstring)."""

    name = "gather"

    def why_not(self, p: Problem) -> str | None:
        if p.return_weights:
            return "the gather backend never materialises the attention weights"
        if p.device.type != "cpu":
            return f"the gather backend runs on CPU tensors, got device {p.device} (on CUDA: triton or flex)"
        if p.score_mod is not None:
            reason = p.score_mod.pair_bias_reason(p.shape.heads, "the gather backend")
            if reason is not None:
                return reason
        if p.v.shape[-1] != p.q.shape[-1]:
            return f"the gather backend needs D_v == D, got D={p.q.shape[-1]}, D_v={p.v.shape[-1]}"
        reason = pattern_reason(p.pattern, p.shape)
        if reason is not None:
            return reason
        pairs = p.shape.n_q * (-(-self.keys_per_query(p) // 4) * 4)
        if pairs >= 2**31:
            return f"the gather backend indexes (query, key) pairs with int32; this call has {pairs} (padded)"
        return native.unavailable("gather")

    def auto_note(self, p: Problem) -> str | None:
        """Why ``auto`` passed over this backend although it can run ``p`` (None if it cannot)."""
        if self.why_not(p) is not None:
            return None
        return problem_skip_reason(p, self.keys_per_query(p))

    def keys_per_query(self, p: Problem) -> int:
        base, _ = gather_form(p.pattern, p.shape)
        return int(base.key_table(p.shape).shape[1])

    def run(self, p: Problem) -> Result:
        tables = key_tables(p.pattern, p.shape)
        dtype = compute_dtype(p.q.dtype)
        q, k, v = (t.to(dtype).contiguous() for t in (p.q, p.k, p.v))
        bias_table = bias_index = None
        if p.score_mod is not None:
            pairs = tables.table.clamp(min=0).long()
            index, size = p.score_mod.pair_bias_index(torch.arange(pairs.shape[0])[:, None], pairs, p.shape)
            bias_table = p.score_mod.pair_bias_table(size).to(dtype).contiguous()
            bias_index = index.to(torch.int32).contiguous()
        if p.needs_grad:
            out, lse = _GatherFn.apply(tables, p.scale, bias_index, q, k, v, bias_table)
        else:
            bias = PairBias(bias_table, bias_index) if bias_table is not None else None
            out, lse, _ = gather_forward(q, k, v, tables, p.scale, bias)
        return Result(out.to(p.q.dtype), None, lse if p.return_lse else None)


__all__ = ["KEEP_PROBS_KEYS_PER_DIM", "Gather", "KeyTables", "MAX_KEYS_AUTO", "MAX_KEYS_AUTO_1D",
           "MAX_KEYS_AUTO_1D_TORCH_TILES", "MAX_KEYS_AUTO_TRAIN", "problem_skip_reason",
           "auto_skip_reason", "build_tables", "gather_backward", "gather_form", "gather_forward", "keeps_probs",
           "key_tables", "max_keys_auto", "pattern_reason"]
