"""Catalogue section 5, hybrids: ``token_routed_hybrid`` (NAtS-L), ``hybrid_stack`` and ``a2ssm``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import (
    MultiHeadAttention,
    build_pattern,
    check_choice,
    check_int,
    check_mixer_input,
    zero_padded,
)
from attnzoo.layers.cache import KVCache
from attnzoo.layers.linear import DeltaNet, SelectiveSSM, _x
from attnzoo.layers.recurrent import cache_state
from attnzoo.ops import attention
from attnzoo.ops.linear import selective_scan
from attnzoo.patterns import DilatedWindow, KeyPadding, Neighborhood, SlidingWindow
from attnzoo.registry import Reduction, create, register, spec

__all__ = ["A2SSM", "HybridStack", "TokenRoutedHybrid"]

FAMILY = "linear-recurrent"


# ------------------------------------------------------------------------- token_routed_hybrid
class TokenRoutedHybrid(nn.Module):
    """NAtS-L-style token routing inside one layer: each token is written either to a softmax KV
    cache or to a gated delta-rule state, and every query reads both.

    ``y = MHA(x; keys = softmax-routed tokens, causal) + GatedDeltaNet(x; writes = the other
    tokens)``. The router is ``σ(x w_r + b_r)`` per token: above 0.5 goes to softmax
    ("long-term retrieval" tokens), else to the linear state ("short-term"). The decision is
    hard in the forward pass, with a straight-through gradient to the router (the routed
    values are scaled by ``route + σ − stopgrad(σ)``). Tokens routed to softmax are identity
    steps of the delta rule (no write, no decay). The KV cache holds only softmax-routed
    tokens (entries no batch row routed to softmax are dropped). ``force`` fixes the routing
    (``"softmax"`` / ``"linear"``). How NAtS-L combines the branches and trains its router is
    not in the abstract: the sum and the straight-through router are this library's choices.
    """

    def __init__(self, dim: int, n_heads: int = 4, *, head_dim: int | None = None, force: str | None = None,
                 conv_size: int = 4, bias: bool = False, backend: str = "auto", form: str = "chunked",
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.force = None if force is None else check_choice("force", force, ("softmax", "linear"))
        self.softmax = MultiHeadAttention(dim, n_heads, head_dim=head_dim, bias=bias, backend=backend)
        self.linear = DeltaNet(dim, n_heads, head_dim=head_dim, gate="scalar", conv_size=conv_size, form=form,
                               chunk_size=chunk_size)
        self.router = nn.Linear(dim, 1)

    @property
    def form(self) -> str:
        return self.linear.form

    @form.setter
    def form(self, value: str) -> None:
        self.linear.form = value

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hard, straight_through)`` ``[B, N]``: 1 = softmax, 0 = linear."""
        p = torch.sigmoid(self.router(x).squeeze(-1))
        if self.force is not None:
            hard = torch.full_like(p, 1.0 if self.force == "softmax" else 0.0)
        else:
            hard = (p > 0.5).to(p.dtype)
        return hard, hard + p - p.detach()

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: token_routed_hybrid is a causal self-attention mixer")
        state = cache_state(cache, "token_routed_hybrid", x.shape[0])
        hard, st = self.route(x)
        keep_soft = hard > 0.5 if mask is None else (hard > 0.5) & mask
        # softmax branch: keys and values of softmax-routed tokens only
        q, k, v = self.softmax.project(x, x)
        v = v * st[:, None, :, None]  # value x 1 in the forward pass; the router's gradient path
        keep = keep_soft
        if cache is not None:
            k, v, keep = cache.append(k, v, keep_soft)
        z = attention(q, k, v, pattern=build_pattern(None, True, keep), backend=self.softmax.backend)
        if cache is not None:  # keep only entries some batch row routed to softmax
            idx = cache.keep.any(0).nonzero().squeeze(-1)
            cache.k, cache.v, cache.keep = (cache.k.index_select(2, idx), cache.v.index_select(2, idx),
                                            cache.keep.index_select(1, idx))
        y = self.softmax.output(z, x)
        # linear branch: the other tokens write to the gated delta state
        sub = None if state is None else state.setdefault("linear", KVCache())
        y = y + self.linear(x, mask=mask, cache=sub, write=1 - st)
        if cache is not None:
            cache.advance(x.shape[1])
        return zero_padded(y, mask)


def _routed(force: str | None, seed: int = 0) -> TokenRoutedHybrid:
    torch.manual_seed(seed)
    return TokenRoutedHybrid(32, 4, force=force).double()


def _trh_softmax_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    m = _routed("softmax")
    mha = MultiHeadAttention(32, 4, bias=False).double()
    mha.load_state_dict(m.softmax.state_dict())
    x = _x()
    return m(x), mha(x, causal=True)


def _trh_linear_is_delta_net() -> tuple[torch.Tensor, torch.Tensor]:
    m = _routed("linear")
    dn = DeltaNet(32, 4, gate="scalar").double()
    dn.load_state_dict(m.linear.state_dict())
    x = _x()
    return m(x), dn(x)


def _trh_cache_size() -> tuple[torch.Tensor, torch.Tensor]:
    m = _routed(None, seed=3)
    x = _x(b=1, n=17) * 3
    cache = KVCache()
    for t in range(17):
        m(x[:, t:t + 1], causal=True, cache=cache)
    routed = (torch.sigmoid(m.router(x).squeeze(-1)) > 0.5).sum()
    return torch.tensor([float(len(cache))], dtype=torch.float64), routed.to(torch.float64).view(1)


@register(
    "token_routed_hybrid", family=FAMILY, type="mixer", priority=3, papers=("NAtS-L",),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N·n_softmax)", backends=(),
    reference="the same module with backend='reference' and form='parallel' in float64",
    reference_kwargs={"backend": "reference", "form": "parallel"},
    test_kwargs={"dim": 32, "n_heads": 4, "chunk_size": 5},
    summary="NAtS-L: a router sends each token to a softmax KV cache or a gated delta-rule state; "
            "queries read both.",
    reductions=(
        Reduction("all_softmax_is_mha", "routing every token to softmax gives causal mha", _trh_softmax_is_mha),
        Reduction("all_linear_is_delta_net", "routing every token to linear gives gated delta_net",
                  _trh_linear_is_delta_net),
        Reduction("cache_size", "the KV-cache size equals the number of softmax-routed tokens", _trh_cache_size),
    ),
)
def token_routed_hybrid(dim: int, n_heads: int = 4, *, head_dim: int | None = None, force: str | None = None,
                        conv_size: int = 4, bias: bool = False, backend: str = "auto", form: str = "chunked",
                        chunk_size: int = 64) -> TokenRoutedHybrid:
    """NAtS-L token-routed hybrid (:class:`TokenRoutedHybrid`)."""
    return TokenRoutedHybrid(dim, n_heads, head_dim=head_dim, force=force, conv_size=conv_size, bias=bias,
                             backend=backend, form=form, chunk_size=chunk_size)


# -------------------------------------------------------------------------------- hybrid_stack
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
    x = _x()
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
    x = _x()
    h = m.norms[0](x)
    return m(x), x + m.layers[0]["swa"](h, causal=True) + m.layers[0]["ssm"](h)


@register(
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
)
def hybrid_stack(dim: int, n_heads: int = 4, *, mode: str = "interleave", n_layers: int = 4, ratio: int = 3,
                 linear: str = "lightning", linear_kwargs: dict[str, Any] | None = None, window: int = 16,
                 d_state: int = 16, mlp_ratio: float = 0.0, backend: str = "auto", form: str = "chunked",
                 chunk_size: int = 64) -> HybridStack:
    """Hybrid softmax / linear stack (:class:`HybridStack`)."""
    return HybridStack(dim, n_heads, mode=mode, n_layers=n_layers, ratio=ratio, linear=linear,
                       linear_kwargs=linear_kwargs, window=window, d_state=d_state, mlp_ratio=mlp_ratio,
                       backend=backend, form=form, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------- a2ssm
class A2SSM(nn.Module):
    """A2Mamba's attention-augmented SSM (MASS): attention maps aggregate the SSM hidden states.

    The ``selective_ssm`` branch computes hidden states ``h_t`` ``[E, S]`` per token. Multi-scale
    attention maps ``A = mean_s softmax_s(q kᵀ/√d)`` over a local window and dilated windows
    (``scales``: ``(window, dilation)`` pairs; 1-D over the sequence, or NATTEN neighbourhoods on a
    2-D ``grid``) then mix them spatially: ``h̃_t = Σ_j A_tj h_j``, ``y_t = C_tᵀ h̃_t + D x_t``,
    output ``(y ⊙ silu(z)) W_out``. ``attention_map="identity"`` skips the mixing (the plain SSM).
    Non-causal (a vision mixer). The exact A2Mamba map construction is [paper]; this is a
    faithful-in-spirit, not verified, layout.
    """

    def __init__(self, dim: int, *, d_state: int = 8, expand: int = 1, scales: tuple = ((3, 1), (3, 2)),
                 qk_dim: int = 16, grid: tuple[int, int] | None = None, attention_map: str = "multiscale",
                 backend: str = "auto", form: str = "chunked", chunk_size: int = 64) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.ssm = SelectiveSSM(dim, d_state=d_state, expand=expand, form=form, chunk_size=chunk_size)
        self.scales = tuple((check_int("window", int(w)), check_int("dilation", int(d))) for w, d in scales)
        self.grid = grid
        self.attention_map = check_choice("attention_map", attention_map, ("multiscale", "identity"))
        self.qk = nn.Linear(dim, 2 * check_int("qk_dim", qk_dim))
        self.backend = backend

    @property
    def form(self) -> str:
        return self.ssm.form

    @form.setter
    def form(self, value: str) -> None:
        self.ssm.form = value

    def _pattern(self, window: int, dilation: int, n: int) -> Any:
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise ValueError(f"grid: expected H * W = N = {n}, got {self.grid}")
            k = 2 * window + 1
            return Neighborhood((k, k), dilation=dilation, grid=self.grid)
        return SlidingWindow(window) if dilation == 1 else DilatedWindow(window, dilation)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if causal or context is not None or cache is not None:
            raise ValueError("causal/context/cache: a2ssm is a non-causal (spatial) self mixer")
        b, n, _ = x.shape
        m = self.ssm
        u, dt, bm, cm, z, _ = m.ssm_inputs(x, mask, None)
        _, states = selective_scan(u, dt, -m.A_log.exp(), bm, cm, None, return_states=True, form=m.form,
                                   chunk_size=m.chunk_size)  # [B, N, E, S]
        if self.attention_map == "multiscale":
            flat = states.reshape(b, 1, n, -1)  # float32 for half inputs, like the states
            q, k = self.qk(zero_padded(x, mask)).unsqueeze(1).to(flat.dtype).chunk(2, dim=-1)  # [B, 1, N, qk]
            mixed = 0
            for window, dilation in self.scales:
                pattern = self._pattern(window, dilation, n)
                if mask is not None and not bool(mask.all()):
                    pattern = pattern & KeyPadding(mask)
                mixed = mixed + attention(q, k, flat, pattern=pattern, backend=self.backend)
            states = (mixed / len(self.scales)).reshape(states.shape)
        y = (states * cm.unsqueeze(-2).to(states.dtype)).sum(-1).to(x.dtype) + u * m.D
        return zero_padded(m.out_proj(y * F.silu(z)), mask)


def _a2ssm_identity_is_ssm() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = A2SSM(32, attention_map="identity").double()
    x = _x()
    return a(x), a.ssm(x)


def _a2ssm_shape() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = A2SSM(32, grid=(6, 6), scales=((1, 1), (1, 2))).double()
    y = a(_x(n=36))
    return torch.tensor(list(y.shape), dtype=torch.float64), torch.tensor([2.0, 36.0, 32.0], dtype=torch.float64)


@register(
    "a2ssm", family=FAMILY, type="mixer", priority=3, papers=("A2Mamba",),
    supports={"self", "padding"}, complexity="O(N·window·E·S)",
    reference="the same module with backend='reference' and form='parallel' in float64",
    reference_kwargs={"backend": "reference", "form": "parallel"}, test_kwargs={"dim": 32, "d_state": 4},
    summary="A2Mamba MASS: multi-scale (local + dilated) attention maps aggregate selective-SSM hidden states.",
    reductions=(
        Reduction("identity_map_is_ssm", "an identity attention map gives the plain selective_ssm output",
                  _a2ssm_identity_is_ssm),
        Reduction("shape", "output shape is preserved (2-D grid)", _a2ssm_shape),
    ),
)
def a2ssm(dim: int, *, d_state: int = 8, expand: int = 1, scales: tuple = ((3, 1), (3, 2)), qk_dim: int = 16,
          grid: tuple[int, int] | None = None, attention_map: str = "multiscale", backend: str = "auto",
          form: str = "chunked", chunk_size: int = 64) -> A2SSM:
    """A2Mamba attention-augmented SSM (:class:`A2SSM`)."""
    return A2SSM(dim, d_state=d_state, expand=expand, scales=scales, qk_dim=qk_dim, grid=grid,
                 attention_map=attention_map, backend=backend, form=form, chunk_size=chunk_size)
