"""``context_broadcast``: Parameter-free uniform attention: x_i <- 0.5 x_i + 0.5 mean_j x_j."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, zero_padded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.registry import Reduction, register


class ContextBroadcast(nn.Module):
    """Context broadcasting: ``x_i ← (1 − alpha)·x_i + alpha·mean_j x_j`` (parameter-free).

    The abstract (Hyeon-Woo et al.) says uniform attention is inserted with "1 line in your
    model code, no additional parameters"; it does not give the coefficient, so the
    catalogue's [recalled] 0.5 is the default of ``alpha``, not verified. The mean runs over
    kept tokens (``mask``); with ``causal=True`` it is the running mean over the prefix, and
    decoding keeps the running sum in the cache.
    """

    def __init__(self, dim: int, *, alpha: float = 0.5) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a float in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: context_broadcast is self-attention only")
        w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
        xw = x * w.unsqueeze(-1)
        if causal or cache is not None:
            s, c = xw.cumsum(1), w.cumsum(1)
            if cache is not None:
                cache.claim_batch(x.shape[0])
                prev_s, prev_c = cache.state.get("sum"), cache.state.get("count")
                if prev_s is not None:
                    s, c = s + prev_s, c + prev_c
                cache.state["sum"], cache.state["count"] = s[:, -1:], c[:, -1:]
                cache.advance(x.shape[1])
            mean = s / c.clamp(min=1).unsqueeze(-1)
        else:
            mean = xw.sum(1, keepdim=True) / w.sum(1).clamp(min=1).view(-1, 1, 1)
        return zero_padded((1 - self.alpha) * x + self.alpha * mean, mask)


def _cb_no_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    m = ContextBroadcast(32)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    return torch.tensor(float(n), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)


def _cb_fixed_point() -> tuple[torch.Tensor, torch.Tensor]:
    x = rand_x(n=1).expand(2, 9, 32).contiguous()
    return ContextBroadcast(32)(x), x


def _cb_equivariant() -> tuple[torch.Tensor, torch.Tensor]:
    x = rand_x()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    m = ContextBroadcast(32)
    return m(x[:, perm]), m(x)[:, perm]


register(
    "context_broadcast", family=FAMILY, type="mixer", priority=3, papers=("Context Broadcasting",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="closed form (the same module) in float64", reference_kwargs={},
    summary="Parameter-free uniform attention: x_i <- 0.5 x_i + 0.5 mean_j x_j.",
    test_kwargs={"dim": 32},
    reductions=(
        Reduction("no_parameters", "the layer has no parameters (and no buffers)", _cb_no_parameters),
        Reduction("constant_fixed_point", "an input constant over tokens is a fixed point", _cb_fixed_point),
        Reduction("permutation_equivariant", "permuting tokens permutes the output", _cb_equivariant),
    ),
)(ContextBroadcast)
