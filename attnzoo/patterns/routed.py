"""Routed attention, the op: :func:`routed_attention` runs any :class:`~attnzoo.ops.routed.Routing` (key lists,
block routings, query routings) on one set of backends, and :func:`explain_routed` says which backend runs and why.

Backends (``backend``): ``"reference"`` (float64, the dense mask of the routing, :meth:`Routing.dense`);
``"gather"``, the CPU fast path of each kind (key lists: :func:`~attnzoo.ops.routed.key_routed_gather`; block
routings: :func:`~attnzoo.ops.routed.block_routed_gather`; query routings:
:func:`~attnzoo.ops.routed.query_routed_prefix`, chunks that read only their causal key prefix); or any
:func:`attnzoo.attention` backend (``"sdpa"``, ``"flex"``, ``"blocksparse"``, ...) given the routing as a pattern
(:class:`DenseRouted`, :class:`BlockRouted`, :class:`QueryRouted`: a dense mask, or a block mask / block layout
built from the routing). ``"auto"``: ``"gather"`` for query routings, for key routings (except a dense routing of
a small call on CPU, ``KEY_DENSE_*``: the masked dense kernel) and for block routings with ``block_q`` below the
tile size (64) on CPU; else :func:`attnzoo.attention`'s choice. :func:`key_routed_attention`
and :func:`block_routed_attention` are the routing-kind shorthands the dynamic-sparse entries call;
mixture-of-heads (``moh``, ``dispatch="gather"``) runs its routed heads as a query routing.
"""

from __future__ import annotations

import torch

from attnzoo.ops import attention
from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.routed import (
    GATHER_CHUNK,
    Routing,
    block_path,
    block_routed_gather,
    key_block_gather,
    key_block_path,
    key_routed_gather,
    query_routed_prefix,
    routed_reference,
)
from attnzoo.patterns.base import Pattern
from attnzoo.patterns.segments import KeyPadding

__all__ = ["BlockRouted", "DenseRouted", "KEY_DENSE_MAX_ELEMENTS", "KEY_DENSE_MIN_DENSITY", "KEY_DENSE_MIN_QUERIES",
           "QueryRouted", "ROUTED_BACKENDS", "Routing", "block_routed_attention", "explain_key_routed",
           "explain_routed", "key_routed_attention", "routed_attention"]

ROUTED_BACKENDS = ("auto", "reference", "gather", *(name for name in BACKENDS if name not in ("reference", "gather")))
TILE = 64  # block_q from which a block routing runs as tiles (attnzoo.attention) rather than gathered per key block


class QueryRouted(Pattern):
    """A query routing as a pattern over its slots: slot ``c`` of (batch b, head h) holds query
    ``queries[b, h, c]`` (-1: empty, sees nothing) at key position ``queries + offset`` (``offset = M - N``).

    ``allow = queries >= 0`` and, if ``causal``, ``kv <= queries + offset``. Block bounds come from the
    per-block minimum and maximum position of the filled slots, so the chunked backend skips the key blocks
    after each block of slots.
    """

    per_batch = True
    per_head = True

    def __init__(self, queries: torch.Tensor, offset: int, causal: bool) -> None:
        self.queries, self.offset, self.causal = queries, offset, causal

    def allow(self, b, h, q, kv, shape):
        i = self.queries[b, h, q]
        if self.causal:
            return (i >= 0) & (kv <= i + self.offset)
        return (i >= 0) & (kv >= 0)

    def check(self, shape):
        want = (shape.batch, shape.heads, shape.n_q)
        if tuple(self.queries.shape) != want:
            raise ValueError(f"queries: expected shape {list(want)} for this call, got {list(self.queries.shape)}")

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        b, h, n = self.queries.shape
        nqb = q_lo.shape[0]
        block = int(q_hi[0, 0] - q_lo[0, 0] + 1) if nqb > 1 else n
        pad = nqb * block - n
        filled = self.queries >= 0
        if not self.causal:
            any_ = torch.nn.functional.pad(filled, (0, pad), value=False).view(b, h, nqb, block).any(-1, True)
            all_ = torch.nn.functional.pad(filled, (0, pad), value=True).view(b, h, nqb, block).all(-1, True)
            return any_ & (k_lo <= k_hi), all_ & (k_lo <= k_hi)
        low = -(n + shape.n_kv + abs(self.offset) + 1)  # below every position: empty slots
        pos = torch.where(filled, self.queries + self.offset, torch.full_like(self.queries, low))
        hi = torch.nn.functional.pad(pos, (0, pad), value=low).view(b, h, nqb, block).amax(-1, keepdim=True)
        lo = torch.nn.functional.pad(pos, (0, pad), value=n + shape.n_kv).view(b, h, nqb, block).amin(-1, keepdim=True)
        return k_lo <= hi, k_hi <= lo


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


class DenseRouted(Pattern):
    """A dense routing mask ``[B, H, N, M]`` as a pattern (for the SDPA / flex views of a key routing)."""

    per_batch = True
    per_head = True

    def __init__(self, allow: torch.Tensor) -> None:
        self.mask = allow

    def allow(self, b, h, q, kv, shape):
        return self.mask[b, h, q, kv]


# A key routing runs as a masked dense call on CPU when it selects at least this fraction of the pairs and the mask
# stays small (benchmarks/bench_routed_keys.py, RESULTS.md: the gather path costs ~30x the mask path per selected
# pair from N = 2048 on, so they break even near 3% of the pairs; below N = 2048 the mask path wins even sooner).
KEY_DENSE_MIN_DENSITY = 0.03
KEY_DENSE_MAX_ELEMENTS = 1 << 25
# ... and has at least this many queries: below, the dense call's fixed costs dominate (a decoding step's query
# gathers its few keys far faster; benchmarks/bench_dyn_decode.py).
KEY_DENSE_MIN_QUERIES = 256


def _key_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, block_q: int,
                 causal: bool) -> tuple[str, str]:
    """(``"gather"`` or ``"dense"``, why) for ``backend="auto"`` of :func:`key_routed_attention`."""
    pairs = keys.shape[0] * keys.shape[1] * keys.shape[2] * k.shape[2]
    if block_q > 1:
        return "gather", f"lists shared by blocks of {block_q} queries: {key_block_path(q, k, v, causal)[1]}"
    if q.device.type != "cpu":
        return "gather", "off CPU the gather path is the default (memory linear in N x K)"
    if keys.shape[2] < KEY_DENSE_MIN_QUERIES:
        return "gather", (f"{keys.shape[2]} queries (< KEY_DENSE_MIN_QUERIES={KEY_DENSE_MIN_QUERIES}): gathering "
                          "their keys costs less than a dense call")
    if pairs > KEY_DENSE_MAX_ELEMENTS:
        return "gather", (f"a dense mask would hold {pairs} pairs (over KEY_DENSE_MAX_ELEMENTS="
                          f"{KEY_DENSE_MAX_ELEMENTS}); the gather path's memory is linear in N x K")
    density = int((keys >= 0).sum()) / max(pairs, 1)
    if density < KEY_DENSE_MIN_DENSITY:
        return "gather", (f"the routing selects {density:.3f} of the pairs (< KEY_DENSE_MIN_DENSITY="
                          f"{KEY_DENSE_MIN_DENSITY})")
    return "dense", (f"the routing selects {density:.3f} of the pairs (>= KEY_DENSE_MIN_DENSITY="
                     f"{KEY_DENSE_MIN_DENSITY}) in a small call: the masked dense kernel is faster on CPU")


def _check_backend(backend: str) -> None:
    if backend not in ROUTED_BACKENDS:
        raise ValueError(f"backend: expected one of {list(ROUTED_BACKENDS)}, got {backend!r}")


def _check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, keep: torch.Tensor | None,
                backend: str, chunk: int | None) -> None:
    if not isinstance(routing, Routing):
        raise ValueError(f"routing: expected an attnzoo.ops.routed.Routing, got {type(routing).__name__}")
    _check_backend(backend)
    routing.check(q, k, v)
    if keep is not None:
        want = (k.shape[0], k.shape[2])
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != want:
            got = f"{keep.dtype} {list(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"keep: expected a bool tensor {list(want)} (True = a kept key), got {got}")
    if chunk is not None:
        if routing.kind != "queries":
            raise ValueError(f"chunk: only a 'queries' routing takes it (slots per causal chunk), this routing is "
                             f"{routing.kind!r}")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
    if backend == "gather" and routing.kind == "blocks" and keep is not None and not bool(keep.all()):
        raise ValueError("keep: the gather path of a block routing cannot pad keys; pass backend='auto' (it runs "
                         "the routing and the padding as one pattern) or another backend")


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, keep: torch.Tensor | None,
          backend: str, causal: bool) -> tuple[str, str]:
    """``(what runs, why)``: ``"reference"``, ``"gather"``, an :func:`attnzoo.attention` backend, or
    ``"auto"`` (:func:`attnzoo.attention`'s choice)."""
    if backend != "auto":
        return backend, "asked for"
    padded = keep is not None and not bool(keep.all())
    if routing.kind == "keys":
        name, why = _key_backend(q, k, v, routing.index, routing.block_q, causal)
        return ("gather", why) if name == "gather" else ("auto", why)
    if routing.kind == "queries":
        return "gather", ("query routing: the C routed queries attend all keys through torch's SDPA; under causal in "
                          "chunks of slots under a bool mask, each reading only the keys up to its last query's "
                          "position")
    if padded:
        return "auto", "key padding: the block routing and the padding run as one pattern through attnzoo.attention"
    if q.device.type == "cpu" and routing.block_q < TILE:
        return "gather", (f"block_q={routing.block_q} < {TILE}: each key block gathers its routed queries and the "
                          f"partials merge by log-sum-exp; tiles would union the routings of {TILE} queries")
    return "auto", f"block_q={routing.block_q}: tiles of the routing through attnzoo.attention's choice"


def _pattern(routing: Routing, n_q: int, n_kv: int, causal: bool, keep: torch.Tensor | None) -> Pattern:
    if routing.kind == "keys":
        pattern: Pattern = DenseRouted(routing.dense(n_q, n_kv, causal))
    elif routing.kind == "blocks":
        pattern = BlockRouted(routing.block_mask(n_kv), routing.block_q, routing.block_k, causal)
    else:
        pattern = QueryRouted(routing.index, n_kv - routing.n_queries, causal)
    return pattern if keep is None or bool(keep.all()) else pattern & KeyPadding(keep)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing, *, causal: bool = False,
                     keep: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
                     chunk: int | None = None) -> torch.Tensor:
    """Softmax attention of every query over exactly the keys ``routing`` selects.

    ``q`` ``[B, H, N, D]`` (for a ``"queries"`` routing the ``C`` routed queries ``[B, H, C, D]``), ``k``/``v``
    ``[B, H, M, D(_v)]``, ``routing`` an :class:`~attnzoo.ops.routed.Routing` (key lists, block routing or query
    routing). ``causal``: query ``i`` also drops keys after position ``i + M - N``. ``keep`` bool ``[B, M]`` pads
    keys (True = kept). ``backend``: ``"reference"``, ``"gather"`` (the CPU fast path of the routing's kind),
    any :func:`attnzoo.attention` backend given the routing as a pattern, or ``"auto"`` (see the module;
    :func:`explain_routed` says which runs and why). ``chunk``: slots per causal chunk of a query routing's fast
    path (default 128). Every argument is checked (``ValueError`` naming it) before any work.

    Returns ``[B, H, N, D_v]`` (``[B, H, C, D_v]`` for a query routing). A query (slot) that selects nothing
    returns zeros and zero gradients on every backend. Routings are indices: they have no gradient.
    """
    _check_call(q, k, v, routing, keep, backend, chunk)
    name, _ = _plan(q, k, v, routing, keep, backend, causal)
    n, m = q.shape[2], k.shape[2]
    if name == "reference":
        allow = routing.dense(n, m, causal)
        if keep is not None:
            allow = allow & keep.view(keep.shape[0], 1, 1, m)
        return routed_reference(q, k, v, allow, scale).to(q.dtype)
    if name != "gather":
        return attention(q, k, v, pattern=_pattern(routing, n, m, causal, keep), scale=scale, backend=name)
    if routing.kind == "keys":
        keys = routing.index
        if keep is not None and not bool(keep.all()):
            kept = keep[torch.arange(keep.shape[0], device=keys.device).view(-1, 1, 1, 1), keys.clamp(min=0)]
            keys = torch.where(kept, keys, torch.full_like(keys, -1))
        if routing.block_q == 1:
            return key_routed_gather(q, k, v, keys, causal=causal, scale=scale)
        return key_block_gather(q, k, v, keys, block_q=routing.block_q, causal=causal, scale=scale)
    if routing.kind == "blocks":
        return block_routed_gather(q, k, v, routing.index, block_q=routing.block_q, block_k=routing.block_k,
                                   causal=causal, scale=scale)
    return query_routed_prefix(q, k, v, routing.index, routing.n_queries, causal=causal, keep=keep, scale=scale,
                               chunk=GATHER_CHUNK if chunk is None else chunk)


def key_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *,
                         causal: bool = False, scale: float | None = None, backend: str = "auto",
                         block_q: int = 1) -> torch.Tensor:
    """:func:`routed_attention` of the key routing ``keys`` int64 ``[B, H, N, K]`` (``-1``: empty slot), or with
    ``block_q > 1`` ``[B, H, ceil(N / block_q), K]``: one list shared by each block of ``block_q`` queries (the
    fast path runs each block on the compiled routed kernels,
    :func:`attnzoo.ops.routed_blocks_native.key_block_native`, or where they cannot, gathers each block's keys
    once into fused CPU flash tiles, :func:`attnzoo.ops.routed_key_blocks.key_block_flash`). ``"auto"``:
    ``"gather"``, except on CPU for a dense per-query routing (at least ``KEY_DENSE_MIN_DENSITY`` of the ``N x M``
    pairs) of a small call (``B*H*N*M <= KEY_DENSE_MAX_ELEMENTS``, ``N >= KEY_DENSE_MIN_QUERIES``), where the masked
    dense kernel through :func:`attnzoo.attention` is faster (:func:`explain_key_routed` says which)."""
    return routed_attention(q, k, v, Routing("keys", keys, block_q), causal=causal, scale=scale, backend=backend)


def explain_key_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *,
                       block_q: int = 1, causal: bool = False) -> str:
    """Which backend :func:`key_routed_attention` runs with ``backend="auto"``, and why (text)."""
    routing = Routing("keys", keys, block_q)
    _check_call(q, k, v, routing, None, "auto", None)
    backend, why = _key_backend(q, k, v, keys, block_q, causal)
    if backend == "gather":
        return f"backend: gather ({why})"
    return f"backend: dense mask through attnzoo.attention ({why})"


def block_routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *,
                           block_q: int, block_k: int, causal: bool = False, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """:func:`routed_attention` of the block routing ``blocks`` bool ``[B, H, ceil(N / block_q), ceil(M / block_k)]``,
    or the same routing as int64 block lists ``[B, H, ceil(N / block_q), K]`` (key-block indices, -1: empty; the
    CPU fast path reads them without a bool mask); ``block_q = 1`` routes each query on its own, as MoBA."""
    return routed_attention(q, k, v, Routing("blocks", blocks, block_q, block_k), causal=causal, scale=scale,
                            backend=backend)


def explain_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing | torch.Tensor, *,
                   causal: bool = False, keep: torch.Tensor | None = None, backend: str = "auto",
                   chunk: int | None = None, block_q: int | None = None, block_k: int | None = None) -> str:
    """Which backend :func:`routed_attention` runs for this call, and why (text; same checks, no attention work).

    ``routing`` may also be a block routing's tensor with ``block_q``/``block_k`` (the form of
    :func:`block_routed_attention`)."""
    if isinstance(routing, torch.Tensor):
        if block_q is None or block_k is None:
            raise ValueError("block_q, block_k: a block routing given as a tensor needs both, got "
                             f"{block_q!r}, {block_k!r}")
        routing = Routing("blocks", routing, block_q, block_k)
    elif block_q is not None or block_k is not None:
        raise ValueError("block_q, block_k: they come with the Routing, got them as arguments too")
    _check_call(q, k, v, routing, keep, backend, chunk)
    name, why = _plan(q, k, v, routing, keep, backend, causal)
    if name == "auto":
        from attnzoo.ops import explain

        text = str(explain(q, k, v, pattern=_pattern(routing, q.shape[2], k.shape[2], causal, keep)))
        first, _, rest = text.partition("\n")
        return "\n".join(filter(None, [f"{first} (attnzoo.attention's choice; {why})", rest]))
    if name == "reference":
        how = "float64 softmax under the dense mask built from the routing"
    elif name != "gather":
        how = f"attnzoo.attention's {name} backend given the routing as a pattern ({why})"
    elif routing.kind == "blocks":
        path, text = block_path(q, k, v, block_q=routing.block_q, block_k=routing.block_k, causal=causal)
        how = text if path == "keys" else f"{why}; {text}"
    elif routing.kind == "queries":
        how = why + f" ({GATHER_CHUNK if chunk is None else chunk} slots per chunk)"
    else:
        how = why
    lines = [f"backend: {name} ({how})"]
    if name != "reference":
        lines.append("  not reference: float64 oracle with a dense [B, H, N, M] mask (pass backend='reference')")
    if name != "flex":
        lines.append("  not flex: the CUDA path (a block mask built from the routing; pass backend='flex')")
    return "\n".join(lines)
