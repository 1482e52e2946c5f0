"""``moa_window``: MoA per-head elastic causal windows S_h(N) = alpha_h + beta_h N plus sinks; a profiler picks them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, seeded
from attnzoo.layers.local_sparse._common import FAMILY, rand_x
from attnzoo.layers.testing import mha_from
from attnzoo.ops import attention
from attnzoo.patterns import Causal, ElasticWindow, SlidingWindow
from attnzoo.patterns.base import Shape
from attnzoo.registry import Reduction, register


def moa_select(gains: torch.Tensor, densities: torch.Tensor, budget: float) -> list[int]:
    """Per head, the candidate index minimising the total estimated loss increase ``gains [H, C]``
    under ``mean_h densities[h, c_h] <= budget`` (a Lagrangian sweep, then a greedy repair)."""
    h, c = gains.shape
    if float(densities.min(1).values.mean()) > budget + 1e-12:
        raise ValueError(f"budget: {budget} is below the sparsest configuration's mean density "
                         f"{float(densities.min(1).values.mean()):.4f}")
    best, best_gain = None, float("inf")
    scale = float(gains.abs().max()) + 1e-12
    for lam in [0.0, *(scale * 10.0 ** e for e in torch.linspace(-6, 6, 121).tolist())]:
        choice = (gains + lam * densities).argmin(1)
        dens = float(densities[torch.arange(h), choice].mean())
        total = float(gains[torch.arange(h), choice].sum())
        if dens <= budget + 1e-12 and total < best_gain:
            best, best_gain = choice, total
    assert best is not None
    return best.tolist()


class MoAAttention(MultiHeadAttention):
    """MoA heterogeneous elastic windows (:class:`~attnzoo.patterns.ElasticWindow`): head ``h``
    attends causally to a window of span ``alpha_h + beta_h * N`` (``N`` the length) plus
    ``n_sink`` sink tokens. Always causal. :meth:`profile` picks ``(alpha_h, beta_h)`` per head
    from calibration data under an average-density budget.
    """

    refused_arguments = ('context_dim', 'pattern', 'score_mod')  # base-class arguments it sets itself or cannot honour

    def __init__(self, dim: int, n_heads: int = 8, *, alpha: Sequence[float] | None = None,
                 beta: Sequence[float] | None = None, n_sink: int = 0, **kw: Any) -> None:
        alpha = [64.0] * n_heads if alpha is None else list(alpha)
        beta = [0.0] * len(alpha) if beta is None else list(beta)
        super().__init__(dim, n_heads, pattern=ElasticWindow(alpha, beta, n_sink=n_sink), **kw)
        self.n_sink = n_sink

    def spans(self, n: int) -> tuple[int, ...]:
        return self.pattern.spans(n)

    def profile(self, x: torch.Tensor, loss_fn: Any, candidates: Sequence[tuple[float, float]],
                budget: float) -> list[tuple[float, float]]:
        """Choose ``(alpha_h, beta_h)`` per head from ``candidates`` on calibration input ``x``.

        The effect on the loss of dropping attention entry ``(i, j)`` is estimated to first
        order, softmax renormalisation included (MoA): ``A_ij (sum_n A_in G_in - G_ij)`` with
        ``G = dL/dA`` of dense causal attention; a configuration's cost is the sum over the
        entries it drops, its density the fraction of causal pairs it keeps. The choice
        minimises the summed cost under ``mean density <= budget``, is installed and returned.
        """
        q, k, v = self.project(x, x)
        s = Shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        z, w = attention(q, k, v, pattern=Causal(), backend="reference", return_weights=True,
                         scale=self.scale)
        loss = loss_fn(self.output(z, x))
        (g,) = torch.autograd.grad(loss, w)
        a, g = w.detach(), g.detach()
        keep_cost = (a * g).sum(-1, keepdim=True)
        per_entry = a * (keep_cost - g)  # [B, H, N, N]
        causal_pairs = s.n_q * (s.n_q + 1) / 2
        gains, dens = [], []
        for alpha, beta in candidates:
            span = max(1, min(s.n_kv, int(alpha + beta * s.n_kv)))
            kept = SlidingWindow(span, causal=True, n_sink=self.n_sink).dense_mask(s, q.device)[0, 0]
            gains.append(per_entry.masked_fill(kept, 0.0).sum((0, 2, 3)))
            dens.append(torch.full((s.heads,), float(kept.sum()) / causal_pairs))
        choice = moa_select(torch.stack(gains, 1), torch.stack(dens, 1), budget)
        chosen = [tuple(candidates[c]) for c in choice]
        self.pattern = ElasticWindow([c[0] for c in chosen], [c[1] for c in chosen], n_sink=self.n_sink)
        return chosen


def _moa_full_span_is_causal():
    m = seeded(MoAAttention, dim=32, n_heads=4, alpha=[2.0, 20.0], beta=[1.0, 0.0])
    x = rand_x()
    return m(x), mha_from(m)(x, causal=True)


def _moa_span_rule():
    m = MoAAttention(32, 4, alpha=[2.0, 4.0], beta=[0.5, 0.1])
    got = torch.tensor([m.spans(n) for n in (8, 16, 64)], dtype=torch.float64)
    rule = [[min(n, int(2 + 0.5 * n)), min(n, int(4 + 0.1 * n))] for n in (8, 16, 64)]
    want = torch.tensor(rule, dtype=torch.float64)
    return got, want


def _moa_budget():
    m = seeded(MoAAttention, dim=32, n_heads=4)
    x = rand_x(n=16)
    cands = [(2.0, 0.0), (4.0, 0.0), (2.0, 0.25), (16.0, 0.0)]
    m.profile(x, lambda y: y.pow(2).mean(), cands, budget=0.5)
    density = m.pattern.density(Shape(1, 4, 16, 16)) * 16 * 16 / (16 * 17 / 2)  # kept fraction of causal pairs
    return torch.tensor(min(density, 0.5), dtype=torch.float64), torch.tensor(density, dtype=torch.float64)


register(
    "moa_window", family=FAMILY, type="pattern", priority=3, papers=("MoA (mixture of sparse attention)",),
    supports={"self", "causal", "padding", "gqa"}, complexity="O(N * mean span)",
    summary="MoA per-head elastic causal windows S_h(N) = alpha_h + beta_h N plus sinks; a profiler picks them.",
    test_kwargs={"dim": 32, "n_heads": 4, "alpha": [2.0, 3.0], "beta": [0.25, 0.0], "n_sink": 1},
    reductions=(
        Reduction("full_span_is_causal", "spans >= N give dense causal attention", _moa_full_span_is_causal),
        Reduction("span_rule", "each head's span follows alpha_h + beta_h N as N changes", _moa_span_rule),
        Reduction("density_budget", "the profiler's choice keeps the mean density within the budget", _moa_budget),
    ),
)(MoAAttention)
