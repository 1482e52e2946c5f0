"""``set_transformer_isab``: Set Transformer induced set attention block (a permutation-equivariant mixer).

``ISAB_m(X) = MAB(X, H)`` with ``H = MAB(I, X)`` and ``I`` ``[m, C]`` learnable inducing points:
two attentions, ``m x n`` and ``n x m``, so O(n m) instead of O(n^2). Padded tokens are left
out of ``H`` and their output rows are zero.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int, check_mixer_input, seeded, zero_padded
from attnzoo.layers.pooling._common import FAMILY, MAB
from attnzoo.registry import Reduction, register

__all__ = ["ISAB"]


class ISAB(nn.Module):
    """ISAB token mixer ``[B, N, C] -> [B, N, C]`` (``mask`` bool ``[B, N]``, True = keep)."""

    def __init__(self, dim: int, n_heads: int = 4, *, n_inducing: int = 16) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.n_heads = check_int("n_heads", n_heads)
        self.n_inducing = check_int("n_inducing", n_inducing)
        self.inducing = nn.Parameter(torch.randn(n_inducing, dim) * dim ** -0.5)
        self.mab_in = MAB(dim, n_heads)
        self.mab_out = MAB(dim, n_heads)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``mask`` bool ``[B, N]``, True = keep. ``causal`` and ``context``
        are refused (a set has no order, ISAB no cross input)."""
        check_mixer_input(x, mask, None, self.dim)
        if causal:
            raise ValueError("causal: set_transformer_isab is permutation-equivariant and has no causal form")
        if context is not None:
            raise ValueError("context: set_transformer_isab is a self-attention block; it takes no context")
        ind = self.inducing.to(x.dtype).expand(x.shape[0], self.n_inducing, self.dim)
        h = self.mab_in(ind, x, mask)
        return zero_padded(self.mab_out(x, h), mask)

    def attention_maps(self, x: torch.Tensor, *,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two attention maps: inducing points over the set ``[B, H, m, N]``, the set over them ``[B, H, N, m]``."""
        check_mixer_input(x, mask, None, self.dim)
        ind = self.inducing.to(x.dtype).expand(x.shape[0], self.n_inducing, self.dim)
        h, a_in = self.mab_in.attend(ind, x, mask)
        return a_in, self.mab_out.attend(x, h)[1]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, n_inducing={self.n_inducing}"


def _equivariant() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ISAB, dim=8, n_heads=2, n_inducing=3)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    return m(x[:, perm]), m(x)[:, perm]


register(
    "set_transformer_isab", family=FAMILY, type="mixer", priority=2, input_kind="set", papers=("Set Transformer",),
    supports={"self", "padding"}, complexity="O(N m)", backends=(),
    reference="the same module in float64", reference_kwargs={},
    test_kwargs={"dim": 32, "n_heads": 4, "n_inducing": 4},
    summary="Set Transformer ISAB: m inducing points read the set (MAB(I, X)) and every element reads them back "
            "(MAB(X, H)); O(n m), permutation-equivariant.",
    reductions=(Reduction("permutation_equivariant", "f(PX) = P f(X)", _equivariant),),
)(ISAB)
