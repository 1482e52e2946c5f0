"""``gated_attention``: Head-specific sigmoid output gate after SDPA, before W_O (elementwise or headwise)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, load_shared, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, MIXER_SUPPORT, SMALL, rand_x
from attnzoo.registry import Reduction, register


class GatedAttention(MultiHeadAttention):
    """Gated attention: ``Y = Concat_h[SDPA_h ⊙ σ(X W_g^h)] W_O`` (gate after SDPA, before W_O).

    ``granularity="elementwise"`` gives ``head_dim`` gate values per head,
    ``"headwise"`` one scalar per head; the gate at token t depends on ``x_t`` only.
    Checked against the paper abstract (Qiu et al. 2025): "a head-specific sigmoid gate
    after the Scaled Dot-Product Attention" and query-dependent gating scores. The
    elementwise/headwise comparison is [recalled]: the abstract only says the paper compares
    "various gating positions and computational variants", not these two by name; both
    are offered.
    ``gate_activation`` is ``torch.sigmoid`` (replaceable, e.g. by a constant 1 in tests).
    """

    def __init__(self, dim: int, n_heads: int = 8, *, granularity: str = "elementwise", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.granularity = check_choice("granularity", granularity, ("elementwise", "headwise"))
        width = self.n_heads * (self.head_dim if granularity == "elementwise" else 1)
        self.gate_proj = nn.Linear(dim, width, bias=True)
        self.gate_activation = torch.sigmoid

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Gate ``[B, H, N, head_dim or 1]`` from ``x`` ``[B, N, C]``."""
        return self.split(self.gate_activation(self.gate_proj(x)), self.n_heads)

    def post_attention(self, z, x, call=None):
        return z * self.gate(x)


def _gated_one_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    x = rand_x()
    for gran in ("elementwise", "headwise"):
        g = seeded(GatedAttention, dim=32, n_heads=4, granularity=gran)
        g.gate_activation = torch.ones_like
        m = MultiHeadAttention(32, 4).double()
        load_shared(g, m)
        out.append((g(x, causal=True), m(x, causal=True)))
    return torch.stack([a for a, _ in out]), torch.stack([b for _, b in out])


def _gated_local_gate() -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(GatedAttention, dim=32, n_heads=4)
    x = rand_x()
    x2 = x.clone()
    x2[:, 1:] += 1.0
    return g.gate(x2)[:, :, 0], g.gate(x)[:, :, 0]


register(
    "gated_attention", family=FAMILY, type="mixer", priority=1, papers=("Gated Attention",), supports=MIXER_SUPPORT,
    summary="Head-specific sigmoid output gate after SDPA, before W_O (elementwise or headwise).",
    test_kwargs=SMALL,
    reductions=(
        Reduction("gate_one_is_mha", "gate ≡ 1 gives mha (both granularities)", _gated_one_is_mha),
        Reduction("gate_is_local", "the gate at token t is unchanged when other tokens change", _gated_local_gate),
    ),
)(GatedAttention)
