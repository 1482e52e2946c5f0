"""Activation patching of head outputs (catalogue 11.10 ``activation_patching``) and circuit overlap."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, attention_layers, check_head, check_layers, heads_of, installed
from attnzoo.inspect.capture import capture, run_model
from attnzoo.inspect.metrics._common import metric

__all__ = ["activation_patching", "circuit_overlap", "patched_run"]


def patched_run(model: nn.Module, inputs: Any, source: Any, heads: Iterable[tuple[int, int]],
                positions: Any = None) -> Any:
    """Run ``model(inputs)`` with the outputs (before W_O) of ``heads`` replaced by those in ``source``
    (a :class:`~attnzoo.inspect.Cache` with ``head_outputs``); ``positions`` restricts the query rows."""
    layers = attention_layers(model)
    n = len(layers)
    per: dict[int, list[int]] = {}
    for layer, h in heads:
        (layer,) = check_layers(layer, n)
        per.setdefault(layer, []).append(check_head(layer, h, heads_of(layers[layer][1])))

    def make(layer: int, hs: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        src = source["head_outputs", layer]

        def fn(z: torch.Tensor) -> torch.Tensor:
            if src.shape != z.shape:
                raise ValueError(f"activation_patching: layer {layer} head outputs have shape {list(z.shape)} "
                                 f"in this run but {list(src.shape)} in the source run")
            sel = torch.zeros(z.shape[1], 1, 1, dtype=torch.bool, device=z.device)
            sel[hs] = True
            if positions is not None:
                rows = torch.zeros(z.shape[2], 1, dtype=torch.bool, device=z.device)
                rows[positions] = True
                sel = sel & rows
            return torch.where(sel, src.to(z.dtype), z)
        return fn

    edits = {layer: LayerEdit(layer=layer, z_edits=[make(layer, hs)]) for layer, hs in per.items()}
    with installed(model, edits):
        return run_model(model, inputs)


@metric("activation_patching", priority=2,
        papers=("Circuit component reuse (IOI)", "Chinchilla circuit analysis"),
        summary="Patch each head's output from a source run into a target run; effect on a metric; "
                "circuit head-set overlap.",
        reference="the same forward passes in float64 with the head outputs replaced before W_O")
def activation_patching(model: nn.Module, clean: Any, corrupted: Any, metric_fn: Callable[[Any], Any], *,
                        heads: Iterable[tuple[int, int]] | None = None, positions: Any = None,
                        direction: str = "denoise") -> torch.Tensor:
    """Effect ``[L, H]`` of patching each head: ``metric(patched) − metric(target run)``.

    ``direction="denoise"``: clean activations into the corrupted run (default);
    ``"noise"``: corrupted activations into the clean run. ``heads`` limits the heads tried.
    """
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction: expected 'denoise' or 'noise', got {direction!r}")
    src_in, dst_in = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    layers = attention_layers(model)
    with torch.no_grad():
        src = capture(model, src_in, what=("head_outputs",))
        base = float(metric_fn(run_model(model, dst_in)))
        shape = (len(layers), max(heads_of(m) or 0 for _, m in layers))
        out = torch.full(shape, float("nan"), dtype=torch.float64)
        todo = list(heads) if heads is not None else [(li, h) for li, (_, m) in enumerate(layers)
                                                      for h in range(heads_of(m) or 0)]
        for layer, h in todo:
            out[layer, h] = float(metric_fn(patched_run(model, dst_in, src, [(layer, h)], positions))) - base
    return out


def circuit_overlap(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> float:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of two circuits' head sets (1 for a circuit with itself)."""
    sa, sb = set(map(tuple, a)), set(map(tuple, b))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
