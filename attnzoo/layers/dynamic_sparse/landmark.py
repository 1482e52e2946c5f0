"""``landmark``: Landmark attention: a landmark token closes each block and gates its block's tokens through a grouped
softmax; at inference each query retrieves its top-k blocks by landmark score, plus a local window of blocks."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import check_int, seeded
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
from attnzoo.registry import Reduction, register


def landmark_mask(n: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[n]``: True at the landmark positions (the last of every ``block_size + 1`` tokens)."""
    return torch.arange(n, device=device) % (block_size + 1) == block_size


def insert_landmarks(x: torch.Tensor, landmark: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` ``[B, N, C]`` with ``landmark`` ``[C]`` inserted after every ``block_size`` tokens:
    ``[B, N + N // block_size, C]`` (a trailing partial block gets no landmark)."""
    check_int("block_size", block_size)
    if landmark.shape != x.shape[-1:]:
        raise ValueError(f"landmark: expected shape [{x.shape[-1]}], got {list(landmark.shape)}")
    b, n, c = x.shape
    full = n // block_size
    blocks = x[:, :full * block_size].view(b, full, block_size, c)
    lm = landmark.to(x.dtype).view(1, 1, 1, c).expand(b, full, 1, c)
    return torch.cat([torch.cat([blocks, lm], 2).view(b, -1, c), x[:, full * block_size:]], 1)


def drop_landmarks(y: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of :func:`insert_landmarks` on the outputs: ``[B, N', C]`` without the landmark positions."""
    return y[:, ~landmark_mask(y.shape[1], block_size, y.device)]


class LandmarkAttention(RoutedMixer):
    """Landmark attention over a sequence that carries a landmark token after every ``block_size`` tokens
    (positions ``p`` with ``p % (block_size + 1) == block_size``; :func:`insert_landmarks` builds such inputs).

    Grouped softmax (training mode, ``top_k=None``): a query in block ``c`` takes one softmax over the regular tokens
    of its own block (its *section*; under ``causal`` those up to itself) and the landmarks of the other blocks
    (under ``causal`` the earlier ones); a landmark's weight is shared among its block's regular tokens by a softmax
    over that block alone. Landmarks carry no value (their own weight goes to their block), and a query never sees
    its own block's landmark. A trailing block without landmark is seen only by its own queries.

    Retrieval (``top_k`` set): each query and head keeps the ``top_k`` blocks of highest landmark score ``q·k_ℓ``
    among those outside its local window, plus the ``window`` blocks just before its own (non-causal: within
    ``window`` blocks on either side), and runs the same grouped softmax over them: retrieving every block is
    exactly training mode; tokens attended per query = ``top_k·block_size + window·block_size`` + its section
    (whatever the length). The choice is a hard top-k without gradient (as in the paper); landmark keys learn
    through the grouped softmax. Backends: training mode and ``return_weights`` run densely (memory ``O(N·M)``);
    retrieval gathers each query's used blocks (``"auto"``/``"gather"``: memory ``O(N·(top_k + window + 1)·
    (block_size + 1))`` besides the landmark scores ``O(N·M / block_size)``); ``"reference"`` is the dense form in
    float64.

    From the paper (Mohtashami & Jaggi) and the authors' code (epfml/landmark-attention ``models/landmark.py``,
    ``models/caches/mem_cache.py`` @78ec517, read not copied): the grouped softmax (the current section and the
    other blocks' landmarks in one softmax, each landmark gating its block, the own landmark ignored), retrieval of
    the top-k blocks per token and head by landmark attention, retrieved blocks entering the same grouped softmax.
    This library's choices: ``window`` counted in blocks, the non-causal generalisation, no KV offloading and no
    ``max_over_heads`` selection.

    Args:
        dim, n_heads: as ``mha``.
        block_size: regular tokens per block (a landmark follows each).
        top_k: retrieved blocks per query (None: training mode, every block).
        window: local blocks always retrieved besides the own block (retrieval mode).
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, block_size: int = 50, top_k: int | None = None,
                 window: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.block_size = check_int("block_size", block_size)
        self.top_k = None if top_k is None else check_top_k(top_k)
        self.window = check_int("window", window, minimum=0)

    def top_k_limit(self, n_keys):
        if self.top_k is None:
            return None
        return self.top_k, -(-n_keys // (self.block_size + 1)), f"blocks of {self.block_size} + 1 landmark"

    def route(self, q, k, keep, call):
        """Blocks each query uses, bool ``[B, H, N, nb]`` (its own block included), as a routing over blocks of
        ``block_size + 1`` keys."""
        causal = bool(call is not None and call.causal)
        b, h, n, _ = q.shape
        m, span = k.shape[2], self.block_size + 1
        nb = -(-m // span)
        own = (query_positions(n, m, q.device) // span).view(-1, 1)
        blk = torch.arange(nb, device=q.device).view(1, -1)
        has_lm = (blk + 1) * span <= m  # blocks closed by a landmark
        other = (blk < own) if causal else (blk != own)
        other = other & has_lm
        if self.top_k is None:
            chosen = other.expand(b, h, n, nb)
        else:
            local = other & ((own - blk).abs() <= self.window)
            lm_idx = (torch.arange(nb, device=q.device) * span + self.block_size).clamp(max=m - 1)
            score = q @ k[:, :, lm_idx].transpose(-1, -2)  # [B, H, N, nb]
            cand = other & ~local
            if keep is not None:
                cand = cand & keep[:, lm_idx].view(b, 1, 1, nb)
            score = score.masked_fill(~cand, float("-inf"))
            val, idx = score.topk(min(self.top_k, nb), dim=-1)
            top = torch.zeros(b, h, n, nb, dtype=torch.bool, device=q.device).scatter_(-1, idx, val > float("-inf"))
            chosen = top | local
        return Routing("blocks", chosen | (blk == own), 1, span)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        causal = bool(call is not None and call.causal)
        keep = call.kv_keep if call is not None else None
        keep = None if keep is not None and bool(keep.all()) else keep
        with torch.no_grad():
            routing = self.route(q.detach(), k.detach(), keep, call)
        scale = self.attention_scale(q)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.backend == "reference":
            z, w = grouped_softmax_attention(q.double(), k.double(), v.double(), routing.index, self.block_size,
                                             causal, keep, scale)
            return z.to(q.dtype), (w.to(q.dtype) if want_weights else None)
        if want_weights or self.top_k is None or self.backend not in ("auto", "gather"):
            z, w = grouped_softmax_attention(q, k, v, routing.index, self.block_size, causal, keep, scale)
            return z, (w if want_weights else None)
        return gathered_grouped_softmax(q, k, v, routing.index, self.block_size, causal, keep, scale), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}, top_k={self.top_k}, window={self.window}"


def grouped_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block_size: int,
                              causal: bool, keep: torch.Tensor | None, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmark grouped-softmax attention: ``(out [B, H, N, D_v], weights [B, H, N, M])``.

    ``q`` ``[B, H, N, D]`` (the last ``N`` of the ``M`` positions), ``k``/``v`` ``[B, H, M, D]``; ``blocks`` bool
    ``[B, H, N, nb]`` the blocks (of ``block_size + 1`` keys, the last one a landmark) each query uses, its own
    included; ``keep`` bool ``[B, M]`` key padding. Rows that see nothing give zeros.
    """
    b, h, n, _ = q.shape
    m, span = k.shape[2], block_size + 1
    nb = blocks.shape[-1]
    pos = query_positions(n, m, q.device)
    kpos = torch.arange(m, device=q.device)
    kblk, is_lm = kpos // span, kpos % span == block_size
    own = (pos // span).view(-1, 1)
    visible = causal_allow(n, m, q.device) if causal else torch.ones(n, m, dtype=torch.bool, device=q.device)
    visible = visible.view(1, 1, n, m)
    if keep is not None:
        visible = visible & keep.view(b, 1, 1, m)
    used = blocks.gather(-1, kblk.view(1, 1, 1, m).expand(b, h, n, m))  # the key's block is used by the query
    mine = kblk.view(1, -1) == own
    section = visible & used & mine & ~is_lm
    gates = visible & used & ~mine & is_lm
    s = q @ k.transpose(-1, -2) * scale
    top_allow = section | gates
    p_top = _masked_softmax(s, top_allow)
    # inner softmax over each other block's regular tokens, padded to whole blocks
    pad = nb * span - m
    member = used & ~mine.view(1, 1, n, m) & ~is_lm & (keep.view(b, 1, 1, m) if keep is not None else True)
    member = member.expand(b, h, n, m)
    s_blk = torch.nn.functional.pad(s, (0, pad)).view(b, h, n, nb, span)
    mem_blk = torch.nn.functional.pad(member, (0, pad)).view(b, h, n, nb, span)
    inner = _masked_softmax(s_blk, mem_blk)
    gate = torch.nn.functional.pad(p_top, (0, pad)).view(b, h, n, nb, span)[..., block_size:block_size + 1]
    w_other = (inner * gate).view(b, h, n, nb * span)[..., :m]
    w = torch.where(section, p_top, torch.zeros_like(p_top)) + w_other
    return w @ v, w


def gathered_grouped_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
                             block_size: int, causal: bool, keep: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`grouped_softmax_attention`'s output computed on each query's used blocks only, gathered: memory and work
    linear in ``N x`` (used blocks ``x (block_size + 1)``), autograd gives the backward (retrieval mode's path)."""
    b, h, n, d = q.shape
    m, span = k.shape[2], block_size + 1
    nb = blocks.shape[-1]
    ar = torch.arange(nb, device=q.device)
    r = max(int(blocks.sum(-1).max()), 1)
    idx = torch.where(blocks, ar, nb).sort(-1).values[..., :r]  # [B, H, N, R], nb = empty slot
    slot = idx < nb
    kpos = idx.unsqueeze(-1) * span + torch.arange(span, device=q.device)  # [B, H, N, R, span]
    ok = slot.unsqueeze(-1) & (kpos < m)
    pos = query_positions(n, m, q.device).view(1, 1, n, 1, 1)
    if causal:
        ok = ok & (kpos <= pos)
    flat = kpos.clamp(max=m - 1).reshape(b, h, n * r * span)
    if keep is not None:
        ok = ok & keep.gather(1, flat.reshape(b, -1)).view(b, h, n, r, span)
    kg = k.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, d)).view(b, h, n, r, span, d)
    vg = v.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1])).view(b, h, n, r, span, v.shape[-1])
    s = torch.einsum("bhnd,bhnrsd->bhnrs", q, kg) * scale
    mine = (idx == pos.view(1, 1, n, 1) // span).unsqueeze(-1)
    is_lm = (torch.arange(span, device=q.device) == block_size).view(1, 1, 1, 1, span)
    section = ok & mine & ~is_lm
    gates = ok & ~mine & is_lm
    top_allow = (section | gates).view(b, h, n, r * span)
    p_top = _masked_softmax(s.reshape(b, h, n, r * span), top_allow).view(b, h, n, r, span)
    inner = _masked_softmax(s, ok & ~mine & ~is_lm)
    w = torch.where(section, p_top, torch.zeros_like(p_top)) + inner * p_top[..., block_size:]
    return torch.einsum("bhnrs,bhnrsd->bhnd", w, vg)


def _masked_softmax(s: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
    s = s.masked_fill(~allow, float("-inf"))
    seen = allow.any(-1, keepdim=True)
    return torch.softmax(torch.where(seen, s, torch.zeros_like(s)), -1) * allow


def _grouped_softmax_by_hand(m: LandmarkAttention, x: torch.Tensor) -> torch.Tensor:
    """Training-mode grouped softmax written one query at a time from the paper's definition (float64)."""
    q, k, v = (t.double() for t in m.project(x, x))
    b, h, n, d = q.shape
    span = m.block_size + 1
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for i in range(n):
        c = i // span
        sec = [j for j in range(c * span, i + 1) if j % span != m.block_size]
        lms = [bb * span + m.block_size for bb in range(c)]
        p = torch.softmax((q[:, :, i:i + 1] @ k[:, :, sec + lms].transpose(-1, -2))[:, :, 0] * d ** -0.5, -1)
        out[:, :, i] = (p[..., :len(sec)].unsqueeze(-2) @ v[:, :, sec])[:, :, 0]
        for t, bb in enumerate(range(c)):
            toks = list(range(bb * span, bb * span + m.block_size))
            inner = torch.softmax((q[:, :, i:i + 1] @ k[:, :, toks].transpose(-1, -2))[:, :, 0] * d ** -0.5, -1)
            out[:, :, i] += p[..., len(sec) + t:len(sec) + t + 1] * (inner.unsqueeze(-2) @ v[:, :, toks])[:, :, 0]
    return m.output(out, x)


def _every_block_is_grouped_softmax():
    x = rand_x(n=14)
    train = seeded(LandmarkAttention, dim=32, n_heads=4, block_size=3)
    retrieve = seeded(LandmarkAttention, dim=32, n_heads=4, block_size=3, top_k=4)
    got = torch.stack([retrieve(x, causal=True), train(x, causal=True)])
    return got, torch.stack([train(x, causal=True), _grouped_softmax_by_hand(train, x)])


def _tokens_per_step():
    m = seeded(LandmarkAttention, dim=32, n_heads=4, block_size=3, top_k=2, window=1)
    counts = []
    for n in (24, 40):
        x = rand_x(n=n)
        _, w = m(x, causal=True, return_weights=True)
        regular = ~landmark_mask(n, 3)
        last = n - 3  # the second token of the last block: a section of 2 tokens
        counts.append(((w[:, :, last] > 0) & regular).sum(-1).double())
    want = torch.full_like(counts[0], 2 * 3 + 1 * 3 + 2)
    return torch.stack(counts), torch.stack([want, want])


register(
    "landmark", family=FAMILY, type="pattern", priority=3, papers=("Landmark Attention",),
    supports=SUPPORT, complexity="O(N M) scores; k·L + window tokens attended per query",
    backends=("reference", "gather", "torch"),
    summary="Landmark attention: a landmark token per block gates the block through a grouped softmax; inference "
            "retrieves each query's top-k blocks by landmark score plus a local window.",
    test_kwargs={**SMALL, "block_size": 2, "top_k": 1, "window": 1},
    reductions=(
        Reduction("every_block_is_grouped_softmax", "retrieving every block reproduces the training-mode grouped "
                  "softmax (itself checked against a per-query transcription of its definition)",
                  _every_block_is_grouped_softmax),
        Reduction("tokens_per_step", "tokens attended per step = k·L + window (+ the section), whatever the length",
                  _tokens_per_step),
    ),
)(LandmarkAttention)
