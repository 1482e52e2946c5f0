"""Induction heads (catalogue 11.7 ``induction_head_score``), in two distinctly named conventions.

* :func:`induction_score_stripe` (ARENA / TransformerLens tutorial): on ``[BOS] + r + r`` with
  ``r`` of ``seq_len`` random tokens, the mean of ``pattern.diagonal(offset=1 − seq_len)``. A
  perfect induction head scores ≈ 1.
* :func:`induction_score_mul` (TransformerLens ``detect_head(..., "induction_head",
  error_measure="mul")``): ``(A ⊙ D).sum() / A.sum()`` with ``D`` the duplicate-token mask shifted
  right by one column; the denominator covers every query row, so on a twice-repeated sequence a
  perfect induction head scores only ≈ 0.495. Thresholds do not transfer between the two.

Also the copying score (positive-eigenvalue ratio of the OV circuit) and the ICL score.
"""

from __future__ import annotations

import torch

from attnzoo.inspect.metrics._common import check_weights, metric

__all__ = ["copying_score", "icl_score", "induction_score_mul", "induction_score_stripe", "induction_targets",
           "repeated_tokens"]


def repeated_tokens(batch: int, seq_len: int, vocab: int, *, repeats: int = 2, bos: int | None = 0,
                    low: int = 1, seed: int = 0) -> torch.Tensor:
    """``[batch, (bos) + repeats·seq_len]`` long: a random block in ``[low, vocab)`` repeated, after ``bos``."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(low, vocab, (batch, seq_len), generator=g)
    t = r.repeat(1, repeats)
    return torch.cat([torch.full((batch, 1), bos, dtype=torch.long), t], 1) if bos is not None else t


def induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """``D`` ``[B, N, N]`` (float): ``D[i, j] = 1`` iff ``tokens[j − 1] == tokens[i]`` with ``j − 1 < i``
    (the token after an earlier occurrence of the current one: TransformerLens' shifted duplicate mask)."""
    t = tokens
    dup = (t[:, :, None] == t[:, None, :]) & torch.ones(t.shape[1], t.shape[1], dtype=torch.bool,
                                                        device=t.device).tril(-1)
    d = torch.zeros_like(dup)
    d[:, :, 1:] = dup[:, :, :-1]
    return d.to(torch.float64)


@metric("induction_head_score", priority=2,
        papers=("Induction heads", "Abrupt ICL learning (induction-head emergence)"),
        summary="Induction prefix-matching scores (ARENA stripe and TransformerLens 'mul', named apart), "
                "copying and ICL scores.",
        reference="float64 means of the reference weights on repeated random sequences",
        supports={"self", "causal"})
def induction_score_stripe(weights: torch.Tensor, seq_len: int) -> torch.Tensor:
    """ARENA score ``[H]``: mean over batch and positions of ``A.diagonal(offset=1 − seq_len)``.

    ``weights`` ``[B, H, N, N]`` on ``[BOS] + r + r`` (``N = 2·seq_len + 1``) or on ``r + r``.
    """
    w = check_weights(weights)
    return w.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1).mean(dim=(0, -1))


def induction_score_mul(weights: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerLens ``"mul"`` score ``[H]``: ``(A ⊙ D).sum() / A.sum()`` per sequence, averaged over the batch."""
    w = check_weights(weights)
    d = induction_targets(tokens).to(w.dtype)[:, None]
    return ((w * d).sum(dim=(-1, -2)) / w.sum(dim=(-1, -2)).clamp_min(1e-30)).mean(0)


def copying_score(ov: torch.Tensor) -> torch.Tensor:
    """``Σ Re λ / Σ |λ|`` of the full OV circuit ``W_U W_O W_V W_E`` (square; 1 for a pure copier).

    A leading batch/head dimension is allowed.
    """
    ev = torch.linalg.eigvals(ov.to(torch.float64))
    return ev.real.sum(-1) / ev.abs().sum(-1).clamp_min(1e-30)


def icl_score(loss_per_position: torch.Tensor, early: int = 50, late: int = 500) -> torch.Tensor:
    """In-context-learning score: loss at token ``late`` minus loss at token ``early`` (last axis;
    positions beyond the sequence are clipped to its end). Negative = the model learns in context."""
    n = loss_per_position.shape[-1]
    return loss_per_position[..., min(late, n - 1)] - loss_per_position[..., min(early, n - 1)]
