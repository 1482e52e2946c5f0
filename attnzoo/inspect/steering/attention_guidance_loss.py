"""``attention_guidance_loss``: losses on concept-token cross-attention maps and the test-time latent update
they drive (Attend-and-Excite, A-STAR, AttenCraft)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from attnzoo.inspect.steering._common import (
    COMMON,
    SteeringTargetError,
    SteeringWrapper,
    check_targets,
    recorded,
    tiny_dit,
)
from attnzoo.registry import Reduction, register

LOSSES = ("excite", "segregation", "retention")


def concept_maps(weights: torch.Tensor, tokens: Sequence[int], *, sot: int | None = 0,
                 grid: Sequence[int] | None = None, sigma: float = 0.5) -> torch.Tensor:
    """Per-token maps ``[B, N_pixels, S]`` from attention weights ``[B, H, N, M]`` over text keys.

    The head mean, renormalised over the keys other than ``sot`` (Attend-and-Excite's softmax
    over text tokens excluding <sot>), then for each token in ``tokens`` a Gaussian smoothing
    (kernel 3, ``sigma``; ``sigma = 0``: none) over the query grid (``grid`` ``(H, W)``, else 1-D).
    """
    a = weights.mean(1)
    m = a.shape[-1]
    if any(not 0 <= t < m or t == sot for t in tokens):
        raise ValueError(f"tokens: expected key indices in 0..{m - 1} other than sot={sot}, got {list(tokens)}")
    keep = torch.ones(m, dtype=torch.bool, device=a.device)
    if sot is not None:
        keep[sot] = False
    a = a * keep.to(a.dtype)
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    maps = a[..., list(tokens)]  # [B, N, S]
    if sigma <= 0:
        return maps
    k1 = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], dtype=maps.dtype, device=maps.device) ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()
    b, n, s = maps.shape
    x = maps.transpose(1, 2).reshape(b * s, 1, n)
    if grid is None:
        y = F.conv1d(F.pad(x, (1, 1), mode="replicate"), k1.view(1, 1, 3))
    else:
        h, w = grid
        x2 = F.pad(x.view(b * s, 1, h, w), (1, 1, 1, 1), mode="replicate")
        y = F.conv2d(x2, (k1[:, None] * k1[None, :]).view(1, 1, 3, 3))
    return y.reshape(b, s, n).transpose(1, 2)


def excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite ``L = max_s (1 − max_pixel A_s)`` per sample ``[B]`` (in [0, 1] for maps in [0, 1])."""
    return (1 - maps.amax(1)).amax(-1)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR-style overlap of different tokens' maps, ``Σ_{s<s'} Σ_p min(A_s, A_s') / Σ_p (A_s + A_s')``, ``[B]``."""
    b, _, s = maps.shape
    out = maps.new_zeros(b)
    for i in range(s):
        for j in range(i + 1, s):
            inter = torch.minimum(maps[..., i], maps[..., j]).sum(1)
            out = out + inter / (maps[..., i] + maps[..., j]).sum(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return out


def retention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A-STAR retention / AttenCraft alignment: ``Σ_s (1 − Σ_p A_s M_s / Σ_p A_s)`` for binary masks
    ``[S, N_pixels]``: the share of each map outside its mask, ``[B]``."""
    inside = (maps * masks.t().unsqueeze(0).to(maps.dtype)).sum(1)
    return (1 - inside / maps.sum(1).clamp_min(torch.finfo(maps.dtype).tiny)).sum(-1)


class AttentionGuidanceLoss(SteeringWrapper):
    """Test-time latent optimisation on attention losses: ``z ← z − α ∇_z L`` for ``steps`` steps, then the pass.

    ``tokens``: the concept tokens (key indices of the cross-attention, e.g. text positions);
    ``loss``: ``"excite"`` (Attend-and-Excite), ``"segregation"`` (A-STAR) or ``"retention"`` (needs
    ``masks`` bool ``[S, H, W]`` or ``[S, N]``), summed over the batch, on the maps of ``layers``
    (default: the host's ``cross_layers`` if it has them, else all) averaged. The latent ``z`` is
    the host's first argument when it is a float tensor (a denoiser's latents), else the output of
    the host's ``embed`` module (a language model's embeddings). ``alpha = 0`` runs the host as is.
    """

    single_pass = False

    def __init__(self, host: nn.Module, tokens: Sequence[int], *, alpha: float = 1.0, steps: int = 1,
                 loss: str = "excite", layers: Any = None, masks: Any = None, sot: int | None = 0,
                 sigma: float = 0.5) -> None:
        super().__init__(host)
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if not math.isfinite(float(alpha)) or float(alpha) < 0:
            raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        self.tokens = [int(t) for t in tokens]
        if not self.tokens:
            raise ValueError("tokens: expected at least one concept token")
        self.alpha, self.steps, self.loss, self.sot, self.sigma = float(alpha), steps, loss, sot, float(sigma)
        self.grid = getattr(host, "grid", None)
        self.masks = None
        if loss == "retention":
            if masks is None:
                raise ValueError("masks: the retention loss needs one mask per concept token")
            mk = torch.as_tensor(masks)
            if mk.dtype != torch.bool or mk.shape[0] != len(self.tokens) or \
                    (self.grid is not None and tuple(mk.shape[1:]) not in (tuple(self.grid),)):
                raise ValueError(f"masks: expected a bool tensor [{len(self.tokens)}, *grid], got {list(mk.shape)}")
            self.masks = mk.reshape(len(self.tokens), -1)
        default = getattr(host, "cross_layers", None) if layers is None else layers
        self.layers = list(check_targets(host, default))

    def objective(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """The loss ``[B]`` from the recorded maps of the layers."""
        maps = torch.stack([concept_maps(w, self.tokens, sot=self.sot, grid=self.grid, sigma=self.sigma)
                            for w in weights]).mean(0)
        if self.loss == "excite":
            return excite_loss(maps)
        if self.loss == "segregation":
            return segregation_loss(maps)
        return retention_loss(maps, self.masks.to(maps.device))

    @contextlib.contextmanager
    def _embedding_delta(self, delta: torch.Tensor) -> Iterator[None]:
        handle = self._embed().register_forward_hook(lambda mod, inp, out: out + delta)
        try:
            yield
        finally:
            handle.remove()

    def _embed(self) -> nn.Module:
        embed = getattr(self.host, "embed", None)
        if not isinstance(embed, nn.Module):
            raise SteeringTargetError("attention_guidance_loss: a host with integer inputs needs an `embed` module "
                                      "whose output is the latent to optimise")
        return embed

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.alpha == 0:
            return self.host(*args, **kwargs)
        latent_input = isinstance(args[0], torch.Tensor) and args[0].is_floating_point()
        if latent_input:
            z = args[0].detach()
        else:
            with torch.no_grad():
                z = torch.zeros_like(self._embed()(args[0]))
        for _ in range(self.steps):
            with torch.enable_grad():
                zv = z.detach().requires_grad_()
                with recorded(self.host, self.layers) as got:
                    if latent_input:
                        self.host(zv, *args[1:], **kwargs)
                    else:
                        with self._embedding_delta(zv):
                            self.host(*args, **kwargs)
                loss = self.objective([got[i] for i in self.layers]).sum()
                (grad,) = torch.autograd.grad(loss, zv)
            z = z - self.alpha * grad
        if latent_input:
            return self.host(z, *args[1:], **kwargs)
        with self._embedding_delta(z):
            return self.host(*args, **kwargs)


def _alpha_zero_sampler() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.bench.models import ddim_sample

    host, (x, _, text) = tiny_dit()
    steered = AttentionGuidanceLoss(host, [1, 3], alpha=0.0)
    return ddim_sample(steered, x, text, steps=3), ddim_sample(host, x, text, steps=3)


def _excite_range() -> tuple[torch.Tensor, torch.Tensor]:
    peaked = torch.zeros(1, 6, 2, dtype=torch.float64)
    peaked[0, 1, 0] = peaked[0, 4, 1] = 1.0
    flat = torch.full((1, 6, 2), 0.5, dtype=torch.float64)
    return torch.cat([excite_loss(peaked), excite_loss(flat)]), torch.tensor([0.0, 0.5], dtype=torch.float64)


def _disjoint_segregation() -> tuple[torch.Tensor, torch.Tensor]:
    maps = torch.zeros(2, 8, 3, dtype=torch.float64)
    maps[:, :3, 0], maps[:, 3:5, 1], maps[:, 5:, 2] = 0.7, 0.2, 1.0
    return segregation_loss(maps), torch.zeros(2, dtype=torch.float64)


register(
    "attention_guidance_loss", priority=3, papers=("Attend-and-Excite", "A-STAR", "AttenCraft"),
    supports={"self", "cross"},
    reference="losses on the reference-backend maps (head mean, text softmax without <sot>, Gaussian-smoothed); "
              "z ← z − α∇L",
    summary="Attend-and-Excite / A-STAR / AttenCraft losses on concept-token attention maps, with the latent update.",
    test_kwargs={"tokens": [2, 5], "alpha": 0.5, "steps": 2},
    reductions=(Reduction("alpha_zero", "α = 0 gives the base sampler", _alpha_zero_sampler),
                Reduction("excite_values", "excite is 0 when every token peaks at 1, 0.5 for flat 0.5 maps",
                          _excite_range),
                Reduction("segregation_disjoint", "segregation is 0 for disjoint maps", _disjoint_segregation)),
    **COMMON,
)(AttentionGuidanceLoss)
