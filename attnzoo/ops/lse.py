"""Exact merge of attention partials computed over disjoint key sets."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``(out_p [..., N, D], lse_p [..., N])`` over a partition of the keys.

    ``lse = logsumexp_p lse_p`` and ``out = sum_p exp(lse_p - lse) * out_p``; a partial whose
    keys were all masked (``lse_p = -inf``) contributes nothing, and rows masked in every
    partial stay zero.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs, lses: expected equal non-zero counts, got {len(outs)} and {len(lses)}")
    lse_stack = torch.stack(list(lses))
    lse = torch.logsumexp(lse_stack, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe)
    out = sum(w.unsqueeze(-1).to(o.dtype) * o for w, o in zip(weights, outs))
    return out, lse
