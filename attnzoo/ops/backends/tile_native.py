"""Compiled CPU kernels for the tiled path of ``blocksparse``: dense attention inside each tile, in place.

A tile plan (:mod:`attnzoo.patterns.tiles`: Swin and MaxViT windows, neighbourhood and band tiles) lists,
per tile, its query tokens and the key tokens they all see. ``tile_kernels.cpp`` reads those rows of
``q``, ``k``, ``v`` where they are and writes ``out``, ``lse`` and the gradients in place, so the tiled
copies of every input and output that the PyTorch tile path makes (gathers or permutations, one read
and one write of each tensor) disappear; the products run in a register-blocked kernel of our own.
The backward recomputes the probabilities from the saved ``lse`` and takes the gradient of ``lse``
too. An additive per-head bias read at an index of the pair (``ScoreMod.pair_bias_index`` /
``pair_bias_table``: the relative-position bias of Swin, MaxViT and NAT,
:class:`~attnzoo.patterns.grid_bias.GridRelativeBias`, and ALiBi, read at the distance of the
pair) is added in the kernels, and its gradient summed per (batch, head). Key padding (``rest &
KeyPadding(keep)``, e.g. the padded batches of the grid mixers) hides keys per batch element.
:func:`why_not` says when the kernels do not apply: the blocksparse backend then runs its PyTorch
tile path.
"""

from __future__ import annotations

import ctypes
from typing import Any, NamedTuple

import torch

from attnzoo.ops import native
from attnzoo.ops.native import PairBias, pair_bias_args, ptr

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FORWARD_ARGS = [_P] * 9 + [_I] + [_P] * 2 + [_I] * 10 + [ctypes.c_double, ctypes.c_int]
_BACKWARD_ARGS = [_P] * 9 + [_I] + [_P] * 8 + [_I] * 10 + [ctypes.c_double, ctypes.c_int, ctypes.c_int]


class PlanArrays(NamedTuple):
    """A tile plan as the kernels read it: ``q_idx`` ``[T, bq]`` and ``kv_idx`` ``[T, R]`` int32 (-1: empty
    slot), ``mask`` ``[T, bq, R]`` additive (0 / -inf) or None, whether the tiles cover every query, whether
    no key is in two tiles (then the backward runs the tiles of one head in parallel), and the key padding
    ``key_ok`` ``[B, M]`` uint8 (0: hidden from every query of that batch element) or None."""

    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    mask: torch.Tensor | None
    covers_all: bool
    keys_disjoint: bool
    key_ok: torch.Tensor | None = None


def _functions(dtype: torch.dtype) -> tuple[Any, Any]:
    suffix = "f64" if dtype == torch.float64 else "f32"
    return native.kernel_pair("tiles", "attnzoo_tile", suffix, _FORWARD_ARGS, _BACKWARD_ARGS)


def column_width(dtype: torch.dtype) -> int:
    """Head dims must be multiples of this (two 32-byte vectors)."""
    return 8 if dtype == torch.float64 else 16


def tensor_reason(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the compiled tile kernels cannot take these tensors (device, dtype, head dims) or cannot be built;
    None when they can (the pattern and score modifier are :func:`why_not`'s part)."""
    if q.device.type != "cpu":
        return f"the compiled tile kernels run on CPU tensors, got device {q.device}"
    if q.dtype not in (torch.float32, torch.float64):
        return f"the compiled tile kernels run float32 and float64, got {q.dtype}"
    width = column_width(q.dtype)
    if q.shape[-1] % width or v.shape[-1] % width:
        return (f"the compiled tile kernels need head dims that are multiples of {width} for {q.dtype}, got "
                f"D={q.shape[-1]}, D_v={v.shape[-1]}")
    return native.unavailable("tiles")


def why_not(tiles: Any, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the compiled tile kernels cannot run this tiled call (None when they can)."""
    reason = tensor_reason(q, v)
    if reason is not None:
        return reason
    if tiles.score_mod is not None:
        reason = tiles.score_mod.pair_bias_reason(q.shape[1], "the compiled tile kernels")
        if reason is not None:
            return f"{reason}; it runs on the PyTorch tile path"
    if _per_batch_mask(tiles) and _padding_split(tiles) is None:
        return ("a per-batch or per-head mask other than key padding (e.g. per-head windows) runs on the PyTorch "
                "tile path")
    return None


def _padding_split(tiles: Any) -> tuple[Any, torch.Tensor] | None:
    """``(rest, keep)`` when the pattern is ``rest & KeyPadding(keep)`` with ``rest`` (or None) the same for
    every batch element and head, else None."""
    split = tiles.pattern.key_padding()
    if split is None or (split[0] is not None and (split[0].per_batch or split[0].per_head)):
        return None
    return split


def _per_batch_mask(tiles: Any) -> bool:
    return tiles.mask is not None and tuple(tiles.mask.shape[:2]) != (1, 1)


def plan_arrays(tiles: Any, dtype: torch.dtype) -> PlanArrays:
    """The kernels' view of ``tiles`` (cached on it per dtype)."""
    key = ("native", dtype)
    cached = tiles.native.get(key)
    if cached is None:
        q_idx = tiles.q_index.to(torch.int32).contiguous()
        kv_idx = tiles.kv_index.to(torch.int32).contiguous()
        shared, key_ok = tiles.mask, None
        if _per_batch_mask(tiles):  # rest & KeyPadding(keep): rest's mask, and keep per batch element
            rest, keep = _padding_split(tiles)
            shared = tiles.pattern_mask(rest)
            key_ok = keep.expand(tiles.shape.batch, tiles.shape.n_kv).to(torch.uint8).contiguous()
        mask = None
        if shared is not None:
            mask = torch.zeros(shared.shape[2:], dtype=dtype).masked_fill_(~shared[0, 0], float("-inf"))
        covers_all = int((q_idx >= 0).sum()) == tiles.shape.n_q
        keys = kv_idx[kv_idx >= 0].long()
        disjoint = keys.numel() == 0 or int(torch.bincount(keys).max()) == 1
        cached = tiles.native[key] = PlanArrays(q_idx, kv_idx, mask, covers_all, disjoint, key_ok)
    return cached


def tile_bias(tiles: Any, dtype: torch.dtype) -> PairBias | None:
    """The score modifier of ``tiles`` as a :class:`~attnzoo.ops.native.PairBias` (None without one); the index
    is cached per modifier, the table read from it on every call."""
    mod = tiles.score_mod
    if mod is None:
        return None
    key = ("bias_index", id(mod))
    cached = tiles.native.get(key)
    if cached is None or cached[0] is not mod:  # the entry holds the modifier, so its id is not reused meanwhile
        q_pos = tiles.q_index.clamp(min=0).unsqueeze(-1)
        kv_pos = tiles.kv_index.clamp(min=0).unsqueeze(1)
        index, size = mod.pair_bias_index(q_pos, kv_pos, tiles.shape)
        cached = tiles.native[key] = (mod, index.to(torch.int32).contiguous(), size)
    return PairBias(mod.pair_bias_table(cached[2]).to(dtype).contiguous(), cached[1])


def _plan_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arrays: PlanArrays) -> tuple[int | None, ...]:
    """The kernels' leading ``q, k, v, q_idx, kv_idx, mask, key_ok`` pointers."""
    return (q.data_ptr(), k.data_ptr(), v.data_ptr(), arrays.q_idx.data_ptr(), arrays.kv_idx.data_ptr(),
            ptr(arrays.mask), ptr(arrays.key_ok))


def _sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arrays: PlanArrays) -> tuple[int, ...]:
    b, h, n, d = q.shape
    t, bq = arrays.q_idx.shape
    return b, h, k.shape[1], n, k.shape[2], d, v.shape[-1], t, bq, arrays.kv_idx.shape[1]


def tile_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arrays: PlanArrays, scale: float,
                 bias: PairBias | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``[B, H, N, D_v]`` and ``lse`` ``[B, H, N]`` (``0`` / ``-inf`` for queries in no tile)."""
    fwd, _ = _functions(q.dtype)
    shape = (*q.shape[:-1], v.shape[-1])
    if arrays.covers_all:
        out, lse = q.new_empty(shape), q.new_empty(q.shape[:-1])
    else:
        out, lse = q.new_zeros(shape), q.new_full(q.shape[:-1], float("-inf"))
    fwd(*_plan_args(q, k, v, arrays), *pair_bias_args(bias), out.data_ptr(), lse.data_ptr(), *_sizes(q, k, v, arrays),
        scale, torch.get_num_threads())
    return out, lse


def tile_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arrays: PlanArrays, scale: float,
                  out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
                  bias: PairBias | None = None) -> tuple[torch.Tensor, ...]:
    """``dq, dk, dv`` (and ``dtable`` ``[H, n_bias]`` with a bias) from the forward's ``out`` and ``lse``,
    ``dout`` ``[B, H, N, D_v]`` and optionally the gradient of ``lse`` ``dlse`` ``[B, H, N]`` (all contiguous)."""
    _, bwd = _functions(q.dtype)
    dq = torch.empty_like(q) if arrays.covers_all else torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dbias = q.new_zeros(q.shape[0], q.shape[1], bias.table.shape[1]) if bias is not None else None
    bwd(*_plan_args(q, k, v, arrays), *pair_bias_args(bias), out.data_ptr(), lse.data_ptr(), dout.data_ptr(),
        ptr(dlse), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ptr(dbias), *_sizes(q, k, v, arrays), scale,
        int(arrays.keys_disjoint), torch.get_num_threads())
    return (dq, dk, dv) if dbias is None else (dq, dk, dv, dbias.sum(0))


class _TileKernelFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, arrays: PlanArrays, scale: float, bias_index, q, k, v, bias_table):
        bias = PairBias(bias_table, bias_index) if bias_table is not None else None
        out, lse = tile_forward(q, k, v, arrays, scale, bias)
        ctx.arrays, ctx.scale, ctx.bias = arrays, scale, bias
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
        dlse = dlse.contiguous() if dlse is not None else None
        grads = tile_backward(q, k, v, ctx.arrays, ctx.scale, out, lse, dout, dlse, ctx.bias)
        return None, None, None, *grads[:3], (grads[3] if ctx.bias is not None else None)


def attention(tiles: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` and ``lse`` of the tiled problem (call only when :func:`why_not` returns None)."""
    arrays = plan_arrays(tiles, q.dtype)
    bias = tile_bias(tiles, q.dtype)
    q, k, v = (t.contiguous() for t in (q, k, v))
    if needs_grad:
        table, index = (bias.table, bias.index) if bias is not None else (None, None)
        return _TileKernelFn.apply(arrays, scale, index, q, k, v, table)
    return tile_forward(q, k, v, arrays, scale, bias)


__all__ = ["PlanArrays", "attention", "column_width", "plan_arrays", "tensor_reason", "tile_backward", "tile_bias",
           "tile_forward", "why_not"]
