"""``activation_steering``: additive activation steering ``h ← h + α(x)·(m ⊙ v)`` at a head output, an
attention layer's output or any module's output (AUSteer, RL-trained steering vectors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, installed
from attnzoo.inspect.steering._common import (
    COMMON,
    SteeringTargetError,
    SteeringWrapper,
    check_pairs,
    check_targets,
    tiny_lm,
)
from attnzoo.registry import Reduction, register

SITES = ("head", "attention", "module")


class ActivationSteering(SteeringWrapper):
    """``h ← h + α(h)·(m ⊙ v)`` at one site, for the duration of a pass.

    ``site="head"``: the output of head ``head=(layer, h)`` before W_O (``v`` ``[head_dim]``; attnzoo
    mixers and Hugging Face models); ``"attention"``: the output of attention layer ``layer``
    (``v`` ``[C]``); ``"module"``: the output of the submodule named ``module`` (e.g. a block, the
    residual stream after it). ``mask`` ``m`` (bool or 0/1, default all ones) selects the dimensions
    (AUSteer's atomic units); ``alpha`` is a number or a callable of the site activation ``h``
    ``[..., N, d]`` returning a scale broadcastable to ``[..., N, 1]`` (input-adaptive α).
    ``m = 0`` or ``α = 0`` is the identity; only the selected dimensions change, by exactly ``α·v``.
    Single pass; also a context manager.
    """

    def __init__(self, host: nn.Module, vector: Any, *, site: str = "head", head: tuple[int, int] | None = None,
                 layer: int | None = None, module: str | None = None, mask: Any = None, alpha: Any = 1.0) -> None:
        super().__init__(host)
        if site not in SITES:
            raise ValueError(f"site: expected one of {SITES}, got {site!r}")
        self.site = site
        self.vector = torch.as_tensor(vector)
        if self.vector.dim() != 1 or not self.vector.is_floating_point():
            raise ValueError(f"vector: expected a float vector [d], got {self.vector.dtype} {list(self.vector.shape)}")
        self.mask = torch.ones_like(self.vector) if mask is None else torch.as_tensor(mask).to(self.vector.dtype)
        if self.mask.shape != self.vector.shape:
            raise ValueError(f"mask: expected {list(self.vector.shape)} like the vector, got {list(self.mask.shape)}")
        if not callable(alpha):
            alpha = float(alpha)
        self.alpha = alpha
        self.head = self.layer = self.module_name = None
        if site == "head":
            if head is None:
                raise ValueError("head: site='head' needs head=(layer, head)")
            ((self.layer, hs),) = check_pairs(host, [head]).items()
            self.head = hs[0]
        elif site == "attention":
            if layer is None:
                raise ValueError("layer: site='attention' needs layer=")
            (self.layer,) = check_targets(host, layer)
        else:
            names = dict(host.named_modules())
            if module not in names:
                raise SteeringTargetError(f"module: {module!r} is not a submodule of the host")
            self.module_name = module

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``α(h)·(m ⊙ v)`` for the site activation ``h`` ``[..., d]``."""
        if h.shape[-1] != self.vector.shape[0]:
            raise ValueError(f"vector: the site has width {h.shape[-1]}, the vector {self.vector.shape[0]}")
        a = self.alpha(h) if callable(self.alpha) else self.alpha
        return torch.as_tensor(a, dtype=h.dtype, device=h.device) * (self.mask * self.vector).to(h.dtype)

    def _head_edit(self, z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[:, self.head] = z[:, self.head] + self.delta(z[:, self.head])
        return z

    def edits(self) -> dict[int, LayerEdit]:
        return {self.layer: LayerEdit(layer=self.layer, z_edits=[self._head_edit])} if self.site == "head" else {}

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        if self.site == "head":
            with installed(self.host, self.edits()):
                yield self.host
            return
        if self.site == "attention":
            from attnzoo.inspect._edits import attention_layers

            target = attention_layers(self.host)[self.layer][1]
        else:
            target = dict(self.host.named_modules())[self.module_name]

        fired = []

        def hook(mod: nn.Module, inputs: Any, out: Any) -> Any:
            fired.append(True)
            if isinstance(out, tuple):
                return (out[0] + self.delta(out[0]), *out[1:])
            return out + self.delta(out)

        handle = target.register_forward_hook(hook)
        try:
            yield self.host
        finally:
            handle.remove()
        if not fired:
            raise RuntimeError(f"activation_steering: the site {self.module_name or self.layer!r} was never called "
                               "during the pass (a container such as a ModuleDict is not called: name a submodule)")


def _zero_vector() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    outs = [ActivationSteering(host, torch.zeros(8), head=(1, 0))(tokens),
            ActivationSteering(host, torch.ones(16), site="attention", layer=0, alpha=0.0)(tokens),
            ActivationSteering(host, torch.ones(16), site="module", module="blocks.0.mlp",
                               mask=torch.zeros(16))(tokens)]
    return torch.stack(outs), host(tokens).expand(3, -1, -1, -1)


register(
    "activation_steering", priority=3, papers=("AUSteer", "RL-trained steering vectors"),
    supports={"self", "causal", "padding"},
    reference="h + α(h)(m ⊙ v) at the chosen head output, attention output or module output",
    summary="Add a (masked, input-scaled) steering vector at a head output, attention output or module output.",
    test_kwargs={"vector": [0.5, -1.0, 2.0, 0.0, 1.0, 0.25, -0.5, 1.5], "head": (1, 2),
                 "mask": [1, 1, 1, 0, 1, 0, 1, 1], "alpha": 2.0},
    reductions=(Reduction("zero_is_identity", "v = 0, α = 0 or m = 0 is the identity", _zero_vector),),
    **COMMON,
)(ActivationSteering)
