"""Routed attention: softmax attention over exactly the (query, key) pairs a *routing* selects.

A :class:`Routing` comes in three kinds, one set for every user (the dynamic-sparse entries, mixture-of-heads):

- ``"keys"``: int64 ``[B, H, N, K]``, the keys of every query (``-1``: an empty slot, no repeats), or with
  ``block_q > 1`` ``[B, H, ceil(N / block_q), K]``, one list per block of ``block_q`` queries;
- ``"blocks"``: bool ``[B, H, ceil(N / block_q), ceil(M / block_k)]``, the key blocks of every query block (or the
  same as int64 block lists ``[B, H, ceil(N / block_q), K]``);
- ``"queries"``: int64 ``[B, H, C]``, the queries routed to each head (or expert) out of the call's ``N``
  (``n_queries``; ``-1``: an empty slot, no repeats). ``q`` then holds those routed queries themselves
  (``[B, H, C, D]``, the caller projects only them) and every routed query attends all keys.

Under ``causal`` query ``i`` sees only keys ``j <= i + M - N`` (the queries are the last ``N`` positions, as in
KV-cache decoding). This module holds the checks, the dense masks (:meth:`Routing.dense`), the float64 oracle
:func:`routed_reference`, and the fast paths of the three kinds (:func:`key_routed_gather`,
:func:`block_routed_gather`, :func:`query_routed_prefix`); the single public entry with its backends is
:func:`attnzoo.patterns.routed.routed_attention`. :func:`gather_routes` turns a per-token selection into a
query routing (mixture-of-heads' gather dispatch); :func:`gather_pays` says when that pays on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.ops.rows import gather_rows, row_index, row_view

__all__ = [
    "GATHER_CHUNK", "GATHER_MAX_FRACTION", "GATHER_MIN_TOKENS", "ROUTING_KINDS", "Routing", "as_block_mask",
    "block_keys", "block_pairs", "block_path", "block_routed_gather", "block_routing_mask", "blocks_from_index",
    "causal_allow", "check_block_lists", "check_block_routing", "check_key_routing", "check_query_routing",
    "gather_pays", "gather_routes", "key_block_gather", "key_block_path", "key_routed_gather", "key_routing_mask",
    "query_routed_prefix", "query_routing_mask", "routed_reference",
]

# Gather dispatch pays when each routed head is picked by at most this fraction of the tokens
# and the call has at least this many query tokens (benchmarks/bench_moh.py, RESULTS.md).
GATHER_MAX_FRACTION = 0.4
GATHER_MIN_TOKENS = 256
GATHER_CHUNK = 128  # routed query slots per causal chunk of a query routing's fast path
ROUTING_KINDS = ("keys", "blocks", "queries")


def gather_pays(fraction: float, n_tokens: int) -> bool:
    """Whether gathering beats computing every route densely (measured on CPU, see the thresholds)."""
    return fraction <= GATHER_MAX_FRACTION and n_tokens >= GATHER_MIN_TOKENS


def gather_routes(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-route token lists of a selection ``sel`` bool ``[B, N, R]``.

    Returns ``idx`` ``[B, R, C]`` (the tokens of each route in increasing order, then filler),
    ``valid`` bool ``[B, R, C]`` (which slots hold a token) and ``counts`` ``[B, R]``, with
    ``C`` the largest count (0 when nothing is selected). ``torch.where(valid, idx, -1)`` is the
    index of a ``"queries"`` :class:`Routing`.
    """
    b, n, _ = sel.shape
    counts = sel.sum(1)
    c = int(counts.max()) if counts.numel() else 0
    ar = torch.arange(n, device=sel.device).view(1, n, 1)
    idx = torch.where(sel, ar, ar + n).argsort(dim=1)[:, :c].transpose(1, 2)
    valid = torch.arange(c, device=sel.device).view(1, 1, c) < counts.unsqueeze(-1)
    return idx, valid, counts


# Routings: checks and dense masks -------------------------------------------------------------------------

ROUTED_CHUNK_ELEMENTS = 1 << 21  # score elements per chunk of the key-routed path


def check_key_routing(keys: torch.Tensor, q: torch.Tensor, n_kv: int, block_q: int = 1) -> None:
    """Raise ``ValueError`` naming ``keys`` unless it is int64 ``[B, H, ceil(N / block_q), K]`` (the keys of every
    query, or of every block of ``block_q`` queries) with entries in ``[-1, n_kv)`` and no key twice in a list."""
    if not isinstance(block_q, int) or isinstance(block_q, bool) or block_q < 1:
        raise ValueError(f"block_q: expected an int >= 1, got {block_q!r}")
    b, h, n, _ = q.shape
    rows = -(-n // block_q)
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.dim() != 4 \
            or tuple(keys.shape[:3]) != (b, h, rows):
        got = f"{keys.dtype} {list(keys.shape)}" if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"keys: expected an int64 tensor [{b}, {h}, {rows}, K], got {got}")
    _check_index_lists("keys", keys, n_kv, "entries", "a query lists the same key twice")


def _check_index_lists(name: str, lists: torch.Tensor, bound: int, entries: str, twice: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless the int64 lists ``[..., K]`` hold indices in ``[-1, bound)``
    (-1: an empty slot) with no index twice in a list (``twice``: what the message says of one that repeats)."""
    if lists.numel() and (int(lists.min()) < -1 or int(lists.max()) >= bound):
        raise ValueError(f"{name}: {entries} must lie in [-1, {bound}) (-1: empty slot), got range "
                         f"[{int(lists.min())}, {int(lists.max())}]")
    if lists.shape[-1] > 1:
        s = lists.sort(-1).values
        if bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any()):
            raise ValueError(f"{name}: {twice}")


def check_block_routing(blocks: torch.Tensor, q: torch.Tensor, n_kv: int, block_q: int, block_k: int) -> None:
    """Raise ``ValueError`` naming the argument unless ``blocks`` is a block routing of this call: bool
    ``[B, H, N / block_q, M / block_k]`` (rounded up), or the same routing as block lists, int64
    ``[B, H, N / block_q, K]`` of key-block indices in ``[-1, M / block_k)`` (-1: an empty slot, no repeats)."""
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
    b, h, n, _ = q.shape
    want = (b, h, -(-n // block_q), -(-n_kv // block_k))
    is_lists = isinstance(blocks, torch.Tensor) and blocks.dtype == torch.int64 and blocks.dim() == 4 \
        and tuple(blocks.shape[:3]) == want[:3]
    if not is_lists and (not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool
                         or tuple(blocks.shape) != want):
        got = f"{blocks.dtype} {list(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks: expected a bool tensor {list(want)} or int64 block lists {list(want[:3])} + [K], "
                         f"got {got}")
    if is_lists:
        check_block_lists(blocks, want[3])


def check_block_lists(lists: torch.Tensor, n_blocks: int) -> None:
    """Raise ``ValueError`` naming ``blocks`` unless the int64 lists ``[..., K]`` hold indices in ``[-1, n_blocks)``
    with no index twice in a list."""
    _check_index_lists("blocks", lists, n_blocks, "block indices", "a query block lists the same key block twice")


def as_block_mask(blocks: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The bool form ``[..., n_blocks]`` of a block routing given as bool or as int64 block lists."""
    return blocks if blocks.dtype == torch.bool else blocks_from_index(blocks, n_blocks)


def blocks_from_index(index: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Bool block routing ``[..., n_blocks]`` from selected block indices ``index`` int64 ``[..., K]`` (-1: none)."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise ValueError(f"index: expected an int64 tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= n_blocks):
        raise ValueError(f"index: entries must lie in [-1, {n_blocks}), got [{int(index.min())}, {int(index.max())}]")
    out = torch.zeros(*index.shape[:-1], n_blocks + 1, dtype=torch.bool, device=index.device)
    out.scatter_(-1, torch.where(index < 0, n_blocks, index), True)
    return out[..., :n_blocks]


def causal_allow(n_q: int, n_kv: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[N, M]``: query ``i`` (at position ``i + M - N``) sees key ``j <= i + M - N``."""
    return torch.arange(n_kv, device=device).view(1, -1) <= torch.arange(n_q, device=device).view(-1, 1) + n_kv - n_q


def key_routing_mask(keys: torch.Tensor, n_kv: int, causal: bool = False, block_q: int = 1,
                     n_q: int | None = None) -> torch.Tensor:
    """Dense bool ``[B, H, N, M]`` of a key routing (the reference's view of it); with ``block_q > 1`` the lists
    are per block of ``block_q`` queries (``n_q`` queries in all)."""
    if block_q > 1:
        keys = keys.repeat_interleave(block_q, 2)[:, :, :n_q]
    out = torch.zeros(*keys.shape[:3], n_kv + 1, dtype=torch.bool, device=keys.device)
    out.scatter_(-1, torch.where(keys < 0, n_kv, keys), True)
    out = out[..., :n_kv]
    return out & causal_allow(keys.shape[2], n_kv, keys.device) if causal else out


def block_routing_mask(blocks: torch.Tensor, n_q: int, n_kv: int, block_q: int, block_k: int,
                       causal: bool = False) -> torch.Tensor:
    """Dense bool ``[B, H, N, M]`` of a block routing (bool or block lists)."""
    out = as_block_mask(blocks, -(-n_kv // block_k)).repeat_interleave(block_q, 2)[:, :, :n_q]
    out = out.repeat_interleave(block_k, 3)[..., :n_kv]
    return out & causal_allow(n_q, n_kv, blocks.device) if causal else out


def check_query_routing(queries: torch.Tensor, q: torch.Tensor, n_queries: int) -> None:
    """Raise ``ValueError`` naming the argument unless ``n_queries`` is an int >= 0 and ``queries`` is int64
    ``[B, H, C]`` (``q``'s first three sizes) with entries in ``[-1, n_queries)``, no query twice in a route."""
    if not isinstance(n_queries, int) or isinstance(n_queries, bool) or n_queries < 0:
        raise ValueError(f"n_queries: expected an int >= 0, got {n_queries!r}")
    b, h, c, _ = q.shape
    if not isinstance(queries, torch.Tensor) or queries.dtype != torch.int64 or tuple(queries.shape) != (b, h, c):
        got = f"{queries.dtype} {list(queries.shape)}" if isinstance(queries, torch.Tensor) else type(queries).__name__
        raise ValueError(f"queries: expected an int64 tensor [{b}, {h}, {c}] (the slots of the routed queries q), "
                         f"got {got}")
    _check_index_lists("queries", queries, n_queries, "entries", "a route lists the same query twice")


def query_routing_mask(queries: torch.Tensor, n_queries: int, n_kv: int, causal: bool = False) -> torch.Tensor:
    """Dense bool ``[B, H, C, M]`` of a query routing: a filled slot sees every key (under ``causal`` the keys up
    to its query's position ``i + M - N``, ``N = n_queries``); an empty slot sees nothing."""
    allow = (queries >= 0).unsqueeze(-1)
    if causal:
        return allow & (torch.arange(n_kv, device=queries.device) <= (queries + (n_kv - n_queries)).unsqueeze(-1))
    return allow.expand(*queries.shape, n_kv)


class Routing:
    """Which (query, key) pairs one call attends: ``kind`` ``"keys"``, ``"blocks"`` or ``"queries"`` (see the module).

    ``index``: the keys (int64 ``[B, H, ceil(N / block_q), K]``: of every query, or with ``block_q > 1`` one list
    shared by each block of ``block_q`` queries), the block routing (bool ``[B, H, ceil(N / block_q),
    ceil(M / block_k)]``, or the same as int64 block lists ``[B, H, ceil(N / block_q), K]``) or the routed queries
    (int64 ``[B, H, C]`` out of ``n_queries``), -1 marking empty slots. ``block_q`` belongs to key and block
    routings, ``block_k`` to block routings, ``n_queries`` (the call's ``N``) to query routings.
    Constructing checks the kind only; :meth:`check` checks the routing against a call before any work.
    """

    def __init__(self, kind: str, index: torch.Tensor, block_q: int = 1, block_k: int = 1, *,
                 n_queries: int | None = None) -> None:
        if kind not in ROUTING_KINDS:
            raise ValueError(f"kind: expected one of {list(ROUTING_KINDS)}, got {kind!r}")
        if (kind == "queries") != (n_queries is not None):
            raise ValueError(f"n_queries: a {kind!r} routing {'needs' if kind == 'queries' else 'takes no'} it, "
                             f"got {n_queries!r}")
        self.kind, self.index, self.block_q, self.block_k, self.n_queries = kind, index, block_q, block_k, n_queries

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the argument unless ``q`` ``[B, H, N, D]`` (the ``C`` routed queries of a query
        routing), ``k`` ``[B, H, M, D]``, ``v`` ``[B, H, M, D_v]`` and the routing fit together."""
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 \
                or k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
            shapes = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (q, k, v)]
            raise ValueError("q, k, v: expected [B, H, N, D], [B, H, M, D], [B, H, M, D_v] (same B and H), got "
                             + ", ".join(map(str, shapes)))
        if self.kind == "keys":
            check_key_routing(self.index, q, k.shape[2], self.block_q)
        elif self.kind == "blocks":
            check_block_routing(self.index, q, k.shape[2], self.block_q, self.block_k)
        else:
            check_query_routing(self.index, q, self.n_queries)

    def dense(self, n_q: int, n_kv: int, causal: bool) -> torch.Tensor:
        """Bool ``[B, H, N, M]`` (``[B, H, C, M]`` for a query routing, whose rows are its slots; ``n_q`` is then
        unused): the pairs this routing (and causality) allows. The reference's view of the routing."""
        if self.kind == "keys":
            return key_routing_mask(self.index, n_kv, causal, self.block_q, n_q)
        if self.kind == "blocks":
            return block_routing_mask(self.index, n_q, n_kv, self.block_q, self.block_k, causal)
        return query_routing_mask(self.index, self.n_queries, n_kv, causal)

    def block_mask(self, n_kv: int) -> torch.Tensor:
        """A block routing as bool ``[B, H, ceil(N/block_q), ceil(M/block_k)]`` (whichever form it was made in)."""
        return as_block_mask(self.index, -(-n_kv // self.block_k))

    def __repr__(self) -> str:
        extra: dict[str, Any] = ({"block_q": self.block_q, "block_k": self.block_k} if self.kind == "blocks" else
                                 {"n_queries": self.n_queries} if self.kind == "queries" else
                                 {"block_q": self.block_q})
        shape = list(self.index.shape) if isinstance(self.index, torch.Tensor) else type(self.index).__name__
        return f"Routing({self.kind!r}, {shape}" + "".join(f", {k}={v}" for k, v in extra.items()) + ")"


def routed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Float64 oracle of routed attention: one dense softmax under ``allow`` ``[B, H, N, M]``; empty rows give zeros."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
    seen = allow.any(-1, keepdim=True)
    p = torch.softmax(torch.where(seen, s, torch.zeros_like(s)), -1) * allow
    return p @ v


def query_routed_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, n_queries: int, *,
                        causal: bool = False, keep: torch.Tensor | None = None, scale: float | None = None,
                        chunk: int = GATHER_CHUNK) -> torch.Tensor:
    """Query-routed attention, the fast path: the routed queries ``q`` ``[B, H, C, D]`` (slot ``c`` holds query
    ``queries[b, h, c]`` of ``n_queries``, -1: empty) attend ``k``/``v`` ``[B, H, M, D(_v)]`` through torch's SDPA.

    Without ``causal`` one call over all (kept) keys. With it, chunks of ``chunk`` slots, each reading only the
    keys up to its last query's position ``i + M - N`` under a bool mask ``[B, H, chunk, prefix]``: when the slots
    are in query order (as :func:`gather_routes` lists them) the routes do about half of a full pass's work, as a
    causal kernel would. ``keep`` bool ``[B, M]`` pads keys. Arguments are checked by the caller. Empty slots and
    slots that see no key return zeros and zero gradients (SDPA sees a stand-in key, the output is replaced).
    """
    b, h, c, _ = q.shape
    m = k.shape[2]
    if c == 0 or m == 0:
        return q.new_zeros(b, h, c, v.shape[-1])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    filled = queries >= 0
    if keep is not None and bool(keep.all()):
        keep = None
    if not causal:
        if keep is None:
            out = sdpa(q, k, v, scale=scale)
            return torch.where(filled.unsqueeze(-1), out, torch.zeros_like(out))
        seen = keep.any(-1).view(b, 1, 1, 1)
        out = sdpa(q, k, v, attn_mask=(keep.view(b, 1, 1, m) | ~seen), scale=scale)
        return torch.where(filled.unsqueeze(-1) & seen, out, torch.zeros_like(out))
    pos = torch.where(filled, queries + (m - n_queries), torch.full_like(queries, -1))
    outs = []
    for start in range(0, c, chunk):
        p = pos[:, :, start:start + chunk]
        mc = min(max(int(p.max()) + 1, 1), m)
        if keep is None:  # a slot sees a key iff its position is >= 0; the others get every key as a stand-in
            seen = (p >= 0).unsqueeze(-1)
            allow = torch.arange(mc, device=q.device) <= torch.where(seen, p.unsqueeze(-1), mc)
        else:
            allow = (torch.arange(mc, device=q.device) <= p.unsqueeze(-1)) & keep[:, :mc].view(b, 1, 1, mc)
            seen = allow.any(-1, keepdim=True)
            allow = allow | ~seen
        out = sdpa(q[:, :, start:start + chunk], k[:, :, :mc], v[:, :, :mc], attn_mask=allow, scale=scale)
        outs.append(torch.where(seen, out, torch.zeros_like(out)))
    return torch.cat(outs, 2)


def _key_chunk(keys: torch.Tensor, start: int, stop: int, n_kv: int, causal: bool) -> tuple[torch.Tensor, ...]:
    idx = keys[:, :, start:stop]
    ok = idx >= 0
    if causal:
        ok = ok & (idx <= torch.arange(start, stop, device=idx.device).view(1, 1, -1, 1) + n_kv - keys.shape[2])
    return idx.clamp(min=0), ok


def _key_probs(q, kg, ok, scale):
    s = torch.einsum("bhcd,bhckd->bhck", q, kg) * scale
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


class _KeyRouted(torch.autograd.Function):
    """Key-routed attention, chunked over queries; the backward recomputes each chunk's probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, keys, causal, scale, chunk):
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        k_rows, v_rows = row_view(k), row_view(v)
        for start in range(0, q.shape[2], chunk):
            stop = min(start + chunk, q.shape[2])
            idx, ok = _key_chunk(keys, start, stop, k.shape[2], causal)
            p = _key_probs(q[:, :, start:stop], gather_rows(k_rows, idx), ok, scale)
            out[:, :, start:stop] = torch.einsum("bhck,bhckd->bhcd", p, gather_rows(v_rows, idx))
        ctx.save_for_backward(q, k, v, keys, out)
        ctx.causal, ctx.scale, ctx.chunk = causal, scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, keys, out = ctx.saved_tensors
        dq = torch.zeros_like(q)
        dk, dv = k.new_zeros(k.shape), v.new_zeros(v.shape)  # contiguous: rows of [B*H*M, D] for index_add_
        dk_rows, dv_rows = dk.view(-1, k.shape[-1]), dv.view(-1, v.shape[-1])
        k_src, v_src = row_view(k), row_view(v)
        contiguous = (k.shape[1] * k.shape[2], k.shape[2], 1)  # row coefficients of dk, dv
        bi = torch.arange(k.shape[0], device=k.device).view(-1, 1, 1, 1)
        hi = torch.arange(k.shape[1], device=k.device).view(1, -1, 1, 1)
        for start in range(0, q.shape[2], ctx.chunk):
            stop = min(start + ctx.chunk, q.shape[2])
            idx, ok = _key_chunk(keys, start, stop, k.shape[2], ctx.causal)
            kg, vg = gather_rows(k_src, idx), gather_rows(v_src, idx)
            qc, do = q[:, :, start:stop], dout[:, :, start:stop]
            p = _key_probs(qc, kg, ok, ctx.scale)
            dp = torch.einsum("bhcd,bhckd->bhck", do, vg)
            ds = p * (dp - (do * out[:, :, start:stop]).sum(-1, keepdim=True)) * ctx.scale
            dq[:, :, start:stop] = torch.einsum("bhck,bhckd->bhcd", ds, kg)
            rows = row_index(contiguous, bi, hi, idx).reshape(-1)
            dk_rows.index_add_(0, rows, torch.einsum("bhck,bhcd->bhckd", ds, qc).reshape(-1, k.shape[-1]))
            dv_rows.index_add_(0, rows, torch.einsum("bhck,bhcd->bhckd", p, do).reshape(-1, v.shape[-1]))
        return dq, dk, dv, None, None, None, None


def key_routed_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """Key-routed attention by gathering each query's ``K`` keys: memory linear in ``N x K`` (forward and backward).

    ``q`` ``[B, H, N, D]``, ``k``/``v`` ``[B, H, M, D]``, ``keys`` int64 ``[B, H, N, K]`` (checked by the caller).
    The routing is not differentiable (indices). Queries with no key return zeros and zero gradients.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    per_query = q.shape[0] * q.shape[1] * max(keys.shape[-1], 1) * max(q.shape[-1], 1)
    chunk = max(1, min(q.shape[2], ROUTED_CHUNK_ELEMENTS // per_query))
    return _KeyRouted.apply(q, k, v, keys, causal, scale, chunk)


def _sub_routes(sel: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the queries of every route of ``sel`` bool ``[G, N, R]`` into sub-routes of at most ``cap`` queries.

    Returns ``route`` ``[S]`` (``g * R + r`` of each sub-route) and ``qidx`` ``[S, cap]`` (its queries in
    increasing order, -1: empty slot). No route is padded by more than ``cap - 1`` slots.
    """
    g, n, r = sel.shape
    gi, ni, ri = sel.nonzero(as_tuple=True)
    key = gi * r + ri
    key, order = key.sort(stable=True)
    ni = ni[order]
    counts = torch.bincount(key, minlength=g * r)
    rank = torch.arange(key.numel(), device=sel.device) - (counts.cumsum(0) - counts)[key]
    nsub = (counts + cap - 1) // cap
    first = nsub.cumsum(0) - nsub
    route = torch.repeat_interleave(torch.arange(g * r, device=sel.device), nsub)
    qidx = torch.full((route.numel(), cap), -1, dtype=torch.int64, device=sel.device)
    qidx[first[key] + rank // cap, rank % cap] = ni
    return route, qidx


def block_keys(blocks: torch.Tensor, block_k: int, n_kv: int) -> torch.Tensor:
    """A per-query block routing (``block_q = 1``, bool or block lists) as key lists ``[B, H, N, K * block_k]``
    (-1: a slot past the last key or of an empty block slot)."""
    lists = blocks if blocks.dtype == torch.int64 else mask_lists(blocks)
    keys = lists.unsqueeze(-1) * block_k + torch.arange(block_k, device=lists.device)
    keys = torch.where((lists.unsqueeze(-1) >= 0) & (keys < n_kv), keys, -1)
    return keys.flatten(-2)


def block_pairs(blocks: torch.Tensor, n: int, block_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (query, key block) pairs a block routing selects (bool ``[B, H, nbq, nkb]`` or int64 block lists
    ``[B, H, nbq, K]``): ``(g, i, kb)`` int64 ``[P]`` with ``g = b * H + h``, ``i`` the query (every query of a
    query block of ``block_q`` gets its block's pairs) and ``kb`` the key block, ordered by ``g`` then ``i``."""
    b, h, _, width = blocks.shape
    per_query = blocks if block_q == 1 else blocks.repeat_interleave(block_q, 2)[:, :, :n]
    per_query = per_query.reshape(b * h, n, width)
    if blocks.dtype == torch.bool:
        return per_query.nonzero(as_tuple=True)
    g, i, slot = (per_query >= 0).nonzero(as_tuple=True)
    return g, i, per_query[g, i, slot]


def mask_lists(blocks: torch.Tensor) -> torch.Tensor:
    """The selected indices of a bool mask ``[..., n]`` as increasing lists ``[..., K]`` (``K`` the most selected in
    a row, at least 1; -1 fills)."""
    width = max(int(blocks.sum(-1).max()), 1) if blocks.numel() else 1
    ar = torch.arange(blocks.shape[-1], device=blocks.device)
    lists = torch.where(blocks, ar, blocks.shape[-1]).sort(-1).values[..., :width]
    return torch.where(lists < blocks.shape[-1], lists, -1)


def block_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_q: int, block_k: int, causal: bool,
               cap: int | None = None) -> tuple[str, str]:
    """Which CPU path :func:`block_routed_gather` takes for this call, and why (text): ``"keys"`` (a per-query
    routing of fewer queries than ``block_k``: each query gathers its blocks' keys), ``"native"`` (attnzoo's
    compiled routed kernels), ``"flash"`` (PyTorch's fused flash tiles) or ``"autograd"`` (sub-routes)."""
    from attnzoo.ops.routed_blocks import flash_routing_ok
    from attnzoo.ops.routed_blocks_native import native_routing_reason

    if q.shape[2] < block_k and block_q == 1:
        return "keys", (f"{q.shape[2]} queries < block_k={block_k}, a decoding step or a short chunk: each query "
                        "gathers the keys of its blocks (block_keys, key_routed_gather); tiles would be mostly "
                        "empty slots")
    reason = "cap (queries per sub-route) was given" if cap is not None else native_routing_reason(q, k, v, causal)
    if reason is None:
        return "native", ("attnzoo's compiled routed kernels: each key block's queries read in place, online "
                          "softmax per query, own block causal with its upper half skipped, fused backward")
    if flash_routing_ok(q, k, v, causal):
        return "flash", (f"fused CPU flash tiles (not the compiled routed kernels: {reason}): own block causal, "
                         "routed blocks batched by query count, fused backward")
    return "autograd", f"autograd over sub-routes (not the compiled routed kernels: {reason})"


def key_block_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[str, str]:
    """Which CPU path :func:`key_block_gather` takes for this call, and why (text): ``"native"`` (attnzoo's
    compiled routed kernels), ``"flash"`` (fused flash tiles) or ``"per-query"`` (each query's keys gathered)."""
    from attnzoo.ops.routed_blocks_native import native_routing_reason
    from attnzoo.ops.routed_key_blocks import key_block_flash_ok

    reason = native_routing_reason(q, k, v, causal)
    if reason is None:
        return "native", "attnzoo's compiled routed kernels: each block's keys read in place, one unit per block"
    if key_block_flash_ok(q, k, v):
        return "flash", ("each block's keys gathered once into fused CPU flash tiles (not the compiled routed "
                         f"kernels: {reason})")
    return "per-query", f"per-query gathers (not the compiled routed kernels: {reason})"


def key_block_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, *, block_q: int,
                     causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Key lists shared by blocks of ``block_q`` queries (``keys`` int64 ``[B, H, ceil(N / block_q), K]``, -1:
    empty; checked by the caller), on the CPU path :func:`key_block_path` picks. Queries that see no key return
    zeros."""
    from attnzoo.ops.routed_blocks_native import key_block_native
    from attnzoo.ops.routed_key_blocks import key_block_flash

    path, _ = key_block_path(q, k, v, causal)
    if path == "native":
        return key_block_native(q, k, v, keys, block_q=block_q, causal=causal, scale=scale)
    if path == "flash":
        return key_block_flash(q, k, v, keys, block_q=block_q, causal=causal, scale=scale)
    per_query = keys.repeat_interleave(block_q, 2)[:, :, :q.shape[2]]
    return key_routed_gather(q, k, v, per_query, causal=causal, scale=scale)


def block_routed_gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, *, block_q: int,
                        block_k: int, causal: bool = False, scale: float | None = None,
                        cap: int | None = None) -> torch.Tensor:
    """Block-routed attention in the MoBA manner: every key block gathers the queries routed to it (in sub-routes
    of at most ``cap`` queries), attends them to its ``block_k`` keys, and the partial results are merged per
    query by log-sum-exp. Work and memory are linear in ``N x`` (selected blocks ``x block_k``). On CPU in
    float32/float64 attnzoo's compiled routed kernels run it in place, forward and backward
    (:func:`attnzoo.ops.routed_blocks_native.block_routed_native`; head dims a multiple of 16 floats / 8 doubles);
    where they cannot (:func:`~attnzoo.ops.routed_blocks_native.native_routing_reason`), or with an explicit
    ``cap``, the tiles run on PyTorch's fused flash kernel with its fused backward
    (:func:`attnzoo.ops.routed_blocks.block_routed_flash`); otherwise autograd gives the backward. ``cap``:
    queries per sub-route (default 128 on the autograd path, ``UNIT_QUERIES`` on the flash path). A per-query
    routing of fewer queries than ``block_k`` (a decoding step, a short chunk) gathers each query's keys instead
    (:func:`block_keys`, :func:`key_routed_gather`): tiles would be mostly empty slots. Shapes as in
    :func:`check_block_routing` (checked by the caller); queries that see no key return zeros.
    """
    from attnzoo.ops.routed_blocks import block_routed_flash
    from attnzoo.ops.routed_blocks_native import block_routed_native

    path, _ = block_path(q, k, v, block_q=block_q, block_k=block_k, causal=causal, cap=cap)
    if path == "keys":
        return key_routed_gather(q, k, v, block_keys(blocks, block_k, k.shape[2]), causal=causal, scale=scale)
    if path == "native":
        return block_routed_native(q, k, v, blocks, block_q=block_q, block_k=block_k, causal=causal, scale=scale)
    if path == "flash":
        return block_routed_flash(q, k, v, blocks, block_q=block_q, block_k=block_k, causal=causal, scale=scale,
                                  cap=cap)
    cap = GATHER_CHUNK if cap is None else cap
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    nkb = -(-m // block_k)
    pad = nkb * block_k - m
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(b * h * nkb, block_k, d)
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(b * h * nkb, block_k, dv)
    sel = as_block_mask(blocks, nkb).repeat_interleave(block_q, 2)[:, :, :n].reshape(b * h, n, nkb)
    route, qidx = _sub_routes(sel, cap)
    valid = qidx >= 0
    target = (route // nkb).view(-1, 1) * n + qidx.clamp(min=0)  # [S, cap] rows of q.view(B*H*N, D)
    qg = q.reshape(b * h * n, d)[target]
    kpos = (route % nkb).view(-1, 1, 1) * block_k + torch.arange(block_k, device=q.device).view(1, 1, -1)
    ok = valid.unsqueeze(-1) & (kpos < m)
    if causal:
        ok = ok & (kpos <= qidx.unsqueeze(-1) + (m - n))
    s = (qg @ kb[route].transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
    mx = s.detach().amax(-1)
    seen = torch.isfinite(mx)
    e = torch.exp(s - torch.where(seen, mx, torch.zeros_like(mx)).unsqueeze(-1))
    den, num = e.sum(-1), e @ vb[route]
    flat = target.reshape(-1)
    top = torch.full((b * h * n,), float("-inf"), dtype=mx.dtype, device=q.device)
    top = top.scatter_reduce(0, flat, torch.where(seen, mx, float("-inf")).reshape(-1), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.where(seen, torch.exp(mx - top[target]), torch.zeros_like(mx))
    tot = torch.zeros(b * h * n, dtype=den.dtype, device=q.device).index_add(0, flat, (den * w).reshape(-1))
    acc = torch.zeros(b * h * n, dv, dtype=num.dtype, device=q.device).index_add(
        0, flat, (num * w.unsqueeze(-1)).reshape(-1, dv))
    out = acc / torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
    return out.view(b, h, n, dv)
