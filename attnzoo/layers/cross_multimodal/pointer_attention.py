"""``pointer_attention``: Pointer Networks' additive attention whose softmax is the output distribution."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import check_int, seeded, zero_padded
from attnzoo.layers.cross_multimodal._common import FAMILY, check_cross_call, rand_x
from attnzoo.registry import Reduction, register


class PointerAttention(nn.Module):
    """Pointer attention (Vinyals et al. 2015): ``u_ij = vᵀ tanh(W1 e_j + W2 d_i)``,
    ``p(C_i = j) = softmax_j(u_ij)`` over the input positions; no context blending.

    Decoder states ``d`` are ``x`` ``[B, N, C]``; the pointed-to inputs ``e`` are ``context``
    ``[B, M, C_ctx]`` (or ``x`` itself). :meth:`probabilities` returns the distribution
    ``[B, N, M]`` (its size follows the input length; masked positions, padded ones and the
    ``exclude``-d already-chosen ones, get exactly 0; a row with nothing left is all zero).
    As a token mixer, :meth:`forward` returns the pointed input in expectation,
    ``W_o Σ_j p_ij e_j`` ``[B, N, C]``.
    """

    def __init__(self, dim: int, *, hidden: int | None = None, context_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.hidden = dim if hidden is None else check_int("hidden", hidden)
        self.context_width = dim if context_dim is None else check_int("context_dim", context_dim)
        self.w_enc = nn.Linear(self.context_width, self.hidden, bias=False)
        self.w_dec = nn.Linear(dim, self.hidden, bias=False)
        self.v = nn.Linear(self.hidden, 1, bias=False)
        self.o_proj = nn.Linear(self.context_width, dim)

    def logits(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``u`` ``[B, N, M]`` for decoder states ``x`` ``[B, N, C]`` and inputs ``src`` ``[B, M, C_ctx]``."""
        return self.v(torch.tanh(self.w_enc(src).unsqueeze(1) + self.w_dec(x).unsqueeze(2))).squeeze(-1)

    def probabilities(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                      context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``p`` ``[B, N, M]``: a distribution over the ``M`` input positions for each of the ``N`` steps.

        ``exclude`` bool ``[B, M]`` or ``[B, N, M]`` (True = already chosen, gets 0).
        """
        check_cross_call(self, x, mask, causal, context, context_mask, None, self.context_width, causal_ok=True)
        if context is not None and causal:
            raise ValueError("causal: a causal pointer is for self-attention (x points into itself); got a context")
        if context is None and self.context_width != self.dim:
            raise ValueError(f"context: required, this module points into a context of width {self.context_width}")
        src = x if context is None else context
        keep = mask if context is None else context_mask
        b, n, m = x.shape[0], x.shape[1], src.shape[1]
        allow = torch.ones(b, n, m, dtype=torch.bool, device=x.device)
        if keep is not None:
            allow = allow & keep[:, None, :]
        if causal:
            allow = allow & torch.ones(n, m, dtype=torch.bool, device=x.device).tril()
        if exclude is not None:
            if exclude.dtype != torch.bool or tuple(exclude.shape) not in ((b, m), (b, n, m)):
                raise ValueError(f"exclude: expected a bool tensor [{b}, {m}] or [{b}, {n}, {m}], got "
                                 f"{exclude.dtype} {list(exclude.shape)}")
            allow = allow & ~(exclude if exclude.dim() == 3 else exclude[:, None, :])
        u = self.logits(x, src).masked_fill(~allow, -math.inf)
        p = torch.softmax(u, -1)
        p = torch.where(allow.any(-1, keepdim=True), p, torch.zeros_like(p))
        return p if mask is None else p * mask[..., None].to(p.dtype)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``W_o (p @ e)`` ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding; ``context_mask`` the same for
        ``context``.
        """
        if cache is not None:
            raise ValueError("cache: PointerAttention does not decode token by token")
        p = self.probabilities(x, mask=mask, causal=causal, context=context, context_mask=context_mask)
        src = x if context is None else context
        return zero_padded(self.o_proj(p @ src), mask)


def _rows_sum_to_one() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(PointerAttention, dim=32)
    sums = []
    for n in (3, 7, 12):
        p = m.probabilities(rand_x(n=n, seed=n))
        assert p.shape[-1] == n
        sums.append(p.sum(-1).flatten())
    got = torch.cat(sums)
    return got, torch.ones_like(got)


def _masked_positions_get_zero() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(PointerAttention, dim=32)
    x = rand_x(n=8)
    chosen = torch.zeros(2, 8, dtype=torch.bool)
    chosen[0, [1, 4]] = True
    chosen[1, 7] = True
    p = m.probabilities(x, exclude=chosen)
    return torch.cat([p[0][:, [1, 4]].flatten(), p[1][:, 7], p.sum(-1).flatten() - 1]), torch.zeros(2 * 8 + 8 + 16)


register(
    "pointer_attention", family=FAMILY, type="mixer", priority=3, papers=("Pointer Networks",),
    supports={"self", "cross", "causal", "padding"}, complexity="O(N·M·hidden)", backends=("reference",),
    reference="the same module in float64 (additive attention has no kernel backend)", reference_kwargs={},
    summary="Pointer Networks: additive attention whose softmax over input positions is the output distribution.",
    test_kwargs={"dim": 32},
    reductions=(
        Reduction("sums_to_one", "the distribution has one entry per input position (any n) and sums to 1",
                  _rows_sum_to_one),
        Reduction("masked_zero", "already-chosen positions get exactly 0, the rest still sums to 1",
                  _masked_positions_get_zero),
    ),
)(PointerAttention)
