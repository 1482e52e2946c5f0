"""``set_transformer_pma``: Set Transformer pooling by multihead attention (PMA).

``PMA_k(Z) = MAB(S, rFF(Z))`` with k learnable seed vectors ``S``, where
``MAB(X, Y) = LN(H + rFF(H))`` and ``H = LN(X + MHA(X, Y, Y))`` (:class:`~attnzoo.layers.pooling._common.MAB`).
The seeds attend over the kept instances of each bag (padded or packed).
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, MAB, Bags, Pooler, rff
from attnzoo.registry import Reduction, register

__all__ = ["PMA"]


class PMA(Pooler):
    """PMA ``[B, N, C] -> [B, k, C]`` (``[B, C]`` for k = 1); weights ``[B, N, k, H]``."""

    def __init__(self, dim: int, n_heads: int = 4, *, n_seeds: int = 1) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.n_heads = check_int("n_heads", n_heads)
        self.n_seeds = check_int("n_seeds", n_seeds)
        self.seeds = nn.Parameter(torch.randn(n_seeds, dim) * dim ** -0.5)
        self.ff = rff(dim)
        self.mab = MAB(dim, self.n_heads)

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor]:
        z, a = self.mab.over_bags(self.seeds, bags, self.ff(bags.x), per_bag=False)
        return (z[:, 0] if self.n_seeds == 1 else z), a

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, n_seeds={self.n_seeds}"


def _x(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _permutation_invariant() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(PMA, dim=8, n_heads=2, n_seeds=3)
    x = _x(2, 11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    return m(x[:, perm]), m(x)


def _k_by_d_for_any_n() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(PMA, dim=8, n_heads=2, n_seeds=3)
    shapes = [list(m(_x(2, n)).shape) for n in (1, 4, 33)]
    return torch.tensor(shapes, dtype=torch.float64), torch.tensor([[2, 3, 8]] * 3, dtype=torch.float64)


register(
    "set_transformer_pma", family=FAMILY, type="pooler", priority=2, input_kind="set", papers=("Set Transformer",),
    supports={"padding", "varlen"}, complexity="O(k N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "n_heads": 4, "n_seeds": 2},
    summary="Set Transformer PMA: k learned seeds attend over rFF(Z) in a MAB block (LN(H + rFF(H)), "
            "H = LN(S + MHA(S, Z, Z))).",
    reductions=(
        Reduction("permutation_invariant", "PMA(PX) = PMA(X) for any permutation P", _permutation_invariant),
        Reduction("k_by_d", "the output is k x d for any n", _k_by_d_for_any_n),
    ),
)(PMA)
