"""Routed attention: each route (a head, an expert) attends only the queries routed to it.

:func:`gather_routes` turns a selection ``sel`` ``[B, N, R]`` (token n goes to route r) into
per-route token lists; :func:`routed_attention_reference` is the float64 oracle of attending
the gathered queries ``[B, R, C, D]`` to all keys, causality following each query's true key
position ``qpos`` (``-1``: an empty slot). The fast form, which needs a pattern
(:class:`~attnzoo.patterns.routed.GatheredCausal`), is :func:`attnzoo.patterns.routed.routed_attention`.
Mixture-of-heads (``moh``'s ``dispatch="gather"``) is the first user.
"""

from __future__ import annotations

import torch

__all__ = [
    "GATHER_CHUNK", "GATHER_MAX_FRACTION", "GATHER_MIN_TOKENS", "gather_pays", "gather_routes",
    "routed_attention_reference",
]

# Gather dispatch pays when each routed head is picked by at most this fraction of the tokens
# and the call has at least this many query tokens (benchmarks/bench_moh.py, RESULTS.md).
GATHER_MAX_FRACTION = 0.4
GATHER_MIN_TOKENS = 256
GATHER_CHUNK = 128


def gather_pays(fraction: float, n_tokens: int) -> bool:
    """Whether gathering beats computing every route densely (measured on CPU, see the thresholds)."""
    return fraction <= GATHER_MAX_FRACTION and n_tokens >= GATHER_MIN_TOKENS


def gather_routes(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-route token lists of a selection ``sel`` bool ``[B, N, R]``.

    Returns ``idx`` ``[B, R, C]`` (the tokens of each route in increasing order, then filler),
    ``valid`` bool ``[B, R, C]`` (which slots hold a token) and ``counts`` ``[B, R]``, with
    ``C`` the largest count (0 when nothing is selected).
    """
    b, n, _ = sel.shape
    counts = sel.sum(1)
    c = int(counts.max()) if counts.numel() else 0
    ar = torch.arange(n, device=sel.device).view(1, n, 1)
    idx = torch.where(sel, ar, ar + n).argsort(dim=1)[:, :c].transpose(1, 2)
    valid = torch.arange(c, device=sel.device).view(1, 1, c) < counts.unsqueeze(-1)
    return idx, valid, counts


def routed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, *,
                               causal: bool, keep: torch.Tensor | None = None,
                               scale: float | None = None) -> torch.Tensor:
    """Float64 oracle of :func:`attnzoo.patterns.routed.routed_attention`: one dense masked softmax per slot.

    A slot sees key ``j`` when ``keep[b, j]`` and, if ``causal``, ``j <= qpos``; a slot with
    ``qpos = -1`` under ``causal`` (or that sees no key) returns zeros.
    """
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("brcd,brmd->brcm", q, k) * scale
    m = k.shape[2]
    allow = torch.ones_like(s, dtype=torch.bool)
    if keep is not None:
        allow = allow & keep.view(keep.shape[0], 1, 1, m)
    if causal:
        allow = allow & (torch.arange(m, device=q.device).view(1, 1, 1, m) <= qpos.unsqueeze(-1))
    s = s.masked_fill(~allow, float("-inf"))
    seen = allow.any(-1, keepdim=True)
    p = torch.softmax(torch.where(seen, s, torch.zeros_like(s)), -1) * allow
    return torch.einsum("brcm,brmd->brcd", p, v)
