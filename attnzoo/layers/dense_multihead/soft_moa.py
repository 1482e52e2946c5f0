"""``soft_moa``: Soft mixture of attention experts (router softmax per token); kv_shared, frozen prior."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import AttentionMixer, MultiHeadAttention, check_int, head_dim_for, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.registry import Reduction, register


class SoftMixtureOfAttention(AttentionMixer):
    """Soft mixture of attention experts: ``Y = Σ_e r_e(x)·Attn_e(x)``, ``r = softmax(x W_r)`` per token.

    Each expert has its own Q, K, V, O (``kv_shared=True``: own Q, O and one shared K, V, as
    in BAM, so the KV cache is one expert's size). ``frozen_prior=True`` freezes expert 0
    (MoA personalisation: ``Y = r·Attn_personal + (1 − r)·Attn_prior`` for two experts).
    All experts run in one attention call (expert heads are grouped-query heads).
    """

    cross_ok = False  # its experts are self-attention (the registry spec has no 'cross')

    def __init__(self, dim: int, n_heads: int = 4, *, n_experts: int = 2, kv_shared: bool = False,
                 frozen_prior: bool = False, head_dim: int | None = None, bias: bool = True, pattern: Any = None,
                 rope: Any = None, backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        super().__init__(dim, pattern=pattern, qk_transform=rope, backend=backend)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.n_experts, self.kv_shared = check_int("n_experts", n_experts), bool(kv_shared)
        width = n_heads * head_dim
        n_kv = 1 if kv_shared else n_experts
        self.q_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_experts))
        self.k_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_kv))
        self.v_proj = nn.ModuleList(nn.Linear(dim, width, bias=bias) for _ in range(n_kv))
        self.o_proj = nn.ModuleList(nn.Linear(width, dim, bias=bias) for _ in range(n_experts))
        self.router = nn.Linear(dim, n_experts)
        if frozen_prior:
            for mod in (self.q_proj[0], self.o_proj[0], *([] if kv_shared else [self.k_proj[0], self.v_proj[0]])):
                mod.requires_grad_(False)

    def _stack(self, projs: nn.ModuleList, t: torch.Tensor) -> torch.Tensor:
        # [B, N, E*H*D] with head index h * E + e (expert heads of one head share a kv head)
        parts = torch.stack([MultiHeadAttention.split(p(t), self.n_heads) for p in projs], dim=2)
        b, h, e, n, d = parts.shape
        return parts.reshape(b, h * e, n, d)

    def project(self, x, src, call=None):
        return self._stack(self.q_proj, x), self._stack(self.k_proj, src), self._stack(self.v_proj, src)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights ``[B, N, E]``."""
        return torch.softmax(self.router(x), dim=-1)

    def output(self, z, x):
        b, _, n, d = z.shape
        z = z.view(b, self.n_heads, self.n_experts, n, d)
        r = self.gates(x)
        return sum(r[..., e:e + 1] * self.o_proj[e](MultiHeadAttention.merge(z[:, :, e]))
                   for e in range(self.n_experts))


def _moa_identical_experts() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3)
    ref = MultiHeadAttention(32, 4).double()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for lin in getattr(m, name):
                lin.load_state_dict(getattr(m, name)[0].state_dict())
            getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = rand_x()
    return m(x, causal=True), ref(x, causal=True)


def _moa_prior() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, frozen_prior=True)
    m.gates = lambda t: torch.cat([t.new_ones(*t.shape[:2], 1), t.new_zeros(*t.shape[:2], 1)], -1)
    ref = MultiHeadAttention(32, 4).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(ref, name).load_state_dict(getattr(m, name)[0].state_dict())
    x = rand_x()
    return m(x), ref(x)


def _moa_kv_shared_cache() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    m = seeded(SoftMixtureOfAttention, dim=32, n_heads=4, n_experts=3, kv_shared=True)
    cache = KVCache()
    m(rand_x(), causal=True, cache=cache)
    return torch.tensor(float(cache.k.shape[1]), dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)


register(
    "soft_moa", family=FAMILY, type="mixer", priority=3, papers=("BAM", "MoA (mixture-of-attention, personalization)"),
    supports={"self", "causal", "padding", "decoding"},
    summary="Soft mixture of attention experts (router softmax per token); kv_shared, frozen prior.",
    test_kwargs={"dim": 32, "n_heads": 4, "n_experts": 2},
    reductions=(
        Reduction("identical_experts", "identical experts give one dense attention for any router",
                  _moa_identical_experts),
        Reduction("prior_only", "r = 0 on the personal expert reproduces the frozen prior exactly", _moa_prior),
        Reduction("kv_shared_cache", "with kv_shared the KV cache is one expert's size", _moa_kv_shared_cache),
    ),
)(SoftMixtureOfAttention)


