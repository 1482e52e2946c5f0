"""``latent_cross_attention``: m ≪ N latent tokens read from the inputs and write back to them (Perceiver-style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, check_int, load_shared, seeded, zero_padded
from attnzoo.layers.cross_multimodal._common import FAMILY, check_cross_call, rand_x
from attnzoo.registry import Reduction, register


class LatentCrossAttention(nn.Module):
    """Latent bottleneck: read ``L' = L + Attn(L, S, S)``, latent self-attention
    ``L'' = L' + Attn(L', L', L')``, write ``X' = X + Attn(X, L'', L'')``.

    ``S`` is ``context`` ``[B, M, C_ctx]`` when given (Perceiver-IO: the latents encode the context
    and the tokens ``x`` decode it), else ``x`` itself. ``latents="learned"``: ``n_latents`` learned
    vectors (Dynamic Perceiver, concept slots); ``"pooled"``: one proxy per ``window`` consecutive
    source tokens (their mean over kept tokens; PT-DiT's proxy tokens, CrossLMM's pooled tokens),
    which then need no read step (``read=False``). The latent side costs O(m·N) and the latents'
    size does not depend on N. ``read``, ``latent_self`` and ``write`` switch the three stages;
    without ``write`` the output is ``x`` (the latents are :meth:`latents_of`).

    ``forward(x [B, N, C], *, mask=None, context=None, context_mask=None) -> [B, N, C]``; rows of
    padded tokens are zero.
    """

    def __init__(self, dim: int, n_heads: int = 8, *, n_latents: int = 8, latents: str = "learned",
                 window: int = 4, read: bool = True, latent_self: bool = True, write: bool = True,
                 context_dim: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.latent_source = check_choice("latents", latents, ("learned", "pooled"))
        self.window = check_int("window", window)
        self.context_width = dim if context_dim is None else check_int("context_dim", context_dim)
        if latents == "pooled" and self.context_width != dim:
            raise ValueError(f"context_dim: pooled latents are pooled source tokens, so the context width must be "
                             f"dim={dim}, got context_dim={context_dim}")
        if latents == "learned" and not read:
            raise ValueError("read: learned latents must read the source (read=True); pooled latents may skip it")
        self.n_latents = check_int("n_latents", n_latents)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) * dim ** -0.5) if latents == "learned" else None
        self.read = MultiHeadAttention(dim, n_heads, context_dim=self.context_width, backend=backend) if read else None
        self.latent_self = MultiHeadAttention(dim, n_heads, backend=backend) if latent_self else None
        self.write = MultiHeadAttention(dim, n_heads, backend=backend) if write else None

    def _initial(self, src: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, c = src.shape
        if self.latents is not None:
            return self.latents.to(src.dtype).unsqueeze(0).expand(b, -1, -1), None
        if n % self.window:
            raise ValueError(f"window: pooled latents need the source length to be a multiple of window="
                             f"{self.window}, got {n} tokens")
        w = torch.ones(b, n, dtype=src.dtype, device=src.device) if keep is None else keep.to(src.dtype)
        wins = w.view(b, n // self.window, self.window)
        s = (src * w.unsqueeze(-1)).view(b, n // self.window, self.window, c).sum(2)
        cnt = wins.sum(-1, keepdim=True)
        lat = s / cnt.clamp_min(1.0)
        return lat, (None if keep is None else cnt.squeeze(-1) > 0)

    def latents_of(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                   context_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(L'' [B, m, C], keep [B, m] or None)``: the latents after the read and latent self-attention."""
        src = x if context is None else context
        keep = mask if context is None else context_mask
        lat, lat_keep = self._initial(src, keep)
        if self.read is not None:
            lat = lat + self.read(lat, context=src, context_mask=keep)
        if self.latent_self is not None:
            lat = lat + self.latent_self(lat, mask=lat_keep)
        return lat, lat_keep

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding; ``context_mask`` the same for
        ``context``.
        """
        check_cross_call(self, x, mask, causal, context, context_mask, cache, self.context_width)
        if context is None and self.context_width != self.dim:
            raise ValueError(f"context: required, this module reads a context of width {self.context_width}")
        lat, lat_keep = self.latents_of(x, mask=mask, context=context, context_mask=context_mask)
        y = x if self.write is None else x + self.write(x, context=lat, context_mask=lat_keep)
        return zero_padded(y, mask)


def _zero_write_keeps_x() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(LatentCrossAttention, dim=32, n_heads=4, n_latents=3)
    with torch.no_grad():
        m.write.o_proj.weight.zero_()
        m.write.o_proj.bias.zero_()
    x = rand_x(n=9)
    return m(x), x


def _one_token_per_window_is_self_attention() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(LatentCrossAttention, dim=32, n_heads=4, latents="pooled", window=1, read=False, backend="reference")
    x = rand_x(n=9)
    ref = load_shared(m.latent_self, MultiHeadAttention(32, 4, backend="reference")).double()
    return m.latents_of(x)[0] - x, ref(x)


register(
    "latent_cross_attention", family=FAMILY, type="mixer", priority=2,
    papers=("Dynamic Perceiver", "FIT", "PT-DiT (Qihoo-T2X)", "CrossLMM", "Concept-Centric Transformers"),
    supports={"self", "cross", "padding"}, complexity="O(m·N + m^2)",
    summary="Perceiver-style latents: read from the inputs (or a context), latent self-attention, write back.",
    test_kwargs={"dim": 32, "n_heads": 4, "n_latents": 4},
    reductions=(
        Reduction("zero_write", "a zero write projection leaves x unchanged", _zero_write_keeps_x),
        Reduction("window_one_proxies", "one proxy per token: the proxy self-attention is full self-attention",
                  _one_token_per_window_is_self_attention),
    ),
)(LatentCrossAttention)
