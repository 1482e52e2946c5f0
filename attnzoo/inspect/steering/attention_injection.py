"""``attention_injection``: replace or blend a target pass's attention maps (or head outputs) with those recorded
from a source pass (MAKIMA, PrimeComposer, DiffUHaul)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, installed
from attnzoo.inspect.steering._common import COMMON, SteeringWrapper, check_targets, recorded, tiny_dit, tiny_lm
from attnzoo.registry import Reduction, register


def as_args(value: Any) -> tuple[Any, ...]:
    """Host arguments: a tuple as is, anything else as the single first argument (lists become tensors)."""
    if isinstance(value, tuple):
        return value
    return (value if isinstance(value, torch.Tensor) else torch.as_tensor(value),)


def blend(target: torch.Tensor, source: torch.Tensor, lam: float, name: str) -> torch.Tensor:
    """``(1 − λ) target + λ source``; ``source`` of batch 1 is shared by every target row."""
    if source.shape[1:] != target.shape[1:] or source.shape[0] not in (1, target.shape[0]):
        raise ValueError(f"source: recorded {name} {list(source.shape)} do not fit the target's "
                         f"{list(target.shape)} (same heads, queries and keys; batch 1 or the target's)")
    return (1 - lam) * target + lam * source.to(target.dtype)


class AttentionInjection(SteeringWrapper):
    """``A_tgt ← (1 − λ) A_tgt + λ A_src`` (``what="maps"``) or the same on the heads' outputs before W_O
    (``what="features"``), on ``layers`` (default all).

    ``source``: the host's arguments for the source pass (a tuple, or one tensor/list as the first
    argument): its maps are recorded at every call, then the target pass runs with the blend.
    ``lam``: a number, or a callable of the host's arguments (e.g. of the timestep in a denoising
    loop: a schedule λ_t) returning one. λ = 0 leaves the target unchanged; λ = 1 reproduces the
    source maps (or features) exactly. The source maps know nothing of the target's padding, so
    padded targets are not supported (pad neither pass or both the same way).
    """

    single_pass = False

    def __init__(self, host: nn.Module, source: Any, *, lam: Any = 1.0, what: str = "maps",
                 layers: Any = None) -> None:
        super().__init__(host)
        if what not in ("maps", "features"):
            raise ValueError(f"what: expected 'maps' or 'features', got {what!r}")
        if not callable(lam) and not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam: expected a fraction in [0, 1] or a schedule, got {lam!r}")
        self.source = as_args(source)
        self.lam = lam if callable(lam) else float(lam)
        self.what = what
        self.layers = list(check_targets(host, layers))

    def record(self) -> dict[int, torch.Tensor]:
        """The source pass's maps (or head outputs) per layer, detached."""
        with recorded(self.host, self.layers, "weights" if self.what == "maps" else "head_outputs") as got:
            self.host(*self.source)
        return {i: t.detach() for i, t in got.items()}

    @contextlib.contextmanager
    def inject(self, source: dict[int, torch.Tensor], lam: float) -> Iterator[nn.Module]:
        """Apply the blend with recorded ``source`` tensors (``{layer: [B, H, N, M or D]}``) inside the block."""
        edits = {}
        for i in self.layers:
            if self.what == "maps":
                edits[i] = LayerEdit(layer=i, weight_edits=[lambda w, s=source[i]: blend(w, s, lam, "maps")])
            else:
                edits[i] = LayerEdit(layer=i, z_edits=[lambda z, s=source[i]: blend(z, s, lam, "features")])
        with installed(self.host, edits):
            yield self.host

    def run(self, *args: Any, **kwargs: Any) -> Any:
        lam = float(self.lam(*args, **kwargs)) if callable(self.lam) else self.lam
        if lam == 0.0:
            return self.host(*args, **kwargs)
        with self.inject(self.record(), lam):
            return self.host(*args, **kwargs)


def _own_maps_change_nothing() -> tuple[torch.Tensor, torch.Tensor]:
    host, (x, t, text) = tiny_dit()
    got = AttentionInjection(host, (x[:1], t[:1], text[:1]), lam=1.0)(x[:1], t[:1], text[:1])
    return got, host(x[:1], t[:1], text[:1])


def _lam_zero() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    return AttentionInjection(host, tokens[1:], lam=0.0)(tokens), host(tokens)


def _lam_one_reproduces_source_maps() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    inj = AttentionInjection(host, tokens[1:], lam=1.0)
    src = inj.record()
    with inj.inject(src, 1.0), recorded(host, [0, 1]) as got:
        host(tokens[:1])
    return torch.stack([got[0], got[1]]), torch.stack([src[0], src[1]])


register(
    "attention_injection", priority=3, papers=("MAKIMA", "PrimeComposer", "DiffUHaul"),
    supports={"self", "cross", "causal"},
    reference="(1 − λ)A_tgt + λA_src on the reference weights (or head outputs), source recorded per call",
    summary="Blend or replace a pass's attention maps or head outputs with those of a source pass (schedule λ_t).",
    test_kwargs={"source": [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]], "lam": 0.7},
    reductions=(Reduction("own_maps", "injecting a pass's own maps changes nothing", _own_maps_change_nothing),
                Reduction("lam_zero", "λ = 0 leaves the target pass unchanged", _lam_zero),
                Reduction("lam_one", "λ = 1 reproduces the source maps exactly", _lam_one_reproduces_source_maps)),
    **COMMON,
)(AttentionInjection)
