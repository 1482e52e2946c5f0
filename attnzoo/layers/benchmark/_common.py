"""Shared parts of the benchmark mixers: a causal long convolution (FFT or direct Toeplitz form)."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.testing import random_tokens

FAMILY = "benchmark"
FORMS = ("fft", "direct")
REFERENCE = "the same module with form='direct' (the causal convolution as an N x N Toeplitz product) in float64"
SMALL = {"dim": 32, "max_len": 16}


def check_conv_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    return form


def causal_conv(u: torch.Tensor, h: torch.Tensor, form: str) -> torch.Tensor:
    """``y[b, t, c] = Σ_{s<=t} h[c, t-s] u[b, s, c]``: ``u`` ``[B, N, C]``, ``h`` ``[C, L]`` with ``L >= N``
    (taps beyond ``N`` unused) -> ``[B, N, C]``. ``fft``: zero-padded FFT, O(N log N); ``direct``: the
    Toeplitz matrix, O(N²) (the reference)."""
    n = u.shape[1]
    if h.shape[1] < n:
        raise ValueError(f"x: sequence length {n} exceeds the filter length max_len={h.shape[1]}")
    h = h[:, :n]
    if form == "direct":
        idx = torch.arange(n, device=u.device)
        lag = idx[:, None] - idx[None, :]  # [t, s]
        toeplitz = torch.where(lag >= 0, h[:, lag.clamp(min=0)], h.new_zeros(()))  # [C, t, s]
        return torch.einsum("cts,bsc->btc", toeplitz, u)
    size = 2 * n
    uf = torch.fft.rfft(u.transpose(1, 2).float() if u.dtype in (torch.float16, torch.bfloat16)
                        else u.transpose(1, 2), n=size)
    hf = torch.fft.rfft(h.to(uf.real.dtype), n=size)
    y = torch.fft.irfft(uf * hf, n=size)[..., :n]
    return y.transpose(1, 2).to(u.dtype)


class LongConv(nn.Module):
    """A causal depthwise convolution with an explicit filter of ``max_len`` taps per channel."""

    def __init__(self, channels: int, max_len: int, *, form: str = "fft") -> None:
        super().__init__()
        self.max_len = check_int("max_len", max_len)
        self.form = check_conv_form(form)
        self.filter = nn.Parameter(torch.randn(channels, self.max_len) * (1.0 / self.max_len) ** 0.5)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return causal_conv(u, self.filter, self.form)


def rand_x(n: int = 11) -> torch.Tensor:
    return random_tokens(n=n)
