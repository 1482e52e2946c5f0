"""The backend protocol: say why a problem cannot run here, or run it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import torch

from attnzoo.ops.dtypes import compute_dtype  # noqa: F401  (the backends import it from here)
from attnzoo.ops.problem import Problem

# From this fraction of the (query, key) work a pattern keeps (of its tiles, or of the keys per query), a masked
# dense kernel beats skipping the rest; `auto` uses it for SDPA vs blocksparse and for gather.
DENSE_FRACTION = 0.5


class Result(NamedTuple):
    """``out`` ``[B, H, N, D_v]``; ``weights`` ``[B, H, N, M]`` and ``lse`` ``[B, H, N]`` when asked for."""

    out: torch.Tensor
    weights: torch.Tensor | None = None
    lse: torch.Tensor | None = None


class Backend:
    """A way to compute attention. ``why_not`` returns None when the backend can run ``p``."""

    name: str = ""

    def why_not(self, p: Problem) -> str | None:
        raise NotImplementedError

    def run(self, p: Problem) -> Result:
        raise NotImplementedError

    def prepare(self, p: Problem) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Result]:
        """A runner for new tensors of the same validated problem (used to skip re-dispatch).

        The runner must not keep ``p``'s tensors alive: it is stored in the dispatch memo.
        """
        template = replace(p, q=None, k=None, v=None)

        def runner(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Result:
            return self.run(replace(template, q=q, k=k, v=v))

        return runner


def index_grid(p: Problem, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Broadcasting ``b [B,1,1,1]``, ``h [1,H,1,1]``, ``q [1,1,N,1]``, ``kv [1,1,1,M]``."""
    s = p.shape
    return (
        torch.arange(s.batch, device=device).view(-1, 1, 1, 1),
        torch.arange(s.heads, device=device).view(1, -1, 1, 1),
        torch.arange(s.n_q, device=device).view(1, 1, -1, 1),
        torch.arange(s.n_kv, device=device).view(1, 1, 1, -1),
    )
