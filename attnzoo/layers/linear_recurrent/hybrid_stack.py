"""``hybrid_stack``: Hybrid stacks: r linear layers (any registry linear mixer) per softmax layer, or
LaMamba local-attention + SSM blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, check_mixer_input, zero_padded
from attnzoo.layers.cache import KVCache
from attnzoo.layers.linear_recurrent._common import FAMILY, rand_x
from attnzoo.layers.linear_recurrent.selective_ssm import SelectiveSSM
from attnzoo.layers.recurrent import cache_state
from attnzoo.patterns import SlidingWindow
from attnzoo.registry import Reduction, create, register, spec


class HybridStack(nn.Module):
    """Hybrid softmax / linear (or SSM) stacks as one mixer (pre-norm residual layers).

    ``mode="interleave"``: ``n_layers`` layers; layer ``i`` is full softmax attention when
    ``(i + 1) % (ratio + 1) == 0`` and the registry mixer ``linear`` otherwise (``ratio`` linear
    layers, then one softmax layer; ``ratio = 0`` is a pure Transformer). ``mode="local+ssm"``:
    each layer is one LaMamba-style block ``x + SWA(norm x) + SSM(norm x)`` (windowed attention
    for local detail plus ``selective_ssm`` for global context, in parallel; the paper's exact
    combination order is [recalled], not verified). ``mlp_ratio > 0`` adds a pre-norm MLP after
    each mixer (MetaFormer blocks). Returns the final residual stream. ``backend`` and ``form``
    reach every sub-layer that has them (the float64 reference uses ``reference``/``parallel``).
    """

    def __init__(self, dim: int, n_heads: int = 4, *, mode: str = "interleave", n_layers: int = 4, ratio: int = 3,
                 linear: str = "lightning", linear_kwargs: dict[str, Any] | None = None, window: int = 16,
                 d_state: int = 16, mlp_ratio: float = 0.0, backend: str = "auto", form: str = "chunked",
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, ("interleave", "local+ssm"))
        self.n_layers = check_int("n_layers", n_layers)
        self.ratio = check_int("ratio", ratio, minimum=0)
        self.linear_slug = linear
        if mode == "interleave" and "causal" not in spec(linear).supports:
            raise ValueError(f"linear: expected a causal registry mixer slug, got {linear!r}")
        self.window = check_int("window", window)
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.mlps = nn.ModuleList()
        for kind in self.schedule:
            self.norms.append(nn.LayerNorm(dim))
            if kind == "softmax":
                self.layers.append(MultiHeadAttention(dim, n_heads, backend=backend))
            elif kind == "linear":
                kw = {"dim": dim, **(linear_kwargs or {})}
                if "n_heads" in (spec(linear).accepted_arguments() or ["n_heads"]):
                    kw.setdefault("n_heads", n_heads)
                layer = create(linear, **kw)
                self.layers.append(layer)
            else:
                self.layers.append(nn.ModuleDict({
                    "swa": MultiHeadAttention(dim, n_heads, pattern=SlidingWindow(self.window, causal=True),
                                              backend=backend),
                    "ssm": SelectiveSSM(dim, d_state=d_state, chunk_size=chunk_size)}))
            hidden = int(dim * mlp_ratio)
            self.mlps.append(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                             if hidden > 0 else nn.Identity())
        self.form = form
        self.chunk_size = chunk_size
        self.backend = backend

    @property
    def schedule(self) -> list[str]:
        """Layer types, in order: ``softmax``, ``linear`` or ``local+ssm``."""
        if self.mode == "local+ssm":
            return ["local+ssm"] * self.n_layers
        return ["softmax" if (i + 1) % (self.ratio + 1) == 0 else "linear" for i in range(self.n_layers)]

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # form and backend reach every sub-layer (chunk sizes stay: for neural_memory they change the model)
        if name in ("form", "backend") and "layers" in self._modules:
            for m in self.modules():
                if m is not self and hasattr(m, name) and not isinstance(m, HybridStack):
                    setattr(m, name, value)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: hybrid_stack is a self-attention stack")
        state = cache_state(cache, "hybrid_stack", x.shape[0])
        subs = None if state is None else state.setdefault("layers", [KVCache() for _ in self.layers])
        for i, (kind, layer, norm, mlp) in enumerate(zip(self.schedule, self.layers, self.norms, self.mlps)):
            h = norm(x)
            c = None if subs is None else subs[i]
            if kind == "local+ssm":
                c2 = None if subs is None else subs[i].state.setdefault("ssm", KVCache())
                x = x + layer["swa"](h, mask=mask, causal=True, cache=c) + layer["ssm"](h, mask=mask, cache=c2)
            else:
                x = x + layer(h, mask=mask, causal=causal or cache is not None, cache=c)
            x = x + mlp(x) if not isinstance(mlp, nn.Identity) else x
        if cache is not None:
            cache.advance(x.shape[1])
        return zero_padded(x, mask)


def _stack(seed: int = 0, **kw: Any) -> HybridStack:
    torch.manual_seed(seed)
    return HybridStack(**{"dim": 32, "n_heads": 4, **kw}).double()


def _hs_ratio0_is_transformer() -> tuple[torch.Tensor, torch.Tensor]:
    m = _stack(ratio=0, n_layers=3, backend="reference")
    x = rand_x()
    y = x
    for norm, layer in zip(m.norms, m.layers):
        y = y + layer(norm(y), causal=True)
    assert all(isinstance(layer, MultiHeadAttention) for layer in m.layers)
    return m(x, causal=True), y


def _hs_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    got = []
    for ratio, n in ((0, 3), (1, 4), (2, 6), (3, 8), (5, 4)):
        m = HybridStack(32, 4, ratio=ratio, n_layers=n, linear="linear_attention")
        types = [1.0 if isinstance(layer, MultiHeadAttention) else 0.0 for layer in m.layers]
        got.append(torch.tensor(types + [-1.0] * (8 - n), dtype=torch.float64))
    want = torch.tensor([[1, 1, 1] + [-1] * 5, [0, 1, 0, 1] + [-1] * 4, [0, 0, 1, 0, 0, 1, -1, -1],
                         [0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0, 0, -1, -1, -1, -1]], dtype=torch.float64)
    return torch.stack(got), want


def _hs_lamamba_block() -> tuple[torch.Tensor, torch.Tensor]:
    m = _stack(mode="local+ssm", n_layers=1, window=4)
    x = rand_x()
    h = m.norms[0](x)
    return m(x), x + m.layers[0]["swa"](h, causal=True) + m.layers[0]["ssm"](h)


register(
    "hybrid_stack", family=FAMILY, type="mixer", priority=2,
    papers=("Hybrid linear attention analysis", "LaMamba-Diff"),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N) per linear layer, O(N^2) per softmax layer",
    reference="the same stack with backend='reference' and form='parallel' in float64",
    reference_kwargs={"backend": "reference", "form": "parallel"},
    test_kwargs={"dim": 32, "n_heads": 4, "n_layers": 3, "ratio": 1, "linear": "delta_net",
                 "linear_kwargs": {"gate": "scalar", "chunk_size": 5}},
    summary="Hybrid stacks: r linear layers (any registry linear mixer) per softmax layer, or LaMamba "
            "local-attention + SSM blocks.",
    reductions=(
        Reduction("ratio0_is_transformer", "r = 0 gives a pure (pre-norm) Transformer of mha layers",
                  _hs_ratio0_is_transformer),
        Reduction("schedule", "layer types follow the r:1 schedule exactly", _hs_schedule),
        Reduction("lamamba_block", "local+ssm block = x + SWA(norm x) + SSM(norm x)", _hs_lamamba_block),
    ),
)(HybridStack)
