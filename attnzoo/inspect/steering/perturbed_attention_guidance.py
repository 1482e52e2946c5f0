"""``perturbed_attention_guidance``: SoftPAG perturbed-attention guidance on selected heads, with HeadHunter's
greedy head selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, installed
from attnzoo.inspect.steering._common import COMMON, SteeringWrapper, check_pairs, head_select, tiny_dit, tiny_lm
from attnzoo.registry import Reduction, register


def soften(w: torch.Tensor, u: float, heads: list[int] | None = None) -> torch.Tensor:
    """``A' = (1 − u) A + u I`` on the selected heads of ``w`` ``[B, H, N, N]`` (rows still sum to 1)."""
    n, m = w.shape[-2:]
    if n != m:
        raise ValueError(f"perturbed_attention_guidance: the identity map needs self-attention, got {n} queries "
                         f"x {m} keys")
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    return torch.where(head_select(w.shape[1], heads, w), (1 - u) * w + u * eye, w)


def headhunter(objective: Callable[[list[tuple[int, int]]], float], candidates: Sequence[tuple[int, int]],
               k: int) -> list[tuple[int, int]]:
    """HeadHunter: greedily add the candidate ``(layer, head)`` that maximises ``objective(selected)``, ``k`` times."""
    if not isinstance(k, int) or not 0 <= k <= len(candidates):
        raise ValueError(f"k: expected an integer in 0..{len(candidates)}, got {k!r}")
    chosen: list[tuple[int, int]] = []
    left = list(candidates)
    for _ in range(k):
        best = max(left, key=lambda c: objective([*chosen, c]))
        chosen.append(best)
        left.remove(best)
    return chosen


class PerturbedAttentionGuidance(SteeringWrapper):
    """``ε̂ = ε + s (ε − ε_pert)``: ``ε`` the host's output, ``ε_pert`` its output with the weak attention
    ``A' = (1 − u) A + u I`` on the selected self-attention ``heads`` (``(layer, head)`` pairs).
    ``scale = 0`` returns the unguided output (one pass); ``u = 1`` makes each selected head output
    its own values. Two passes: call it like the host (e.g. as the model of
    :func:`~attnzoo.bench.models.ddim_sample`)."""

    single_pass = False

    def __init__(self, host: nn.Module, heads: Sequence[tuple[int, int]] = (), *, u: float = 1.0,
                 scale: float = 1.0) -> None:
        super().__init__(host)
        if not 0.0 <= float(u) <= 1.0:
            raise ValueError(f"u: expected a fraction in [0, 1], got {u!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale: expected a finite number, got {scale!r}")
        self.u, self.scale = float(u), float(scale)
        self.targets = check_pairs(host, heads)

    def perturbed(self) -> dict[int, LayerEdit]:
        return {i: LayerEdit(layer=i, weight_edits=[lambda w, hs=hs: soften(w, self.u, hs)])
                for i, hs in self.targets.items()}

    def run(self, *args: Any, **kwargs: Any) -> Any:
        eps = self.host(*args, **kwargs)
        if self.scale == 0 or not self.targets:
            return eps
        with installed(self.host, self.perturbed()):
            eps_pert = self.host(*args, **kwargs)
        return eps + self.scale * (eps - eps_pert)


def _scale_zero() -> tuple[torch.Tensor, torch.Tensor]:
    host, (x, t, text) = tiny_dit()
    return PerturbedAttentionGuidance(host, [(0, 1), (2, 0)], u=1.0, scale=0.0)(x, t, text), host(x, t, text)


def _u_zero() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    return PerturbedAttentionGuidance(host, [(0, 1), (1, 0)], u=0.0, scale=3.0)(tokens), host(tokens)


register(
    "perturbed_attention_guidance", priority=3, papers=("HeadHunter/SoftPAG",),
    supports={"self", "causal", "padding"},
    reference="ε + s(ε − ε_pert), ε_pert with A' = (1 − u)A + uI on the reference weights of the chosen heads",
    summary="SoftPAG: guide away from a weak model whose chosen heads blend their attention with the identity.",
    test_kwargs={"heads": [(0, 1), (1, 0)], "u": 1.0, "scale": 2.0},
    reductions=(Reduction("scale_zero", "scale 0 gives the unguided denoiser output", _scale_zero),
                Reduction("u_zero", "u = 0 leaves the host unperturbed (guidance adds 0)", _u_zero)),
    **COMMON,
)(PerturbedAttentionGuidance)
