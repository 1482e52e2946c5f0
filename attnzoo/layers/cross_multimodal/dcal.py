"""``dcal``: DCAL dual cross-attention: global-local cross-attention (GLCA) and pair-wise cross-attention (PWCA)."""

from __future__ import annotations

import math
from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, check_int, load_shared, seeded, zero_padded
from attnzoo.layers.cross_multimodal._common import FAMILY, check_cross_call, rand_x
from attnzoo.ops import attention
from attnzoo.patterns import KeyPadding
from attnzoo.registry import Reduction, register


class DualCrossAttention(MultiHeadAttention):
    """DCAL (Zhu et al. 2022) on the projections of ``mha``.

    GLCA (no context): the ``top_r`` query tokens with the highest CLS attention (the head mean of
    the CLS row, or the per-call ``scores [B, N]``, e.g. an attention rollout; padded tokens are never
    chosen before kept ones) attend to all keys: ``softmax(Q_R Kᵀ/√d) V``; the other rows are zero.
    ``top_r >= N`` gives self-attention.

    PWCA (``context`` = the tokens of a paired distractor image, training only): every query
    attends over ``[K1; K2]`` and ``[V1; V2]``; a context in eval mode is refused. With the partner
    equal to the image itself it is self-attention (duplicated keys leave the average unchanged).
    """

    cab_not_applicable = {"NC": "its cross branch (PWCA, a partner image) exists only in training; CAB runs in eval"}

    def __init__(self, dim: int, n_heads: int = 8, *, top_r: int = 4, cls_index: int = 0, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.top_r = check_int("top_r", top_r)
        self.cls_index = check_int("cls_index", cls_index, minimum=0)

    refused_arguments = ("context_dim", "pattern", "rope", "score_mod", "n_kv_heads")

    def cls_scores(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Head-mean attention of the CLS query ``[B, N]`` (padded keys get -inf)."""
        s = torch.einsum("bhd,bhmd->bhm", q[:, :, self.cls_index], k) * (self.scale or 1 / math.sqrt(q.shape[-1]))
        if keep is not None:
            s = s.masked_fill(~keep[:, None], -math.inf)
        return torch.softmax(s, -1).nan_to_num(0.0).mean(1)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None, cache: Any = None,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (GLCA rows, or PWCA with ``context`` in training).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding; ``context_mask`` the same for
        ``context``.
        """
        check_cross_call(self, x, mask, causal, context, context_mask, cache, self.dim)
        b, n, _ = x.shape
        if self.cls_index >= n:
            raise ValueError(f"cls_index: {self.cls_index} is not a token of x with {n} tokens")
        if scores is not None and (scores.shape != (b, n) or scores.is_complex()):
            raise ValueError(f"scores: expected a real tensor [{b}, {n}], got {list(scores.shape)}")
        if context is not None and not self.training:
            raise ValueError("context: PWCA (pair-wise cross-attention with a partner image) is training-only; "
                             "got a context in eval mode")
        if scores is not None and context is not None:
            raise ValueError("scores: select GLCA queries; PWCA (with a context) attends from every query")
        q, k, v = self.project(x, x)
        scale = self.attention_scale(q)
        if context is not None:
            _, k2, v2 = self.project(context[:, :1], context)
            keep = torch.cat([torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask,
                              torch.ones(b, context.shape[1], dtype=torch.bool, device=x.device)
                              if context_mask is None else context_mask], 1)
            z = attention(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2),
                          pattern=None if bool(keep.all()) else KeyPadding(keep), scale=scale, backend=self.backend)
            return zero_padded(self.output(z, x), mask)
        pattern = None if mask is None or bool(mask.all()) else KeyPadding(mask)
        rank = self.cls_scores(q, k, mask) if scores is None else scores.to(q.dtype)
        if mask is not None:
            rank = rank.masked_fill(~mask, -math.inf)
        idx = rank.detach().topk(min(self.top_r, n), dim=-1).indices  # [B, R]
        q_r = q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        z = attention(q_r, k, v, pattern=pattern, scale=scale, backend=self.backend)
        y_r = self.output(z, x)
        y = torch.zeros_like(x[..., :1]).expand(-1, -1, y_r.shape[-1]).scatter(
            1, idx[..., None].expand(-1, -1, y_r.shape[-1]), y_r)
        return zero_padded(y, mask)


def _all_queries_is_self_attention() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(DualCrossAttention, dim=32, n_heads=4, top_r=10)
    ref = load_shared(m, MultiHeadAttention(32, 4)).double()
    x = rand_x()
    return m(x), ref(x)


def _pwca_with_itself_is_self_attention() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(DualCrossAttention, dim=32, n_heads=4, top_r=3)
    ref = load_shared(m, MultiHeadAttention(32, 4)).double()
    x = rand_x()
    return m(x, context=x), ref(x)


register(
    "dcal", family=FAMILY, type="mixer", priority=3, papers=("DCAL",),
    supports={"self", "cross", "padding"}, complexity="O(R·N) (GLCA), O(N·(N+M)) (PWCA)",
    summary="DCAL: top-R queries by CLS attention attend to all tokens (GLCA); training-only pair-wise "
            "cross-attention with a distractor's keys (PWCA).",
    test_kwargs={"dim": 32, "n_heads": 4, "top_r": 5},
    reductions=(
        Reduction("r_equals_n", "R = N gives self-attention", _all_queries_is_self_attention),
        Reduction("pwca_self_partner", "PWCA with the image as its own partner is self-attention",
                  _pwca_with_itself_is_self_attention),
    ),
)(DualCrossAttention)
