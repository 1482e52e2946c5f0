"""``superlinear_span``: Superlinear multi-step attention, N = 2: a span search over ~sqrt(L) anchors, then attention
over the selected spans."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import Call, check_choice, seeded
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
from attnzoo.ops import attention
from attnzoo.ops.routed import key_routing_mask
from attnzoo.patterns.routed import DenseRouted, key_routed_attention
from attnzoo.registry import Reduction, register

# Anchor-key gathers per chunk of queries while searching ([chunk, S, D] at a time).
SEARCH_CHUNK_ELEMENTS = 1 << 22
SPAN_FACTOR = 2.0  # span length ceil(2 sqrt(p + 1)): the smallest factor that leaves no earlier position unreachable


def search_positions(n_q: int, n_kv: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Position ``p`` ``[N]`` each query searches back from: its own under ``causal``, else the last key's."""
    return query_positions(n_q, n_kv, device) if causal else torch.full((n_q,), n_kv - 1, device=device)


def span_anchors(pos: torch.Tensor) -> torch.Tensor:
    """Anchor positions ``[N, S]`` of the span search (-1: none): ``p + 1 - i^2`` for ``i = 1 .. floor(sqrt(p + 1))``,
    ``S`` the largest count of the call. ``pos`` ``[N]``."""
    s = max(math.isqrt(int(pos.max()) + 1), 1) if pos.numel() else 1
    i = torch.arange(1, s + 1, device=pos.device).view(1, -1)
    a = pos.view(-1, 1) + 1 - i * i
    return torch.where(a >= 0, a, -1)


def span_length(pos: torch.Tensor) -> torch.Tensor:
    """Keys before its anchor a span reaches back: ``ceil(2 sqrt(p + 1))`` per query ``[N]``."""
    return torch.ceil(SPAN_FACTOR * (pos.double() + 1).sqrt()).to(torch.int64)


def span_keys(anchor: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Keys of spans ``[anchor - length, anchor]``: ``anchor`` ``[B, H, N, k]`` (-1: none), ``length`` ``[N]`` ->
    ``[B, H, N, k, L + 1]`` positions (-1 outside a span), ``L = max length``."""
    t = torch.arange(int(length.max()) + 1 if length.numel() else 1, device=anchor.device)
    pos = anchor.unsqueeze(-1) - t
    ok = (anchor.unsqueeze(-1) >= 0) & (pos >= 0) & (t <= length.view(1, 1, -1, 1, 1))
    return torch.where(ok, pos, -1)


def union_keys(keys: torch.Tensor) -> torch.Tensor:
    """``[..., k, L]`` span keys -> ``[..., W]`` their union (decreasing, then -1), ``W`` the largest union."""
    flat = keys.flatten(-2).sort(-1).values
    dup = torch.zeros_like(flat, dtype=torch.bool)
    dup[..., 1:] = flat[..., 1:] == flat[..., :-1]
    out = torch.where(dup, -1, flat).sort(-1, descending=True).values
    return out[..., :max(int((out >= 0).sum(-1).max()), 1) if out.numel() else 1]


def anchor_logits(s: torch.Tensor, k: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Search logits ``s · k_anchor`` ``[B, H, N, k]`` (differentiable) of anchors ``[B, H, N, k]`` (-1: any value)."""
    b, h, n, d = s.shape
    kg = k.gather(2, anchor.clamp(min=0).reshape(b, h, -1, 1).expand(-1, -1, -1, d)).view(*anchor.shape, d)
    return torch.einsum("bhnd,bhnsd->bhns", s, kg)


class SuperlinearSpanAttention(RoutedMixer):
    """Superlinear attention with N = 2 steps: a span search, then attention over the selected spans.

    Step 1 (span search, ``O(L^{3/2})``): a query at position ``p`` scores ``floor(sqrt(p + 1))`` anchor keys at
    ``p + 1 - i^2`` (``i = 1, 2, ...``: jump search with growing strides) by ``s · k_anchor`` and keeps the
    ``top_k`` best. Each anchor opens the span ``[anchor - ceil(2 sqrt(p + 1)), anchor]``. Consecutive anchors
    are ``2i + 1 <= 2 sqrt(p + 1) + 1`` apart, so the spans cover every position ``<= p``: no earlier position
    is structurally excluded (the paper's structural non-exclusion). Step 2 (``O(L^{3/2})``): attention of
    ``q`` over the selected spans. Padded keys are never anchors nor attended. Without ``causal`` every
    query searches back from the last key (and sees every position).

    ``combine="union"`` (the catalogue's form, default): the search query is the attention query ``q`` and
    one softmax runs over the union of the selected spans; selecting every span is dense causal attention.
    The search is non-differentiable (hard top-k). ``combine="gated"`` (the authors' code): a separate search
    projection ``search_proj`` (``s = x W_s``) scores the anchors, each selected span is attended on its own
    and the span outputs are mixed by the softmax of their anchors' search logits ``s · k_anchor``; this gate
    is what trains the search end to end. Selecting every span then is not dense attention.

    From the paper (abstract): N-step search, ``O(L^{1 + 1/N})``; for N = 2 a span search selects relevant spans
    and span attention runs over them; random context access; the routed span selection is learnable end to
    end. Read in the authors' code (jeetnotop/superlinear, ``search/_reference.py``, ``attention/_prefill.py``,
    ``common/adjustment.py``; not copied): anchors at ``p + 1 - i^2``, unscaled ``Q1·K`` anchor scores, top-k
    anchors, backward span length ``ceil(2 (p + 1)^{1/2})``, the per-span outputs mixed by the softmax of the
    anchor scores. Not implemented: the sliding-window branch beside the spans (``sw_index``), forward span
    extension, other search powers (N > 2), the Triton kernels. A query with fewer than ``top_k`` anchors attends
    all its spans; a call without a KV cache whose last query has fewer than ``top_k`` anchors
    (``floor(sqrt(N))``) is refused before any work (``ValueError`` naming ``top_k``); decoding steps with a cache
    are not, so decoding from one token works.

    Args:
        dim, n_heads: as ``mha``.
        top_k: spans per query.
        combine: ``"union"`` or ``"gated"``.
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope`` (not with ``"gated"``), ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 3, combine: str = "union", **kw: Any) -> None:
        if combine == "gated" and kw.get("rope") not in (None, False):
            raise ValueError("rope: not supported with combine='gated' (the search query has no rotary embedding)")
        super().__init__(dim, n_heads, **kw)
        self.top_k = check_top_k(top_k)
        self.combine = check_choice("combine", combine, ("union", "gated"))
        self.search_proj = (nn.Linear(dim, n_heads * self.head_dim, bias=self.q_proj.bias is not None)
                            if combine == "gated" else None)


    def top_k_limit(self, n_keys):
        return self.top_k, math.isqrt(n_keys), "span anchors of the last query (floor(sqrt(N)))"
    def search(self, s: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, causal: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The span search (no gradient): ``(anchors [B, H, N, k] (-1: none), keys [B, H, N, k, L + 1])`` for
        search queries ``s`` ``[B, H, N, D]``; anchors are scored in chunks of queries (``O(chunk sqrt(M))``)."""
        b, h, n, d = s.shape
        pos = search_positions(n, k.shape[2], causal, s.device)
        cand = span_anchors(pos)  # [N, S]
        ok = (cand >= 0).view(1, 1, n, -1)
        if keep is not None:
            ok = ok & keep.gather(1, cand.clamp(min=0).view(1, -1).expand(b, -1)).view(b, 1, n, -1)
        kk = min(self.top_k, cand.shape[1])
        best = torch.empty(b, h, n, kk, dtype=torch.int64, device=s.device)
        found = torch.empty(b, h, n, kk, dtype=torch.bool, device=s.device)
        chunk = max(1, min(n, SEARCH_CHUNK_ELEMENTS // max(b * h * cand.shape[1] * d, 1)))
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            idx = cand[sl].clamp(min=0).reshape(1, 1, -1, 1).expand(b, h, -1, d)
            kg = k.gather(2, idx).view(b, h, -1, cand.shape[1], d)
            logits = torch.einsum("bhnd,bhnsd->bhns", s[:, :, sl], kg)
            logits = logits.masked_fill(~ok[:, :, sl], float("-inf"))
            val, ix = logits.topk(kk, dim=-1)
            best[:, :, sl], found[:, :, sl] = ix, val > float("-inf")
        anchor = torch.where(found, cand.view(1, 1, n, -1).expand(b, h, -1, -1).gather(-1, best), -1)
        keys = span_keys(anchor, span_length(pos))
        if keep is not None:
            kept = keep.gather(1, keys.clamp(min=0).view(b, -1)).view(keys.shape)
            keys = torch.where((keys >= 0) & kept, keys, -1)
        return anchor, keys

    def route(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, call: Call | None) -> Routing:
        causal = bool(call is not None and call.causal)
        return Routing("keys", union_keys(self.search(q, k, keep, causal)[1]))

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if self.combine == "union":
            return super().attend(q, k, v, pattern, want_weights, call=call)
        causal = bool(call is not None and call.causal)
        keep = call.kv_keep if call is not None else None
        s = self.split(self.search_proj(call.x), self.n_heads)
        with torch.no_grad():
            anchor, keys = self.search(s.detach(), k.detach(), keep, causal)
        logits = anchor_logits(s, k, anchor)
        gate = torch.softmax(logits.masked_fill(anchor < 0, -1e30), -1) * (anchor >= 0)
        scale = self.attention_scale(q)
        backend = self.backend if self.backend in ("reference", "gather", "sdpa", "flex") else "auto"
        outs, probs = [], []
        for j in range(anchor.shape[-1]):
            kj = keys[..., j, :].contiguous()
            if want_weights:
                allow = key_routing_mask(kj, k.shape[2], causal)
                o, p = attention(q, k, v, pattern=DenseRouted(allow), scale=scale, backend="reference",
                                 return_weights=True)
                probs.append(p * gate[..., j:j + 1])
            else:
                o = key_routed_attention(q, k, v, kj, causal=causal, scale=scale, backend=backend)
            outs.append(o * gate[..., j:j + 1].to(o.dtype))
        z = torch.stack(outs, 0).sum(0)
        return z, (torch.stack(probs, 0).sum(0) if want_weights else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, combine={self.combine!r}"


def _all_spans_is_causal_mha():
    x = rand_x(n=17)
    m = seeded(SuperlinearSpanAttention, dim=32, n_heads=4, top_k=4)  # floor(sqrt(17)) = 4 spans at most
    got = torch.stack([m(x, causal=True), m(x)])
    want = torch.stack([mha_from(m)(x, causal=True), mha_from(m)(x)])
    return got, want


def _every_earlier_position_reachable():
    """For every query position p <= 199 and every key j <= p, some span (anchor) of p contains j."""
    pos = torch.arange(200)
    anchors = span_anchors(pos)
    keys = span_keys(anchors.view(1, 1, 200, -1), span_length(pos))[0, 0]  # [N, S, L + 1]
    cover = torch.zeros(200, 201, dtype=torch.bool).scatter_(1, keys.flatten(1).clamp(min=-1) + 1, True)[:, 1:]
    want = torch.arange(200).view(1, -1) <= pos.view(-1, 1)
    return cover.double(), want.double()


def _no_future_leak():
    """Routed keys never lie after the query (causal), for any top_k; and the output ignores the future."""
    x = rand_x(n=15)
    got, want = [], []
    for kk in (1, 2, 3):
        m = seeded(SuperlinearSpanAttention, dim=32, n_heads=4, top_k=kk)
        q, k, _ = m.project(x, x)
        keys = m.route(q, k, None, Call(x=x, src=x, causal=True)).index
        got.append((keys > torch.arange(15).view(1, 1, -1, 1)).any().double().view(1))
        want.append(torch.zeros(1, dtype=torch.float64))
        x2 = x.clone()
        x2[:, 8:] = 3 * rand_x(n=7, seed=5)
        got.append(m(x2, causal=True)[:, :8].flatten())
        want.append(m(x, causal=True)[:, :8].flatten())
    return torch.cat(got), torch.cat(want)


register(
    "superlinear_span", family=FAMILY, type="pattern", priority=3, papers=("Superlinear attention",),
    supports=SUPPORT, complexity="O(L^{3/2})",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Superlinear multi-step attention (N = 2): span search over sqrt(L) anchors, attention over the top spans.",
    test_kwargs={**SMALL, "top_k": 2},
    reductions=(
        Reduction("all_spans_is_causal_mha", "selecting every span equals dense causal mha", _all_spans_is_causal_mha),
        Reduction("every_earlier_position_reachable", "every earlier position lies in some span of the query",
                  _every_earlier_position_reachable),
        Reduction("no_future_leak", "no routed key after the query; outputs ignore future tokens", _no_future_leak),
    ),
)(SuperlinearSpanAttention)
