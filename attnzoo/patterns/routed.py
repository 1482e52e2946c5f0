"""Routed attention's patterns: queries gathered per route (head or expert) keep their true positions.

:class:`GatheredCausal` is causality for gathered queries; :func:`routed_attention` attends the
gathered queries of every route with it (its float64 oracle is
:func:`attnzoo.ops.routed.routed_attention_reference`; the token gathering is
:func:`attnzoo.ops.routed.gather_routes`).
"""

from __future__ import annotations

import torch

from attnzoo.ops import attention
from attnzoo.ops.routed import (
    GATHER_CHUNK,
    as_block_mask,
    block_routed_gather,
    block_routing_mask,
    check_block_routing,
    check_key_routing,
    key_routed_gather,
    key_routing_mask,
    routed_reference,
)
from attnzoo.ops.routed_key_blocks import key_block_flash, key_block_flash_ok
from attnzoo.patterns.base import Pattern
from attnzoo.patterns.segments import KeyPadding

__all__ = ["BlockRouted", "GatheredCausal", "KEY_DENSE_MAX_ELEMENTS", "KEY_DENSE_MIN_DENSITY", "ROUTED_BACKENDS",
           "block_routed_attention", "explain_key_routed", "explain_routed", "key_routed_attention", "routed_attention"]

ROUTED_BACKENDS = ("auto", "reference", "gather", "blocksparse", "flex", "sdpa")


class GatheredCausal(Pattern):
    """Causality for gathered queries: query slot ``c`` of (batch b, head h) sits at key index ``qpos[b, h, c]``.

    ``allow = kv <= qpos[b, h, q]``; a slot with ``qpos = -1`` sees nothing (padding slots of
    the gather). Block bounds come from the per-block minimum and maximum of ``qpos``, so the
    chunked backend skips the key blocks after each query block.
    """

    per_batch = True
    per_head = True

    def __init__(self, qpos: torch.Tensor) -> None:
        self.qpos = qpos

    def allow(self, b, h, q, kv, shape):
        return kv <= self.qpos[b, h, q]

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        n = self.qpos.shape[-1]
        block = int(q_hi[0, 0] - q_lo[0, 0] + 1) if q_lo.shape[0] > 1 else n
        nqb = q_lo.shape[0]
        pad = nqb * block - n
        hi = torch.nn.functional.pad(self.qpos, (0, pad), value=-1).view(*self.qpos.shape[:2], nqb, block)
        lo = torch.nn.functional.pad(self.qpos, (0, pad), value=n + shape.n_kv).view(*self.qpos.shape[:2], nqb,
                                                                                      block)
        qmax, qmin = hi.amax(-1, keepdim=True), lo.amin(-1, keepdim=True)
        return k_lo <= qmax, k_hi <= qmin


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, *, causal: bool,
                     keep: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
                     chunk: int = GATHER_CHUNK) -> torch.Tensor:
    """Attention of gathered queries ``q`` ``[B, R, C, D]`` over ``k``/``v`` ``[B, R, M, D]``.

    ``qpos`` ``[B, R, C]``: the key index each query sits at (``-1``: an empty slot).
    ``causal``: a query sees the keys up to its position; calls split the slots (sorted by
    position) into chunks of ``chunk`` and each chunk reads only the keys up to its last
    position, so the routes do about half the work of a full pass, as a causal kernel would.
    ``keep`` bool ``[B, M]`` pads keys. Without ``causal`` every slot sees every kept key.
    """
    pad = KeyPadding(keep) if keep is not None and not bool(keep.all()) else None
    if not causal:
        return attention(q, k, v, pattern=pad, scale=scale, backend=backend)
    outs = []
    for start in range(0, q.shape[2], chunk):
        sl = slice(start, start + chunk)
        qp = qpos[:, :, sl]
        m = max(int(qp.max()) + 1, 1)
        pattern = GatheredCausal(qp) if pad is None else GatheredCausal(qp) & KeyPadding(keep[:, :m])
        outs.append(attention(q[:, :, sl], k[:, :, :m], v[:, :, :m], pattern=pattern, scale=scale, backend=backend))
    return torch.cat(outs, 2)


class BlockRouted(Pattern):
    """A block routing as a pattern: query ``i`` sees key ``j`` when ``blocks[b, h, i // block_q, j // block_k]``
    (and, if ``causal``, ``j <= i + M - N``). Block bounds are exact for any backend block size (2-D prefix
    sums of the routing), so blocksparse visits only routed tiles and flex builds its block mask from it."""

    per_batch = True
    per_head = True
    flex_from_layout = True  # flex's block mask comes from the exact bounds, never from evaluating every pair

    def __init__(self, blocks: torch.Tensor, block_q: int, block_k: int, causal: bool = False) -> None:
        self.blocks, self.block_q, self.block_k, self.causal = blocks, block_q, block_k, causal

    def allow(self, b, h, q, kv, shape):
        ok = self.blocks[b, h, q // self.block_q, kv // self.block_k]
        return ok & (kv <= q + (shape.n_kv - shape.n_q)) if self.causal else ok

    def check(self, shape):
        nqb, nkb = -(-shape.n_q // self.block_q), -(-shape.n_kv // self.block_k)
        want = (shape.batch, shape.heads, nqb, nkb)
        if tuple(self.blocks.shape) != want:
            raise ValueError(f"blocks: expected shape {list(want)} for this call, got {list(self.blocks.shape)}")

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        c = torch.nn.functional.pad(self.blocks.to(torch.int64).cumsum(2).cumsum(3), (1, 0, 1, 0))
        qa, qb = q_lo // self.block_q, q_hi // self.block_q + 1
        ka, kb = k_lo // self.block_k, k_hi // self.block_k + 1

        def box(qa_, qb_, ka_, kb_):
            return c[:, :, qb_, kb_] - c[:, :, qa_, kb_] - c[:, :, qb_, ka_] + c[:, :, qa_, ka_]

        qa, qb, ka, kb = (t.expand(q_lo.shape[0], k_lo.shape[1]) for t in (qa, qb, ka, kb))
        total = box(qa, qb, ka, kb)
        any_, all_ = total > 0, total == (qb - qa) * (kb - ka)
        if self.causal:
            off = shape.n_kv - shape.n_q
            any_, all_ = any_ & (k_lo <= q_hi + off), all_ & (k_hi <= q_lo + off)
        return any_, all_

    def value_key(self):
        return None


def _check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {list(allowed)}, got {backend!r}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2] \
            or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q, k, v: expected [B, H, N, D], [B, H, M, D], [B, H, M, D_v] (same B and H), got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")


def key_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *,
                         causal: bool = False, scale: float | None = None, backend: str = "auto",
                         block_q: int = 1) -> torch.Tensor:
    """Softmax attention of every query over exactly its routed keys.

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D(_v)]``, ``keys`` int64 ``[B, H, N, K]`` (``-1``: empty slot),
    or with ``block_q > 1`` ``[B, H, ceil(N / block_q), K]``: one list shared by each block of ``block_q``
    consecutive queries. ``causal``: query ``i`` also drops keys after position ``i + M - N``. ``backend``:
    ``"reference"`` (float64, dense mask from the routing), ``"gather"`` (memory linear in ``N x K``, forward and
    backward: per-query lists gather each query's keys; shared lists gather each block's keys once and run fused
    CPU flash tiles, :func:`attnzoo.ops.routed_key_blocks.key_block_flash`), or any :func:`attnzoo.attention`
    backend given the dense mask (``"sdpa"``, ``"flex"``); ``"auto"``: ``"gather"``, except on CPU for a dense
    per-query routing (at least ``KEY_DENSE_MIN_DENSITY`` of the ``N x M`` pairs) of a small call
    (``B*H*N*M <= KEY_DENSE_MAX_ELEMENTS``), where the masked dense kernel is faster (:func:`explain_key_routed`
    says which). A query whose routing selects nothing returns zeros.
    """
    _check_qkv(q, k, v)
    _check_backend(backend, ROUTED_BACKENDS)
    check_key_routing(keys, q, k.shape[2], block_q)
    if backend == "auto":
        backend = _key_backend(q, k, v, keys, block_q)[0]
    if backend == "gather":
        if block_q == 1:
            return key_routed_gather(q, k, v, keys, causal=causal, scale=scale)
        if key_block_flash_ok(q, k, v):
            return key_block_flash(q, k, v, keys, block_q=block_q, causal=causal, scale=scale)
        per_query = keys.repeat_interleave(block_q, 2)[:, :, :q.shape[2]]
        return key_routed_gather(q, k, v, per_query, causal=causal, scale=scale)
    allow = key_routing_mask(keys, k.shape[2], causal, block_q, q.shape[2])
    if backend == "reference":
        return routed_reference(q, k, v, allow, scale).to(q.dtype)
    if backend == "dense":
        backend = "auto"
    return attention(q, k, v, pattern=DenseRouted(allow), scale=scale, backend=backend)


# A key routing runs as a masked dense call on CPU when it selects at least this fraction of the pairs and the mask
# stays small (benchmarks/bench_routed_keys.py, RESULTS.md: the gather path costs ~30x the mask path per selected
# pair from N = 2048 on, so they break even near 3% of the pairs; below N = 2048 the mask path wins even sooner).
KEY_DENSE_MIN_DENSITY = 0.03
KEY_DENSE_MAX_ELEMENTS = 1 << 25


def _key_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, block_q: int = 1
                 ) -> tuple[str, str]:
    """(``"gather"`` or ``"dense"``, why) for ``backend="auto"`` of :func:`key_routed_attention`."""
    pairs = keys.shape[0] * keys.shape[1] * keys.shape[2] * k.shape[2]
    if block_q > 1:
        how = "fused CPU flash tiles" if key_block_flash_ok(q, k, v) else "per-query gathers"
        return "gather", f"lists shared by blocks of {block_q} queries: each block's keys gathered once ({how})"
    if q.device.type != "cpu":
        return "gather", "off CPU the gather path is the default (memory linear in N x K)"
    if pairs > KEY_DENSE_MAX_ELEMENTS:
        return "gather", (f"a dense mask would hold {pairs} pairs (over KEY_DENSE_MAX_ELEMENTS="
                          f"{KEY_DENSE_MAX_ELEMENTS}); the gather path's memory is linear in N x K")
    density = int((keys >= 0).sum()) / max(pairs, 1)
    if density < KEY_DENSE_MIN_DENSITY:
        return "gather", (f"the routing selects {density:.3f} of the pairs (< KEY_DENSE_MIN_DENSITY="
                          f"{KEY_DENSE_MIN_DENSITY})")
    return "dense", (f"the routing selects {density:.3f} of the pairs (>= KEY_DENSE_MIN_DENSITY="
                     f"{KEY_DENSE_MIN_DENSITY}) in a small call: the masked dense kernel is faster on CPU")


def explain_key_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *,
                       block_q: int = 1) -> str:
    """Which backend :func:`key_routed_attention` runs with ``backend="auto"``, and why (text)."""
    _check_qkv(q, k, v)
    check_key_routing(keys, q, k.shape[2], block_q)
    backend, why = _key_backend(q, k, v, keys, block_q)
    if backend == "gather":
        return f"backend: gather ({why})"
    return f"backend: dense mask through attnzoo.attention ({why})"


class DenseRouted(Pattern):
    """A dense routing mask ``[B, H, N, M]`` as a pattern (for the SDPA / flex views of a key routing)."""

    per_batch = True
    per_head = True

    def __init__(self, allow: torch.Tensor) -> None:
        self.mask = allow

    def allow(self, b, h, q, kv, shape):
        return self.mask[b, h, q, kv]


def block_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *,
                           block_q: int, block_k: int, causal: bool = False, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """Softmax attention of every query block over exactly its routed key blocks.

    ``blocks`` bool ``[B, H, ceil(N / block_q), ceil(M / block_k)]``, or the same routing as int64 block lists
    ``[B, H, ceil(N / block_q), K]`` (key-block indices, -1: empty; the CPU fast path reads them without a bool
    mask); ``block_q = 1`` routes each query on its own (MoBA). ``causal``: query ``i`` also drops keys after
    ``i + M - N``. ``backend``: ``"reference"`` (float64, dense mask from the routing); ``"gather"`` (each key
    block gathers its queries, lse merge: CPU fast path for per-query routings); ``"blocksparse"`` / ``"flex"``
    / ``"sdpa"`` run :class:`BlockRouted` through :func:`attnzoo.attention` (flex: a block mask built from the
    routing, the CUDA path); ``"auto"``: ``"gather"`` on CPU when ``block_q`` is below the tile size (64), else
    :func:`attnzoo.attention`'s choice (:func:`explain_routed` says which). A query whose routing selects nothing
    returns zeros.
    """
    _check_qkv(q, k, v)
    _check_backend(backend, ROUTED_BACKENDS)
    check_block_routing(blocks, q, k.shape[2], block_q, block_k)
    backend = _block_backend(q, block_q) if backend == "auto" else backend
    if backend == "gather":
        return block_routed_gather(q, k, v, blocks, block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    if backend == "reference":
        allow = block_routing_mask(blocks, q.shape[2], k.shape[2], block_q, block_k, causal)
        return routed_reference(q, k, v, allow, scale).to(q.dtype)
    pattern = BlockRouted(as_block_mask(blocks, -(-k.shape[2] // block_k)), block_q, block_k, causal)
    return attention(q, k, v, pattern=pattern, scale=scale, backend=backend)


def _block_backend(q: torch.Tensor, block_q: int) -> str:
    return "gather" if q.device.type == "cpu" and block_q < 64 else "auto"


def explain_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, block_q: int,
                   block_k: int, causal: bool = False) -> str:
    """Which backend :func:`block_routed_attention` runs with ``backend="auto"``, and why (text)."""
    check_block_routing(blocks, q, k.shape[2], block_q, block_k)
    if _block_backend(q, block_q) == "gather":
        from attnzoo.ops.routed_blocks import flash_routing_ok

        how = ("fused CPU flash tiles: own block causal, routed blocks batched by query count, fused backward"
               if flash_routing_ok(q, k, v, causal) else "autograd over sub-routes")
        return (f"backend: gather (block_q={block_q} < 64: each key block gathers its routed queries and the "
                f"partials merge by log-sum-exp; tiles would union the routings of 64 queries; {how})\n"
                "  not flex: CUDA path (a block mask built from the routing)")
    from attnzoo.ops import explain

    return str(explain(q, k, v, pattern=BlockRouted(as_block_mask(blocks, -(-k.shape[2] // block_k)), block_q,
                                                    block_k, causal)))
