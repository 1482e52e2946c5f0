"""Retrieval-head score (catalogue 11.8 ``retrieval_head_score``; Wu et al. 2024, nightdessert/Retrieval_Head)."""

from __future__ import annotations

import torch

from attnzoo.inspect.metrics._common import metric

__all__ = ["retrieval_head_score", "retrieval_heads", "rouge1_recall"]


@metric("retrieval_head_score", priority=2, papers=("Retrieval Head",),
        summary="Copy-paste events per head during needle decoding: top-1 attended prompt position inside the "
                "needle holding the generated token; score = events / |needle|.",
        reference="the reference repository's counting rule on captured decoding-step weights",
        supports={"self", "causal", "decoding"})
def retrieval_head_score(step_weights: torch.Tensor, generated: torch.Tensor, prompt_ids: torch.Tensor,
                         needle: tuple[int, int]) -> torch.Tensor:
    """Per-trial score ``[L, H]`` (or ``[H]``) in [0, 1].

    ``step_weights`` ``[S, (L,) H, M]``: each decoding step's attention over the prompt's ``M``
    positions; ``generated`` ``[S]`` the tokens emitted; ``needle = (start, end)``. An event at
    step s for a head: its top-1 position i satisfies ``start ≤ i < end`` and
    ``prompt_ids[i] == generated[s]``; each adds ``1 / (end − start)`` (no de-duplication, as in
    the reference code). Count a trial only when its answer's :func:`rouge1_recall` is above 0.5.
    """
    start, end = needle
    if not 0 <= start < end <= prompt_ids.shape[-1]:
        raise ValueError(f"needle: expected 0 <= start < end <= {prompt_ids.shape[-1]}, got {needle}")
    top = step_weights.argmax(-1)  # [S, (L,) H]
    tok = prompt_ids.to(top.device)[top]
    gen = generated.to(top.device).view(-1, *([1] * (top.dim() - 1)))
    events = ((top >= start) & (top < end) & (tok == gen)).to(torch.float64)
    return (events.sum(0) / (end - start)).clamp(max=1.0)


def retrieval_heads(scores: torch.Tensor, threshold: float = 0.1) -> list[tuple[int, ...]]:
    """Indices of the heads whose mean score exceeds ``threshold`` (0.1 in the paper)."""
    return [tuple(int(i) for i in idx) for idx in (scores > threshold).nonzero()]


def rouge1_recall(answer: list, reference: list) -> float:
    """Unigram recall of ``reference`` tokens in ``answer`` (multiset), in [0, 1]."""
    from collections import Counter

    ref, ans = Counter(reference), Counter(answer)
    return sum(min(c, ans[t]) for t, c in ref.items()) / max(1, sum(ref.values()))
