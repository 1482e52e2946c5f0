"""``token_routed_hybrid``: NAtS-L: a router sends each token to a softmax KV cache or a gated delta-
rule state; queries read both.
"""

from __future__ import annotations

from typing import Any

import torch
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
from attnzoo.layers.linear_recurrent._common import FAMILY, rand_x
from attnzoo.layers.linear_recurrent.delta_net import DeltaNet
from attnzoo.layers.recurrent import cache_state
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


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
    x = rand_x()
    return m(x), mha(x, causal=True)


def _trh_linear_is_delta_net() -> tuple[torch.Tensor, torch.Tensor]:
    m = _routed("linear")
    dn = DeltaNet(32, 4, gate="scalar").double()
    dn.load_state_dict(m.linear.state_dict())
    x = rand_x()
    return m(x), dn(x)


def _trh_cache_size() -> tuple[torch.Tensor, torch.Tensor]:
    m = _routed(None, seed=3)
    x = rand_x(b=1, n=17) * 3
    cache = KVCache()
    for t in range(17):
        m(x[:, t:t + 1], causal=True, cache=cache)
    routed = (torch.sigmoid(m.router(x).squeeze(-1)) > 0.5).sum()
    return torch.tensor([float(len(cache))], dtype=torch.float64), routed.to(torch.float64).view(1)


register(
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
)(TokenRoutedHybrid)
