"""``tidal_decode``: TidalDecode: top-k positions chosen by full attention at a selection layer, reused by later layers.

The selection travels between layers in a :class:`TokenSelection` handed to every layer of one call (never kept on a
module): a ``"select"`` layer runs full attention and writes the top-k positions of its attention rows into it, the
``"sparse"`` layers after it attend only those positions, until the next ``"select"`` layer replaces them.
:class:`TidalDecode` (the registered entry) is a small residual stack of such layers that builds the selection object
of each call (and keeps one KV cache per layer inside the cache it is given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.cache import KVCache
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
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register

ROLES = ("dense", "select", "sparse")


class TokenSelection:
    """The positions chosen by the last selection layer of one forward call (create one per call).

    ``index``: int64 ``[B, H, N, K]`` (key positions of every query and head, ``-1`` = empty slot) or None before the
    first selection layer. ``history``: ``(layer, role, index)`` for every layer that read or wrote it, in call order
    (``index`` None for dense layers), so one can check which positions each layer attended.
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.history: list[tuple[int, str, torch.Tensor | None]] = []


class TidalDecodeAttention(RoutedMixer):
    """One TidalDecode attention layer (projections as ``mha``).

    ``role="dense"``: full attention. ``role="select"``: full attention, and each query's ``top_k`` keys of highest
    attention weight (per head; softmax is monotone in ``q·k``, so by logit; ties: lower position) become
    ``selection.index``. ``role="sparse"``: each query attends only ``selection.index`` (the routed op, gather path).
    The selection is per query, so the full causal forward applies the decoding rule to every position and
    decoding with a KV cache equals it (the paper decodes sparsely after a dense prefill; ``role="dense"`` layers or a
    dense model give that prefill). The choice is a hard top-k and has no gradient (as in the paper).

    From the paper (abstract): a few token selection layers run full attention and keep the tokens of highest
    attention score; the other layers attend the pre-selected tokens. The catalogue's layer schedule (sparse from
    layer 2, re-selection at layer 13, k = 256) is recalled from the authors' code snippets. Per-head selection is
    this library's choice (the paper's kernel may share one set over heads: not verified).

    Args:
        dim, n_heads: as ``mha`` (no GQA).
        top_k: positions kept per query and head (capped at the keys a query sees: ``top_k`` >= context is dense).
        role: ``"dense"``, ``"select"`` or ``"sparse"``.
        layer_index: this layer's position in its stack (recorded in the selection's history).
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``rope``, ``scale``, ``backend``).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 256, role: str = "select", layer_index: int = 0,
                 **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.top_k = check_top_k(top_k)
        self.role = check_choice("role", role, ROLES)
        self.layer_index = check_int("layer_index", layer_index, minimum=0)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, selection: TokenSelection | None = None,
                head_mask: torch.Tensor | None = None, return_weights: bool = False, **kw: Any
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``mask`` bool ``[B, N]`` (True = keep); ``selection``: the
        :class:`TokenSelection` of this call (required by ``"sparse"`` layers, written by ``"select"`` layers)."""
        if selection is not None and not isinstance(selection, TokenSelection):
            raise ValueError(f"selection: expected a TokenSelection, got {type(selection).__name__}")
        if self.role == "sparse" and (selection is None or selection.index is None):
            raise ValueError("selection: a 'sparse' TidalDecode layer needs the TokenSelection written by an earlier "
                             "'select' layer of the same call")
        return self.mix(x, mask=mask, causal=causal, cache=cache, head_mask=head_mask,
                        return_weights=return_weights, extra={"selection": selection}, **kw)

    def select(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Top-``top_k`` key positions ``[B, H, N, K]`` of every query's attention row (``-1`` where fewer keys)."""
        b, h, n, _ = q.shape
        m = k.shape[2]
        s = q @ k.transpose(-1, -2)
        allow = torch.ones(n, m, dtype=torch.bool, device=q.device)
        if causal:
            allow = causal_allow(n, m, q.device)
        allow = allow.expand(b, h, n, m)
        if keep is not None:
            allow = allow & keep.view(b, 1, 1, m)
        s = s.masked_fill(~allow, float("-inf"))
        val, idx = s.topk(min(self.top_k, m), dim=-1)
        return torch.where(val > float("-inf"), idx, -1)

    def route(self, q, k, keep, call):
        selection = call.extra.get("selection")
        index = selection.index
        want = (q.shape[0], q.shape[1], q.shape[2])
        if tuple(index.shape[:3]) != want:
            raise ValueError(f"selection: holds an index {list(index.shape)} for queries {list(want)} of this call "
                             "(the layers of one call share batch, heads and length)")
        if index.numel() and int(index.max()) >= k.shape[2]:
            raise ValueError(f"selection: lists key {int(index.max())}, this layer has {k.shape[2]} keys")
        selection.history.append((self.layer_index, self.role, index))
        return Routing("keys", index)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if self.role == "sparse":
            return super().attend(q, k, v, pattern, want_weights, call=call)
        selection = call.extra.get("selection") if call is not None else None
        if selection is not None:
            keep = call.kv_keep if call.kv_keep is not None and not bool(call.kv_keep.all()) else None
            index = None
            if self.role == "select":
                with torch.no_grad():
                    index = self.select(q.detach(), k.detach(), keep, bool(call.causal))
                selection.index = index
            selection.history.append((self.layer_index, self.role, index))
        backend = "reference" if want_weights or self.backend == "reference" else (
            self.backend if self.backend in ("sdpa", "flex", "blocksparse") else "auto")
        res = attention(q, k, v, pattern=pattern, scale=self.attention_scale(q), backend=backend,
                        return_weights=want_weights)
        return (res[0], res[1]) if want_weights else (res, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, role={self.role!r}, layer_index={self.layer_index}"


def schedule(n_layers: int, first_sparse: int, reselect: Sequence[int]) -> tuple[str, ...]:
    """Roles of a stack: ``"dense"`` before layer ``first_sparse - 1``, ``"select"`` at ``first_sparse - 1`` and at
    every layer of ``reselect``, ``"sparse"`` elsewhere (the paper: sparse from layer 2, re-selection at 13)."""
    check_int("n_layers", n_layers)
    check_int("first_sparse", first_sparse)
    if first_sparse >= n_layers:
        raise ValueError(f"first_sparse: expected a layer index < n_layers={n_layers}, got {first_sparse}")
    bad = [r for r in reselect if not isinstance(r, int) or not first_sparse <= r < n_layers]
    if bad:
        raise ValueError(f"reselect: expected layer indices in [{first_sparse}, {n_layers}), got {list(reselect)}")
    roles = ["dense"] * (first_sparse - 1) + ["select"] + ["sparse"] * (n_layers - first_sparse)
    for r in reselect:
        roles[r] = "select"
    return tuple(roles)


class TidalDecode(nn.Module):
    """TidalDecode as a token mixer: ``n_layers`` attention layers with residual connections
    (``h = h + layer(h)``; no norms or MLPs, which a full model would add between them), roles from
    :func:`schedule`: dense before ``first_sparse - 1``, a selection layer at ``first_sparse - 1`` and at each layer of
    ``reselect``, sparse layers (attending the last selection's ``top_k`` positions) elsewhere.

    Each call builds one :class:`TokenSelection` and hands it to every layer (pass ``selection=`` to read it
    afterwards). With ``cache`` (a :class:`~attnzoo.layers.KVCache`), the stack keeps one cache per layer in
    ``cache.state["layers"]``; token-by-token decoding equals the full causal forward.

    Args:
        dim, n_heads: as ``mha`` (every layer).
        top_k: positions kept per query and head.
        n_layers, first_sparse, reselect: the layer schedule.
        head_dim, bias, rope, scale, backend: ``mha`` arguments of every layer.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, top_k: int = 256, n_layers: int = 3, first_sparse: int = 2,
                 reselect: Sequence[int] = (), head_dim: int | None = None, bias: bool = True, rope: Any = None,
                 scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        kw = {"head_dim": head_dim, "bias": bias, "rope": rope, "scale": scale, "backend": backend}
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.top_k = check_top_k(top_k)
        self.roles = schedule(n_layers, first_sparse, tuple(reselect))
        self.layers = nn.ModuleList(TidalDecodeAttention(dim, n_heads, top_k=top_k, role=r, layer_index=i, **kw)
                                    for i, r in enumerate(self.roles))
        self.head_dim = self.layers[0].head_dim

    @property
    def backend(self) -> str:
        return self.layers[0].backend

    @backend.setter
    def backend(self, value: str) -> None:
        for layer in self.layers:
            layer.backend = value

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None, selection: TokenSelection | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``. ``mask`` bool ``[B, N]`` (True = keep; padded rows come out zero);
        ``causal``; ``cache``: a KVCache for decoding (pass ``causal=True``); ``selection``: a fresh
        :class:`TokenSelection` to read the positions afterwards (default: a new one)."""
        if context is not None:
            raise ValueError("context: TidalDecode is self-attention only")
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected an attnzoo.layers.KVCache, got {type(cache).__name__}")
        selection = TokenSelection() if selection is None else selection
        if not isinstance(selection, TokenSelection):
            raise ValueError(f"selection: expected a TokenSelection, got {type(selection).__name__}")
        caches: list[KVCache | None] = [None] * len(self.layers)
        if cache is not None:
            if x.dim() == 3:
                cache.claim_batch(x.shape[0])
            caches = cache.state.setdefault("layers", [KVCache() for _ in self.layers])
        h = x
        for layer, c in zip(self.layers, caches):
            h = h + layer(h, mask=mask, causal=causal, cache=c, selection=selection)
        if cache is not None:
            cache.advance(x.shape[1])
        y = h - x
        return y if mask is None else y * mask.unsqueeze(-1).to(y.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, top_k={self.top_k}, roles={list(self.roles)}"


def _k_at_least_context_is_dense():
    x = rand_x(n=10)
    got, want = [], []
    for causal in (True, False):
        m = seeded(TidalDecode, dim=32, n_heads=4, top_k=10, n_layers=4, first_sparse=1, reselect=(2,)).double()
        dense = seeded(TidalDecode, dim=32, n_heads=4, top_k=10, n_layers=4, first_sparse=3).double()
        for layer in dense.layers:
            layer.role = "dense"
        dense.load_state_dict(m.state_dict())
        got.append(m(x, causal=causal))
        want.append(dense(x, causal=causal))
    return torch.stack(got), torch.stack(want)


def _index_persists_and_is_the_top_k():
    m = seeded(TidalDecode, dim=32, n_heads=4, top_k=3, n_layers=5, first_sparse=1, reselect=(3,)).double()
    x = rand_x(n=10)
    sel = TokenSelection()
    m(x, causal=True, selection=sel)
    by_layer = {i: idx for i, _, idx in sel.history}
    # layers 1, 2 reuse layer 0's set; layer 4 reuses layer 3's
    same = [(by_layer[1] == by_layer[0]).all(), (by_layer[2] == by_layer[0]).all(), (by_layer[4] == by_layer[3]).all()]
    h, flow, rows = x, TokenSelection(), {}
    for i, layer in enumerate(m.layers):
        if layer.role == "select":
            _, w = layer(h, causal=True, selection=TokenSelection(), return_weights=True)
            val, idx = w.topk(3, dim=-1)
            rows[i] = torch.where(val > 0, idx, -1)
        h = h + layer(h, causal=True, selection=flow)
    equal = [(by_layer[0] == rows[0]).all(), (by_layer[3] == rows[3]).all()]
    got = torch.stack([torch.stack(same).double().min(), torch.stack(equal).double().min()])
    return got, torch.ones(2, dtype=torch.float64)


register(
    "tidal_decode", family=FAMILY, type="pattern", priority=3, papers=("TidalDecode",),
    supports=SUPPORT, complexity="O(N M) at selection layers, O(N k) elsewhere",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="TidalDecode: a selection layer keeps each query's top-k positions by full attention; the following "
            "layers attend only those until a re-selection layer (a residual stack; the selection is a per-call "
            "object).",
    test_kwargs={**SMALL, "top_k": 3, "n_layers": 3, "first_sparse": 1},
    reductions=(
        Reduction("k_at_least_context_is_dense", "k >= context length gives dense decoding (causal and not)",
                  _k_at_least_context_is_dense),
        Reduction("index_persists_and_is_top_k", "the index set is the same for every layer between two selection "
                  "layers and equals the top-k of the selection layer's attention row",
                  _index_persists_and_is_the_top_k),
    ),
)(TidalDecode)
