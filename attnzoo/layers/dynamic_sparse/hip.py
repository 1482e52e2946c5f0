"""``hip``: HiP, training-free hierarchical top-k mask search: k keys per query found by repeated chunk halving."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import Call, check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    check_top_k,
    query_positions,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register

# Representative-key gathers per chunk of queries while searching ([chunk, 2k, D] at a time).
SEARCH_CHUNK_ELEMENTS = 1 << 22


def visible_keys(n_q: int, keep: torch.Tensor | None, n_kv: int, causal: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each query may see, in rank space.

    Returns ``(kept_pos [B', M], count [B', N])``: ``kept_pos[b, r]`` is the position of the ``r``-th kept key
    (increasing; entries past the kept count are filler) and ``count[b, i]`` how many kept keys query ``i`` sees
    (all of them, or under ``causal`` those at positions ``<= i + M - N``). ``B' = 1`` without ``keep``.
    """
    if keep is None:
        kept_pos = torch.arange(n_kv, device=device).view(1, n_kv)
        seen = query_positions(n_q, n_kv, device) + 1 if causal else torch.full((n_q,), n_kv, device=device)
        return kept_pos, seen.view(1, n_q)
    kept_pos = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    csum = keep.to(torch.int64).cumsum(1)
    if causal:
        seen = csum[:, query_positions(n_q, n_kv, device)]
    else:
        seen = csum[:, -1:].expand(-1, n_q)
    return kept_pos, seen


def hierarchical_top_k(q: torch.Tensor, k: torch.Tensor, kept_pos: torch.Tensor, count: torch.Tensor, top_k: int,
                       representative: str = "first", query_block: int = 1) -> torch.Tensor:
    """HiP's mask search: the keys of every query, int64 ``[B, H, N, min(top_k, max count)]`` (-1: empty slot).

    ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]``; ``kept_pos``/``count`` as :func:`visible_keys`. Query ``i``
    searches the ranks ``[0, count_i)``: they start as ``top_k`` nearly equal chunks; each round splits every
    chunk in two (the left half takes the odd key), scores each half by ``q·k_rep`` of its representative key
    (its first key, or its middle one) and keeps the ``top_k`` best halves, until every chunk is one key. A
    query seeing ``T <= top_k`` keys gets all of them; otherwise exactly ``top_k`` distinct keys, after
    ``ceil(log2(ceil(T / top_k)))`` rounds.

    ``query_block > 1``: blocks of ``query_block`` consecutive queries search together and share the result
    (``[B, H, ceil(N / query_block), K]``): a block searches the keys its last query sees, and a half scores the
    highest ``q·k_rep`` over the block's queries.
    """
    b, h, n, d = q.shape
    if query_block > 1:
        rows = -(-n // query_block)
        last = (torch.arange(rows, device=q.device) * query_block + query_block - 1).clamp(max=n - 1)
        count = count[:, last]
        member = torch.arange(rows * query_block, device=q.device).clamp(max=n - 1)  # the last block repeats
        qb = q[:, :, member].view(b, h, rows, query_block, d)                       # its last query
        n = rows
    else:
        qb = q.unsqueeze(-2)  # [B, H, N, 1, D]
    kk = min(top_k, max(int(count.max()), 1)) if count.numel() else 1
    t = count.view(count.shape[0], 1, n, 1).expand(b, h, n, 1)
    j = torch.arange(kk + 1, device=q.device).view(1, 1, 1, -1)
    bounds = j * t // kk  # [B, H, N, kk + 1]: chunk j is [bounds[j], bounds[j + 1])
    lo, hi = bounds[..., :-1].contiguous(), bounds[..., 1:].contiguous()
    pos = kept_pos.view(kept_pos.shape[0], 1, 1, -1).expand(b, h, n, -1)
    per_query = b * h * 2 * kk * max(d, qb.shape[-2])
    chunk = max(1, min(n, SEARCH_CHUNK_ELEMENTS // per_query))
    kflat = k.reshape(-1, d)
    base = (torch.arange(b * h, device=q.device) * k.shape[2]).view(b, h, 1, 1)
    while bool(((hi - lo) > 1).any()):
        mid = lo + (hi - lo + 1) // 2
        c_lo = torch.cat([lo, mid], -1)
        c_hi = torch.cat([mid, hi], -1)
        rep = c_lo if representative == "first" else c_lo + (c_hi - c_lo - 1).clamp(min=0) // 2
        idx = pos.gather(-1, rep.clamp(max=pos.shape[-1] - 1))
        scores = torch.empty(idx.shape, dtype=q.dtype, device=q.device)
        rows = idx + base  # rows of k.reshape(B*H*M, D)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            kg = kflat.index_select(0, rows[:, :, sl].reshape(-1)).view(*rows[:, :, sl].shape, d)
            scores[:, :, sl] = (kg @ qb[:, :, sl].transpose(-1, -2)).amax(-1)
        scores = scores.masked_fill(c_hi <= c_lo, float("-inf"))
        best = scores.topk(kk, dim=-1).indices
        lo, hi = c_lo.gather(-1, best), c_hi.gather(-1, best)
    keys = pos.gather(-1, lo.clamp(max=pos.shape[-1] - 1))
    return torch.where(hi > lo, keys, -1)


class HiPAttention(RoutedMixer):
    """HiP attention: every query attends exactly ``top_k`` keys found by a hierarchical top-k search (training-free).

    Per query and head, the keys it may see (all, or the past under ``causal``; padded keys never) start as
    ``top_k`` chunks; each round halves every chunk, scores the halves by ``q·k_rep`` against a representative
    key and keeps the best ``top_k`` halves, for ``log2(T / top_k)`` rounds, leaving ``top_k`` single keys
    (:func:`hierarchical_top_k`). Softmax attention then runs over those keys only (the routed ``gather`` path:
    ``O(N top_k)`` memory). Search cost ``O(N top_k log T)`` scores, attention ``O(N top_k)``.

    From the paper (HiP, Lee et al.; abstract): training-free, a tree-search-like top-k estimation of the
    attention mask on the fly, ``O(T log T)`` time, ``O(T)`` space, no token structurally excluded. Recalled,
    not checked against the authors' code (DeepAuto-AI/hip-attention, whose kernels work on query and key
    blocks): the initial ``top_k`` equal chunks, halving, and the representative being the chunk's first key
    (``representative="first"``; ``"middle"`` takes its centre key, as InfiniteHiP does). Queries are searched
    one by one by default; ``query_block = b`` searches blocks of ``b`` consecutive queries together, as HiP does
    (a block searches the keys its last query sees, scores a half by the highest ``q·k_rep`` over its queries,
    and shares the ``top_k`` keys found): the search costs ``b`` times less and the attention gathers each
    block's keys once (fused flash tiles on CPU). Under ``causal`` a block's earlier queries then see only the
    shared keys at or before them (fewer than ``top_k``), and a call's blocks start at its first query, so
    decoding token by token (blocks of one) equals the full forward only for ``query_block = 1``. The search is
    non-differentiable (hard top-k); gradients flow through the attention over the chosen keys. A query that sees
    ``T <= top_k`` keys attends all of them (early causal queries), so ``top_k == T`` is dense attention. A call
    without a KV cache whose ``T`` is below ``top_k`` is refused before any work (``ValueError`` naming
    ``top_k``); decoding steps with a cache are not, so decoding from one token works.

    Args:
        dim, n_heads: as ``mha``.
        top_k: keys per query (``k``).
        representative: ``"first"`` or ``"middle"`` key of a chunk scores it.
        query_block: queries that search together and share their keys (1: every query on its own).
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 64, representative: str = "first",
                 query_block: int = 1, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.top_k = check_top_k(top_k)
        self.representative = check_choice("representative", representative, ("first", "middle"))
        self.query_block = check_int("query_block", query_block)


    def top_k_limit(self, n_keys):
        return self.top_k, n_keys, "keys"
    def route(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, call: Call | None) -> Routing:
        causal = bool(call is not None and call.causal)
        kept_pos, count = visible_keys(q.shape[2], keep, k.shape[2], causal, q.device)
        keys = hierarchical_top_k(q, k, kept_pos, count, self.top_k, self.representative, self.query_block)
        return Routing("keys", keys, block_q=self.query_block)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, top_k={self.top_k}, representative={self.representative!r}, "
                f"query_block={self.query_block}")


def _k_at_least_t_is_mha():
    outs, want = [], []
    x = rand_x(n=13)
    for causal in (False, True):
        for rep in ("first", "middle"):
            m = seeded(HiPAttention, dim=32, n_heads=4, top_k=13, representative=rep)
            outs.append(m(x, causal=causal))
            want.append(mha_from(m)(x, causal=causal))
    return torch.stack(outs), torch.stack(want)


def _exactly_k_keys():
    got, want = [], []
    x = rand_x(n=29)
    for causal in (False, True):
        m = seeded(HiPAttention, dim=32, n_heads=4, top_k=5)
        q, k, _ = m.project(x, x)
        keys = m.route(q, k, None, Call(x=x, src=x, causal=causal)).index
        n_seen = torch.arange(1, 30) if causal else torch.full((29,), 29)
        s = keys.sort(-1).values
        distinct = ((s[..., 1:] != s[..., :-1]) | (s[..., 1:] < 0)).all()
        in_range = ((keys < n_seen.view(1, 1, -1, 1)) & (keys >= -1)).all()
        got.append(torch.stack([(keys >= 0).sum(-1).double().flatten(), distinct.double().expand(2 * 4 * 29),
                                in_range.double().expand(2 * 4 * 29)]))
        ones = torch.ones(2 * 4 * 29, dtype=torch.float64)
        want.append(torch.stack([n_seen.clamp(max=5).double().repeat(2 * 4), ones, ones]))
    return torch.stack(got), torch.stack(want)


register(
    "hip", family=FAMILY, type="pattern", priority=3, papers=("HiP",),
    supports=SUPPORT, complexity="O(N k log N) search, O(N k) attention",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="HiP: per query k keys by hierarchical chunk halving scored by representative keys; attention over them.",
    test_kwargs={**SMALL, "top_k": 3},
    reductions=(
        Reduction("k_at_least_t_is_mha", "top_k >= T equals mha (causal and not)", _k_at_least_t_is_mha),
        Reduction("exactly_k_keys", "each query gets exactly min(k, T) distinct keys it may see", _exactly_k_keys),
    ),
)(HiPAttention)
