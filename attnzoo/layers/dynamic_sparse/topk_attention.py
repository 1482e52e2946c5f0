"""``topk_attention``: per-query top-k sparse attention: the softmax over each query's k highest-scoring keys."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_choice, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    causal_allow,
    check_top_k,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register

# Score elements per chunk of queries while selecting.
SELECT_CHUNK_ELEMENTS = 1 << 22


class TopKAttention(RoutedMixer):
    """Per-query top-k attention: keep the ``top_k`` keys of highest ``q·k`` per query and head (``scorer="exact"``)
    and take the softmax over them only (Sparsifiner's instance-dependent unstructured mask).

    Selection runs in chunks of queries (memory ``O(chunk·M)`` transient, ``O(N·top_k)`` kept) and the attention
    gathers each query's keys (memory linear in ``N·top_k``, forward and backward). Ties keep the lower key index
    (``torch.topk``). A ``top_k`` above the number of keys of a call is refused (``ValueError``); ``top_k = N``
    is dense attention, and causal queries with fewer than ``top_k`` visible keys attend all of them (as do
    KV-cache decoding steps, which are not checked). The
    selection is non-differentiable (hard top-k). ``scorer="predictor"`` (Sparsifiner's low-rank connectivity
    predictor, trained with its own loss) is not implemented and is refused.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 32, scorer: str = "exact", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.top_k = check_top_k(top_k)
        self.scorer = check_choice("scorer", scorer, ("exact",))

    def top_k_limit(self, n_keys):
        return self.top_k, n_keys, "keys"

    def route(self, q, k, keep, call):
        b, h, n, _ = q.shape
        m = k.shape[2]
        causal = bool(call is not None and call.causal)
        kk = min(self.top_k, m)
        out = torch.empty(b, h, n, kk, dtype=torch.int64, device=q.device)
        chunk = max(1, SELECT_CHUNK_ELEMENTS // max(b * h * m, 1))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            s = q[:, :, start:stop] @ k.transpose(-1, -2)
            if causal:
                s = s.masked_fill(~causal_allow(n, m, q.device)[start:stop], float("-inf"))
            if keep is not None:
                s = s.masked_fill(~keep.view(b, 1, 1, m), float("-inf"))
            val, idx = s.topk(kk, dim=-1)
            out[:, :, start:stop] = torch.where(val > float("-inf"), idx, -1)
        return Routing("keys", out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, scorer={self.scorer!r}"


def _k_equals_n_is_mha():
    outs, want = [], []
    x = rand_x()
    for causal in (False, True):
        m = seeded(TopKAttention, dim=32, n_heads=4, top_k=12)
        outs.append(m(x, causal=causal))
        want.append(mha_from(m)(x, causal=causal))
    return torch.stack(outs), torch.stack(want)


def _rows_k_nonzeros_sum_one():
    m = seeded(TopKAttention, dim=32, n_heads=4, top_k=3)
    x = rand_x()
    _, w = m(x, return_weights=True)
    q, k, _ = m.project(x, x)
    s = q @ k.transpose(-1, -2)
    kth = s.topk(3, -1).values[..., -1:]
    got = torch.stack([((w > 0).sum(-1) <= 3).all().double(), (w.sum(-1) - 1).abs().max(),
                       w.masked_fill(s >= kth, 0).abs().max()])
    return got, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)


register(
    "topk_attention", family=FAMILY, type="pattern", priority=2, papers=("Sparsifiner",),
    supports=SUPPORT, complexity="O(N^2) scoring, O(N k) attention",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Per-query top-k keys by exact q·k; softmax over the kept pairs only.",
    test_kwargs={**SMALL, "top_k": 4},
    reductions=(
        Reduction("k_equals_n_is_mha", "k = N equals mha (causal and not)", _k_equals_n_is_mha),
        Reduction("rows_k_nonzeros", "each row has <= k non-zeros summing to 1, and 0 outside the top k",
                  _rows_k_nonzeros_sum_one),
    ),
)(TopKAttention)
