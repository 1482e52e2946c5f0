"""``selective_ssm``: Mamba-style selective state-space block (input-dependent Δ, B, C; chunked scan)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.linear_recurrent._common import FAMILY, PARALLEL, both_forms, check_form, inv_softplus, rand_x
from attnzoo.layers.recurrent import ShortConv, cache_state, step_form
from attnzoo.ops.linear import selective_scan
from attnzoo.registry import Reduction, register


class SelectiveSSM(nn.Module):
    """Mamba-style selective SSM block.

    ``[x, z] = X W_in``; ``x ← silu(causal depthwise conv(x))``; ``Δ, B, C`` from ``x``
    (``Δ = softplus(W_Δ (x W_r))`` through a rank-``dt_rank`` bottleneck); then per channel and
    state ``h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t``, ``y_t = C_tᵀ h_t + D x_t``; output
    ``(y ⊙ silu(z)) W_out``. ``A = −exp(A_log)`` with the S4D-real init ``A_log[c, s] = log(s+1)``,
    ``D = 1``, ``Δ`` bias initialised so that ``softplus`` of it is log-uniform in
    ``[dt_min, dt_max]`` (Mamba's initialisation [recalled]).
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, bias: bool = False, conv_bias: bool = True,
                 form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.d_state = check_int("d_state", d_state)
        self.d_inner = e = check_int("expand", expand) * dim
        self.dt_rank = check_int("dt_rank", dt_rank if dt_rank is not None else math.ceil(dim / 16))
        self.form, self.chunk_size = check_form(form, chunk_size)
        self.in_proj = nn.Linear(dim, 2 * e, bias=bias)
        self.conv = ShortConv(e, check_int("d_conv", d_conv), bias=conv_bias)
        self.x_proj = nn.Linear(e, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, e, bias=True)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus(dt))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, dim, bias=bias)

    def ssm_inputs(self, x: torch.Tensor, mask: torch.Tensor | None, conv_prev: torch.Tensor | None
                   ) -> tuple[torch.Tensor, ...]:
        """``(u, Δ, B, C, z, new_conv_prev)`` for ``x`` ``[B, N, C]`` (padded tokens get Δ = 0)."""
        if mask is not None:
            x = zero_padded(x, mask)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u, conv_prev = self.conv(u, conv_prev)
        dt_low, bm, cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low))
        if mask is not None:
            dt = dt * mask.unsqueeze(-1).to(dt.dtype)
        return u, dt, bm, cm, z, conv_prev

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: selective_ssm is a causal sequence mixer")
        state = cache_state(cache, "selective_ssm", x.shape[0])
        n = x.shape[1]
        u, dt, bm, cm, z, conv_prev = self.ssm_inputs(x, mask, None if state is None else state.get("conv"))
        form = step_form(self.form, n) if state is not None else self.form
        res = selective_scan(u, dt, -self.A_log.exp(), bm, cm, self.D, form=form, chunk_size=self.chunk_size,
                             initial_state=None if state is None else state.get("h"),
                             output_final_state=state is not None)
        if state is not None:
            y, state["h"] = res
            state["conv"] = conv_prev
            cache.advance(n)
        else:
            y = res
        return zero_padded(self.out_proj(y * F.silu(z)), mask)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"form={self.form}, chunk_size={self.chunk_size}")


def _ssm_forms() -> tuple[torch.Tensor, torch.Tensor]:
    return both_forms(seeded(SelectiveSSM, dim=32, d_state=4, chunk_size=3), rand_x())


def _ssm_zero_b_is_skip() -> tuple[torch.Tensor, torch.Tensor]:
    """With B ≡ 0 the state stays zero and y = D x: the block reduces to its gated skip path."""
    m = seeded(SelectiveSSM, dim=32, d_state=4)
    with torch.no_grad():
        m.x_proj.weight[m.dt_rank:m.dt_rank + m.d_state] = 0
    x = rand_x()
    u, _, _, _, z, _ = m.ssm_inputs(x, None, None)
    return m(x), m.out_proj(u * m.D * F.silu(z))


register(
    "selective_ssm", family=FAMILY, type="memory", priority=2, papers=("baseline",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="the same module with form='parallel' (materialised scan) in float64", reference_kwargs=PARALLEL,
    test_kwargs={"dim": 32, "d_state": 4, "chunk_size": 5},
    summary="Mamba-style selective state-space block (input-dependent Δ, B, C; chunked scan).",
    reductions=(
        Reduction("scan_equals_recurrence", "step-by-step recurrence = chunked scan = materialised scan", _ssm_forms),
        Reduction("zero_b_is_skip", "B ≡ 0 leaves the state at zero: y = D x (the gated skip path)",
                  _ssm_zero_b_is_skip),
    ),
)(SelectiveSSM)


# The rest of section 5 lives in sibling modules that build on this one; importing them here
# registers every section-5 entry when attnzoo.layers imports this module.
