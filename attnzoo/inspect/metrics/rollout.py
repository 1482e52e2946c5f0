"""Attention rollout and attention flow (Abnar & Zuidema 2020), catalogue 11.1 ``attention_rollout``.

Per layer ``Â_l = rownorm(0.5·fuse_h(A_l) + 0.5·I)`` (rows renormalised with ``keepdim=True``:
the most copied PyTorch version divides columns, jacobgil/vit-explain#16). Rollout
``R = Â_L ⋯ Â_1`` (newer layers on the left). Flow: max-flow (Edmonds–Karp) over the layered
graph whose edge capacities are the ``Â_l[i, j]``, from each output token to each input token,
rows normalised to sum to 1 as in the authors' ``compute_flows``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from attnzoo.inspect.metrics._common import metric, weights_list

__all__ = ["attention_flow", "attention_rollout", "augment", "fuse_heads", "max_flow"]

FUSIONS = ("mean", "max", "min")


def fuse_heads(w: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """``[B, H, N, M]`` -> ``[B, N, M]`` by the mean, max or min over heads."""
    if head_fusion == "mean":
        return w.mean(1)
    if head_fusion == "max":
        return w.amax(1)
    if head_fusion == "min":
        return w.amin(1)
    raise ValueError(f"head_fusion: expected one of {FUSIONS}, got {head_fusion!r}")


def augment(a: torch.Tensor, *, residual: bool = True, discard_ratio: float = 0.0) -> torch.Tensor:
    """``rownorm(0.5·A + 0.5·I)`` of a fused ``[B, N, N]`` map (rows always sum to 1).

    ``discard_ratio``: zero the lowest fraction of each row's entries first (never the
    diagonal), as vit-explain's option but per row.
    """
    b, n, m = a.shape
    if n != m:
        raise ValueError(f"rollout needs square self-attention maps, got [{n}, {m}]")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio: expected a fraction in [0, 1), got {discard_ratio}")
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand(b, n, n)
    if discard_ratio > 0:
        k = int(n * discard_ratio)
        if k:
            low = a.masked_fill(eye.bool(), float("inf")).topk(k, dim=-1, largest=False).indices
            a = a.scatter(-1, low, 0.0)
    x = 0.5 * a + 0.5 * eye if residual else a
    s = x.sum(-1, keepdim=True)
    return torch.where(s > 0, x / s.clamp_min(torch.finfo(x.dtype).tiny), eye)


@metric("attention_rollout", priority=1, papers=("Attention Flow (rollout/flow)", "VL-SAM"),
        summary="Attention rollout R = Â_L⋯Â_1 with Â = rownorm(0.5A + 0.5I); attention flow by max-flow.",
        reference="float64 product of residual-augmented, row-normalised maps; Edmonds–Karp max-flow",
        supports={"self", "causal", "padding"})
def attention_rollout(weights: Any, *, head_fusion: str = "mean", residual: bool = True,
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Rollout ``[B, N, N]`` of per-layer weights (a Cache, a list of ``[B, H, N, N]``, or ``[L, B, H, N, N]``).

    Row ``t`` is how much output position ``t`` draws on each input token; rows sum to 1.
    """
    layers = weights_list(weights)
    r = None
    for w in layers:
        a = augment(fuse_heads(w.double(), head_fusion), residual=residual, discard_ratio=discard_ratio)
        r = a if r is None else a @ r
    return r


def max_flow(cap: np.ndarray, s: int, t: int) -> float:
    """Maximum ``s``-``t`` flow value of a capacity matrix (Edmonds–Karp, BFS augmenting paths)."""
    n = cap.shape[0]
    res = cap.astype(np.float64).copy()
    adj = [np.nonzero((cap[i] > 0) | (cap[:, i] > 0))[0] for i in range(n)]
    total = 0.0
    while True:
        parent = np.full(n, -1)
        parent[s] = s
        q = deque([s])
        while q and parent[t] < 0:
            u = q.popleft()
            for v in adj[u]:
                if parent[v] < 0 and res[u, v] > 1e-15:
                    parent[v] = u
                    q.append(v)
        if parent[t] < 0:
            return total
        f, v = np.inf, t
        while v != s:
            f = min(f, res[parent[v], v])
            v = parent[v]
        v = t
        while v != s:
            res[parent[v], v] -= f
            res[v, parent[v]] += f
            v = parent[v]
        total += f


def _layered_graph(aug: list[np.ndarray]) -> np.ndarray:
    n, L = aug[0].shape[0], len(aug)
    cap = np.zeros(((L + 1) * n, (L + 1) * n))
    for li, a in enumerate(aug):  # layer li+1 token i -> layer li token j, capacity Â_l[i, j]
        cap[(li + 1) * n:(li + 2) * n, li * n:(li + 1) * n] = a
    return cap


def attention_flow(weights: Any, *, head_fusion: str = "mean", residual: bool = True, normalize: bool = True,
                   batch_index: int | None = None) -> torch.Tensor:
    """Attention flow ``[B, N, N]``: max-flow from each last-layer token to each input token.

    ``normalize`` divides each row by its sum (the authors' convention); raw values are the
    max-flow values, bounded by each layer's cut. Cost: N^2 max-flow problems on a graph of
    (L+1)·N nodes; meant for short inputs.
    """
    layers = weights_list(weights)
    aug = [augment(fuse_heads(w.double(), head_fusion), residual=residual).cpu().numpy() for w in layers]
    b, n = aug[0].shape[0], aug[0].shape[1]
    batches = range(b) if batch_index is None else [batch_index]
    out = np.zeros((len(batches), n, n))
    top = len(layers) * n
    for bi, bb in enumerate(batches):
        cap = _layered_graph([a[bb] for a in aug])
        for i in range(n):
            for j in range(n):
                out[bi, i, j] = max_flow(cap, top + i, j)
    t = torch.from_numpy(out)
    if normalize:
        s = t.sum(-1, keepdim=True)
        t = torch.where(s > 0, t / s.clamp_min(1e-300), t)
    return t


attention_rollout.flow = attention_flow  # type: ignore[attr-defined]
