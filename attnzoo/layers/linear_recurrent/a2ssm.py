"""``a2ssm``: A2Mamba MASS: multi-scale (local + dilated) attention maps aggregate selective-SSM hidden states."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_choice, check_int, check_mixer_input, zero_padded
from attnzoo.layers.linear_recurrent._common import FAMILY, rand_x
from attnzoo.layers.linear_recurrent.selective_ssm import SelectiveSSM
from attnzoo.ops import attention
from attnzoo.ops.linear import selective_scan
from attnzoo.patterns import DilatedWindow, KeyPadding, Neighborhood, SlidingWindow
from attnzoo.registry import Reduction, register


# ---------------------------------------------------------------------------------------- a2ssm
class A2SSM(nn.Module):
    """A2Mamba's attention-augmented SSM (MASS): attention maps aggregate the SSM hidden states.

    The ``selective_ssm`` branch computes hidden states ``h_t`` ``[E, S]`` per token. Multi-scale
    attention maps ``A = mean_s softmax_s(q kᵀ/√d)`` over a local window and dilated windows
    (``scales``: ``(window, dilation)`` pairs; 1-D over the sequence, or NATTEN neighbourhoods on a
    2-D ``grid``) then mix them spatially: ``h̃_t = Σ_j A_tj h_j``, ``y_t = C_tᵀ h̃_t + D x_t``,
    output ``(y ⊙ silu(z)) W_out``. ``attention_map="identity"`` skips the mixing (the plain SSM).
    Non-causal (a vision mixer). The exact A2Mamba map construction is [paper]; this is a
    faithful-in-spirit, not verified, layout.
    """

    def __init__(self, dim: int, *, d_state: int = 8, expand: int = 1, scales: tuple = ((3, 1), (3, 2)),
                 qk_dim: int = 16, grid: tuple[int, int] | None = None, attention_map: str = "multiscale",
                 backend: str = "auto", form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.ssm = SelectiveSSM(dim, d_state=d_state, expand=expand, form=form, chunk_size=chunk_size)
        self.scales = tuple((check_int("window", int(w)), check_int("dilation", int(d))) for w, d in scales)
        self.grid = grid
        self.attention_map = check_choice("attention_map", attention_map, ("multiscale", "identity"))
        self.qk = nn.Linear(dim, 2 * check_int("qk_dim", qk_dim))
        self.backend = backend

    @property
    def form(self) -> str:
        return self.ssm.form

    @form.setter
    def form(self, value: str) -> None:
        self.ssm.form = value

    def _pattern(self, window: int, dilation: int, n: int) -> Any:
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise ValueError(f"grid: expected H * W = N = {n}, got {self.grid}")
            k = 2 * window + 1
            return Neighborhood((k, k), dilation=dilation, grid=self.grid)
        return SlidingWindow(window) if dilation == 1 else DilatedWindow(window, dilation)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if causal or context is not None or cache is not None:
            raise ValueError("causal/context/cache: a2ssm is a non-causal (spatial) self mixer")
        b, n, _ = x.shape
        m = self.ssm
        u, dt, bm, cm, z, _ = m.ssm_inputs(x, mask, None)
        _, states = selective_scan(u, dt, -m.A_log.exp(), bm, cm, None, return_states=True, form=m.form,
                                   chunk_size=m.chunk_size)  # [B, N, E, S]
        if self.attention_map == "multiscale":
            flat = states.reshape(b, 1, n, -1)  # float32 for half inputs, like the states
            q, k = self.qk(zero_padded(x, mask)).unsqueeze(1).to(flat.dtype).chunk(2, dim=-1)  # [B, 1, N, qk]
            mixed = 0
            for window, dilation in self.scales:
                pattern = self._pattern(window, dilation, n)
                if mask is not None and not bool(mask.all()):
                    pattern = pattern & KeyPadding(mask)
                mixed = mixed + attention(q, k, flat, pattern=pattern, backend=self.backend)
            states = (mixed / len(self.scales)).reshape(states.shape)
        y = (states * cm.unsqueeze(-2).to(states.dtype)).sum(-1).to(x.dtype) + u * m.D
        return zero_padded(m.out_proj(y * F.silu(z)), mask)


def _a2ssm_identity_is_ssm() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = A2SSM(32, attention_map="identity").double()
    x = rand_x()
    return a(x), a.ssm(x)


def _a2ssm_shape() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = A2SSM(32, grid=(6, 6), scales=((1, 1), (1, 2))).double()
    y = a(rand_x(n=36))
    return torch.tensor(list(y.shape), dtype=torch.float64), torch.tensor([2.0, 36.0, 32.0], dtype=torch.float64)


register(
    "a2ssm", family=FAMILY, type="mixer", priority=3, papers=("A2Mamba",),
    supports={"self", "padding"}, complexity="O(N·window·E·S)",
    reference="the same module with backend='reference' and form='parallel' in float64",
    reference_kwargs={"backend": "reference", "form": "parallel"}, test_kwargs={"dim": 32, "d_state": 4},
    summary="A2Mamba MASS: multi-scale (local + dilated) attention maps aggregate selective-SSM hidden states.",
    reductions=(
        Reduction("identity_map_is_ssm", "an identity attention map gives the plain selective_ssm output",
                  _a2ssm_identity_is_ssm),
        Reduction("shape", "output shape is preserved (2-D grid)", _a2ssm_shape),
    ),
)(A2SSM)
