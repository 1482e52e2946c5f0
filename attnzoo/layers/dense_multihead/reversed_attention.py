"""``reversed_attention``: DependencyViT: tokens send values to the parents they choose (out = Pᵀ V)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, SMALL, rand_x
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


class ReversedAttention(MultiHeadAttention):
    """DependencyViT reversed attention: each token sends its value to the parents it picks.

    ``P = softmax(Q Kᵀ/√d)`` (row i: child i's distribution over parents j), ``out = Pᵀ V``,
    i.e. ``out_j = Σ_i P_ij v_i``. With ``gates`` each sender i is also scaled by a
    per-head selector ``softmax_h(x_i W_s)`` and a message controller ``σ(x_i W_m)``
    ([code: timm dependencyvit.py] per the catalogue; not re-read here). Padded senders
    send nothing and padded parents receive nothing. Needs the weights: reference backend.
    Checked against the abstract (DependencyViT): "a child token in reversed attention is
    trained to attend to its parent tokens and send information following a normalized
    probability distribution rather than gathering information". Not causal by
    construction (a parent receives from every child that picks it, later tokens
    included), and the catalogue asks for no causal variant; bidirectional only.
    """

    # base-class arguments it sets itself or cannot honour
    refused_arguments = ('n_kv_heads', 'context_dim', 'pattern', 'score_mod', 'rope')

    cross_ok = False
    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, gates: bool = True, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.gates = bool(gates)
        if gates:
            self.head_selector = nn.Linear(dim, n_heads)
            self.message_controller = nn.Linear(dim, 1)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        _, p = attention(q, k, v, pattern=pattern, scale=self.scale, backend="reference", return_weights=True)
        if call is None:
            raise ValueError("call: reversed_attention's attend reads the call's x and mask")
        if call.mask is not None:
            p = p * call.mask[:, None, :, None].to(p.dtype)
        if self.gates:
            x = call.x
            send = torch.softmax(self.head_selector(x), -1).transpose(1, 2) * torch.sigmoid(
                self.message_controller(x)).transpose(1, 2)
            p = p * send.unsqueeze(-1)
        return torch.matmul(p.transpose(-1, -2), v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)), p

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None:
            raise ValueError("cache: reversed_attention has no KV-cache decoding")
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                               head_mask=head_mask, return_weights=return_weights)


def _rev_mass() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
    m.capture = True
    x = rand_x()
    m(x)
    v = MultiHeadAttention.split(m.v_proj(x), 4)
    return m.captured["z"].sum(2), v.sum(2)


def _rev_transposed() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(ReversedAttention, dim=32, n_heads=4, gates=False)
    x = rand_x()
    q, k, v = m.project(x, x)
    p = attention(q, k, v, return_weights=True)[1]
    z = torch.matmul(p.transpose(-1, -2), v)
    return m(x), m.o_proj(MultiHeadAttention.merge(z))


register(
    "reversed_attention", family=FAMILY, type="mixer", priority=3, papers=("DependencyViT",),
    supports={"self", "padding"}, backends=("reference",),
    summary="DependencyViT: tokens send values to the parents they choose (out = Pᵀ V).",
    test_kwargs=SMALL,
    reductions=(
        Reduction("mass_conserved", "without gates Σ_j out_j = Σ_i v_i", _rev_mass),
        Reduction("transposed_mha", "equals mha run with the transposed weight matrix", _rev_transposed),
    ),
)(ReversedAttention)
