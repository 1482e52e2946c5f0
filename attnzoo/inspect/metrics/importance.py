"""Head importance (catalogue 11.5 ``head_importance``): head-mask gradient (Michel et al. 2019),
ablation importance and the iterative pruning curve (the HF bertology recipe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import attention_layers, heads_of
from attnzoo.inspect.capture import run_model
from attnzoo.inspect.metrics._common import metric
from attnzoo.inspect.steer import steer

__all__ = ["ablation_importance", "head_importance", "pruning_curve"]


def _shape(model: nn.Module) -> tuple[int, int]:
    layers = attention_layers(model)
    hs = {heads_of(m) for _, m in layers}
    if len(hs) != 1 or None in hs:
        raise TypeError(f"head_importance: needs the same known head count in every layer, got {sorted(map(str, hs))}")
    return len(layers), hs.pop()


def _batches(inputs: Any) -> list[Any]:
    return list(inputs) if isinstance(inputs, list) else [inputs]


@metric("head_importance", priority=2, papers=("Are Sixteen Heads", "ViT attention visual analytics"),
        summary="I_h = E|∂L/∂ξ_h| from head-mask gradients (normalised per layer); ablation importance; "
                "iterative pruning curve.",
        reference="autograd of the loss through head_scale multipliers ξ = 1 (float64 in tests)")
def head_importance(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor], *,
                    mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """``[L, H]`` importance ``E_x |∂L(x)/∂ξ_h|`` (ξ the per-head output multipliers, at ``mask`` or 1).

    ``inputs``: one input or a list of batches; ``loss_fn(model_output) -> scalar``. ``normalize``:
    ℓ2-normalise each layer's scores (Michel et al., after Molchanov et al.).
    """
    n_layers, n_heads = _shape(model)
    base = torch.ones(n_layers, n_heads, dtype=torch.float64) if mask is None else mask.detach().double()
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    batches = _batches(inputs)
    for x in batches:
        xi = base.clone().requires_grad_(True)
        with steer(model, head_scale=xi):
            loss = loss_fn(run_model(model, x))
        (g,) = torch.autograd.grad(loss, xi)
        total += g.abs()
    imp = total / len(batches)
    if normalize:
        imp = imp / imp.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    return imp


def ablation_importance(model: nn.Module, inputs: Any, score_fn: Callable[[Any], torch.Tensor | float]) -> torch.Tensor:
    """``[L, H]``: ``score(base) − score(with head h of layer l ablated)`` (``head_scale`` ξ = 0)."""
    n_layers, n_heads = _shape(model)
    with torch.no_grad():
        base = float(score_fn(run_model(model, inputs)))
        out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        for layer in range(n_layers):
            for h in range(n_heads):
                with steer(model, head_scale={(layer, h): 0.0}):
                    out[layer, h] = base - float(score_fn(run_model(model, inputs)))
    return out


def pruning_curve(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor],
                  score_fn: Callable[[Any], torch.Tensor | float], *, step: float = 0.1,
                  steps: int | None = None) -> list[dict[str, Any]]:
    """Iterative pruning: mask the least important ``step`` fraction of all heads at a time,
    recomputing the importance under the current mask, and record ``score_fn`` after each step.

    Returns ``[{"pruned": fraction, "score": value, "mask": [L, H]}, ...]`` starting from no pruning.
    """
    n_layers, n_heads = _shape(model)
    total = n_layers * n_heads
    per_step = max(1, int(round(total * step)))
    mask = torch.ones(n_layers, n_heads, dtype=torch.float64)

    def score() -> float:
        with torch.no_grad(), steer(model, head_scale=mask):
            return float(score_fn(run_model(model, _batches(inputs)[0])))

    curve = [{"pruned": 0.0, "score": score(), "mask": mask.clone()}]
    limit = steps if steps is not None else total
    while int(mask.sum()) > 0 and len(curve) <= limit:
        imp = head_importance(model, inputs, loss_fn, mask=mask, normalize=True)
        imp = imp.masked_fill(mask == 0, float("inf")).flatten()
        k = min(per_step, int(mask.sum()))
        idx = imp.topk(k, largest=False).indices
        mask.view(-1)[idx] = 0.0
        curve.append({"pruned": 1 - float(mask.sum()) / total, "score": score(), "mask": mask.clone()})
    return curve


