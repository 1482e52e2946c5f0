"""``rcmha``: MHA with depthwise convolutions after Q/K/V and a Transformer-XL relative-position score term."""

from __future__ import annotations

import math

import torch
from torch import nn

from attnzoo.layers.base import AttentionMixer, MultiHeadAttention, check_int, head_dim_for
from attnzoo.layers.positional._common import FAMILY
from attnzoo.registry import Reduction, register


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-XL sinusoids ``[..., dim]``: ``[sin(p·f), cos(p·f)]`` with ``f_k = 10000^(−2k/dim)``."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    ang = pos.to(torch.float64).unsqueeze(-1) * inv
    return torch.cat([ang.sin(), ang.cos()], -1)[..., :dim]


class RelativeConvMHA(AttentionMixer):
    """RCMHA: relative convolutional multi-head attention.

    Q, K and V are each followed by a depthwise convolution along the sequence (one kernel
    of ``kernel_size`` taps per channel, Multi-DConv-Head style; causal, i.e. left-padded,
    by default), and the scores get a Transformer-XL relative-position term:
    ``s_ij = (q_i·k_j + u·k_j + (q_i + w)·W_R r_{i−j}) / √d`` with ``r`` the sinusoids of
    the distance, ``W_R`` a learned projection and ``u, w`` learned per-head vectors. The
    relative term is an additive score modifier built per call, so every backend runs it.
    Padded tokens are zeroed before the convolutions (nothing leaks from them).
    Convolution kernels start as the identity (delta) and ``u, w`` at zero.

    Checked against the abstract (RCMHA): "the application of the Depth-Wise Convolutional
    Layer to the input embedding, encompassing Query, Key, and Value parameters" and "the
    incorporation of Relative Positional Encoding into the attention scoring phase" in
    the manner of "Transformer-XL or Relative Multi-Head Attention (RMHA)". That the
    convolutions follow the projections (rather than precede them) is the catalogue's
    reading; kernel size 3 is the Primer MDHA choice, not from the abstract.
    ``conv_causal=False`` centres the kernels (then the layer is not causal and does not
    decode). KV-cache decoding keeps the last ``kernel_size − 1`` projections in the cache.
    """

    cross_ok = False

    def __init__(self, dim: int, n_heads: int = 8, *, kernel_size: int = 3, conv_causal: bool = True,
                 head_dim: int | None = None, bias: bool = True, backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        super().__init__(dim, backend=backend)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.conv_causal = bool(conv_causal)
        if not conv_causal and kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: a centred (conv_causal=False) kernel must be odd, got {kernel_size}")
        self.causal_ok = self.conv_causal
        width = n_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=bias)
        self.conv = nn.Conv1d(3 * width, 3 * width, kernel_size, groups=3 * width, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0, kernel_size - 1 if conv_causal else kernel_size // 2] = 1.0
        self.o_proj = nn.Linear(width, dim, bias=bias)
        self.r_proj = nn.Linear(dim, width, bias=False)
        self.u = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.w = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if cache is not None and not self.conv_causal:
            raise ValueError("cache: rcmha with conv_causal=False cannot decode (its kernels read later tokens)")
        return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                               cache=cache, head_mask=head_mask, return_weights=return_weights)

    def project(self, x, src, call=None):
        keep, cache = (None, None) if call is None else (call.mask, call.cache)
        p = self.qkv(x)
        if keep is not None:
            p = p * keep.unsqueeze(-1).to(p.dtype)
        t = p.transpose(1, 2)  # [B, 3W, N]
        k = self.kernel_size
        if self.conv_causal:
            if cache is not None:
                cache.claim_batch(t.shape[0])
            tail = None if cache is None else cache.state.get("rcmha_tail")
            left = tail.to(t.dtype) if tail is not None else t.new_zeros(t.shape[0], t.shape[1], k - 1)
            full = torch.cat([left, t], -1)
            if cache is not None:
                cache.state["rcmha_tail"] = full[..., full.shape[-1] - (k - 1):] if k > 1 else full[..., :0]
        else:
            full = nn.functional.pad(t, (k // 2, k // 2))
        y = nn.functional.conv1d(full, self.conv.weight.to(t.dtype), groups=t.shape[1]).transpose(1, 2)
        q, kk, v = y.split(self.n_heads * self.head_dim, dim=-1)
        split = MultiHeadAttention.split
        return split(q, self.n_heads), split(kk, self.n_heads), split(v, self.n_heads)

    def score_mod_for(self, q, k, call=None):
        from attnzoo.patterns import Bias

        n, m = q.shape[2], k.shape[2]
        scale = 1.0 / math.sqrt(self.head_dim)
        dist = torch.arange(1 - n, m, device=q.device)  # every value of i_abs − j: (m − n) + i − j
        rel = self.r_proj(sinusoid(dist, self.dim).to(q.dtype))  # [D, H*d]
        rel = rel.view(-1, self.n_heads, self.head_dim).transpose(0, 1)  # [H, D, d]
        pos_term = torch.matmul(q + self.w.to(q.dtype).view(1, -1, 1, self.head_dim), rel.transpose(-1, -2))
        i = torch.arange(n, device=q.device).view(-1, 1)
        j = torch.arange(m, device=q.device).view(1, -1)
        idx = ((m - n) + i - j) - (1 - n)  # [N, M] into dist
        pos_term = pos_term.gather(-1, idx.expand(*pos_term.shape[:2], n, m))
        content = torch.matmul(self.u.to(q.dtype).view(1, -1, 1, self.head_dim), k.transpose(-1, -2))  # [B, H, 1, M]
        return Bias((pos_term + content) * scale)

    def output(self, z, x):
        return self.o_proj(MultiHeadAttention.merge(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, kernel_size={self.kernel_size}, causal={self.conv_causal}"


def _rcmha_to_mha(m: RelativeConvMHA) -> MultiHeadAttention:
    ref = MultiHeadAttention(m.dim, m.n_heads, head_dim=m.head_dim).double()
    w, b = m.qkv.weight.detach().chunk(3), m.qkv.bias.detach().chunk(3)
    ref.load_state_dict({"q_proj.weight": w[0], "q_proj.bias": b[0], "k_proj.weight": w[1], "k_proj.bias": b[1],
                         "v_proj.weight": w[2], "v_proj.bias": b[2], "o_proj.weight": m.o_proj.weight.detach(),
                         "o_proj.bias": m.o_proj.bias.detach()})
    return ref


def _rcmha_identity_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for conv_causal in (True, False):
        torch.manual_seed(0)
        m = RelativeConvMHA(32, 4, conv_causal=conv_causal).double()
        nn.init.zeros_(m.r_proj.weight)  # zero relative term (u = w = 0 at init); kernels start as deltas
        ref = _rcmha_to_mha(m)
        got.append(m(x))
        want.append(ref(x))
    return torch.stack(got), torch.stack(want)


def _rcmha_conv_causal() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = RelativeConvMHA(32, 4, kernel_size=4).double()
    with torch.no_grad():
        m.conv.weight.normal_()
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    return torch.stack([t[:, :, :6] for t in m.project(x2, x2)]), torch.stack([t[:, :, :6] for t in m.project(x, x)])


def _rcmha_relative_form() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = RelativeConvMHA(32, 4).double()
    with torch.no_grad():
        m.u.normal_()
        m.w.normal_()
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, k, _ = m.project(x, x)
    bias = m.score_mod_for(q, k).bias
    want = torch.empty_like(bias)
    for h in range(4):
        for i in range(6):
            for j in range(6):
                r = m.r_proj(sinusoid(torch.tensor(float(i - j)), 32).double()).view(4, 8)[h]
                want[0, h, i, j] = (m.u[h] @ k[0, h, j] + (q[0, h, i] + m.w[h]) @ r) / math.sqrt(8)
    return bias, want


register(
    "rcmha", family=FAMILY, type="mixer", priority=3, papers=("RCMHA",), supports={"self", "causal", "padding",
                                                                                  "decoding"},
    summary="MHA with depthwise convolutions after Q/K/V and a Transformer-XL relative-position score term.",
    test_kwargs={"dim": 32, "n_heads": 4, "kernel_size": 3},
    reductions=(
        Reduction("identity_kernels_is_mha", "delta kernels and a zero relative term give mha (causal and centred)",
                  _rcmha_identity_is_mha),
        Reduction("causal_conv", "the causal depthwise convolution keeps Q/K/V at t independent of later tokens",
                  _rcmha_conv_causal),
        Reduction("relative_term", "the score term is (u·k_j + (q_i + w)·W_R r_{i−j})/√d (explicit loop)",
                  _rcmha_relative_form),
    ),
)(RelativeConvMHA)


