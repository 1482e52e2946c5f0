"""The tiled path of the ``blocksparse`` backend, for patterns that give a tile plan.

Patterns with a regular structure (sliding windows, neighbourhoods, Swin windows, MaxViT
axes) give a *tile plan* (``pattern.tile_plan(shape, block)``, see
:mod:`attnzoo.patterns.tiles`): query tiles, each with one fixed list of keys. Where the compiled
tile kernels cannot run them, this path does: gather each tile's queries and keys once
(overlapping strided views for 1-D bands, no copy), one masked softmax per tile (on CPU the
fused flash kernel of PyTorch for the forward), and a chunked recomputing backward sized to stay
in cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.ops.backends.blocksparse_layout import MASK_CACHE_BYTES, grad_or_zeros
from attnzoo.ops.problem import Problem

# Score elements per chunk of the unfused steps (cache-sized), float-mask elements per fused call.
TILE_CHUNK_ELEMENTS = 1 << 19
TILE_FUSED_MASK_ELEMENTS = 1 << 23


class Tiles:
    """A pattern's tile plan resolved for one problem: indices on the device and the exact tile mask.

    ``mask``: bool ``[B'|1, H'|1, T, bq, R]`` (None when every real slot pair is allowed and
    every slot is real); ``row_any``: whether each query slot sees any key (same layout
    without ``R``). Both are evaluated from ``pattern.allow`` on the tile indices and cached
    on the pattern per shape, groups and device.
    """

    def __init__(self, p: Problem, plan: Any, device: torch.device) -> None:
        s = p.shape
        self.pattern, self.score_mod, self.shape, self.scale, self.groups = (
            p.pattern, p.score_mod, s, p.scale, p.groups)
        self.q_index = plan.q_index.to(device)
        self.kv_index = plan.kv_index.to(device)
        self.strided = plan.strided
        self.grid_perm = getattr(plan, "grid_perm", None)
        t, bq = self.q_index.shape
        self.n_tiles, self.bq, self.r = t, bq, self.kv_index.shape[1]
        self.q_identity = bool(t * bq == s.n_q and torch.equal(
            self.q_index.flatten(), torch.arange(s.n_q, device=device)))
        self.q_flat = torch.where(self.q_index >= 0, self.q_index, s.n_q).flatten()
        self.kv_flat = torch.where(self.kv_index >= 0, self.kv_index, s.n_kv).flatten()
        self.mask = self.pattern_mask(self.pattern)
        self.row_any = None if self.mask is None else self.mask.any(-1)
        self._fmask: dict[Any, torch.Tensor] = {}
        self.native: dict[Any, Any] = {}  # the compiled tile kernels' arrays (tile_native.plan_arrays)

    @staticmethod
    def build(p: Problem, plan: Any) -> Tiles:
        key = ("tiles", p.shape, p.groups, str(p.device), id(plan))
        cached = p.pattern._cache_get(key)
        if cached is None or cached.score_mod is not p.score_mod or cached.scale != p.scale:
            if cached is None:
                cached = p.pattern._cache_put(key, Tiles(p, plan, p.device))
            else:  # same plan and mask, other score modifier / scale
                cached = _copy_tiles(cached, p)
        return cached

    def index_grid(self, rows: slice) -> tuple[torch.Tensor, ...]:
        """``b [B,1,1,1,1,1]``, ``h [1,Hkv,1,G,1,1]``, ``q [1,1,c,1,bq,1]``, ``kv [1,1,c,1,1,R]`` (clamped ids)."""
        s, g = self.shape, self.groups
        dev = self.q_index.device
        hkv = s.heads // g
        b = torch.arange(s.batch, device=dev).view(-1, 1, 1, 1, 1, 1)
        h = (torch.arange(hkv, device=dev).view(-1, 1) * g + torch.arange(g, device=dev)).view(1, hkv, 1, g, 1, 1)
        qi, ki = self.q_index[rows], self.kv_index[rows]
        q = qi.clamp(min=0).view(1, 1, -1, 1, self.bq, 1)
        kv = ki.clamp(min=0).view(1, 1, -1, 1, 1, self.r)
        return b, h, q, kv

    def pattern_mask(self, pattern: Any) -> torch.Tensor | None:
        """Bool ``[B'|1, H'|1, T, bq, R]``: the slot pairs ``pattern`` allows (None: every real pair, and every
        slot is real); ``pattern`` None allows every real pair."""
        s, device = self.shape, self.q_index.device
        bsz = s.batch if getattr(pattern, "per_batch", False) else 1
        hsz = s.heads if getattr(pattern, "per_head", False) else 1
        b = torch.arange(bsz, device=device).view(-1, 1, 1, 1, 1)
        h = torch.arange(hsz, device=device).view(1, -1, 1, 1, 1)
        per_tile = bsz * hsz * self.bq * self.r
        step = max(1, (1 << 24) // max(per_tile, 1))
        parts = []
        for start in range(0, self.n_tiles, step):
            qi, ki = self.q_index[start:start + step], self.kv_index[start:start + step]
            q = qi.clamp(min=0).unsqueeze(-1).view(1, 1, -1, self.bq, 1)
            kv = ki.clamp(min=0).view(1, 1, -1, 1, self.r)
            allowed = (qi >= 0).view(1, 1, -1, self.bq, 1) & (ki >= 0).view(1, 1, -1, 1, self.r)
            if pattern is not None:
                allowed = torch.as_tensor(pattern.allow(b, h, q, kv, s), device=device) & allowed
            parts.append(allowed.expand(*allowed.shape[:2], qi.shape[0], self.bq, self.r))
        mask = torch.cat(parts, dim=2)
        return None if bool(mask.all()) else mask

    def mask6(self, rows: slice) -> torch.Tensor | None:
        """The mask of tiles ``rows`` as ``[B'|1, Hkv|1, c, G|1, bq, R]``."""
        if self.mask is None:
            return None
        return _heads6(self.mask[:, :, rows], self.groups)

    def fused_mask(self, rows: slice, dtype: torch.dtype, batch_heads: int) -> torch.Tensor | None:
        """Additive float mask (0 / -inf, plus an additive score modifier) ``[1|B*Hkv, c, G*bq, R]``."""
        bias = None
        if self.score_mod is not None:
            b, h, q, kv = self.index_grid(rows)
            zero = torch.zeros((), dtype=dtype, device=q.device)
            bias = self.score_mod(zero, b, h, q, kv, self.shape)
            bias = torch.as_tensor(bias).to(dtype)
            bias = bias.expand(bias.shape[0], bias.shape[1], q.shape[2], bias.shape[3], self.bq, self.r)
        elif self.mask is None:
            return None
        else:
            key = (rows.start, rows.stop, dtype, batch_heads)
            cached = self._fmask.get(key)
            if cached is not None:
                return cached
        m6 = self.mask6(rows)
        if bias is None:
            fm = torch.zeros(m6.shape, dtype=dtype, device=m6.device).masked_fill_(~m6, float("-inf"))
        else:
            fm = torch.where(m6, bias, float("-inf")) if m6 is not None else bias
        # [X, Y, c, G', bq, R] -> [1 | B*Hkv, c, G*bq, R]
        x, y, c = fm.shape[:3]
        g = self.groups
        fm = fm.expand(x, y, c, g, self.bq, self.r)
        if x == 1 and y == 1:
            fm = fm.reshape(1, c, g * self.bq, self.r)
        else:
            fm = fm.expand(self.shape.batch, batch_heads // self.shape.batch, c, g, self.bq, self.r)
            fm = fm.reshape(batch_heads, c, g * self.bq, self.r)
        if bias is None and self.mask is not None:
            held = sum(t.numel() * t.element_size() for t in self._fmask.values())
            if held + fm.numel() * fm.element_size() <= MASK_CACHE_BYTES:  # else rebuilt per call
                self._fmask[(rows.start, rows.stop, dtype, batch_heads)] = fm
        return fm


def _copy_tiles(src: Tiles, p: Problem) -> Tiles:
    out = Tiles.__new__(Tiles)
    out.__dict__.update(src.__dict__)
    out.score_mod, out.scale = p.score_mod, p.scale
    out._fmask = src._fmask if p.score_mod is None else {}
    return out


def _heads6(t: torch.Tensor, g: int) -> torch.Tensor:
    """``[X, H|1, c, bq, ...]`` -> ``[X, Hkv|1, c, G|1, bq, ...]``."""
    x, hh, c = t.shape[:3]
    rest = t.shape[3:]
    if hh == 1:
        return t.view(x, 1, c, 1, *rest)
    return t.view(x, hh // g, g, c, *rest).transpose(2, 3)


def _tile_q(t: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """``[B, H, N, *rest]`` -> ``[B, H_kv, T, G*bq, *rest]`` (queries of each tile, zeros in empty slots)."""
    b, h, n = t.shape[:3]
    rest = t.shape[3:]
    g = tiles.groups
    if tiles.grid_perm is not None:
        return _grid_permute(t, tiles.grid_perm, g)
    gathered = t if tiles.q_identity else _gather_tokens(t, tiles.q_flat)
    gathered = gathered.reshape(b, h // g, g, tiles.n_tiles, tiles.bq, *rest)
    if g == 1:
        return gathered.reshape(b, h, tiles.n_tiles, tiles.bq, *rest)
    return gathered.transpose(2, 3).reshape(b, h // g, tiles.n_tiles, g * tiles.bq, *rest)


def _untile_q(t: torch.Tensor, tiles: Tiles, fill: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`_tile_q`: ``[B, H_kv, T, G*bq, *rest]`` (any strides) -> ``[B, H, N, *rest]``
    (``fill`` where unseen)."""
    b, hkv = t.shape[:2]
    rest = t.shape[4:]
    g, n = tiles.groups, tiles.shape.n_q
    if tiles.grid_perm is not None:
        return _grid_unpermute(t, tiles.grid_perm, g)
    t = t.reshape(b, hkv, tiles.n_tiles, g, tiles.bq, *rest).transpose(2, 3).reshape(
        b, hkv * g, tiles.n_tiles * tiles.bq, *rest)
    if tiles.q_identity:
        return t
    out = t.new_full((b, hkv * g, n + 1, *rest), fill)
    out.index_copy_(2, tiles.q_flat, t)
    return out[:, :, :n]


def _tile_kv(t: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """``[B, H_kv, M, D]`` -> ``[B, H_kv, T, R, D]`` keys of each tile (a strided view when the plan allows)."""
    b, hkv, m, d = t.shape
    if tiles.strided is not None:
        start, step = tiles.strided
        lo = max(0, -start)
        hi = max(0, start + (tiles.n_tiles - 1) * step + tiles.r - m)
        padded = torch.nn.functional.pad(t, (0, 0, lo, hi)).contiguous()
        mp = m + lo + hi
        return padded.as_strided((b, hkv, tiles.n_tiles, tiles.r, d), (hkv * mp * d, mp * d, step * d, d, 1),
                                 padded.storage_offset() + (start + lo) * d)
    if tiles.grid_perm is not None:
        return _grid_permute(t, tiles.grid_perm)
    return _gather_tokens(t, tiles.kv_flat).view(b, hkv, tiles.n_tiles, tiles.r, d)


class _KVTiles:
    """Keys (or values) of the tiles, chunk by chunk: strided views and permutations are built once,
    gathers only for the chunk asked (so peak memory stays a chunk, not ``R / bq`` copies of K)."""

    def __init__(self, t: torch.Tensor, tiles: Tiles) -> None:
        self.t, self.tiles = t, tiles
        self.whole = _tile_kv(t, tiles) if tiles.strided is not None or tiles.grid_perm is not None else None

    def chunk(self, rows: slice) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[:, :, rows]
        tl = self.tiles
        b, hkv, _, d = self.t.shape
        index = tl.kv_flat.view(tl.n_tiles, tl.r)[rows].flatten()
        return _gather_tokens(self.t, index).view(b, hkv, -1, tl.r, d)


def _gather_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t [B, H, N, *rest]`` at token ids ``index`` (``N`` = a zero row) -> ``[B, H, len(index), *rest]``."""
    b, h = t.shape[:2]
    rest = t.shape[3:]
    return torch.cat([t, t.new_zeros(b, h, 1, *rest)], dim=2).index_select(2, index)


def _grid_axes(grid_perm: Any) -> tuple[list[int], list[int], list[int]]:
    """Sizes of the split grid axes (token order) and the positions of their tile and slot parts."""
    _, axes = grid_perm
    dims: list[int] = []
    tile_pos, slot_pos = [], []
    for n_tiles, a, strided in axes:
        dims += (a, n_tiles) if strided else (n_tiles, a)
        tile_pos.append(len(dims) - (1 if strided else 2))
        slot_pos.append(len(dims) - (2 if strided else 1))
    return dims, tile_pos, slot_pos


def _grid_permute(t: torch.Tensor, grid_perm: Any, groups: int = 1) -> torch.Tensor:
    """Tokens ``[B, H, N, *rest]`` -> tiles ``[B, H/G, T, G*bq, *rest]`` of a pure axis permutation, in
    one copy (the ``G`` heads sharing a key head become rows of the same tile)."""
    dims, tile_pos, slot_pos = _grid_axes(grid_perm)
    b, h = t.shape[:2]
    rest = t.shape[3:]
    nd = len(dims)
    tail = list(range(3 + nd, 3 + nd + len(rest)))
    perm = [0, 1, *(3 + i for i in tile_pos), 2, *(3 + i for i in slot_pos), *tail]
    n_tiles = math.prod(dims[i] for i in tile_pos)
    slots = math.prod(dims[i] for i in slot_pos)
    split = t.reshape(b, h // groups, groups, *dims, *rest)
    return split.permute(perm).reshape(b, h // groups, n_tiles, groups * slots, *rest)


def _grid_unpermute(t: torch.Tensor, grid_perm: Any, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`_grid_permute`: ``[B, H/G, T, G*bq, *rest]`` (any strides) -> ``[B, H, N, *rest]``,
    one copy."""
    dims, tile_pos, slot_pos = _grid_axes(grid_perm)
    b, hkv = t.shape[:2]
    rest = t.shape[4:]
    nd = len(dims)
    split = t.unflatten(3, (groups, *(dims[i] for i in slot_pos))).unflatten(2, tuple(dims[i] for i in tile_pos))
    # split: [B, Hkv, *tile dims, G, *slot dims, *rest]; token order wants [B, Hkv, G, *dims, *rest]
    where = {2 + ti: pos for ti, pos in enumerate(tile_pos)}
    where.update({3 + nd // 2 + si: pos for si, pos in enumerate(slot_pos)})
    order = sorted(where, key=where.get)
    tail = list(range(3 + nd, 3 + nd + len(rest)))
    return split.permute(0, 1, 2 + nd // 2, *order, *tail).reshape(b, hkv * groups, -1, *rest)


def _tile_chunks(tiles: Tiles, batch_heads: int) -> list[slice]:
    per_tile = batch_heads * tiles.groups * tiles.bq * tiles.r
    step = max(1, TILE_CHUNK_ELEMENTS // max(per_tile, 1))
    return [slice(i, min(tiles.n_tiles, i + step)) for i in range(0, tiles.n_tiles, step)]


def _tile_scores(tiles: Tiles, qc: torch.Tensor, kc: torch.Tensor, rows: slice, track: bool = False):
    """(raw, modified, masked) scores ``[B, H_kv, c, G, bq, R]`` of tiles ``rows``; ``qc`` is pre-scaled."""
    b, hkv, c = qc.shape[:3]
    raw = torch.matmul(qc, kc.transpose(-1, -2)).view(b, hkv, c, tiles.groups, tiles.bq, tiles.r)
    mask = tiles.mask6(rows)
    if tiles.score_mod is None:
        return raw, raw, raw.masked_fill_(~mask, float("-inf")) if mask is not None else raw
    if track:
        raw.requires_grad_()
    idx = tiles.index_grid(rows)
    mod = tiles.score_mod(raw, *idx, tiles.shape)
    return raw, mod, mod.masked_fill(~mask, float("-inf")) if mask is not None else mod


def _fusable(tiles: Tiles, q: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and q.dtype in (torch.float32, torch.float64)
            and (tiles.score_mod is None or getattr(tiles.score_mod, "additive", False)))


def _tile_forward(tiles: Tiles, q, k, v, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor, _FlashTiles | None]:
    """``out [B, H, N, D_v]``, ``lse [B, H, N]``, and (``keep``) the fused backward's tiled inputs when it
    applies."""
    b, hkv = k.shape[:2]
    qt, kt, vt = _tile_q(q, tiles), _KVTiles(k, tiles), _KVTiles(v, tiles)
    kept = None
    if _fusable(tiles, q, v):
        bh = b * hkv
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        qf = qt.reshape(bh, tiles.n_tiles, -1, q.shape[-1])
        per_tile = bh * tiles.groups * tiles.bq * tiles.r
        step = max(1, TILE_FUSED_MASK_ELEMENTS // max(per_tile, 1))
        outs, lses = [], []
        for i in range(0, tiles.n_tiles, step):
            rows = slice(i, min(tiles.n_tiles, i + step))
            fm = tiles.fused_mask(rows, q.dtype, bh)
            kc = kt.chunk(rows).reshape(bh, -1, tiles.r, q.shape[-1])
            vc = vt.chunk(rows).reshape(bh, -1, tiles.r, v.shape[-1])
            o, lse = op(qf[:, rows], kc, vc, 0.0, False, attn_mask=fm, scale=tiles.scale)
            outs.append(o)
            lses.append(lse)
        of = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        lsef = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
        if keep and _fused_backward_ok(tiles, q, v):
            kept = _FlashTiles(qf, kt.whole.reshape(bh, tiles.n_tiles, tiles.r, -1),
                               vt.whole.reshape(bh, tiles.n_tiles, tiles.r, -1), of, lsef)
        out_t = of.view(b, hkv, tiles.n_tiles, -1, v.shape[-1])
        lse_t = lsef.view(b, hkv, tiles.n_tiles, -1)
        if tiles.row_any is not None:  # rows that see no key: out is 0, lse must be -inf
            seen = _heads6(tiles.row_any, tiles.groups)
            seen = seen.expand(*seen.shape[:3], tiles.groups, tiles.bq).flatten(3, 4)
            lse_t = lse_t.masked_fill(~seen, float("-inf"))
    else:
        out_t = qt.new_zeros(*qt.shape[:-1], v.shape[-1])
        lse_t = qt.new_full(qt.shape[:-1], float("-inf"))
        for rows in _tile_chunks(tiles, b * hkv):
            _, _, s = _tile_scores(tiles, qt[:, :, rows] * tiles.scale, kt.chunk(rows), rows)
            s = s.flatten(3, 4)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = s.sub_(m).exp_()
            denom = p.sum(-1, keepdim=True)
            out_t[:, :, rows] = torch.matmul(p, vt.chunk(rows)).div_(denom.clamp_min(torch.finfo(p.dtype).tiny))
            lse_t[:, :, rows] = (m + torch.log(denom)).squeeze(-1)
    return _untile_q(out_t, tiles), _untile_q(lse_t, tiles, float("-inf")), kept


@dataclass
class _FlashTiles:
    """The fused CPU backward's inputs in tile layout ``[B*H_kv, T, rows, D]`` (``lse``: the forward op's
    own ``[B*H_kv, T, G*bq]``), kept from the forward so the backward does not permute them again."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


def _fused_backward_ok(tiles: Tiles, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Permutation plans without a score modifier where every query sees a key: CPU flash backward."""
    return (tiles.grid_perm is not None and tiles.score_mod is None and _fusable(tiles, q, v)
            and (tiles.row_any is None or bool(tiles.row_any.all())))


def _fused_tile_backward(tiles: Tiles, kept: _FlashTiles, dout: torch.Tensor):
    """Backward of block-diagonal (permuted) tiles with PyTorch's fused CPU flash backward, per tile group."""
    bh, t, _, d = kept.k.shape
    b = dout.shape[0]
    hkv = bh // b
    opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dof = _tile_q(dout, tiles).reshape(bh, t, -1, dout.shape[-1])
    step = max(1, TILE_FUSED_MASK_ELEMENTS // max(bh * tiles.groups * tiles.bq * tiles.r, 1))
    grads: list[list[torch.Tensor]] = [[], [], []]
    for i in range(0, t, step):
        rows = slice(i, min(t, i + step))
        fm = tiles.fused_mask(rows, dof.dtype, bh)
        for acc, g in zip(grads, opb(dof[:, rows], kept.q[:, rows], kept.k[:, rows], kept.v[:, rows],
                                     kept.out[:, rows], kept.lse[:, rows], 0.0, False, attn_mask=fm,
                                     scale=tiles.scale)):
            acc.append(g)
    dq_t, dk_t, dv_t = (g[0] if len(g) == 1 else torch.cat(g, 1) for g in grads)
    dq = _untile_q(dq_t.view(b, hkv, t, -1, d), tiles)
    dk = _grid_unpermute(dk_t.view(b, hkv, t, tiles.r, d), tiles.grid_perm)
    dv = _grid_unpermute(dv_t.view(b, hkv, t, tiles.r, dv_t.shape[-1]), tiles.grid_perm)
    return dq, dk, dv


def _tile_backward(tiles: Tiles, q, k, v, out, lse, dout, dlse, mod_tensors):
    b, hkv, m, d = k.shape
    bh = b * hkv
    qt = _tile_q(q * tiles.scale, tiles)
    kt, vt = _KVTiles(k, tiles), _KVTiles(v, tiles)
    do_t = _tile_q(dout, tiles)
    delta = (dout * out).sum(-1)
    delta_t = _tile_q(delta if dlse is None else delta - dlse, tiles)
    lse_t = _tile_q(torch.where(torch.isinf(lse), torch.zeros_like(lse), lse), tiles)
    dq_t = torch.empty_like(qt)
    if tiles.grid_perm is not None:
        dk_t, dv_t = torch.empty_like(kt.whole), v.new_empty(*kt.whole.shape[:-1], v.shape[-1])
        dk = dv = None
    else:
        dk_t = dv_t = None
        dk = k.new_zeros(b, hkv, m + 1, d)
        dv = v.new_zeros(b, hkv, m + 1, v.shape[-1])
    tracked = [i for i, t in enumerate(mod_tensors) if t.requires_grad]
    mod_grads: list[torch.Tensor | None] = [None] * len(mod_tensors)
    kv_flat = tiles.kv_flat.view(tiles.n_tiles, tiles.r)
    plain = tiles.score_mod is None
    for rows in _tile_chunks(tiles, bh):
        qc, doc = qt[:, :, rows], do_t[:, :, rows]
        if plain:
            # s - lse and dp - delta come out of the products: [q, -lse] . [k, 1] and [do, -delta] . [v, 1].
            ones = qc.new_ones(b, hkv, rows.stop - rows.start, tiles.r, 1)
            k_aug = torch.cat([kt.chunk(rows), ones], -1)
            v_aug = torch.cat([vt.chunk(rows), ones], -1)
            q_aug = torch.cat([qc, -lse_t[:, :, rows].unsqueeze(-1)], -1)
            s = torch.matmul(q_aug, k_aug.transpose(-1, -2))
            fm = tiles.fused_mask(rows, s.dtype, bh)
            if fm is not None:
                s.view(bh, -1, *s.shape[-2:]).add_(fm)
            p = s.exp_()
            do_aug = torch.cat([doc, -delta_t[:, :, rows].unsqueeze(-1)], -1)
            ds = torch.matmul(do_aug, v_aug.transpose(-1, -2)).mul_(p)
            kc = k_aug[..., :d]
        else:
            kc, vc = kt.chunk(rows), vt.chunk(rows)
            with torch.enable_grad():
                raw, mod, s = _tile_scores(tiles, qc, kc, rows, track=True)
            p = (s.detach().flatten(3, 4) - lse_t[:, :, rows].unsqueeze(-1)).exp_()
            ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(delta_t[:, :, rows].unsqueeze(-1)).mul_(p)
            grads = torch.autograd.grad(mod, [raw, *(mod_tensors[i] for i in tracked)], ds.view_as(mod))
            ds = grads[0].flatten(3, 4)
            for i, g in zip(tracked, grads[1:]):
                mod_grads[i] = g if mod_grads[i] is None else mod_grads[i] + g
        dv_c = torch.matmul(p.transpose(-1, -2), doc)
        dq_t[:, :, rows] = torch.matmul(ds, kc).mul_(tiles.scale)
        dk_c = torch.matmul(ds.transpose(-1, -2), qc)
        if dk_t is not None:
            dk_t[:, :, rows], dv_t[:, :, rows] = dk_c, dv_c
            continue
        flat = kv_flat[rows].flatten()
        dk.index_add_(2, flat, dk_c.reshape(b, hkv, -1, d))
        dv.index_add_(2, flat, dv_c.reshape(b, hkv, -1, dv_c.shape[-1]))
    if dk_t is not None:  # each key in exactly one tile: undo the permutation
        return (_untile_q(dq_t, tiles), _grid_unpermute(dk_t, tiles.grid_perm),
                _grid_unpermute(dv_t, tiles.grid_perm), mod_grads)
    return _untile_q(dq_t, tiles), dk[:, :, :m], dv[:, :, :m], mod_grads


class TileFn(torch.autograd.Function):
    """``keep``: the caller does not take the lse, so a fused backward may start from the forward's tiles."""

    @staticmethod
    def forward(ctx, tiles: Tiles, keep: bool, q, k, v, *mod_tensors):
        out, lse, kept = _tile_forward(tiles, q, k, v, keep=keep and not mod_tensors)
        ctx.tiles, ctx.kept = tiles, kept is not None
        ctx.set_materialize_grads(False)
        if kept is not None:
            ctx.save_for_backward(kept.q, kept.k, kept.v, kept.out, kept.lse)
        else:
            ctx.save_for_backward(q, k, v, out, lse, *mod_tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if ctx.kept:
            kept = _FlashTiles(*ctx.saved_tensors)
            if dout is None:  # the lse is not returned, so the output is what reached the loss
                return None, None, None, None, None
            dq, dk, dv = _fused_tile_backward(ctx.tiles, kept, dout.contiguous())
            return None, None, dq, dk, dv
        q, k, v, out, lse, *mod_tensors = ctx.saved_tensors
        dout = grad_or_zeros(dout, q, v)
        dq, dk, dv, mod_grads = _tile_backward(ctx.tiles, q, k, v, out, lse, dout, dlse, mod_tensors)
        return (None, None, dq, dk, dv, *mod_grads)
