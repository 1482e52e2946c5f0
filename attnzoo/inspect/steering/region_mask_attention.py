"""``region_mask_attention``: region / mask-conditioned logit edits (hard blocks and soft boosts) for self- and
cross-attention in diffusion models (Detector Guidance, PrimeComposer, MAKIMA, DesignEdit, DiffUHaul)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit
from attnzoo.inspect.steering._common import COMMON, SteeringWrapper, check_targets, layer_heads, tiny_dit, tiny_lm
from attnzoo.registry import Reduction, register


def region_bias(n_q: int, n_kv: int, regions: dict[int, torch.Tensor], hole: torch.Tensor | None, mode: str,
                strength: float, dtype: torch.dtype, device: Any) -> torch.Tensor | None:
    """The logit bias ``B [N_q, N_kv]`` (entries in ``{-inf, ±strength, 0}``), or None when nothing applies.

    ``regions``: key index -> bool ``[N_q]`` query region: ``mode="block"`` gives ``-inf`` outside the
    region; ``"boost"`` ``+strength`` inside and ``-strength`` outside. ``hole`` bool ``[N]``
    (self-attention): keys in the hole get ``-inf`` for queries outside it.
    """
    bias = torch.zeros(n_q, n_kv, dtype=dtype, device=device)
    used = False
    for key, region in regions.items():
        if region.numel() != n_q or key >= n_kv:
            continue
        r = region.reshape(-1).to(device)
        if mode == "block":
            bias[:, key] = torch.where(r, 0.0, -math.inf)
        else:
            bias[:, key] = torch.where(r, strength, -strength)
        used = True
    if hole is not None and hole.numel() == n_q == n_kv:
        h = hole.reshape(-1).to(device)
        bias = bias.masked_fill(~h[:, None] & h[None, :], -math.inf)
        used = True
    return bias if used else None


def apply_bias(w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(s + B)`` from ``w = softmax(s)`` ``[B, H, N, M]``: ``w·exp(B)`` renormalised; blocked pairs get 0."""
    out = w * torch.exp(bias - bias.masked_fill(bias == -math.inf, 0).amax()).to(w.dtype)
    s = out.sum(-1, keepdim=True)
    return torch.where(s > 0, out / s.clamp_min(torch.finfo(w.dtype).tiny), out)


class RegionMaskAttention(SteeringWrapper):
    """Region-conditioned attention logits: ``s'_ij = s_ij + B_ij``, ``B_ij ∈ {−∞, ±λ, 0}``.

    ``regions``: ``{key index: query region}`` where a region is a bool mask over the query tokens:
    ``[N]`` or, for a host with a ``grid`` (e.g. :class:`~attnzoo.bench.models.TinyDiT`), ``[H, W]``
    (block a text token outside its layout region, Detector Guidance / PrimeComposer; ``mode="boost"``
    raises logits inside by ``strength`` and lowers them outside, MAKIMA). ``hole`` (bool over the
    image tokens): self-attention key masking (DesignEdit): queries outside the hole never see the
    hole's keys. ``layers`` default: the host's ``cross_layers`` for regions and ``self_layers`` for
    the hole when it has them, else every attention layer. Single pass; also a context manager.
    """

    def __init__(self, host: nn.Module, regions: dict[int, Any] | None = None, *, hole: Any = None,
                 mode: str = "block", strength: float = 1.0, layers: Any = None) -> None:
        super().__init__(host)
        if mode not in ("block", "boost"):
            raise ValueError(f"mode: expected 'block' or 'boost', got {mode!r}")
        self.mode, self.strength = mode, float(strength)
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength: expected a finite number >= 0, got {strength!r}")
        grid = getattr(host, "grid", None)
        self.regions = {}
        for key, region in dict(regions or {}).items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise ValueError(f"regions: keys are key-token indices >= 0, got {key!r}")
            self.regions[key] = self._mask(f"regions[{key}]", region, grid)
        self.hole = None if hole is None else self._mask("hole", hole, grid)
        found, _ = layer_heads(host)
        n = len(found)
        if layers is None:
            cross = list(getattr(host, "cross_layers", range(n)))
            selfl = list(getattr(host, "self_layers", range(n)))
            self.region_layers = list(check_targets(host, cross)) if self.regions else []
            self.hole_layers = list(check_targets(host, selfl)) if self.hole is not None else []
        else:
            chosen = list(check_targets(host, layers))
            self.region_layers = chosen if self.regions else []
            self.hole_layers = chosen if self.hole is not None else []

    @staticmethod
    def _mask(name: str, value: Any, grid: Any) -> torch.Tensor:
        t = torch.as_tensor(value)
        if t.dtype != torch.bool:
            raise ValueError(f"{name}: expected a bool mask over the query tokens, got {t.dtype}")
        if grid is not None:
            n = 1
            for g in grid:
                n *= g
            if tuple(t.shape) not in (tuple(grid), (n,)):
                raise ValueError(f"{name}: expected a mask of the host's grid {list(grid)} (or [{n}]), got "
                                 f"{list(t.shape)}")
        elif t.dim() != 1:
            raise ValueError(f"{name}: expected a bool mask [N] over the query tokens, got {list(t.shape)}")
        return t.reshape(-1)

    def check_inputs(self, n_q: int) -> None:
        for key, r in self.regions.items():
            if r.numel() != n_q:
                raise ValueError(f"regions[{key}]: a mask of {r.numel()} query tokens, the input has {n_q}")
        if self.hole is not None and self.hole.numel() != n_q:
            raise ValueError(f"hole: a mask of {self.hole.numel()} query tokens, the input has {n_q}")

    def edits(self) -> dict[int, LayerEdit]:
        out: dict[int, LayerEdit] = {}
        for i in sorted(set(self.region_layers) | set(self.hole_layers)):
            regions = self.regions if i in self.region_layers else {}
            hole = self.hole if i in self.hole_layers else None

            def before(b: int, n_q: int, n_kv: int, regions=regions, hole=hole) -> None:
                for key, r in regions.items():
                    if r.numel() != n_q or key >= n_kv:
                        raise ValueError(f"regions[{key}]: does not fit this layer's {n_q} queries x {n_kv} keys")
                if hole is not None and not hole.numel() == n_q == n_kv:
                    raise ValueError(f"hole: a mask of {hole.numel()} tokens does not fit this layer's "
                                     f"{n_q} queries x {n_kv} keys (key masking is for self-attention)")

            def edit(w: torch.Tensor, regions=regions, hole=hole) -> torch.Tensor:
                bias = region_bias(w.shape[-2], w.shape[-1], regions, hole, self.mode, self.strength, w.dtype,
                                   w.device)
                return w if bias is None else apply_bias(w, bias)

            out[i] = LayerEdit(layer=i, weight_edits=[edit], before=before)
        return out

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            grid = getattr(self.host, "grid", None)
            self.check_inputs(args[0].shape[1] if grid is None else args[0].shape[1] * args[0].shape[2])
        return super().run(*args, **kwargs)


def _no_op_mask() -> tuple[torch.Tensor, torch.Tensor]:
    host, (x, t, text) = tiny_dit()
    everywhere = torch.ones(4, 4, dtype=torch.bool)
    steered = RegionMaskAttention(host, {0: everywhere, 3: everywhere}, hole=torch.zeros(4, 4, dtype=torch.bool))
    return steered(x, t, text), host(x, t, text)


def _lm_no_op_mask() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    return RegionMaskAttention(host, {1: torch.ones(9, dtype=torch.bool)})(tokens), host(tokens)


register(
    "region_mask_attention", priority=2,
    papers=("Detector Guidance", "PrimeComposer", "MAKIMA", "DesignEdit", "DiffUHaul"),
    supports={"self", "cross", "causal", "padding"},
    reference="softmax(s + B) with B ∈ {−∞, ±λ, 0} by region, as w·exp(B) renormalised on the reference weights",
    summary="Region/mask logit edits: block a key outside its query region, boost inside, mask a hole's keys.",
    test_kwargs={"regions": {2: [True] * 6 + [False] * 6, 5: [False] * 3 + [True] * 9}},
    reductions=(Reduction("no_op_dit", "an all-True region and an empty hole reproduce the denoiser", _no_op_mask),
                Reduction("no_op_lm", "an all-True region reproduces the host LM", _lm_no_op_mask)),
    **COMMON,
)(RegionMaskAttention)
