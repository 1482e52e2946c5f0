"""``tree_cross_attention``: Tree Cross Attention (ReTreever): each query descends a tree over the context and
cross-attends over O(log N) retrieved nodes."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import Call, MultiHeadAttention, check_choice, check_int, seeded
from attnzoo.layers.dynamic_sparse._common import FAMILY, SMALL, pool_levels, pooled_token_weights, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.patterns.routed import DenseRouted, key_routed_attention
from attnzoo.registry import Reduction, register

TREE_BACKENDS = ("auto", "reference", "gather", "sdpa", "flex")


@dataclass
class _Descent:
    """How the descents of a forward run inside :meth:`TreeCrossAttention.training_loss`: ``"sample"`` (the policy
    samples, its log-probabilities collected in ``log_probs``) or ``"full"`` (every node expanded)."""

    mode: str
    generator: torch.Generator | None = None
    log_probs: list[torch.Tensor] = field(default_factory=list)


_DESCENT: contextvars.ContextVar[_Descent | None] = contextvars.ContextVar("tree_cross_attention_descent",
                                                                           default=None)


@contextmanager
def _descent(state: _Descent) -> Iterator[_Descent]:
    token = _DESCENT.set(state)
    try:
        yield state
    finally:
        _DESCENT.reset(token)


def build_tree(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[int]]:
    """The binary tree over ``M`` context tokens (leaves; padded to ``P = 2^depth``, the padding kept out).

    Returns ``(k_nodes [B, H, 2P - 1, D], v_nodes, counts, offsets)``: level ``l`` (0: leaves, ``depth``: the
    root) holds ``P / 2^l`` nodes, node ``j`` the mean key and value of the kept leaves ``[j 2^l, (j + 1) 2^l)``
    (``counts[l]`` ``[B, P / 2^l]`` of them; 0: an empty node, never retrieved); levels are concatenated
    leaves first, level ``l`` starting at ``offsets[l]``.
    """
    m = k.shape[2]
    p = 1 << max(m - 1, 0).bit_length()
    levels = pool_levels(k, v, keep, p, p.bit_length())
    offsets, start = [], 0
    for kl, _, _ in levels:
        offsets.append(start)
        start += kl.shape[2]
    return (torch.cat([lv[0] for lv in levels], 2), torch.cat([lv[1] for lv in levels], 2), [lv[2] for lv in levels],
            offsets)


def descend(s: torch.Tensor, k_nodes: torch.Tensor, counts: list[torch.Tensor], offsets: list[int], beam: int, *,
            scale: float, sample: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tree search of every query: the retrieved nodes int64 ``[B, H, N, R]`` (indices into ``k_nodes``,
    -1: empty slot) and, when sampling, the log-probability ``[B, H, N]`` of the path taken.

    From the root down, the frontier's children are scored by ``scale · s · k_node`` (``s`` ``[B, H, N, D]``);
    while they number at most ``beam`` all are expanded, else the best ``beam`` (or, with ``sample`` a
    generator, ``beam`` drawn without replacement from the softmax of the scores: Gumbel top-k) are expanded
    and the others are retrieved as summaries of their unexplored subtrees; the final frontier's leaves are
    retrieved too. Empty nodes are never expanded when others are, nor retrieved. ``beam = 1`` retrieves
    ``depth + 1`` nodes; ``beam >= #leaves`` expands every node and retrieves every leaf.
    """
    b, h, n, d = s.shape
    depth = len(counts) - 1
    frontier = torch.zeros(b, h, n, 1, dtype=torch.int64, device=s.device)
    valid = (counts[depth][:, :1] > 0).view(b, 1, 1, 1).expand(b, h, n, 1)
    retrieved: list[torch.Tensor] = []
    log_prob = s.new_zeros(b, h, n) if sample is not None else None
    for level in range(depth - 1, -1, -1):
        kids = torch.cat([2 * frontier, 2 * frontier + 1], -1)
        cnt = counts[level].view(b, 1, 1, -1).expand(b, h, n, -1)
        ok = valid.repeat(1, 1, 1, 2) & (cnt.gather(-1, kids) > 0)
        if kids.shape[-1] <= beam:
            frontier, valid = kids, ok
            continue
        node = kids + offsets[level]
        kg = k_nodes.gather(2, node.reshape(b, h, -1, 1).expand(-1, -1, -1, d)).view(*node.shape, d)
        logits = (torch.einsum("bhnd,bhncd->bhnc", s, kg) * scale).masked_fill(~ok, float("-inf"))
        ranking = logits.detach()
        if sample is not None:
            u = torch.rand(ranking.shape, generator=sample, dtype=torch.float64).to(ranking.device)
            ranking = ranking + (-(-u.clamp(min=1e-300).log()).log()).to(ranking.dtype)
        chosen = ranking.topk(beam, dim=-1).indices
        if sample is not None:
            log_prob = log_prob + _plackett_luce(logits, chosen)
        pick = torch.zeros_like(ok).scatter_(-1, chosen, True)
        rest = pick.to(torch.int8).argsort(dim=-1, stable=True)[..., :kids.shape[-1] - beam]  # the unexpanded
        retrieved.append(torch.where(ok.gather(-1, rest), node.gather(-1, rest), -1))
        frontier, valid = kids.gather(-1, chosen), ok.gather(-1, chosen)
    retrieved.append(torch.where(valid, frontier + offsets[0], -1))
    return torch.cat(retrieved, -1), log_prob


def _plackett_luce(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Log-probability ``[B, H, N]`` of drawing ``chosen`` (in order, without replacement) from ``softmax(logits)``;
    draws of an impossible (``-inf``) candidate count 0."""
    out = logits.new_zeros(logits.shape[:-1])
    remaining = logits
    for r in range(chosen.shape[-1]):
        pick = remaining.gather(-1, chosen[..., r:r + 1]).squeeze(-1)
        lse = torch.logsumexp(remaining, -1)
        out = out + torch.where(torch.isfinite(pick), pick - lse, torch.zeros_like(pick))
        remaining = remaining.scatter(-1, chosen[..., r:r + 1], float("-inf"))
    return out


class TreeCrossAttention(MultiHeadAttention):
    """Tree Cross Attention: every query retrieves ``O(log N)`` nodes of a tree over the context and cross-attends
    over them.

    The context tokens (``context``, or ``x`` itself without one) are the leaves of a binary tree whose internal
    nodes hold the mean key and value of their kept leaves (:func:`build_tree`). Each query and head descends
    from the root (:func:`descend`): at each level it expands the ``beam`` best children by a scorer and keeps
    the unexpanded siblings as summaries of their subtrees; it then attends (one softmax, routed ``gather``
    path) over the retrieved leaves and summaries: ``beam (depth + 1)`` nodes at most, ``log2 N + 1`` for
    ``beam = 1``. ``beam >= N`` expands every node: full cross-attention.

    Scorer: ``"attention"`` scores a child by the attention's own ``q · k_node`` (no extra parameters);
    ``"learned"`` by a separate policy projection ``s = x W_π`` (``policy_proj``) against ``k_node``. Plain
    forwards descend greedily; the descent is non-differentiable. Training: :meth:`training_loss` (the
    ``training`` capability) returns ``L_TCA + L_CA + rl_weight · L_RL``: the loss with sampled descents, the
    loss with every node expanded (full cross-attention, which trains the tree's keys and values), and
    REINFORCE on the sampled paths' log-probability with the reward ``-L_TCA`` and the greedy descent's loss
    as baseline. It is what trains ``policy_proj``; a plain forward and backward leaves it without gradient.

    From the paper (TCA, Feng et al.; abstract): a tree over the context, a tree search at inference retrieving
    ``O(log N)`` tokens, a policy trained by RL, cross-attention over the retrieved leaves and the summaries of
    unexplored subtrees. Recalled, not checked against the authors' code: the objective's three terms, a binary
    tree built bottom-up in token order. Ours: mean aggregation (the paper learns its aggregator), the scorers
    above, the beam, Gumbel top-k sampling, a batch-level reward (the loss is one scalar) with the greedy
    baseline. ReTreever's encoder and Perceiver-style latents are not part of this layer.

    Args:
        dim, n_heads: as ``mha``.
        beam: nodes expanded per level (capped by the leaves of each call).
        scorer: ``"attention"`` or ``"learned"``.
        **kw: ``mha`` arguments (``head_dim``, ``bias``, ``context_dim``, ``scale``, ``backend``).
    """

    refused_arguments = ("pattern", "score_mod", "n_kv_heads", "rope")
    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, beam: int = 1, scorer: str = "attention", **kw: Any) -> None:
        for name in self.refused_arguments:
            if kw.get(name) is not None:
                raise ValueError(f"{name}: TreeCrossAttention cannot honour it (the tree chooses the keys; nodes "
                                 "have no positions)")
            kw.pop(name, None)
        if kw.get("backend", "auto") not in TREE_BACKENDS:
            raise ValueError(f"backend: expected one of {list(TREE_BACKENDS)}, got {kw['backend']!r}")
        super().__init__(dim, n_heads, **kw)
        self.beam = check_int("beam", beam)
        self.scorer = check_choice("scorer", scorer, ("attention", "learned"))
        self.policy_proj = (nn.Linear(dim, n_heads * self.head_dim, bias=self.q_proj.bias is not None)
                            if scorer == "learned" else None)

    def retrieve(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call | None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``(k_nodes, v_nodes, counts, nodes [B, H, N, R])``: the tree of this call and each query's retrieved
        nodes (as :meth:`forward` descends; inside :meth:`training_loss` sampled or fully expanded)."""
        keep = call.kv_keep if call is not None else None
        k_nodes, v_nodes, counts, offsets = build_tree(k, v, keep)
        state = _DESCENT.get()
        beam = counts[0].shape[1] if state is not None and state.mode == "full" else self.beam
        s = q if self.policy_proj is None else self.split(self.policy_proj(call.x), self.n_heads)
        scale = self.attention_scale(q) or q.shape[-1] ** -0.5
        if state is not None and state.mode == "sample":
            nodes, log_prob = descend(s, k_nodes, counts, offsets, beam, scale=scale, sample=state.generator)
            if call is not None and call.mask is not None:
                log_prob = log_prob * call.mask.view(call.mask.shape[0], 1, -1).to(log_prob.dtype)
            state.log_probs.append(log_prob.sum())
        else:
            with torch.no_grad():
                nodes, _ = descend(s.detach(), k_nodes.detach(), counts, offsets, beam, scale=scale)
        return k_nodes, v_nodes, counts, nodes

    def attend(self, q, k, v, pattern, want_weights, call=None):
        k_nodes, v_nodes, counts, nodes = self.retrieve(q, k, v, call)
        scale = self.attention_scale(q)
        if want_weights:
            from attnzoo.ops.routed import key_routing_mask

            allow = key_routing_mask(nodes, k_nodes.shape[2])
            z, w = attention(q, k_nodes, v_nodes, pattern=DenseRouted(allow), scale=scale, backend="reference",
                             return_weights=True)
            return z, pooled_token_weights(w, counts, k.shape[2])
        return key_routed_attention(q, k_nodes, v_nodes, nodes, scale=scale, backend=self.backend), None

    def training_loss(self, loss_fn: Callable[[], torch.Tensor], *, rl_weight: float = 1.0,
                      seed: int = 0) -> torch.Tensor:
        """``L_TCA + L_CA + rl_weight · (L_TCA - L_greedy) · log π(paths)``: backpropagate it instead of the loss.

        ``loss_fn()`` runs the model (every ``tree_cross_attention`` layer in it) and returns a scalar loss; it is
        called three times: every node expanded (``L_CA``), greedy descents (the baseline, without gradient) and
        descents sampled from the policy with a generator seeded by ``seed`` (``L_TCA`` and the log-probability
        of the paths, padded queries left out).
        """
        with _descent(_Descent("full")):
            loss_ca = loss_fn()
        with torch.no_grad():
            baseline = loss_fn()
        with _descent(_Descent("sample", torch.Generator().manual_seed(seed))) as state:
            loss_tca = loss_fn()
        log_prob = torch.stack(state.log_probs).sum() if state.log_probs else loss_tca.new_zeros(())
        reinforce = (loss_tca.detach() - baseline.detach()) * log_prob
        return loss_tca + loss_ca + rl_weight * reinforce

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beam={self.beam}, scorer={self.scorer!r}"


def _every_node_expanded_is_cross_attention():
    x, ctx = rand_x(n=6), rand_x(n=11, seed=1)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 7:] = False
    got, want = [], []
    for scorer in ("attention", "learned"):
        m = seeded(TreeCrossAttention, dim=32, n_heads=4, beam=16, scorer=scorer)
        d = mha_from(m)
        got += [m(x, context=ctx), m(x, context=ctx, context_mask=keep), m(ctx)]
        want += [d(x, context=ctx), d(x, context=ctx, context_mask=keep), d(ctx)]
    return torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])


def _attended_nodes_grow_as_log_n():
    """beam = 1: exactly log2(N) + 1 nodes (one leaf and a sibling summary per level) for N = 8 ... 4096."""
    got, want = [], []
    torch.manual_seed(0)
    for n in (8, 64, 512, 4096):
        q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
        k = torch.randn(1, 2, n, 8, dtype=torch.float64)
        k_nodes, _, counts, offsets = build_tree(k, k, None)
        nodes, _ = descend(q, k_nodes, counts, offsets, 1, scale=8 ** -0.5)
        got.append((nodes >= 0).sum(-1).double().flatten())
        want.append(torch.full((6,), float(n.bit_length()), dtype=torch.float64))
    return torch.cat(got), torch.cat(want)


register(
    "tree_cross_attention", family=FAMILY, type="mixer", priority=3, papers=("Tree Cross Attention",),
    supports={"self", "cross", "padding", "training"}, complexity="O(N log M)",
    backends=("reference", "gather", "sdpa", "flex"),
    summary="Tree Cross Attention: a query descends a mean-aggregated tree over the context and attends "
            "log(M) + 1 nodes.",
    test_kwargs={**SMALL, "beam": 1},
    reductions=(
        Reduction("every_node_expanded_is_cross_attention", "expanding every node equals full cross-attention "
                  "(padded context, self-attention too)", _every_node_expanded_is_cross_attention),
        Reduction("attended_nodes_grow_as_log_n", "attended nodes = log2 N + 1 for beam 1",
                  _attended_nodes_grow_as_log_n),
    ),
)(TreeCrossAttention)
