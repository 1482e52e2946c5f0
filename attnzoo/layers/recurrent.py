"""Shared pieces of the linear / recurrent token mixers: decoding state, short causal convolution, norms.

Decoding. A recurrent mixer keeps a fixed-size state instead of keys and values. It takes
the usual ``cache`` argument: any :class:`~attnzoo.layers.KVCache` (its free ``state`` dict
holds the layer's tensors, ``position`` counts the tokens seen), or a :class:`RecurrentState`,
the same object whose :meth:`RecurrentState.nbytes` reports the state size. Feeding a
sequence chunk by chunk with one cache gives the same outputs as one causal pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import check_int
from attnzoo.layers.cache import KVCache

__all__ = ["HeadRMSNorm", "RecurrentState", "ShortConv", "cache_state", "state_nbytes"]


def state_nbytes(obj: Any) -> int:
    """Bytes held by the tensors in ``obj`` (nested dicts, lists, caches)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, KVCache):
        return obj.nbytes() if isinstance(obj, RecurrentState) else obj.nbytes() + state_nbytes(obj.state)
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


class RecurrentState(KVCache):
    """The decoding state of a recurrent mixer: fixed-size tensors in ``state``; no keys or values.

    Use like a KV cache: ``s = RecurrentState()``, then ``layer(x_t, causal=True, cache=s)``
    for each new chunk. ``nbytes()`` does not grow with the number of tokens seen.
    """

    def nbytes(self) -> int:
        return super().nbytes() + state_nbytes(self.state)


def cache_state(cache: Any, name: str, batch: int) -> dict[str, Any] | None:
    """``cache.state`` after checking ``cache`` is a KV cache holding a state of ``batch`` (``None`` passes
    through)."""
    if cache is None:
        return None
    if not isinstance(cache, KVCache):
        raise ValueError(
            f"cache: {name} expects an attnzoo.layers.KVCache or RecurrentState, got {type(cache).__name__}"
        )
    cache.claim_batch(batch)
    return cache.state


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over tokens (``kernel`` taps), optionally followed by SiLU.

    ``y_t[c] = Σ_j w[c, j] x_{t-K+1+j}[c] + b[c]``. ``forward(x [B, N, C], prev)`` with ``prev``
    the last ``kernel - 1`` inputs before ``x`` (``[B, kernel-1, C]``, zeros when None) returns
    ``(y, new_prev)``, so decoding chunk by chunk equals one pass. Written as ``kernel`` shifted
    multiply-adds (PyTorch's grouped ``conv1d`` is slow on CPU for float64 and tiny groups; an unfold
    and a sum took 3.6x as long, forward and backward at B 64, N 64, C 384).
    """

    def __init__(self, channels: int, kernel: int, *, activation: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.kernel = check_int("conv_size", kernel)
        bound = 1.0 / math.sqrt(self.kernel)  # nn.Conv1d's default init for a depthwise kernel
        self.weight = nn.Parameter(torch.empty(channels, self.kernel).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None
        self.activation = activation

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        if prev is None:
            prev = x.new_zeros(b, self.kernel - 1, c)
        full = torch.cat([prev.to(x.dtype), x], dim=1)  # [B, K-1+N, C]
        y = full[:, :n] * self.weight[:, 0]
        for j in range(1, self.kernel):
            y = y + full[:, j:j + n] * self.weight[:, j]
        if self.bias is not None:
            y = y + self.bias
        if self.activation:
            y = F.silu(y)
        return y, full[:, full.shape[1] - (self.kernel - 1):]


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dimension (per head when applied to ``[B, H, N, D]``), learnable gain.

    Computed in float32 for half inputs; a zero row stays zero.
    """

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*D]`` -> ``[B, H, N, D]``."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(z: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H*D]``."""
    b, h, n, d = z.shape
    return z.transpose(1, 2).reshape(b, n, h * d)


def keep_float(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``mask`` ``[B, N]`` as ``x``'s dtype (None stays None)."""
    return None if mask is None else mask.to(x.dtype)


def step_form(form: str, n: int) -> str:
    """The form for a decoding step of ``n`` tokens: token by token when one token comes."""
    return "recurrent" if n == 1 else form


def run_from_state(op: Any, state: dict[str, Any] | None, cache: Any, n: int, *args: Any, form: str,
                   **kw: Any) -> torch.Tensor:
    """``op(*args, form=form, **kw)`` over ``n`` new tokens; when decoding (``state`` given) it starts from
    ``state["S"]``, stores the final state back there, advances ``cache`` and runs a one-token step recurrently."""
    if state is None:
        return op(*args, form=form, **kw)
    o, state["S"] = op(*args, initial_state=state.get("S"), output_final_state=True, form=step_form(form, n), **kw)
    cache.advance(n)
    return o
