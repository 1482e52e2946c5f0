"""The oracle: materialise every score, softmax in the input precision (float64 stays float64)."""

from __future__ import annotations

import torch

from attnzoo.ops.backends.base import Backend, Result, compute_dtype, index_grid
from attnzoo.ops.config import limits
from attnzoo.ops.problem import Problem


class Reference(Backend):
    name = "reference"

    def why_not(self, p: Problem) -> str | None:
        s = p.shape
        need = s.batch * s.heads * s.n_q * s.n_kv * torch.finfo(compute_dtype(p.q.dtype)).bits // 8
        if need > limits.max_weights_bytes:
            return (
                f"materialising [B, H, N, M] = [{s.batch}, {s.heads}, {s.n_q}, {s.n_kv}] scores needs "
                f"{need / 2**30:.2f} GiB, over attnzoo.ops.config.limits.max_weights_bytes = "
                f"{limits.max_weights_bytes / 2**30:.2f} GiB"
            )
        return None

    def run(self, p: Problem) -> Result:
        dtype = compute_dtype(p.q.dtype)
        q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))
        if p.groups > 1:
            k, v = k.repeat_interleave(p.groups, dim=1), v.repeat_interleave(p.groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * p.scale
        b, h, qi, kvi = index_grid(p, q.device)
        if p.score_mod is not None:
            scores = p.score_mod(scores, b, h, qi, kvi, p.shape)
        if p.pattern is not None:
            scores = scores.masked_fill(~p.pattern.dense_mask(p.shape, q.device), float("-inf"))
        # A row that sees no key (masked by the pattern, a -inf bias or a score_mod returning -inf): softmax
        # over zeros, then zeroed, so the row and its gradients are zeros, never NaN.
        row_any = (scores != float("-inf")).any(-1, keepdim=True)
        scores = torch.where(row_any, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        weights = torch.softmax(scores, dim=-1) * row_any
        lse = torch.where(row_any[..., 0], torch.logsumexp(scores, dim=-1), float("-inf"))
        out = torch.matmul(weights, v).to(p.q.dtype)
        return Result(out, weights.to(p.q.dtype) if p.return_weights else None, lse if p.return_lse else None)
