"""``hilo``: HiLo (LITv2): alpha of the heads attend globally over s x s pooled K/V (Lo-Fi), the rest
inside s x s windows (Hi-Fi); outputs concatenated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_int, seeded, zero_padded
from attnzoo.layers.local_sparse._common import FAMILY, pool_grid
from attnzoo.layers.local_sparse._grid import flatten_grid
from attnzoo.layers.local_sparse.pooled_kv import PooledKVAttention
from attnzoo.layers.local_sparse.swin_window import SwinWindowAttention
from attnzoo.layers.testing import random_grid
from attnzoo.ops import attention
from attnzoo.patterns import KeyPadding, WindowPartition
from attnzoo.registry import Reduction, register


class HiLoAttention(nn.Module):
    """HiLo attention (LITv2): a fraction ``alpha`` of the heads are Lo-Fi (global attention over
    K/V average-pooled in ``window``-sized cells), the others Hi-Fi (attention inside
    ``window``-sized windows); each path has its own projections and the two outputs are
    concatenated along channels (Hi-Fi first). Input ``[B, N, C]`` or ``[B, *spatial, C]``;
    ``window`` must divide every extent.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, alpha: float = 0.5, window: int = 2,
                 head_dim: int | None = None, bias: bool = True, scale: float | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a fraction in [0, 1], got {alpha!r}")
        self.head_dim = head_dim or dim // n_heads
        if head_dim is None and dim % n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={n_heads}, got dim={dim}")
        if n_heads * self.head_dim != dim:  # the two branches' outputs are concatenated into dim channels
            raise ValueError(f"head_dim: HiLo needs n_heads * head_dim == dim, got {n_heads} * {self.head_dim} "
                             f"!= {dim}")
        self.l_heads = int(n_heads * alpha)
        self.h_heads = n_heads - self.l_heads
        self.window, self.scale, self.backend = check_int("window", window), scale, backend
        hd = self.head_dim
        self.h_dim, self.l_dim = self.h_heads * hd, self.l_heads * hd
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim, bias=bias)
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim, bias=bias)
        self._patterns: dict[tuple[int, ...], Any] = {}

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` or ``[B, *spatial, C]`` -> same shape (Hi-Fi channels, then Lo-Fi).

        ``mask``: bool ``[B, N]`` (``[B, *spatial]`` for grid input), True = keep (a real token), False = padding.
        """
        if causal or context is not None or cache is not None:
            raise ValueError("causal, context, cache: HiLo attention is non-causal self-attention")
        grid, flat, keep = flatten_grid(x, mask, self.dim)
        s = (self.window,) * len(grid)
        for axis, n in enumerate(grid):
            if n % self.window:
                raise ValueError(f"window: window {self.window} does not divide the grid extent {n} on axis {axis}")
        b, n, _ = flat.shape
        pad = KeyPadding(keep) if keep is not None and not bool(keep.all()) else None
        outs = []
        if self.h_heads:
            pat = self._patterns.get(grid)
            if pat is None:
                pat = self._patterns.setdefault(grid, WindowPartition(s, grid=grid))
            q, k, v = (t.view(b, n, self.h_heads, -1).transpose(1, 2) for t in self.h_qkv(flat).chunk(3, -1))
            z = attention(q, k, v, pattern=pat if pad is None else pat & pad, scale=self.scale, backend=self.backend)
            outs.append(self.h_proj(z.transpose(1, 2).reshape(b, n, self.h_dim)))
        if self.l_heads:
            xp, valid = pool_grid(flat.unsqueeze(1), keep, grid, s)
            xp = xp.squeeze(1)
            q = self.l_q(flat).view(b, n, self.l_heads, -1).transpose(1, 2)
            k, v = (t.view(b, xp.shape[1], self.l_heads, -1).transpose(1, 2) for t in self.l_kv(xp).chunk(2, -1))
            lp = KeyPadding(valid) if valid is not None and not bool(valid.all()) else None
            z = attention(q, k, v, pattern=lp, scale=self.scale, backend=self.backend)
            outs.append(self.l_proj(z.transpose(1, 2).reshape(b, n, self.l_dim)))
        y = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        return zero_padded(y, keep).reshape(x.shape)


def _hilo_alpha0_is_window():
    m = seeded(HiLoAttention, dim=32, n_heads=4, alpha=0.0, window=2)
    win = SwinWindowAttention(32, 4, window=2, backend="reference").double()
    q, k, v = m.h_qkv.weight.chunk(3, 0)
    qb, kb, vb = m.h_qkv.bias.chunk(3, 0)
    win.load_state_dict({"q_proj.weight": q, "q_proj.bias": qb, "k_proj.weight": k, "k_proj.bias": kb,
                         "v_proj.weight": v, "v_proj.bias": vb, "o_proj.weight": m.h_proj.weight,
                         "o_proj.bias": m.h_proj.bias})
    x = random_grid(grid=(4, 6))
    return m(x), win(x)


def _hilo_lofi_map(m: HiLoAttention, dst: nn.Module) -> nn.Module:
    k, v = m.l_kv.weight.chunk(2, 0)
    kb, vb = m.l_kv.bias.chunk(2, 0)
    dst.load_state_dict({"q_proj.weight": m.l_q.weight, "q_proj.bias": m.l_q.bias, "k_proj.weight": k,
                         "k_proj.bias": kb, "v_proj.weight": v, "v_proj.bias": vb, "o_proj.weight": m.l_proj.weight,
                         "o_proj.bias": m.l_proj.bias})
    return dst


def _hilo_alpha1_is_pooled():
    m = seeded(HiLoAttention, dim=32, n_heads=4, alpha=1.0, window=2)
    pooled = _hilo_lofi_map(m, PooledKVAttention(32, 4, pool=2, backend="reference").double())
    x = random_grid(grid=(4, 6))
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[0, 3, 3:] = False
    return torch.stack([m(x), m(x, mask=keep)]), torch.stack([pooled(x), pooled(x, mask=keep)])


def _hilo_s1_lofi_is_mha():
    m = seeded(HiLoAttention, dim=32, n_heads=4, alpha=1.0, window=1)
    ref = _hilo_lofi_map(m, MultiHeadAttention(32, 4, backend="reference").double())
    x = random_grid(grid=(4, 6))
    return m(x), ref(x.view(2, 24, 32)).view(x.shape)


register(
    "hilo", family=FAMILY, type="mixer", priority=2, input_kind="grid2d", papers=("HiLo (LITv2)",),
    supports={"self", "padding"}, complexity="O(N (s^2 + N / s^2))",
    summary="HiLo (LITv2): alpha of the heads attend globally over s x s pooled K/V (Lo-Fi), the rest inside "
            "s x s windows (Hi-Fi); outputs concatenated.",
    test_kwargs={"dim": 32, "n_heads": 4, "alpha": 0.5, "window": 2},
    reductions=(
        Reduction("alpha0_is_window", "alpha = 0 gives pure window attention (swin_window)", _hilo_alpha0_is_window),
        Reduction("alpha1_is_pooled", "alpha = 1 gives global attention over pooled K/V (pooled_kv)",
                  _hilo_alpha1_is_pooled),
        Reduction("s1_lofi_is_mha", "s = 1 makes Lo-Fi equal to full MHSA", _hilo_s1_lofi_is_mha),
    ),
)(HiLoAttention)
