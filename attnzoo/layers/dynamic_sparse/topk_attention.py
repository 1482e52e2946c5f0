"""``topk_attention``: per-query top-k sparse attention: the softmax over each query's k highest-scoring keys, scored
exactly (``q·k``) or by Sparsifiner's low-rank connectivity predictor."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import Call, check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    check_top_k,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.registry import Reduction, register

# Score elements per chunk of queries while selecting (and while building the predictor's target).
SELECT_CHUNK_ELEMENTS = 1 << 22
SCORERS = ("exact", "predictor")
PREDICTOR_KEYS = "topk_predictor_keys"  # cache.state entry: (keys projected, their k̃, the key weight used)


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's connectivity predictor, channel part: per head, bias-free down-projections of the layer's
    queries and keys to ``rank`` dimensions, ``q̃ = q W_q^h``, ``k̃ = k W_k^h`` (``[H, head_dim, rank]`` each); the
    cheap score of a pair is ``q̃·k̃`` (cost ``O(N M rank)`` instead of ``O(N M head_dim)``).

    Initialised as one random Gaussian sketch shared by both sides (``W_q = W_k = R / √rank``, ``R`` standard
    normal), so an untrained predictor is a Johnson-Lindenstrauss estimate of ``q·k`` (``E[q̃·k̃] = q·k``).
    """

    def __init__(self, n_heads: int, head_dim: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        sketch = torch.randn(n_heads, head_dim, rank) / math.sqrt(rank)
        self.q_weight = nn.Parameter(sketch.clone())
        self.k_weight = nn.Parameter(sketch.clone())

    def project(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]`` -> ``(q̃ [B, H, N, rank], k̃ [B, H, M, rank])``."""
        return self.project_queries(q), self.project_keys(k)

    def project_queries(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, H, N, D]`` -> ``q̃`` ``[B, H, N, rank]``."""
        return torch.einsum("bhnd,hdr->bhnr", q, self.q_weight.to(q.dtype))

    def project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """``k`` ``[B, H, M, D]`` -> ``k̃`` ``[B, H, M, rank]``."""
        return torch.einsum("bhmd,hdr->bhmr", k, self.k_weight.to(k.dtype))

    @torch.no_grad()
    def set_identity_(self) -> ConnectivityPredictor:
        """Set both projections to the identity (needs ``rank == head_dim``): the predictor then scores exactly
        ``q·k`` and selects what ``scorer="exact"`` selects."""
        h, d, r = self.q_weight.shape
        if r != d:
            raise ValueError(f"rank: the identity needs rank == head_dim={d}, got {r}")
        eye = torch.eye(d, dtype=self.q_weight.dtype, device=self.q_weight.device).expand(h, d, d)
        self.q_weight.copy_(eye)
        self.k_weight.copy_(eye)
        return self


class TopKAttention(RoutedMixer):
    """Per-query top-k attention: keep the ``top_k`` keys of highest score per query and head and take the exact
    softmax of the real ``q·k`` over them only (Sparsifiner's instance-dependent unstructured mask).

    * ``scorer="exact"``: the score is ``q·k`` itself (``O(N M head_dim)`` to score).
    * ``scorer="predictor"``: the score is Sparsifiner's connectivity predictor ``q̃·k̃``
      (:class:`ConnectivityPredictor`, per-head down-projections to ``rank``, default ``head_dim // 2``), whose
      top-k per query picks the keys; the attention over them is still the exact softmax of ``q·k``.

    Selection runs in chunks of queries (memory ``O(chunk·M)`` transient, ``O(N·top_k)`` kept; under ``causal`` a
    chunk scores only the key prefix it may see, about half the pairs) and the attention
    gathers each query's keys (memory linear in ``N·top_k``, forward and backward). Ties keep the lower key index
    (``torch.topk``). A ``top_k`` above the number of keys of a call is refused (``ValueError``); ``top_k = N``
    is dense attention, and causal queries with fewer than ``top_k`` visible keys attend all of them (as do
    KV-cache decoding steps, which are not checked). Decoding with a KV cache equals the full forward with either
    scorer (a query's choice depends only on it and the keys it may see).

    The selection is non-differentiable (hard top-k): the output's gradient reaches the q/k/v/o projections, never
    the predictor. The predictor is trained by its own objective, :meth:`predictor_loss`: the KL divergence from
    the layer's dense attention ``softmax(scale q·k)`` to the predictor's ``softmax(scale q̃·k̃)`` per query (causal
    and padding masks applied), with the base projections frozen; ``trained_by_own_loss`` names its parameters.

    From the paper (abstract) and the authors' code (lim142857/Sparsifiner, ``src/models/sparsifiner.py``
    ``MaskPredictor`` and ``src/losses.py`` @90174dd, read not copied): a lightweight predictor on the layer's
    own ``q`` and ``k`` with the channels reduced (``proj_c_q``/``proj_c_k``, ``head_dim -> head_dim / 2`` by
    default), top-k of its scores per query as a detached binary mask, the exact softmax over the kept pairs, and
    an attention-reconstruction loss with a KL criterion (``kl_div(log_softmax(approx), attn)``).
    Chosen / recalled here, not the authors': per-head projections without bias (theirs: one ``nn.Linear`` shared by
    the heads, with bias; a query-side bias would shift the ranking, a key-side one would not); the Gaussian-sketch
    initialisation; the KL target is this layer's own dense attention (self-distillation; the authors' KL is against
    a teacher ViT's attention, their self-distillation uses MSE) at the layer's attention scale. Not implemented:
    the authors' token-dimension low rank (keys projected ``N -> N / 8`` by a learned ``[N, N/8]`` matrix, a softmax
    over the reduced keys, then a learned basis back to ``N`` columns, with thresholds on the basis and its
    coefficients), because it needs a fixed sequence length and mixes future keys into every score (no causal
    mask, no KV cache); their threshold rule instead of top-k, the kept CLS row, and the budget / ratio losses.
    """

    trained_by_own_loss = ("predictor.",)  # parameter-name prefixes trained by predictor_loss, not by the output

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 32, scorer: str = "exact",
                 rank: int | None = None, **kw: Any) -> None:
        """Args:
            dim: model width; n_heads: heads.
            top_k: keys kept per query and head (at most the keys of a call).
            scorer: ``"exact"`` (``q·k``) or ``"predictor"`` (Sparsifiner's low-rank connectivity predictor).
            rank: the predictor's width, ``1 <= rank <= head_dim`` (default ``head_dim // 2``, the authors'
                ``reduce_c_factor = 2``); only with ``scorer="predictor"``.
            **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
        """
        self.top_k = check_top_k(top_k)
        self.scorer = check_choice("scorer", scorer, SCORERS)
        if rank is not None and scorer != "predictor":
            raise ValueError(f"rank: only the predictor scorer has a rank; got rank={rank!r} with scorer={scorer!r}")
        if rank is not None:
            check_int("rank", rank)
        super().__init__(dim, n_heads, **kw)
        self.predictor: ConnectivityPredictor | None = None
        if scorer == "predictor":
            rank = max(1, self.head_dim // 2) if rank is None else rank
            if rank > self.head_dim:
                raise ValueError(f"rank: expected at most head_dim={self.head_dim}, got {rank}")
            self.predictor = ConnectivityPredictor(self.n_heads, self.head_dim, rank)

    def top_k_limit(self, n_keys):
        return self.top_k, n_keys, "keys"

    def selection_scores(self, q: torch.Tensor, k: torch.Tensor,
                         call: Call | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors whose product ranks the keys: ``(q, k)`` (exact) or the predictor's ``(q̃, k̃)``. While
        decoding with a KV cache (``call.cache``), the projected keys of earlier steps are kept in the cache's state
        and a step projects only its new keys, as long as the predictor's key projection is unchanged (compared by
        value: a weight changed in place starts the keys over)."""
        if self.predictor is None:
            return q, k
        cache = call.cache if call is not None else None
        if cache is None:
            return self.predictor.project(q, k)
        return self.predictor.project_queries(q), self._kept_keys(k, cache)

    def _kept_keys(self, k: torch.Tensor, cache: Any) -> torch.Tensor:
        """``k̃`` of every cached key ``[B, H, M, rank]``, the earlier ones read from ``cache.state`` (selection
        only: no gradient flows through the choice of keys)."""
        weight = self.predictor.k_weight.detach()
        done, kept, seen = cache.state.get(PREDICTOR_KEYS, (0, None, None))
        if (kept is None or done > k.shape[2] or kept.shape[:2] != k.shape[:2] or kept.dtype != k.dtype
                or kept.device != k.device or seen.device != weight.device or not torch.equal(seen, weight)):
            done, kept, seen = 0, None, weight.clone()
        with torch.no_grad():
            new = self.predictor.project_keys(k[:, :, done:])
            keys = new if kept is None else torch.cat([kept, new], 2)
        cache.state[PREDICTOR_KEYS] = (k.shape[2], keys, seen)
        return keys

    def route(self, q, k, keep, call):
        b, h, n, _ = q.shape
        m = k.shape[2]
        causal = bool(call is not None and call.causal)
        qs, ks = self.selection_scores(q, k, call)
        kk = min(self.top_k, m)
        out = torch.full((b, h, n, kk), -1, dtype=torch.int64, device=q.device)
        chunk = max(1, SELECT_CHUNK_ELEMENTS // max(b * h * m, 1))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            width = min(m, stop + m - n) if causal else m  # under causality the chunk sees only a key prefix
            s = qs[:, :, start:stop] @ ks[:, :, :width].transpose(-1, -2)
            if causal:
                pos = torch.arange(start, stop, device=q.device) + (m - n)
                s = s.masked_fill(torch.arange(width, device=q.device).view(1, -1) > pos.view(-1, 1), float("-inf"))
            if keep is not None:
                s = s.masked_fill(~keep[:, :width].view(b, 1, 1, width), float("-inf"))
            val, idx = s.topk(min(kk, width), dim=-1)
            out[:, :, start:stop, :idx.shape[-1]] = torch.where(val > float("-inf"), idx, -1)
        return Routing("keys", out)

    def predictor_loss(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                       causal: bool = False) -> torch.Tensor:
        """KL(dense attention ‖ predictor) per query, averaged over the queries and heads that see a key: the
        predictor's training objective (a scalar).

        ``x`` ``[B, N, C]``, ``mask`` bool ``[B, N]`` (True = keep; padded queries do not count). Both
        distributions are softmaxes over the keys a query may see (causal and padding masks) at the layer's
        attention scale: the target ``softmax(scale q·k)`` from the frozen base projections (no gradient), the
        prediction ``softmax(scale q̃·k̃)``; only ``predictor.*`` receives a gradient. Built in chunks of queries;
        the autograd graph keeps ``O(B·H·N·N)`` like a dense attention map (a training-time cost).
        """
        if self.predictor is None:
            raise ValueError("scorer: predictor_loss trains the predictor; this layer has scorer='exact'")
        self.check_call(x, mask, causal, None, None)
        with torch.no_grad():
            q, k, _ = self.project(x, x)
            if self.qk_transform is not None:
                q, k = self.qk_transform(q, k, q_offset=0, k_offset=0)
        scale = self.attention_scale(q)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        qp, kp = self.predictor.project(q, k)
        b, h, n, _ = q.shape
        chunk = max(1, SELECT_CHUNK_ELEMENTS // max(b * h * n, 1))
        total = q.new_zeros(())
        rows = q.new_zeros(())
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            keys = torch.arange(n, device=q.device).view(1, -1)
            allow = keys <= torch.arange(start, stop, device=q.device).view(-1, 1) if causal else keys >= 0
            allow = allow.expand(b, h, stop - start, n)
            if mask is not None:
                allow = allow & mask.view(b, 1, 1, n)
            seen = allow.any(-1)
            if mask is not None:
                seen = seen & mask[:, start:stop].view(b, 1, stop - start)
            with torch.no_grad():
                s = (q[:, :, start:stop] @ k.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
                target = torch.softmax(s.masked_fill(~seen.unsqueeze(-1), 0.0), -1) * allow
            p = (qp[:, :, start:stop] @ kp.transpose(-1, -2) * scale).masked_fill(~allow, float("-inf"))
            logp = torch.log_softmax(p.masked_fill(~seen.unsqueeze(-1), 0.0), -1)
            safe_t = torch.where(target > 0, target, torch.ones_like(target))
            kl = torch.where(target > 0, target * (safe_t.log() - logp), torch.zeros_like(target)).sum(-1)
            total = total + (kl * seen).sum()
            rows = rows + seen.sum()
        return total / rows.clamp(min=1)

    def extra_repr(self) -> str:
        rank = "" if self.predictor is None else f", rank={self.predictor.rank}"
        return f"{super().extra_repr()}, top_k={self.top_k}, scorer={self.scorer!r}{rank}"


def _k_equals_n_is_mha():
    outs, want = [], []
    x = rand_x()
    for scorer in SCORERS:
        for causal in (False, True):
            m = seeded(TopKAttention, dim=32, n_heads=4, top_k=12, scorer=scorer)
            outs.append(m(x, causal=causal))
            want.append(mha_from(m)(x, causal=causal))
    return torch.stack(outs), torch.stack(want)


def _rows_k_nonzeros_sum_one():
    got = []
    x = rand_x()
    for scorer in SCORERS:
        m = seeded(TopKAttention, dim=32, n_heads=4, top_k=3, scorer=scorer)
        _, w = m(x, return_weights=True)
        q, k, _ = m.project(x, x)
        qs, ks = m.selection_scores(q, k)
        s = qs @ ks.transpose(-1, -2)
        kth = s.topk(3, -1).values[..., -1:]
        got.append(torch.stack([((w > 0).sum(-1) <= 3).all().double(), (w.sum(-1) - 1).abs().max(),
                                w.masked_fill(s >= kth, 0).abs().max()]))
    got = torch.cat(got)
    return got, torch.tensor([1.0, 0.0, 0.0] * len(SCORERS), dtype=torch.float64)


def _identity_predictor_selects_as_exact():
    x = rand_x()
    exact = seeded(TopKAttention, dim=32, n_heads=4, top_k=3)
    pred = seeded(TopKAttention, dim=32, n_heads=4, top_k=3, scorer="predictor", rank=8)
    pred.load_state_dict(exact.state_dict(), strict=False)
    pred.predictor.set_identity_()
    got, want = [], []
    for causal in (False, True):
        got.append(pred(x, causal=causal))
        want.append(exact(x, causal=causal))
    return torch.stack(got), torch.stack(want)


register(
    "topk_attention", family=FAMILY, type="pattern", priority=2, papers=("Sparsifiner",),
    supports=SUPPORT, complexity="O(N^2 d) exact or O(N^2 rank) predictor scoring, O(N k) attention",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Per-query top-k keys by exact q·k or Sparsifiner's low-rank connectivity predictor (scorer, rank; "
            "trained by predictor_loss); exact softmax over the kept pairs only.",
    test_kwargs={**SMALL, "top_k": 4},
    reductions=(
        Reduction("k_equals_n_is_mha", "k = N equals mha (causal and not), with either scorer", _k_equals_n_is_mha),
        Reduction("rows_k_nonzeros", "each row has <= k non-zeros summing to 1, and 0 outside the top k of the "
                  "scorer (exact and predictor)", _rows_k_nonzeros_sum_one),
        Reduction("identity_predictor_is_exact", "a predictor with identity projections (rank = head dim) selects "
                  "what the exact scorer selects", _identity_predictor_selects_as_exact),
    ),
)(TopKAttention)
