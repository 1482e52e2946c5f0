"""``abmil``: attention-based MIL pooling (gated ABMIL, multi-branch ACMIL with STKIM, MIDAM).

``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))`` over the kept instances of a bag and
``z = sum_i a_i h_i`` (``gated=False`` drops the sigmoid gate). ``n_branches`` M separate ``w``
give M bag embeddings (ACMIL's multi-branch attention). STKIM (training only, ``stkim=(K, ratio)``)
drops each of the top-K attended instances of a bag with probability ``ratio`` and renormalises
over the rest. ``mode="smoothed_max"`` is MIDAM's smoothed-max pooling
``tau * log mean_i exp(h_i / tau)`` per channel; :class:`MovingAveragePooling` is MIDAM's
moving-average estimator of the attention pooling numerator and denominator from sampled instances.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler, rank_in_bag
from attnzoo.registry import Reduction, register

__all__ = ["ABMIL", "MovingAveragePooling", "MODES"]

MODES = ("attention", "smoothed_max")


class ABMIL(Pooler):
    """Gated attention MIL pooling ``[B, N, C] -> [B, C]`` (``[B, M, C]`` with M > 1 branches).

    Weights: ``[B, N]`` (``[B, N, M]`` with M > 1). ``stkim``: ``(K, ratio)``, active in training only.
    ``mode="smoothed_max"`` has no weights and uses ``tau``.
    """

    def __init__(self, dim: int, *, attn_dim: int = 128, gated: bool = True, n_branches: int = 1,
                 stkim: tuple[int, float] | None = None, mode: str = "attention", tau: float = 1.0) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.n_branches = check_int("n_branches", n_branches)
        self.mode = check_choice("mode", mode, MODES)
        self.gated = bool(gated)
        if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau: expected a finite float > 0, got {tau!r}")
        self.tau = float(tau)
        if stkim is not None:
            if (not isinstance(stkim, (tuple, list)) or len(stkim) != 2 or not 0.0 <= float(stkim[1]) <= 1.0):
                raise ValueError(f"stkim: expected (K, ratio) with K >= 1 and 0 <= ratio <= 1, got {stkim!r}")
            stkim = (check_int("stkim K", stkim[0]), float(stkim[1]))
        self.stkim = stkim
        if mode == "attention":
            attn_dim = check_int("attn_dim", attn_dim)
            self.V = nn.Linear(dim, attn_dim)
            self.U = nn.Linear(dim, attn_dim) if gated else None
            self.w = nn.Linear(attn_dim, self.n_branches)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Instance scores ``[..., M]`` of instances ``h`` ``[..., C]``."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        return self.w(a)

    def pool(self, bags: Bags) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.mode == "smoothed_max":
            return smoothed_max(bags, bags.x, self.tau), None
        s = self.scores(bags.x)
        if self.training and self.stkim is not None:
            k, ratio = self.stkim
            drop = (rank_in_bag(bags, s) < k) & (torch.rand_like(s) < ratio)
            s = s.masked_fill(drop, float("-inf"))
        a = bags.softmax(s)
        z = bags.weighted_sum(a, bags.x)
        if self.n_branches == 1:
            return z[:, 0], a.squeeze(-1)
        return z, a

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}, gated={self.gated}, n_branches={self.n_branches}"


def smoothed_max(bags: Bags, v: torch.Tensor, tau: float) -> torch.Tensor:
    """MIDAM's smoothed max ``tau * log mean_i exp(v_i / tau)`` per bag and channel (zeros for an empty bag)."""
    s = v / tau
    top = bags.max(s.detach())
    e = torch.exp(s - bags.broadcast(top))
    mean = bags.mean(e)
    return tau * (torch.log(torch.where(mean > 0, mean, torch.ones_like(mean))) + top)


class MovingAveragePooling(nn.Module):
    """MIDAM's stochastic attention pooling: per-bag moving averages of the numerator and denominator.

    For bag ``j`` and sampled instances ``h`` ``[n, C]`` with scores ``s`` ``[n]``:
    ``num_j <- (1 - rate) num_j + rate * mean_i exp(s_i) h_i``, ``den_j <- (1 - rate) den_j +
    rate * mean_i exp(s_i)``; the estimate is ``num_j / den_j``. Rate 1 on the whole bag is exact
    attention pooling.
    """

    def __init__(self, pooler: ABMIL, n_bags: int, *, rate: float = 0.9) -> None:
        super().__init__()
        if pooler.mode != "attention" or pooler.n_branches != 1:
            raise ValueError("pooler: expected an attention-mode ABMIL with one branch")
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"rate: expected 0 < rate <= 1, got {rate!r}")
        self.pooler, self.rate = pooler, float(rate)
        self.register_buffer("num", torch.zeros(check_int("n_bags", n_bags), pooler.dim))
        self.register_buffer("den", torch.zeros(n_bags))

    def forward(self, bag: int, h: torch.Tensor) -> torch.Tensor:
        """Update bag ``bag`` with sampled instances ``h`` ``[n, C]``; return its estimate ``[C]``."""
        e = torch.exp(self.pooler.scores(h)[:, 0])
        num = (1 - self.rate) * self.num[bag].detach() + self.rate * (e.unsqueeze(-1) * h).mean(0)
        den = (1 - self.rate) * self.den[bag].detach() + self.rate * e.mean()
        self.num[bag], self.den[bag] = num.detach(), den.detach()
        return num / den


def _x(b: int = 2, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _eval_is_plain_multibranch() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ABMIL, dim=8, attn_dim=6, n_branches=3, stkim=(2, 0.5)).eval()
    plain = seeded(ABMIL, dim=8, attn_dim=6, n_branches=3)
    x = _x()
    return m(x), plain(x)


def _permutation_invariant() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ABMIL, dim=8, attn_dim=6)
    x = _x()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    return m(x[:, perm]), m(x)


def _rate_one_whole_bag() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ABMIL, dim=8, attn_dim=6)
    est = MovingAveragePooling(m, 2, rate=1.0).double()
    x = _x()
    return torch.stack([est(j, x[j]) for j in range(2)]), m(x)


def _stkim_renormalises() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ABMIL, dim=8, attn_dim=6, stkim=(3, 1.0)).train()
    x = _x()
    _, a = m(x, return_weights=True)
    top3 = m.eval()(x, return_weights=True)[1].argsort(1, descending=True)[:, :3]
    return torch.stack([a.sum(1), a.gather(1, top3).abs().sum(1)]), torch.stack([torch.ones(2), torch.zeros(2)])


register(
    "abmil", family=FAMILY, type="pooler", priority=2, input_kind="set", papers=("ACMIL", "MIDAM"),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "attn_dim": 16},
    summary="Gated attention MIL pooling (ABMIL) with multi-branch attention and STKIM top-K masking (ACMIL), "
            "MIDAM smoothed-max pooling and moving-average estimators; packed bags via a segment softmax.",
    reductions=(
        Reduction("eval_is_plain_multibranch", "with STKIM off (eval) it equals plain multi-branch ABMIL",
                  _eval_is_plain_multibranch),
        Reduction("permutation_invariant", "permutation-invariant over instances", _permutation_invariant),
        Reduction("rate_one_whole_bag", "sampling the whole bag with moving-average rate 1 gives exact "
                  "attention pooling", _rate_one_whole_bag),
        Reduction("stkim_renormalises", "STKIM with ratio 1 zeroes the top-K weights; the rest sum to 1",
                  _stkim_renormalises),
    ),
)(ABMIL)
