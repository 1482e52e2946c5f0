"""Attention sinks (catalogue 11.6 ``sink_score``): Gu et al.'s sink metric, massive activations, secondary sinks.

Per head, ``α_k = Σ_i a_ik / #{queries that can see k}``: for causal maps the ``T − k`` queries
at or after ``k`` (Gu et al., ``sail-sg/Attention-Sink``), otherwise all queries. The sink score
of token ``k`` is the fraction of (sample, layer, head) triples with ``α_k > ε`` (ε = 0.3; Gu et
al. report it ×100). Their setup: T = 64 tokens, token k = 0.
"""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.inspect.metrics._common import check_weights, metric, weights_list

__all__ = ["head_sink_alpha", "massive_activations", "received_attention", "secondary_sinks", "sink_score"]


def received_attention(weights: torch.Tensor) -> torch.Tensor:
    """``mean_i a_ij`` ``[B, H, M]``: sums to 1 over keys for softmax rows."""
    return check_weights(weights).mean(-2)


def head_sink_alpha(weights: torch.Tensor, causal: bool | None = None) -> torch.Tensor:
    """Gu et al.'s ``α_k`` ``[B, H, M]``: mean attention to key ``k`` over the queries that can see it.

    ``causal=None`` infers it (no weight above the diagonal, queries aligned to the last keys).
    """
    w = check_weights(weights)
    n, m = w.shape[-2:]
    if causal is None:
        causal = n > 1 and bool((w.triu(m - n + 1) == 0).all())
    if not causal:
        return w.mean(-2)
    qi = torch.arange(m - n, m, device=w.device)
    visible = (torch.arange(m, device=w.device)[None, :] <= qi[:, None]).to(w.dtype).sum(0)  # queries seeing k
    return w.sum(-2) / visible.clamp_min(1)


@metric("sink_score", priority=2, papers=("Secondary attention sinks", "VAR (visual attention sink)"),
        summary="Sink score (Gu et al.: fraction of heads whose mean attention to a token exceeds ε=0.3), "
                "massive-activation detector, secondary-sink alignment.",
        reference="float64 means of the reference weights, as sail-sg/Attention-Sink compute_attention_sink")
def sink_score(weights: Any, token: int = 0, eps: float = 0.3, causal: bool | None = None) -> torch.Tensor:
    """Fraction in [0, 1] of (sample, layer, head) with ``α_token > eps`` (×100 is Gu et al.'s number).

    ``weights``: one ``[B, H, N, M]`` map, a list of per-layer maps, or a Cache.
    """
    layers = [check_weights(weights)] if isinstance(weights, torch.Tensor) and weights.dim() <= 4 else \
        weights_list(weights)
    flags = torch.stack([(head_sink_alpha(w, causal)[..., token] > eps).to(torch.float64) for w in layers])
    return flags.mean()


def massive_activations(hidden: torch.Tensor, tau: float, dims: Any = None) -> torch.Tensor:
    """Tokens ``[B, N]`` (bool) with ``|h_d| > tau`` in any of ``dims`` (default all hidden dimensions)."""
    h = hidden if dims is None else hidden[..., torch.as_tensor(list(dims), dtype=torch.long)]
    return (h.abs() > tau).any(-1)


def secondary_sinks(hidden: torch.Tensor, sink_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, norm)`` ``[B, N]``: cosine of each hidden state with the primary sink's, and its ℓ2 norm."""
    ref = hidden[:, sink_index:sink_index + 1]
    cos = torch.nn.functional.cosine_similarity(hidden, ref.expand_as(hidden), dim=-1).clamp(-1, 1)
    return cos, hidden.norm(dim=-1)
