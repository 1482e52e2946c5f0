"""``tensor_attention``: Third-order attention over key pairs: scores <q_i, k1_j * k2_k>, values v1_j * v2_k."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_context, check_mixer_input, load_shared, seeded, zero_padded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.patterns import KeyPadding, Pattern
from attnzoo.registry import Reduction, register


class PairCausal(Pattern):
    """Causality over the pair keys of tensor attention: pair ``p = j·m + k`` is visible to query ``i``
    when ``j`` and ``k`` are both ``<= i + offset`` (``m`` tokens per member, ``offset = m − n_q``)."""

    def __init__(self, m: int) -> None:
        self.m = m

    def allow(self, b, h, q, kv, shape):
        last = q + (self.m - shape.n_q)
        return (torch.div(kv, self.m, rounding_mode="floor") <= last) & (torch.remainder(kv, self.m) <= last)


class TensorAttention(MultiHeadAttention):
    """Third-order (Kronecker) softmax attention.

    ``A_i,(j,k) = softmax_{(j,k)} ⟨q_i, k1_j ⊙ k2_k⟩/√d``, ``out_i = Σ_{j,k} A_i,(j,k) (v1_j ⊙ v2_k)``:
    ordinary attention over the ``M²`` pair keys ``k1_j ⊙ k2_k`` with pair values
    ``v1_j ⊙ v2_k`` (naive cost O(N·M²), memory O(M²·d)). Padding masks a pair when
    either member is padded; ``causal=True`` keeps the pairs whose members are both at or
    before the query. Self- or cross-attention; no KV-cache decoding (the catalogue does
    not ask for it: every new token would add a row and a column of pairs). Checked
    against the abstract ("How to Capture Higher-order Correlations?"): "a generalization of attention which captures
    triple-wise correlations" whose "straightforward algorithm requires cubic time in n";
    the Kronecker form is the catalogue's.
    """

    call_pattern = True

    refused_arguments = ('pattern', 'score_mod', 'rope')  # base-class arguments it sets itself or cannot honour

    def __init__(self, dim: int, n_heads: int = 8, **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        ctx = self.k_proj.in_features
        self.k2_proj = nn.Linear(ctx, self.n_kv_heads * self.head_dim, bias=self.k_proj.bias is not None)
        self.v2_proj = nn.Linear(ctx, self.n_kv_heads * self.head_dim, bias=self.v_proj.bias is not None)

    def project(self, x, src, call=None):
        q, k1, v1 = super().project(x, src, call=call)
        k2, v2 = self.split(self.k2_proj(src), self.n_kv_heads), self.split(self.v2_proj(src), self.n_kv_heads)
        b, h, m, d = k1.shape
        k = (k1.unsqueeze(3) * k2.unsqueeze(2)).reshape(b, h, m * m, d)
        v = (v1.unsqueeze(3) * v2.unsqueeze(2)).reshape(b, h, m * m, d)
        return q, k, v

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None:
            raise ValueError("cache: tensor_attention has no KV-cache decoding")
        check_mixer_input(x, mask, context, self.dim)
        check_context(context, context_mask, self.context_width)
        keep = mask if context is None else context_mask
        pair = None if keep is None else (keep.unsqueeze(2) & keep.unsqueeze(1)).flatten(1)
        parts = [p for p in (self.pattern, PairCausal((x if context is None else context).shape[1]) if causal else None)
                 if p is not None]
        if pair is not None and not bool(pair.all()):
            parts.append(KeyPadding(pair))
        for p in parts[1:]:
            parts[0] = parts[0] & p
        out = self.mix(x, context=context, head_mask=head_mask, return_weights=return_weights,
                       pattern=parts[0] if parts else None)
        if return_weights:
            return zero_padded(out[0], mask), out[1]
        return zero_padded(out, mask)


def _tensor_reduces_to_mha() -> tuple[torch.Tensor, torch.Tensor]:
    t = seeded(TensorAttention, dim=32, n_heads=4)
    for lin in (t.k2_proj, t.v2_proj):
        nn.init.zeros_(lin.weight)
        nn.init.ones_(lin.bias)
    m = MultiHeadAttention(32, 4).double()
    load_shared(t, m)
    x = rand_x()
    return t(x), m(x)


def _tensor_triple_loop() -> tuple[torch.Tensor, torch.Tensor]:
    t = seeded(TensorAttention, dim=8, n_heads=1)
    x = rand_x(b=1, n=4, c=8)
    q = t.q_proj(x)[0]
    k1, k2, v1, v2 = (lin(x)[0] for lin in (t.k_proj, t.k2_proj, t.v_proj, t.v2_proj))
    n = 4
    rows = []
    for i in range(n):
        s = torch.stack([torch.stack([(q[i] * k1[j] * k2[kk]).sum() / math.sqrt(8) for kk in range(n)])
                         for j in range(n)])
        a = torch.softmax(s.flatten(), 0).view(n, n)
        rows.append(sum(a[j, kk] * v1[j] * v2[kk] for j in range(n) for kk in range(n)))
    want = t.o_proj(torch.stack(rows)).unsqueeze(0)
    return t(x), want


register(
    "tensor_attention", family=FAMILY, type="mixer", priority=3, papers=("Tensor attention (Kronecker)",),
    supports={"self", "cross", "causal", "padding", "gqa"}, complexity="O(N^3)",
    summary="Third-order attention over key pairs: scores <q_i, k1_j * k2_k>, values v1_j * v2_k.",
    test_kwargs={"dim": 32, "n_heads": 4},
    reductions=(
        Reduction("ones_is_mha", "K2 = V2 = all-ones reduces exactly to mha", _tensor_reduces_to_mha),
        Reduction("triple_loop", "matches a naive triple loop (rows of the N x N² matrix sum to 1)",
                  _tensor_triple_loop),
    ),
)(TensorAttention)
