"""Shared by the dynamic-sparse entries: :class:`RoutedMixer`, a multi-head mixer whose keys per query come from a
router, and the routers' shared pieces (block means, top-k that skips forbidden candidates)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from attnzoo.layers.base import Call, MultiHeadAttention
from attnzoo.layers.testing import random_tokens
from attnzoo.ops import attention
from attnzoo.ops.routed import Routing, causal_allow
from attnzoo.patterns.routed import (
    DenseRouted,
    block_routed_attention,
    explain_key_routed,
    explain_routed,
    key_routed_attention,
)

FAMILY = "dynamic-sparse"
SMALL = {"dim": 32, "n_heads": 4}
SUPPORT = {"self", "causal", "padding", "decoding"}

rand_x = partial(random_tokens, n=12)  # the family's reduction inputs [2, 12, 32]


class RoutedMixer(MultiHeadAttention):
    """Multi-head attention whose keys per query come from :meth:`route` (projections ``q_proj, k_proj, v_proj,
    o_proj`` as in ``mha``, so weights move between them).

    :meth:`route` sees ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]`` (cached keys included; under
    ``causal`` query ``i`` sits at position ``i + M - N``), the key padding ``keep`` bool ``[B, M]`` or None,
    and the :class:`~attnzoo.layers.base.Call`; it returns a :class:`Routing`. Routers run under
    ``torch.no_grad``: the discrete choice has no gradient (the attention over the chosen keys has).
    ``backend``: ``"reference"`` (float64 oracle, dense mask from the routing) or a routed-attention backend.
    With key padding the routing is intersected with the kept keys and runs through :func:`attnzoo.attention`.
    """

    refused_arguments = ("pattern", "score_mod", "n_kv_heads", "context_dim")
    cross_ok = False
    call_pattern = True  # the routing (the keys each query sees) is built per call

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        for name in self.refused_arguments:
            if kw.get(name) is not None:
                raise ValueError(f"{name}: {type(self).__name__} cannot honour it (the router chooses the keys)")
            kw.pop(name, None)
        super().__init__(dim, n_heads, **kw)

    def route(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, call: Call | None) -> Routing:
        raise NotImplementedError

    def explain(self, x: torch.Tensor, *, causal: bool = False) -> str:
        """Which routed-attention backend a call ``self(x, causal=causal)`` runs, and why (text): the call's
        routing is computed (``x`` ``[B, N, C]``, no padding) and handed to :func:`explain_routed` or
        :func:`explain_key_routed`. ``backend`` other than ``"auto"`` is reported as forced."""
        with torch.no_grad():
            q, k, v = self.project(x, x)
            routing = self.route(q, k, None, Call(x=x, src=x, causal=causal))
        head = f"{type(self).__name__}: {routing.kind} routing"
        if self.backend not in (None, "auto"):
            return f"{head}; backend forced to {self.backend!r} by the module"
        if routing.kind == "keys":
            return f"{head}; " + explain_key_routed(q, k, v, routing.index, block_q=routing.block_q, causal=causal)
        return f"{head}; " + explain_routed(q, k, v, routing.index, block_q=routing.block_q,
                                            block_k=routing.block_k, causal=causal)

    def top_k_limit(self, n_keys: int) -> tuple[int, int, str] | None:
        """``(top_k, available, what)`` for a call with ``n_keys`` keys, checked by :func:`check_top_k_fits`
        before any work (None: the entry has no such bound)."""
        return None

    def check_call(self, x, mask, causal, context, cache) -> None:
        super().check_call(x, mask, causal, context, cache)
        limit = self.top_k_limit(x.shape[1]) if cache is None else None
        if limit is not None:
            check_top_k_fits(*limit)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        causal = bool(call.causal) if call is not None else False
        keep = call.kv_keep if call is not None else None
        if keep is not None and bool(keep.all()):
            keep = None
        with torch.no_grad():
            routing = self.route(q.detach(), k.detach(), keep, call)
        scale = self.attention_scale(q)
        n, m = q.shape[2], k.shape[2]
        if want_weights or keep is not None:
            allow = routing.dense(n, m, causal)
            if keep is not None:
                allow = allow & keep.view(keep.shape[0], 1, 1, m)
            backend = "reference" if want_weights or self.backend == "reference" else "auto"
            res = attention(q, k, v, pattern=DenseRouted(allow), scale=scale, backend=backend,
                            return_weights=want_weights)
            return (res[0], res[1]) if want_weights else (res, None)
        backend = self.backend if self.backend in ("reference", "gather", "blocksparse", "flex", "sdpa") else "auto"
        if routing.kind == "keys":
            return key_routed_attention(q, k, v, routing.index, causal=causal, scale=scale, backend=backend,
                                        block_q=routing.block_q), None
        return block_routed_attention(q, k, v, routing.index, block_q=routing.block_q, block_k=routing.block_k,
                                      causal=causal, scale=scale, backend=backend), None


def check_top_k(top_k: Any, name: str = "top_k") -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {top_k!r}")
    return top_k


def check_top_k_fits(top_k: int, available: int, what: str, name: str = "top_k") -> None:
    """Raise ``ValueError`` naming ``name`` when ``top_k`` exceeds the ``available`` candidates (blocks, keys,
    regions: ``what``) of the call; ``top_k == available`` selects everything (full attention).

    :class:`RoutedMixer` runs it before any work through :meth:`RoutedMixer.top_k_limit`, on calls without a KV
    cache: a decoding step is part of a longer sequence, and its query attends all its candidates when it has
    fewer than ``top_k``, as the full forward's early queries do under causality.
    """
    if top_k > available:
        raise ValueError(f"{name}: expected at most {available} (the {what} of this call), got {top_k}")


def block_means(k: torch.Tensor, block: int, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``k`` ``[B, H, M, D]`` over blocks of ``block`` keys (kept keys only; the last block may be partial).

    Returns ``(means [B, H, nb, D], valid bool [B, nb])`` (a block with no kept key is invalid).
    """
    b, h, m, d = k.shape
    nb = -(-m // block)
    if keep is None and m % block == 0:
        return k.unflatten(2, (nb, block)).mean(3), torch.ones(b, nb, dtype=torch.bool, device=k.device)
    w = torch.ones(b, m, dtype=k.dtype, device=k.device) if keep is None else keep.to(k.dtype)
    w = torch.nn.functional.pad(w, (0, nb * block - m)).view(b, 1, nb, block, 1)
    kp = torch.nn.functional.pad(k, (0, 0, 0, nb * block - m)).view(b, h, nb, block, d)
    cnt = w.sum(3)
    return (kp * w).sum(3) / cnt.clamp(min=1), cnt.view(b, nb) > 0


def top_k_lists(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Int64 ``[..., min(top_k, n)]``: the indices of the highest ``scores`` per row, ``-1`` for a ``-inf`` one (a
    block-list routing; :func:`~attnzoo.ops.routed.as_block_mask` gives its bool form)."""
    val, idx = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
    return idx.masked_fill_(val == float("-inf"), -1)


def query_positions(n_q: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """Positions ``[N]`` of the call's queries among the keys (the last ``N`` of ``M``)."""
    return torch.arange(n_q, device=device) + (n_kv - n_q)


def pool_levels(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, block_size: int, n_levels: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The key/value pyramid: for level ``l < n_levels``, ``(k_l [B, H, M_l, D], v_l [B, H, M_l, D_v],
    count_l [B, M_l])`` with ``M_l = nkb * block_size / 2^l``: the mean of each group of ``2^l`` consecutive
    kept keys (values) of a key block and how many kept keys it stands for (0: none). Keys are padded to whole
    blocks (the padding is not kept)."""
    b, h, m, d = k.shape
    nkb = -(-m // block_size)
    pad = nkb * block_size - m
    w = torch.ones(b, m, dtype=k.dtype, device=k.device) if keep is None else keep.to(k.dtype)
    w = torch.nn.functional.pad(w, (0, pad))
    kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v))
    out = []
    for level in range(n_levels):
        g = 1 << level
        cnt = w.view(b, -1, g).sum(-1)
        wk = w.view(b, 1, -1, g, 1)
        den = cnt.clamp(min=1).view(b, 1, -1, 1)
        out.append(((kp.view(b, h, -1, g, d) * wk).sum(3) / den, (vp.view(b, h, -1, g, vp.shape[-1]) * wk).sum(3) / den,
                    cnt))
    return out


def pooled_token_weights(w: torch.Tensor, counts: list[torch.Tensor], m: int) -> torch.Tensor:
    """Token-level weights ``[..., M]`` of weights ``w`` ``[..., sum M_l]`` over the concatenated levels of
    :func:`pool_levels` (``counts`` its ``count_l``): a pooled key's weight is shared equally by its kept
    members, so ``w @ cat(v_l) == result @ v``."""
    out, start = 0, 0
    for level, cnt in enumerate(counts):
        wl = w[..., start:start + cnt.shape[1]] / cnt.clamp(min=1).view(cnt.shape[0], 1, 1, -1).to(w.dtype)
        out = out + wl.repeat_interleave(1 << level, -1)[..., :m]
        start += cnt.shape[1]
    return out


__all__ = ["FAMILY", "SMALL", "SUPPORT", "RoutedMixer", "Routing", "block_means", "causal_allow", "check_top_k",
           "check_top_k_fits", "pool_levels", "pooled_token_weights", "query_positions", "rand_x", "top_k_lists"]
