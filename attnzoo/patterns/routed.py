"""Routed attention's patterns: queries gathered per route (head or expert) keep their true positions.

:class:`GatheredCausal` is causality for gathered queries; :func:`routed_attention` attends the
gathered queries of every route with it (its float64 oracle is
:func:`attnzoo.ops.routed.routed_attention_reference`; the token gathering is
:func:`attnzoo.ops.routed.gather_routes`).
"""

from __future__ import annotations

import torch

from attnzoo.ops import attention
from attnzoo.ops.routed import GATHER_CHUNK
from attnzoo.patterns.base import Pattern
from attnzoo.patterns.segments import KeyPadding

__all__ = ["GatheredCausal", "routed_attention"]


class GatheredCausal(Pattern):
    """Causality for gathered queries: query slot ``c`` of (batch b, head h) sits at key index ``qpos[b, h, c]``.

    ``allow = kv <= qpos[b, h, q]``; a slot with ``qpos = -1`` sees nothing (padding slots of
    the gather). Block bounds come from the per-block minimum and maximum of ``qpos``, so the
    chunked backend skips the key blocks after each query block.
    """

    per_batch = True
    per_head = True

    def __init__(self, qpos: torch.Tensor) -> None:
        self.qpos = qpos

    def allow(self, b, h, q, kv, shape):
        return kv <= self.qpos[b, h, q]

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        n = self.qpos.shape[-1]
        block = int(q_hi[0, 0] - q_lo[0, 0] + 1) if q_lo.shape[0] > 1 else n
        nqb = q_lo.shape[0]
        pad = nqb * block - n
        hi = torch.nn.functional.pad(self.qpos, (0, pad), value=-1).view(*self.qpos.shape[:2], nqb, block)
        lo = torch.nn.functional.pad(self.qpos, (0, pad), value=n + shape.n_kv).view(*self.qpos.shape[:2], nqb,
                                                                                      block)
        qmax, qmin = hi.amax(-1, keepdim=True), lo.amin(-1, keepdim=True)
        return k_lo <= qmax, k_hi <= qmin


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, *, causal: bool,
                     keep: torch.Tensor | None = None, scale: float | None = None, backend: str = "auto",
                     chunk: int = GATHER_CHUNK) -> torch.Tensor:
    """Attention of gathered queries ``q`` ``[B, R, C, D]`` over ``k``/``v`` ``[B, R, M, D]``.

    ``qpos`` ``[B, R, C]``: the key index each query sits at (``-1``: an empty slot).
    ``causal``: a query sees the keys up to its position; calls split the slots (sorted by
    position) into chunks of ``chunk`` and each chunk reads only the keys up to its last
    position, so the routes do about half the work of a full pass, as a causal kernel would.
    ``keep`` bool ``[B, M]`` pads keys. Without ``causal`` every slot sees every kept key.
    """
    pad = KeyPadding(keep) if keep is not None and not bool(keep.all()) else None
    if not causal:
        return attention(q, k, v, pattern=pad, scale=scale, backend=backend)
    outs = []
    for start in range(0, q.shape[2], chunk):
        sl = slice(start, start + chunk)
        qp = qpos[:, :, sl]
        m = max(int(qp.max()) + 1, 1)
        pattern = GatheredCausal(qp) if pad is None else GatheredCausal(qp) & KeyPadding(keep[:, :m])
        outs.append(attention(q[:, :, sl], k[:, :, :m], v[:, :, :m], pattern=pattern, scale=scale, backend=backend))
    return torch.cat(outs, 2)
