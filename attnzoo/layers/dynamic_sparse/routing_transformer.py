"""``routing_transformer``: attention within content clusters found by online k-means (Routing Transformer), with
EMA-updated centroids and optional local-attention heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import (
    FAMILY,
    SMALL,
    SUPPORT,
    RoutedMixer,
    Routing,
    query_positions,
    rand_x,
)
from attnzoo.layers.testing import mha_from
from attnzoo.patterns.routed import key_routed_attention
from attnzoo.registry import Reduction, register


def dedupe_keys(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` int64 ``[..., K]`` sorted, with repeats and empty slots as ``-1`` (a key listed once)."""
    s = keys.sort(-1).values
    repeat = torch.zeros_like(s, dtype=torch.bool)
    repeat[..., 1:] = s[..., 1:] == s[..., :-1]
    return torch.where(repeat | (s < 0), -1, s)


def membership(lists: torch.Tensor, n: int, n_clusters: int) -> torch.Tensor:
    """Every token's clusters ``[B, H, N, S]`` (increasing, ``n_clusters`` as filler; ``S`` the most any token is
    in) from the cluster lists ``[B, H, C, W]`` (-1 filler)."""
    b, h, c, _ = lists.shape
    member = torch.zeros(b, h, n + 1, c, dtype=torch.bool, device=lists.device)
    idx = torch.where(lists >= 0, lists, n).transpose(2, 3)  # [B, H, W, C]
    member.scatter_(2, idx, True)
    member = member[:, :, :n]
    most = max(int(member.sum(-1).max()) if member.numel() else 0, 1)
    ar = torch.arange(c, device=lists.device)
    return torch.where(member, ar, n_clusters).sort(-1).values[..., :most]


def shared_earlier(qlists: torch.Tensor, klists: torch.Tensor, qclusters: torch.Tensor, m: int,
                   n_clusters: int) -> torch.Tensor:
    """Bool ``[B, H, C, Wq, Wk]``: query slot ``a`` and key slot ``b`` of cluster ``c`` also share a cluster
    ``c' < c`` (the pair is counted there, so the merge counts every key of a query once)."""
    b, h, c, wq = qlists.shape
    kclusters = membership(klists, m, n_clusters)  # [B, H, M, S_k]
    qc = qclusters.gather(2, qlists.clamp(min=0).reshape(b, h, -1, 1).expand(-1, -1, -1, qclusters.shape[-1]))
    kc = kclusters.gather(2, klists.clamp(min=0).reshape(b, h, -1, 1).expand(-1, -1, -1, kclusters.shape[-1]))
    qc = qc.view(b, h, c, wq, -1)
    kc = kc.view(b, h, c, klists.shape[-1], -1)
    own = torch.arange(c, device=qlists.device).view(1, 1, c, 1, 1)
    qc = torch.where(qc < own, qc, n_clusters + 1)  # only earlier clusters can match
    kc = torch.where(kc < n_clusters, kc, n_clusters + 2)
    return (qc.unsqueeze(4).unsqueeze(-1) == kc.unsqueeze(3).unsqueeze(-2)).flatten(-2).any(-1)


def cluster_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qlists: torch.Tensor, klists: torch.Tensor,
                      causal: bool, scale: float, earlier: torch.Tensor | None) -> torch.Tensor:
    """Attention of every query over the union of its clusters' keys: per cluster a dense ``Wq x Wk`` block, then
    a log-sum-exp merge per query (``earlier`` drops pairs counted in an earlier cluster). ``q`` ``[B, H, N, D]``,
    ``k``/``v`` ``[B, H, M, D]``, lists ``[B, H, C, W]`` (-1 filler); a query in no cluster returns zeros."""
    b, h, n, _ = q.shape
    m, dv, c = k.shape[2], v.shape[-1], qlists.shape[2]

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.clamp(min=0).reshape(b, h, -1, 1).expand(-1, -1, -1, t.shape[-1])
        return t.gather(2, flat).view(b, h, c, idx.shape[-1], t.shape[-1])

    ok = (qlists >= 0).unsqueeze(-1) & (klists >= 0).unsqueeze(-2)  # [B, H, C, Wq, Wk]
    if causal:
        ok = ok & (klists.unsqueeze(-2) <= (qlists + (m - n)).unsqueeze(-1))
    if earlier is not None:
        ok = ok & ~earlier
    s = (take(q, qlists) @ take(k, klists).transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
    mx = s.detach().amax(-1)  # [B, H, C, Wq]
    seen = torch.isfinite(mx)
    e = torch.exp(s - torch.where(seen, mx, torch.zeros_like(mx)).unsqueeze(-1))
    den, num = e.sum(-1), e @ take(v, klists)  # [B, H, C, Wq], [B, H, C, Wq, Dv]
    target = torch.where(qlists >= 0, qlists, n).reshape(b, h, -1)  # row n: the filler slots
    top = torch.full((b, h, n + 1), float("-inf"), dtype=mx.dtype, device=q.device)
    top = top.scatter_reduce(2, target, torch.where(seen, mx, float("-inf")).reshape(b, h, -1), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    wgt = torch.where(seen, torch.exp(mx - top.gather(2, target).view_as(mx)), torch.zeros_like(mx))
    tot = torch.zeros(b, h, n + 1, dtype=den.dtype, device=q.device).scatter_add(
        2, target, (den * wgt).reshape(b, h, -1))
    acc = torch.zeros(b, h, n + 1, dv, dtype=num.dtype, device=q.device).scatter_add(
        2, target.unsqueeze(-1).expand(-1, -1, -1, dv), (num * wgt.unsqueeze(-1)).reshape(b, h, -1, dv))
    out = acc / torch.where(tot > 0, tot, torch.ones_like(tot)).unsqueeze(-1)
    return out[:, :, :n]


def cluster_lists(cluster: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Members of every cluster: ``(lists [B, H, C, L] int64 with -1 filler, counts [B, H, C])`` from the cluster
    ``[B, H, M]`` of every key (``n_clusters``: not in any cluster)."""
    b, h, m = cluster.shape
    ar = torch.arange(m, device=cluster.device)
    order = (cluster * m + ar).argsort(-1)
    srt = cluster.gather(-1, order)
    counts = F.one_hot(cluster, n_clusters + 1).sum(2)  # [B, H, C + 1]
    start = counts.cumsum(-1) - counts
    slot = ar - start.gather(-1, srt)
    length = max(int(counts[..., :n_clusters].max()), 1)
    width = max(int(counts.max()), 1)
    out = torch.full((b, h, (n_clusters + 1) * width), -1, dtype=torch.int64, device=cluster.device)
    out.scatter_(-1, srt * width + slot, order)
    out = out.view(b, h, n_clusters + 1, width)
    return out[:, :, :n_clusters, :length], counts[..., :n_clusters]


class RoutingTransformerAttention(RoutedMixer):
    """Routing attention (Routing Transformer): queries attend the keys of their own k-means cluster.

    Queries and keys are unit-normalised per head and compared with ``n_clusters`` centroids per head
    (``x̂·μ_c``, shared by queries and keys). ``assignment="argmax"``: every query and key joins its nearest
    centroid, and a query attends the keys of its cluster (sorting by cluster makes the mask block-diagonal).
    ``assignment="balanced"``: every cluster takes the ``window`` queries and the ``window`` keys closest to its
    centroid (default ``window = ceil(N / n_clusters)``), so clusters are equal-sized, a token may sit in
    several clusters or none, and a query attends the union of its clusters' keys (one softmax; a query in no
    cluster returns zeros). ``local_heads``: the first heads attend a local window instead (the paper's mix of
    routing and local-attention heads): keys ``p - local_window < j <= p`` under ``causal``, ``|j - p| <
    local_window`` otherwise. Under ``causal`` a query also drops keys after it.

    Centroids: the buffer ``centroids`` ``[H, C, D]``, the paper's online mini-batch k-means state (like
    BatchNorm's running statistics). In training mode with ``update_centroids`` each forward routes with the
    current centroids, then sets ``μ_c <- decay·μ_c + (1 - decay)·normalize(mean of the normalised queries
    and keys (kept tokens, this call's new tokens) whose nearest centroid is c)``; a centroid no vector chose
    keeps its value. The update is deterministic given the inputs and happens nowhere else (eval mode and
    ``update_centroids=False`` leave the buffer as it is; nothing else of the call stays on the module).
    The routing is non-differentiable (the centroids get no gradient; k-means is the paper's training
    signal for them).
    ``backend="auto"`` runs the clustered form (:meth:`cluster_attend`: a dense block per cluster, merged per
    query by log-sum-exp, work ``O(C·W²)`` per head); ``"reference"`` / ``"gather"`` / ``"sdpa"`` / ``"flex"``
    run the same routing as per-query key lists on the routed-attention op (all equal in float64).

    Sources: the abstract (online k-means routing, O(n^1.5 d)); lucidrains/routing-transformer (read, a peer
    implementation: per-head centroids, cosine similarity to them, argmax buckets, balanced top-``window``
    tokens per cluster, the normalised-mean EMA update with decay 0.999, local heads). Recalled, not checked
    against the paper: the exact EMA form (the paper may weight query and key sums by ``(1 - decay)/2``).
    Differences: lucidrains averages a query's per-cluster outputs, here one softmax runs over the union;
    its data-dependent centroid initialisation (k-means iterations on the first batch, a per-call state
    change) and the commitment loss are not implemented (centroids start as random unit vectors).
    ``balanced`` membership is decided over the whole call: with ``causal`` the keys a token attends would
    depend on later tokens (whether a past key makes its cluster's top-``window`` depends on every token), so
    causal calls and KV-cache decoding are refused for it; ``argmax`` routes every token on its own, is causal
    and decodes token by token.

    Args:
        dim, n_heads: as ``mha``.
        n_clusters: centroids per head (about ``sqrt(N)`` in the paper).
        assignment: ``"balanced"`` or ``"argmax"``.
        window: tokens per cluster for ``"balanced"`` (None: ``ceil(N / n_clusters)``; at most ``N``).
        decay: the EMA decay of the centroids.
        update_centroids: EMA-update the centroids in training mode (False: frozen, e.g. trained ones).
        local_heads, local_window: heads that attend a local window, and its size.
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, n_clusters: int = 8, assignment: str = "balanced",
                 window: int | None = None, decay: float = 0.999, update_centroids: bool = True,
                 local_heads: int = 0, local_window: int = 64, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.n_clusters = check_int("n_clusters", n_clusters)
        self.assignment = check_choice("assignment", assignment, ("balanced", "argmax"))
        self.window = None if window is None else check_int("window", window)
        if window is not None and assignment != "balanced":
            raise ValueError(f"window: only assignment='balanced' takes a window, got window={window} with "
                             f"assignment={assignment!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a float in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.update_centroids = bool(update_centroids)
        self.local_heads = check_int("local_heads", local_heads, minimum=0)
        if local_heads > n_heads:
            raise ValueError(f"local_heads: expected at most n_heads={n_heads}, got {local_heads}")
        self.local_window = check_int("local_window", local_window)
        self.register_buffer("centroids", F.normalize(torch.randn(n_heads, n_clusters, self.head_dim), dim=-1))

    # Routing -------------------------------------------------------------------------------
    def similarity(self, t: torch.Tensor) -> torch.Tensor:
        """``x̂·μ_c`` ``[B, H, N, C]`` of ``t`` ``[B, H, N, D]`` (unit-normalised) with every centroid."""
        return torch.einsum("bhnd,hcd->bhnc", F.normalize(t, dim=-1), self.centroids.to(t.dtype))

    def call_window(self, n: int) -> int:
        """Tokens per cluster of a balanced call on ``n`` tokens."""
        return -(-n // self.n_clusters) if self.window is None else self.window

    def clusters(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, call: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qlists [B, H, C, Wq], klists [B, H, C, Wk], qclusters [B, H, N, S])``: every cluster's queries and
        keys (-1 filler) and every query's clusters (``C``: filler; one per query for ``argmax``)."""
        b, h, n, _ = q.shape
        m, c = k.shape[2], self.n_clusters
        sq, sk = self.similarity(q), self.similarity(k)
        if keep is not None:
            sk = sk.masked_fill(~keep.view(b, 1, m, 1), float("-inf"))
        if self.assignment == "argmax":
            cq = sq.argmax(-1)
            ck = torch.where(torch.isfinite(sk[..., 0]), sk.argmax(-1), c)
            return cluster_lists(cq, c)[0], cluster_lists(ck, c)[0], cq.unsqueeze(-1)
        qkeep = call.mask if call is not None else None  # padded queries take no cluster's slot
        if qkeep is not None:
            sq = sq.masked_fill(~qkeep.view(b, 1, n, 1), float("-inf"))
        w = self.call_window(n)
        qval, qsel = sq.topk(w, dim=2)  # [B, H, w, C]: the queries of every cluster
        kval, ksel = sk.topk(min(w, m), dim=2)
        qlists = torch.where(torch.isfinite(qval), qsel, -1).transpose(2, 3)  # [B, H, C, w]
        klists = torch.where(torch.isfinite(kval), ksel, -1).transpose(2, 3)
        return qlists, klists, membership(qlists, n, c)

    def route(self, q, k, keep, call):
        b, h, n, _ = q.shape
        m = k.shape[2]
        _, klists, qclusters = self.clusters(q, k, keep, call)
        padded = torch.cat([klists, torch.full_like(klists[:, :, :1], -1)], 2)  # [B, H, C + 1, Wk]
        keys = padded.gather(2, qclusters.reshape(b, h, -1, 1).expand(-1, -1, -1, padded.shape[-1]))
        keys = keys.view(b, h, n, -1)
        if self.assignment == "balanced":
            keys = dedupe_keys(keys)
        if self.local_heads:
            keys = self._with_local_heads(keys, n, m, bool(call is not None and call.causal))
        return Routing("keys", keys)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if want_weights or self.backend != "auto":
            out = super().attend(q, k, v, pattern, want_weights, call=call)
        else:
            out = self.cluster_attend(q, k, v, call), None
        if self.training and self.update_centroids:
            n, m = q.shape[2], k.shape[2]
            keep = call.kv_keep if call is not None else None
            self.centroids.copy_(self.updated_centroids(q, k[:, :, m - n:], call.mask if call is not None else None,
                                                        None if keep is None else keep[:, m - n:]))
        return out

    def cluster_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any) -> torch.Tensor:
        """The clustered form (``backend="auto"``): each cluster attends its queries to its keys densely and a
        query in several clusters merges its partial results by log-sum-exp, a key shared by two of its
        clusters counted once (work ``O(C·Wq·Wk)`` per head); local heads run on the key-routed op. Equal to
        one softmax over the union of the query's clusters' keys (the routed reference)."""
        b, h, n, _ = q.shape
        m = k.shape[2]
        causal = bool(call is not None and call.causal)
        keep = call.kv_keep if call is not None else None
        keep = None if keep is None or bool(keep.all()) else keep
        scale = self.attention_scale(q)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        lh = self.local_heads
        with torch.no_grad():
            qlists, klists, qclusters = self.clusters(q.detach(), k.detach(), keep, call)
        outs = []
        if lh:
            keys = self._with_local_heads(torch.full((b, h, n, 1), -1, dtype=torch.int64, device=q.device), n, m,
                                          causal)[:, :lh]
            if keep is not None:
                keys = torch.where(keep.gather(1, keys.clamp(min=0).reshape(b, -1)).view_as(keys), keys, -1)
            outs.append(key_routed_attention(q[:, :lh], k[:, :lh], v[:, :lh], keys, causal=causal, scale=scale))
        if lh < h:
            sl = slice(lh, h)
            earlier = None
            if self.assignment == "balanced":
                earlier = shared_earlier(qlists[:, sl], klists[:, sl], qclusters[:, sl], m, self.n_clusters)
            outs.append(cluster_attention(q[:, sl], k[:, sl], v[:, sl], qlists[:, sl], klists[:, sl], causal, scale,
                                          earlier))
        return torch.cat(outs, 1)

    def _with_local_heads(self, keys: torch.Tensor, n: int, m: int, causal: bool) -> torch.Tensor:
        w = self.local_window
        pos = query_positions(n, m, keys.device).view(-1, 1)
        off = torch.arange(-w + 1, 1 if causal else w, device=keys.device).view(1, -1)
        j = pos + off
        local = torch.where((j >= 0) & (j < m), j, -1)  # [N, K_local]
        b, h = keys.shape[:2]
        width = max(keys.shape[-1], local.shape[-1])
        keys = F.pad(keys, (0, width - keys.shape[-1]), value=-1)
        local = F.pad(local, (0, width - local.shape[-1]), value=-1).expand(b, self.local_heads, n, width)
        return torch.cat([local, keys[:, self.local_heads:]], 1)

    @torch.no_grad()
    def updated_centroids(self, q: torch.Tensor, k: torch.Tensor, q_keep: torch.Tensor | None,
                          k_keep: torch.Tensor | None) -> torch.Tensor:
        """The centroids after one EMA step on ``q`` ``[B, H, N, D]`` and ``k`` ``[B, H, N', D]`` (kept tokens):
        ``decay·μ_c + (1 - decay)·normalize(mean of the unit vectors whose nearest centroid is c)``, ``μ_c``
        unchanged where no vector chose ``c``. Pure: the caller stores the result (see the class docstring)."""
        mu = self.centroids
        vecs, weights = [], []
        for t, keep in ((q, q_keep), (k, k_keep)):
            x = F.normalize(t.to(mu.dtype), dim=-1)
            near = F.one_hot(torch.einsum("bhnd,hcd->bhnc", x, mu).argmax(-1), self.n_clusters).to(mu.dtype)
            if keep is not None:
                near = near * keep.view(keep.shape[0], 1, -1, 1).to(mu.dtype)
            vecs.append(torch.einsum("bhnc,bhnd->hcd", near, x))
            weights.append(near.sum((0, 2)))
        total, count = vecs[0] + vecs[1], weights[0] + weights[1]  # [H, C, D], [H, C]
        mean = F.normalize(total / count.clamp(min=1).unsqueeze(-1), dim=-1)
        moved = self.decay * mu + (1.0 - self.decay) * mean
        return torch.where((count > 0).unsqueeze(-1), moved, mu)

    # Forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, cache: Any = None,
                head_mask: torch.Tensor | None = None, return_weights: bool = False):
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (the :class:`~attnzoo.layers.base.AttentionMixer` contract:
        ``mask`` bool ``[B, N]``, True = keep; ``causal``; ``cache`` a KVCache with ``assignment="argmax"``); a
        balanced call checks ``window <= N`` and refuses ``cache`` before any work."""
        if self.assignment == "balanced":
            if causal:
                raise ValueError("causal: assignment='balanced' picks each cluster's tokens over the whole call, so "
                                 "the keys a token attends would depend on later tokens; use assignment='argmax' "
                                 "for causal calls (it also decodes with a KV cache)")
            if cache is not None:
                raise ValueError("cache: assignment='balanced' picks each cluster's tokens over the whole call; "
                                 "decode with assignment='argmax'")
            if isinstance(x, torch.Tensor) and x.dim() == 3 and self.call_window(x.shape[1]) > x.shape[1]:
                raise ValueError(f"window: expected at most the number of tokens of this call ({x.shape[1]}), "
                                 f"got {self.window}")
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                               cache=cache, head_mask=head_mask, return_weights=return_weights)

    @property
    def cab_not_applicable(self) -> dict[str, str]:
        """CAB's causal patterns for ``assignment="balanced"``, which refuses causal calls (see the class)."""
        if self.assignment != "balanced":
            return {}
        why = ("assignment='balanced' refuses causal calls (a cluster's tokens are chosen over the whole call); "
               "assignment='argmax' is causal")
        return {"CS": why, "CC": why}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_clusters={self.n_clusters}, assignment={self.assignment!r}, "
                f"window={self.window}, decay={self.decay}, update_centroids={self.update_centroids}, "
                f"local_heads={self.local_heads}, local_window={self.local_window}")


# Reductions -------------------------------------------------------------------------------------
def _one_cluster_is_mha():
    got, want = [], []
    x = rand_x(n=13)
    for assignment, causal in (("argmax", False), ("argmax", True), ("balanced", False)):
        m = seeded(RoutingTransformerAttention, dim=32, n_heads=4, n_clusters=1, assignment=assignment)
        got.append(m(x, causal=causal))
        want.append(mha_from(m)(x, causal=causal))
    return torch.stack(got), torch.stack(want)


def _cross_cluster_weights_zero_block_diagonal():
    """argmax: every weight between a query and a key of another cluster is 0, and sorting queries and keys by
    cluster makes each head's mask block-diagonal (a query's row is exactly its cluster's keys)."""
    m = seeded(RoutingTransformerAttention, dim=32, n_heads=4, n_clusters=3, assignment="argmax").eval()
    x = rand_x(n=16)
    _, w = m(x, return_weights=True)
    q, k, _ = m.project(x, x)
    cq, ck = m.similarity(q).argmax(-1), m.similarity(k).argmax(-1)  # [B, H, N]
    same = cq.unsqueeze(-1) == ck.unsqueeze(-2)
    oq, ok = cq.argsort(dim=-1, stable=True), ck.argsort(dim=-1, stable=True)
    support = (w > 0).gather(2, oq.unsqueeze(-1).expand_as(w)).gather(3, ok.unsqueeze(-2).expand_as(w))
    sq, sk = cq.gather(-1, oq), ck.gather(-1, ok)
    block = sq.unsqueeze(-1) == sk.unsqueeze(-2)  # block-diagonal by construction of the sorted labels
    got = torch.stack([w.masked_fill(same, 0).abs().max(), (support != block).double().sum()])
    return got, torch.zeros(2, dtype=torch.float64)


def _centroid_update_is_ema_of_assigned():
    m = seeded(RoutingTransformerAttention, dim=32, n_heads=4, n_clusters=3, decay=0.9).train()
    x = rand_x(n=10)
    before = m.centroids.clone()
    q, k, _ = m.project(x, x)
    m(x)
    want = torch.empty_like(before)
    for h in range(4):
        vecs = torch.cat([F.normalize(t[:, h].reshape(-1, 8), dim=-1) for t in (q, k)])  # [2 B N, D]
        near = (vecs @ before[h].T).argmax(-1)
        for c in range(3):
            chosen = vecs[near == c]
            want[h, c] = before[h, c] if len(chosen) == 0 else \
                0.9 * before[h, c] + 0.1 * F.normalize(chosen.mean(0), dim=0)
    return m.centroids, want


register(
    "routing_transformer", family=FAMILY, type="pattern", priority=2, papers=("Routing Transformer",),
    supports=SUPPORT, complexity="O(N^1.5 d)",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Online k-means routing: queries attend keys of their own cluster (balanced top-w or argmax), "
            "EMA-updated centroids in training, optional local heads.",
    # argmax routes each token on its own (causal prefix, KV-cache decoding); frozen centroids make the module a
    # function of its input, as the suite's repeated calls need; the EMA update has its own reduction and tests
    test_kwargs={**SMALL, "n_clusters": 3, "assignment": "argmax", "local_heads": 1, "local_window": 3,
                 "update_centroids": False},
    reductions=(
        Reduction("one_cluster_is_mha", "one cluster equals mha (argmax causal and not; balanced, non-causal)",
                  _one_cluster_is_mha),
        Reduction("cross_cluster_zero_block_diagonal", "weights across clusters are 0; sorted by cluster the "
                  "mask is block-diagonal", _cross_cluster_weights_zero_block_diagonal),
        Reduction("centroid_update_is_ema", "in training each centroid moves to the EMA of its assigned "
                  "(normalised) vectors; unassigned ones stay", _centroid_update_is_ema_of_assigned),
    ),
)(RoutingTransformerAttention)
