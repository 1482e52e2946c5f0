"""Per-head QK and OV circuits and structure scores (catalogue 11.11 ``qk_ov_circuits``)."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.inspect.metrics._common import metric

__all__ = ["diagonality", "homogeneity", "ov_last_entry", "qk_ov_circuits"]


@metric("qk_ov_circuits", priority=3, papers=("ICL linear regression demystified",),
        summary="Per-head W_KQ = W_Kᵀ W_Q and W_OV = W_V W_O (residual-space maps); diagonality, homogeneity.",
        reference="float64 products of the projection weights")
def qk_ov_circuits(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_KQ [H, C, C], W_OV [H, C, C])`` of a :class:`~attnzoo.layers.MultiHeadAttention`.

    Row-vector convention (``q = x W_Q``): the logit of query ``x_i`` on key ``x_j`` is
    ``x_j W_KQ x_iᵀ`` (×scale) with ``W_KQ = W_K W_Qᵀ`` in weight-matrix terms, and a token's value
    contribution is ``x_j W_OV``. GQA key/value heads are repeated to the query heads.
    """
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "head_dim"):
        if not hasattr(module, name):
            raise TypeError(f"qk_ov_circuits: {type(module).__name__} has no {name}; expected a MultiHeadAttention")
    h, d = module.n_heads, module.head_dim
    rep = h // getattr(module, "n_kv_heads", h)
    wq = module.q_proj.weight.detach().double().view(h, d, -1)  # [H, D, C]
    wk = module.k_proj.weight.detach().double().view(-1, d, wq.shape[-1]).repeat_interleave(rep, 0)
    wv = module.v_proj.weight.detach().double().view(-1, d, wq.shape[-1]).repeat_interleave(rep, 0)
    wo = module.o_proj.weight.detach().double().view(-1, h, d).permute(1, 2, 0)  # [H, D, C_out]
    w_kq = wk.transpose(1, 2) @ wq  # [H, C, C]: x_j W_KQ x_iᵀ = k_j · q_i
    w_ov = wv.transpose(1, 2) @ wo  # [H, C, C_out]: x_j -> contribution
    return w_kq, w_ov


def diagonality(m: torch.Tensor) -> torch.Tensor:
    """``‖offdiag(M)‖_F / ‖diag(M)‖`` over the last two axes (0 for a diagonal matrix)."""
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    off = m - torch.diag_embed(diag)
    return off.flatten(-2).norm(dim=-1) / diag.norm(dim=-1).clamp_min(1e-300)


def homogeneity(ms: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the heads' matrices ``[H, ...]`` (1 when all are proportional)."""
    f = ms.flatten(1).to(torch.float64)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    c = f @ f.T
    h = c.shape[0]
    return (c.sum() - c.diagonal().sum()) / max(1, h * (h - 1))


def ov_last_entry(w_ov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The OV circuits' last entry per head (the y→y weight of in-context regression tokens) and their sum."""
    last = w_ov[:, -1, -1]
    return last, last.sum()
