"""``seer_attention``: SeerAttention: a learned block gate (pooled Q, [max, min, avg]-pooled K) distilled from the
block max-pool of the attention map, choosing the key blocks the block-sparse executor runs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    causal_allow,
    check_top_k,
    query_positions,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register

GATES = ("auto", "pooled", "per_query")
TARGET_CHUNK_ELEMENTS = 1 << 22  # attention-map elements per chunk of query rows while building the target


def block_pool(t: torch.Tensor, block: int, keep: torch.Tensor | None, n_blocks: int,
               kinds: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``t`` ``[B, H, M, D]`` over its first ``n_blocks`` blocks of ``block`` rows (kept rows only).

    Returns ``(pooled [B, H, n_blocks, len(kinds) * D], valid bool [B, n_blocks])`` with ``kinds`` among
    ``"max"``, ``"min"``, ``"avg"`` concatenated in that order; a block with no kept row is invalid (pooled 0).
    """
    b, h, m, d = t.shape
    span = n_blocks * block
    tp = torch.nn.functional.pad(t[:, :, :span], (0, 0, 0, max(0, span - m))).view(b, h, n_blocks, block, d)
    w = torch.ones(b, m, dtype=torch.bool, device=t.device) if keep is None else keep
    w = torch.nn.functional.pad(w[:, :span], (0, max(0, span - m))).view(b, 1, n_blocks, block, 1)
    cnt = w.sum(3)
    valid = cnt.view(b, n_blocks) > 0
    parts = []
    for kind in kinds:
        if kind == "avg":
            parts.append((tp * w).sum(3) / cnt.clamp(min=1))
        else:
            fill = float("-inf") if kind == "max" else float("inf")
            red = tp.masked_fill(~w, fill)
            red = red.amax(3) if kind == "max" else red.amin(3)
            parts.append(torch.where(cnt > 0, red, torch.zeros_like(red)))
    return torch.cat(parts, -1), valid


class SeerGate(nn.Module):
    """The attention gate: per key-value head, linear maps of the pooled queries (``D -> gate_dim``) and of the
    ``[max, min, avg]``-pooled block keys (``3D -> gate_dim``), no bias (as the authors' ``MultiHeadLinear``)."""

    def __init__(self, n_kv_heads: int, head_dim: int, gate_dim: int) -> None:
        super().__init__()
        self.gate_dim = gate_dim
        self.q_weight = nn.Parameter(torch.empty(n_kv_heads, head_dim, gate_dim))
        self.k_weight = nn.Parameter(torch.empty(n_kv_heads, 3 * head_dim, gate_dim))
        for w in (self.q_weight, self.k_weight):
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            nn.init.uniform_(w, -bound, bound)

    def logits(self, q: torch.Tensor, kpool: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, Hkv, R, D]``, ``kpool`` ``[B, Hkv, nb, 3D]`` -> ``q̃ k̃ᵀ / √gate_dim`` ``[B, Hkv, R, nb]``."""
        qg = torch.einsum("bhrd,hdg->bhrg", q, self.q_weight.to(q.dtype))
        kg = torch.einsum("bhnd,hdg->bhng", kpool, self.k_weight.to(q.dtype))
        return qg @ kg.transpose(-1, -2) / math.sqrt(self.gate_dim)


class SeerAttention(RoutedMixer):
    """SeerAttention: a learned gate picks the key blocks each query block (or query) attends.

    Gate (per key-value head; the query heads of a GQA group are averaged first, so a group shares one block set):
    ``softmax(q̃ k̃ᵀ / √gate_dim + mask)`` over key blocks, with ``k̃ = W_k^h [max, min, avg](K_block)``.

    * ``gate="pooled"`` (the paper's prefill gate): ``q̃ = W_q^h avg(Q_block)`` per query block; under ``causal`` the
      block-causal mask drops later blocks. Queries of a block share its routing, so a query's blocks depend on the
      later queries of its block: no decoding and no strict causal prefix (refused with a cache).
    * ``gate="per_query"`` (SeerAttention-R's decode gate): ``q̃ = W_q^h avg_group(q_i)`` for every query; only
      blocks completed at the query's position are pooled (a compressed-K cache in ``cache.state`` grows when a
      block completes), the query's own incomplete block has a zero compressed key (logit 0). Exactly causal:
      decoding with a KV cache equals the full forward.
    * ``gate="auto"``: ``per_query`` under ``causal``, ``pooled`` otherwise.

    Blocks are kept by ``top_k`` (the query's own/last block, always kept, counts among them; ``top_k`` above the
    blocks of a call is refused, equal is full attention) or by ``threshold`` (gate probability ``> threshold``, plus
    the own block). The gate has no gradient from the output (a hard choice); it is trained by :meth:`gate_loss`,
    the KL divergence to the 2-D block max-pool of the attention map (row-normalised) with the base projections
    frozen (the paper's self-distillation). ``trained_by_own_loss`` names those parameters.

    From the authors' code (microsoft/SeerAttention, ``attn_gate.py`` @1261d99, ``decode_sparse/attn_gate_inf.py``
    @5d967a6, read not copied): the per-head bias-free linears, ``[max, min, avg]`` key pooling with the query
    average, the ``1/√gate_dim`` scale, masked softmax, threshold as ``p > threshold``, the decode gate's group
    average (``Qavgproj``), its zero compressed key for the incomplete last block and ``mask[..., -1] = True``.
    Not implemented: the gate's RoPE at block positions (the gate sees the layer's q and k, rotated when the layer
    has ``rope``), the ``Qproj``/``Qorig`` head merges and the gate's optional q/k norm. The target's max over the
    query heads of a GQA group is this library's choice.

    Args:
        dim, n_heads, n_kv_heads: as ``mha`` (GQA allowed).
        block_size: tokens per block (queries and keys).
        top_k / threshold: exactly one (blocks per query row, or a gate probability in ``[0, 1)``).
        gate_dim: the gate's width (default ``head_dim``).
        gate: ``"auto"``, ``"pooled"`` or ``"per_query"``.
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    refused_arguments = ("pattern", "score_mod", "context_dim")
    trained_by_own_loss = ("gate.",)  # parameter-name prefixes trained by gate_loss, not by the output

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 64, top_k: int | None = None,
                 threshold: float | None = None, gate_dim: int | None = None, gate: str = "auto", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        if (top_k is None) == (threshold is None):
            raise ValueError(f"top_k, threshold: expected exactly one of them, got top_k={top_k!r}, "
                             f"threshold={threshold!r}")
        self.top_k = None if top_k is None else check_top_k(top_k)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold < 1):
            raise ValueError(f"threshold: expected a float in [0, 1), got {threshold!r}")
        self.threshold = None if threshold is None else float(threshold)
        self.gate_mode = check_choice("gate", gate, GATES)
        gate_dim = self.head_dim if gate_dim is None else check_int("gate_dim", gate_dim)
        self.gate = SeerGate(self.n_kv_heads, self.head_dim, gate_dim)

    def gate_kind(self, causal: bool) -> str:
        if self.gate_mode != "auto":
            return self.gate_mode
        return "per_query" if causal else "pooled"

    def check_call(self, x, mask, causal, context, cache):
        super().check_call(x, mask, causal, context, cache)
        if cache is not None and self.gate_kind(causal) == "pooled":
            raise ValueError("cache: the pooled (prefill) gate routes a block by all its queries and cannot decode; "
                             "pass causal=True with gate='auto' or 'per_query'")
        if not causal and self.gate_kind(causal) == "per_query":
            raise ValueError("causal: gate='per_query' is the causal decode gate; call with causal=True")

    def top_k_limit(self, n_keys):
        if self.top_k is None:
            return None
        return self.top_k, -(-n_keys // self.block_size), f"key blocks of {self.block_size}"

    # The gate ------------------------------------------------------------------------------------------------
    def _group_mean(self, q: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        return q.view(b, self.n_kv_heads, h // self.n_kv_heads, n, d).mean(2)

    def gate_logits(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, causal: bool,
                    cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate logits ``[B, Hkv, R, nb]`` (``-inf`` where not allowed) and the forced block ``[R]`` of each row.

        ``q`` ``[B, H, N, D]``, ``k`` ``[B, Hkv, M, D]`` (all keys, cached ones included), ``keep`` bool ``[B, M]``.
        Rows ``R``: query blocks (pooled gate) or queries (per-query gate).
        """
        bs = self.block_size
        n, m = q.shape[2], k.shape[2]
        nb = -(-m // bs)
        qm = self._group_mean(q)
        if self.gate_kind(causal) == "pooled":
            qkeep = None if keep is None else keep[:, m - n:]
            qpool, qvalid = block_pool(qm, bs, qkeep, nb, ("avg",))
            kpool, kvalid = block_pool(k, bs, keep, nb, ("max", "min", "avg"))
            logits = self.gate.logits(qpool, kpool)
            rows = torch.arange(nb, device=q.device)
            allow = kvalid.view(-1, 1, 1, nb).expand(-1, 1, nb, nb)
            if causal:
                allow = allow & (rows.view(1, -1) <= rows.view(-1, 1))
            return logits.masked_fill(~allow, float("-inf")), rows
        complete = m // bs
        kpool, kvalid = self._compressed_keys(k, keep, complete, cache)
        pos = query_positions(n, m, q.device)
        own = pos // bs
        logits = self.gate.logits(qm, torch.nn.functional.pad(kpool, (0, 0, 0, nb - complete)))
        blk = torch.arange(nb, device=q.device).view(1, -1)
        done = (blk + 1) * bs <= pos.view(-1, 1) + 1  # blocks complete at each query's position
        valid = torch.nn.functional.pad(kvalid, (0, nb - complete), value=True)
        logits = torch.where(done | (blk != own.view(-1, 1)), logits, torch.zeros_like(logits))
        allow = (blk <= own.view(-1, 1)).view(1, 1, n, nb) & valid.view(-1, 1, 1, nb)
        return logits.masked_fill(~allow, float("-inf")), own

    def _compressed_keys(self, k: torch.Tensor, keep: torch.Tensor | None, complete: int,
                         cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``[max, min, avg]`` of the ``complete`` full key blocks; with a cache, only newly completed blocks are pooled
        and the rest are read from ``cache.state`` (the compressed-K cache)."""
        if cache is None:
            return block_pool(k, self.block_size, keep, complete, ("max", "min", "avg"))
        state = cache.state.get("seer_compressed_k")
        done = 0 if state is None else state[0].shape[2]
        if done < complete:
            lo = done * self.block_size
            new, new_valid = block_pool(k[:, :, lo:], self.block_size, None if keep is None else keep[:, lo:],
                                        complete - done, ("max", "min", "avg"))
            state = (new, new_valid) if state is None else (torch.cat([state[0], new], 2),
                                                            torch.cat([state[1], new_valid], 1))
            cache.state["seer_compressed_k"] = state
        if state is None:
            b, h, _, d = k.shape
            return k.new_zeros(b, h, 0, 3 * d), torch.zeros(b, 0, dtype=torch.bool, device=k.device)
        return state

    def select(self, logits: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """Kept blocks ``[B, Hkv, R, nb]`` from the gate logits: top-k or threshold on the softmax, forced blocks in."""
        nb = logits.shape[-1]
        probs = torch.softmax(logits.masked_fill(logits.isneginf().all(-1, keepdim=True), 0.0), -1)
        probs = probs.masked_fill(logits.isneginf(), 0.0)
        force = torch.arange(nb, device=logits.device).view(1, -1) == forced.view(-1, 1)
        if self.threshold is not None:
            return (probs > self.threshold) | force
        score = probs.masked_fill(logits.isneginf(), -1.0).masked_fill(force, 2.0)
        kk = min(self.top_k, nb)
        val, idx = score.topk(kk, dim=-1)
        return torch.zeros_like(force.expand_as(probs)).scatter(-1, idx, val >= 0)

    def route(self, q, k, keep, call):
        causal = bool(call is not None and call.causal)
        group = self.n_heads // self.n_kv_heads
        kk = k[:, ::group]
        logits, forced = self.gate_logits(q, kk, keep, causal, None if call is None else call.cache)
        blocks = self.select(logits, forced).repeat_interleave(group, 1)
        block_q = self.block_size if self.gate_kind(causal) == "pooled" else 1
        return Routing("blocks", blocks, block_q, self.block_size)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return super().attend(q, k, v, pattern, want_weights, call=call)

    # Distillation --------------------------------------------------------------------------------------------
    def gate_target(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation target ``[B, Hkv, R, nb]``: the block max-pool of the attention map (over the queries of a
        query block and the query heads of a GQA group), rows normalised to sum 1; and the valid rows ``[B, R]``.

        ``q`` ``[B, H, N, D]``, ``k`` ``[B, Hkv, N, D]`` (self-attention, no cache), ``keep`` bool ``[B, N]``.
        Built in chunks of whole query blocks (memory ``O(chunk·N)``, not the ``N x N`` map; the paper fuses it
        into a FlashAttention kernel).
        """
        b, h, n, _ = q.shape
        bs, group = self.block_size, self.n_heads // self.n_kv_heads
        nb = -(-n // bs)
        kf = k.repeat_interleave(group, 1)
        scale = self.attention_scale(q)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        pooled = self.gate_kind(causal) == "pooled"
        rows = max(bs, TARGET_CHUNK_ELEMENTS // max(b * h * n, 1) // bs * bs)  # query rows per chunk, whole blocks
        parts = []
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            s = q[:, :, start:stop] @ kf.transpose(-1, -2) * scale
            allow = causal_allow(n, n, q.device)[start:stop] if causal else torch.ones(
                stop - start, n, dtype=torch.bool, device=q.device)
            allow = allow.expand(b, h, stop - start, n)
            if keep is not None:
                allow = allow & keep.view(b, 1, 1, n)
            s = s.masked_fill(~allow, float("-inf"))
            seen = allow.any(-1, keepdim=True)
            a = torch.softmax(torch.where(seen, s, torch.zeros_like(s)), -1) * allow
            a = a.view(b, self.n_kv_heads, group, stop - start, n).amax(2)
            a = torch.nn.functional.pad(a, (0, nb * bs - n)).view(b, self.n_kv_heads, stop - start, nb, bs).amax(-1)
            if pooled:
                c = -(-(stop - start) // bs)
                a = torch.nn.functional.pad(a, (0, 0, 0, c * bs - (stop - start))).view(
                    b, self.n_kv_heads, c, bs, nb).amax(3)
            parts.append(a)
        a = torch.cat(parts, 2)
        qvalid = torch.ones(b, n, dtype=torch.bool, device=q.device) if keep is None else keep
        if pooled:
            qvalid = torch.nn.functional.pad(qvalid, (0, nb * bs - n)).view(b, nb, bs).any(-1)
        tot = a.sum(-1, keepdim=True)
        qvalid = qvalid & (tot > 0).all(1).squeeze(-1)
        return a / torch.where(tot > 0, tot, torch.ones_like(tot)), qvalid

    def gate_loss(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """KL(target ‖ gate), averaged over the valid rows and key-value heads: the gate's training objective.

        ``x`` ``[B, N, C]``, ``mask`` bool ``[B, N]`` (True = keep). The base projections run without gradient
        (frozen, as in the paper); only ``gate.*`` receives one.
        """
        self.check_call(x, mask, causal, None, None)
        with torch.no_grad():
            q, k, _ = self.project(x, x)
            if self.qk_transform is not None:
                q, k = self.qk_transform(q, k, q_offset=0, k_offset=0)
            target, rows = self.gate_target(q, k, mask, causal)
        keep = None if mask is None or bool(mask.all()) else mask
        logits, _ = self.gate_logits(q, k, keep, causal)
        allowed = ~logits.isneginf()
        logp = torch.log_softmax(logits.masked_fill(~allowed.any(-1, keepdim=True), 0.0), -1)
        logp = torch.where(allowed, logp, torch.zeros_like(logp))
        safe_t = torch.where(target > 0, target, torch.ones_like(target))
        kl = torch.where(target > 0, target * (safe_t.log() - logp), torch.zeros_like(target)).sum(-1)
        w = rows.view(rows.shape[0], 1, -1).to(kl.dtype).expand_as(kl)
        return (kl * w).sum() / w.sum().clamp(min=1)

    def extra_repr(self) -> str:
        rule = f"top_k={self.top_k}" if self.top_k is not None else f"threshold={self.threshold}"
        return f"{super().extra_repr()}, block_size={self.block_size}, {rule}, gate={self.gate_mode!r}"


def _every_block_is_mha():
    x = rand_x(n=13)
    got, want = [], []
    for causal in (False, True):
        m = seeded(SeerAttention, dim=32, n_heads=4, n_kv_heads=2, block_size=4, top_k=4)
        got.append(m(x, causal=causal))
        want.append(mha_from(m)(x, causal=causal))
    m = seeded(SeerAttention, dim=32, n_heads=4, block_size=4, threshold=0.0, gate="pooled")
    got.append(m(x, causal=True))
    want.append(mha_from(m)(x, causal=True))
    return torch.stack(got), torch.stack(want)


def _target_rows_sum_to_one():
    m = seeded(SeerAttention, dim=32, n_heads=4, n_kv_heads=2, block_size=3, top_k=2)
    x = rand_x(n=11)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 8:] = False
    q, k, _ = m.project(x, x)
    sums = []
    for causal in (False, True):
        t, rows = m.gate_target(q, k, keep, causal)
        sums.append(t.sum(-1).permute(0, 2, 1)[rows])
    got = torch.cat([s.reshape(-1) for s in sums])
    return got, torch.ones_like(got)


def _last_block_kept_and_groups_share():
    m = seeded(SeerAttention, dim=32, n_heads=4, n_kv_heads=2, block_size=3, top_k=1)
    x = rand_x(n=12)
    q, k, _ = m.project(x, x)
    from attnzoo.layers.base import Call

    checks = []
    for causal in (True, False):
        r = m.route(q, k.repeat_interleave(2, 1), None, Call(x=x, src=x, causal=causal))
        blocks = r.index
        if causal:  # per query: its own (last) block
            own = torch.arange(12) // 3
            checks.append(blocks[..., torch.arange(12), own].all())
            checks.append((blocks.sum(-1) == 1).all())
        else:  # per query block: the diagonal block
            checks.append(blocks[..., torch.arange(4), torch.arange(4)].all())
        checks.append((blocks[:, 0] == blocks[:, 1]).all() & (blocks[:, 2] == blocks[:, 3]).all())
    got = torch.stack(checks).double()
    return got, torch.ones_like(got)


register(
    "seer_attention", family=FAMILY, type="pattern", priority=2, papers=("SeerAttention", "SeerAttention-R"),
    supports=SUPPORT | {"gqa"}, complexity="O(N^2 / B^2) gate, O(N k B) attention",
    backends=("reference", "gather", "blocksparse", "flex", "sdpa"),
    summary="SeerAttention: a learned block gate (pooled Q, [max, min, avg]-pooled K) picks the key blocks; "
            "trained by KL to the block max-pool of the attention map (gate_loss), base frozen.",
    test_kwargs={**SMALL, "n_kv_heads": 2, "block_size": 4, "top_k": 2},
    reductions=(
        Reduction("every_block_is_mha", "selecting every block gives dense (and causal) mha, GQA included",
                  _every_block_is_mha),
        Reduction("target_rows_sum_to_one", "the target block-map rows sum to 1", _target_rows_sum_to_one),
        Reduction("last_block_and_group_sharing", "the last block is always selected; all heads of a GQA group "
                  "share one block set", _last_block_kept_and_groups_share),
    ),
)(SeerAttention)
