"""``shsa``: SHViT single-head self-attention on the first dim/ratio channels; the rest pass through."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import AttentionMixer, MultiHeadAttention, check_int, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.registry import Reduction, register


class SingleHeadSelfAttention(AttentionMixer):
    """SHViT single-head attention on a channel subset.

    ``X_p`` = the first ``C_p = dim // ratio`` channels (pre-normalised with LayerNorm when
    ``pre_norm``); ``Y_p`` = single-head ``Attn(X_p W_q, X_p W_k, X_p W_v)`` with
    ``qk_dim``-wide queries/keys and ``C_p``-wide values; ``Y = Proj(act(Concat(Y_p, X_rest)))``.
    The abstract (Yun & Ro, SHViT) only says "a single-head attention module ... combining
    global and local information"; the split/concat layout and the ReLU before the
    projection are [recalled] from the official code, not verified here.
    """

    cross_ok = False

    def __init__(self, dim: int, *, ratio: float = 4.0, qk_dim: int = 16, pre_norm: bool = True,
                 activation: bool = True, bias: bool = True, pattern: Any = None, score_mod: Any = None,
                 backend: str = "auto") -> None:
        super().__init__(dim, pattern=pattern, score_mod=score_mod, backend=backend)
        if not ratio >= 1:
            raise ValueError(f"ratio: expected a number >= 1, got {ratio!r}")
        self.pdim = int(dim // ratio)
        if self.pdim < 1:
            raise ValueError(f"ratio: dim // ratio must be >= 1, got dim={dim}, ratio={ratio}")
        self.qk_dim = check_int("qk_dim", qk_dim)
        self.norm = nn.LayerNorm(self.pdim) if pre_norm else nn.Identity()
        self.qkv = nn.Linear(self.pdim, 2 * qk_dim + self.pdim, bias=bias)
        self.act = nn.ReLU() if activation else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x, src, call=None):
        xp = self.norm(x[..., : self.pdim])
        q, k, v = self.qkv(xp).split([self.qk_dim, self.qk_dim, self.pdim], dim=-1)
        return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)

    def output(self, z, x):
        return self.proj(self.act(torch.cat([z[:, 0], x[..., self.pdim:]], dim=-1)))


def _shsa_r1_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    s = seeded(SingleHeadSelfAttention, dim=32, ratio=1, qk_dim=32, pre_norm=False, activation=False)
    m = MultiHeadAttention(32, 1).double()
    w, b = s.qkv.weight.detach().split(32), s.qkv.bias.detach().split(32)
    m.load_state_dict({"q_proj.weight": w[0], "q_proj.bias": b[0], "k_proj.weight": w[1], "k_proj.bias": b[1],
                       "v_proj.weight": w[2], "v_proj.bias": b[2], "o_proj.weight": s.proj.weight.detach(),
                       "o_proj.bias": s.proj.bias.detach()})
    x = rand_x()
    return s(x, causal=True), m(x, causal=True)


def _shsa_rest_passthrough() -> tuple[torch.Tensor, torch.Tensor]:
    s = seeded(SingleHeadSelfAttention, dim=32, ratio=4, activation=False)
    x = rand_x()
    s.capture = True
    s(x)
    proj_in = torch.cat([s.captured["z"][:, 0], x[..., 8:]], dim=-1)
    return s.proj(proj_in), s(x)


register(
    "shsa", family=FAMILY, type="mixer", priority=3, papers=("SHViT",),
    supports={"self", "causal", "padding", "decoding"},
    summary="SHViT single-head self-attention on the first dim/ratio channels; the rest pass through.",
    test_kwargs={"dim": 32, "ratio": 4, "qk_dim": 8},
    reductions=(
        Reduction("ratio1_is_single_head_mha", "ratio = 1 (no norm, no activation) is single-head mha",
                  _shsa_r1_is_mha),
        Reduction("rest_passthrough", "channels outside X_p reach the final projection unchanged",
                  _shsa_rest_passthrough),
    ),
)(SingleHeadSelfAttention)
