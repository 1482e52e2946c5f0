"""The oracle: materialise every score, softmax in the input precision (float64 stays float64).

Without gradients the scores are built a chunk of query rows at a time (the weights, when asked
for, written into their result tensor), so the peak memory is the weights plus one chunk; with
gradients every step is one dense tensor op (autograd keeps what it needs). Either way the peak is
estimated before any work and held to ``attnzoo.ops.config.limits.max_weights_bytes``.
"""

from __future__ import annotations

import torch

from attnzoo.ops.backends.base import Backend, Result, compute_dtype, index_grid
from attnzoo.ops.config import limits
from attnzoo.ops.problem import Problem

# Score elements ([B, H, rows, M]) of one chunk of the no-gradient path.
CHUNK_ELEMENTS = 1 << 20
# Memory per chunk element in the no-gradient path, measured (at most 7 values and 16 bytes) with a margin:
# chunk-sized temporaries in the compute dtype (scores, a score modifier's output and intermediates) and
# int64 / bool index temporaries of the pattern and the modifier (distances, masks).
CHUNK_TEMPORARIES = 8
CHUNK_INDEX_BYTES = 24
# Peak of the dense path with gradients and its backward, per score element: score-sized tensors (scores,
# modified, masked, weights, what autograd saves of them, the backward's) and the dense index and bool
# temporaries of the pattern and the modifier; measured at most 10.7 float32 / 7.4 float64 scores, with a margin.
GRAD_PEAK_SCORES = 8
GRAD_INDEX_BYTES = 24


def _chunk_rows(p: Problem) -> int:
    s = p.shape
    return max(1, min(s.n_q, CHUNK_ELEMENTS // max(1, s.batch * s.heads * s.n_kv)))


def peak_bytes(p: Problem) -> int:
    """Estimated peak memory of :meth:`Reference.run` on ``p`` (bytes), result tensors included."""
    s = p.shape
    size = torch.finfo(compute_dtype(p.q.dtype)).bits // 8
    out_size = p.q.element_size()
    scores = s.batch * s.heads * s.n_q * s.n_kv
    outputs = s.batch * s.heads * s.n_q * p.v.shape[-1] * (size + out_size)
    # a modifier's tensors in another dtype are converted (whole) on every use
    dtype = compute_dtype(p.q.dtype)
    copies = sum(t.numel() * size for t in (p.score_mod.tensors() if p.score_mod is not None else [])
                 if t.dtype != dtype or t.device != p.q.device)
    if p.needs_grad:
        return scores * (GRAD_PEAK_SCORES * size + GRAD_INDEX_BYTES) + copies + outputs
    weights = scores * (size if out_size == size else size + out_size) if p.return_weights else 0
    chunk = s.batch * s.heads * _chunk_rows(p) * s.n_kv
    return weights + chunk * (CHUNK_TEMPORARIES * size + CHUNK_INDEX_BYTES) + copies + outputs


class Reference(Backend):
    name = "reference"

    def why_not(self, p: Problem) -> str | None:
        s = p.shape
        need = peak_bytes(p)
        if need > limits.max_weights_bytes:
            what = "the weights [B, H, N, M]" if p.return_weights else "its chunks"
            how = "dense scores kept for gradients" if p.needs_grad else what
            return (
                f"the reference backend on [B, H, N, M] = [{s.batch}, {s.heads}, {s.n_q}, {s.n_kv}] needs about "
                f"{need / 2**30:.2f} GiB at its peak ({how}), over attnzoo.ops.config.limits.max_weights_bytes = "
                f"{limits.max_weights_bytes / 2**30:.2f} GiB"
            )
        return None

    def run(self, p: Problem) -> Result:
        if not p.needs_grad:
            return _chunked(p)
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


def _chunked(p: Problem) -> Result:
    """The no-gradient path, a chunk of query rows at a time; a row that sees no key (masked by the pattern or by
    ``-inf`` scores) gets zero weights, a zero output and an lse of ``-inf``."""
    s, dtype = p.shape, compute_dtype(p.q.dtype)
    bsz, heads, n, m = s.batch, s.heads, s.n_q, s.n_kv
    hkv, g = p.k.shape[1], p.groups
    k, v = p.k.to(dtype), p.v.to(dtype)
    k_t = k.transpose(-1, -2)
    out = torch.empty(bsz, heads, n, v.shape[-1], dtype=p.q.dtype, device=p.q.device)
    lse = torch.empty(bsz, heads, n, dtype=dtype, device=p.q.device) if p.return_lse else None
    weights = torch.empty(bsz, heads, n, m, dtype=p.q.dtype, device=p.q.device) if p.return_weights else None
    b, h, _, kvi = index_grid(p, p.q.device)
    step = _chunk_rows(p)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        r = rows.stop - rows.start
        qc = p.q[:, :, rows].to(dtype).reshape(bsz, hkv, g * r, -1)
        sc = torch.matmul(qc, k_t).view(bsz, heads, r, m).mul_(p.scale)
        qi = torch.arange(rows.start, rows.stop, device=p.q.device).view(1, 1, -1, 1)
        if p.score_mod is not None:
            sc = p.score_mod(sc, b, h, qi, kvi, s)
        if p.pattern is not None:
            allowed = torch.as_tensor(p.pattern.allow(b, h, qi, kvi, s), device=sc.device)
            sc = sc.masked_fill_(~allowed, float("-inf"))
            del allowed
        seen = (sc != float("-inf")).any(-1, keepdim=True)
        blind = not bool(seen.all())
        if blind:  # softmax over zeros, then zeroed
            sc = sc.masked_fill_(~seen, 0.0)
        if lse is not None:
            lse[:, :, rows] = torch.where(seen, torch.logsumexp(sc, dim=-1, keepdim=True), float("-inf")).squeeze(-1)
        w = torch.softmax(sc, dim=-1)  # torch's softmax: rounded as every other softmax (eager models, SDPA math)
        del sc
        if blind:
            w = w.masked_fill_(~seen, 0.0)
        out[:, :, rows] = torch.matmul(w.view(bsz, hkv, g * r, m), v).view(bsz, heads, r, -1)
        if weights is not None:
            weights[:, :, rows] = w
        del w
    return Result(out, weights, lse)
