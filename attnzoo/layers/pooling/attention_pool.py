"""``attention_pool``: additive-score attention pooling (self-attentive pooling) and its variants.

``e_t = v^T tanh(W h_t + b)``, ``a = softmax_t(e)`` over the kept frames, ``z = sum_t a_t h_t``.
With ``n_heads`` H the channels split into H groups, each pooled with its own scores; ``per_dim``
gives every channel its own score (AttSets: H = C). ``cond`` conditions the scorer on per-frame
features ``c_t`` (``concat``: ``[h_t; c_t]``, ``gate``: ``h_t * sigmoid(W_c c_t)``, ``affine``:
``gamma(c_t) * h_t + beta(c_t)``); the pooled values stay ``h_t``. :meth:`AttentionPool.stream`
gives the streaming LID form: a running max, ``S_t`` and ``Z_t``, and ``z_t = S_t / Z_t`` at
every frame.
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.layers.base import check_choice, check_int, seeded
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler, check_pool_mask
from attnzoo.layers.pooling.mean_pool import MeanPool
from attnzoo.registry import Reduction, register

__all__ = ["AttentionPool", "CONDS"]

CONDS = ("none", "concat", "gate", "affine")


class AttentionPool(Pooler):
    """Additive attention pooling ``[B, N, C] -> [B, C]``; weights ``[B, N]`` (``[B, N, H]`` for H > 1).

    Args: ``attn_dim`` hidden width of the scorer; ``n_heads`` channel groups with their own
    scores; ``per_dim`` one score per channel (H = C); ``cond`` and ``cond_dim`` the conditioning
    (a per-call ``cond`` tensor ``[B, N, cond_dim]``, ``[1, T, cond_dim]`` when packed).
    """

    def __init__(self, dim: int, *, attn_dim: int | None = None, n_heads: int = 1, per_dim: bool = False,
                 cond: str = "none", cond_dim: int | None = None) -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.n_heads = dim if per_dim else check_int("n_heads", n_heads)
        if dim % self.n_heads:
            raise ValueError(f"n_heads: must divide dim={dim}, got n_heads={self.n_heads}")
        self.per_dim = bool(per_dim)
        self.cond = check_choice("cond", cond, CONDS)
        if (cond == "none") != (cond_dim is None):
            raise ValueError(f"cond_dim: expected an integer with cond={cond!r} and None without, got {cond_dim!r}")
        self.cond_dim = None if cond_dim is None else check_int("cond_dim", cond_dim)
        hidden = check_int("attn_dim", attn_dim if attn_dim is not None else max(dim // 2, 8))
        score_in = dim + (self.cond_dim if cond == "concat" else 0)
        self.proj = nn.Linear(score_in, hidden)
        self.score = nn.Linear(hidden, self.n_heads, bias=False)
        if cond == "gate":
            self.cond_gate = nn.Linear(self.cond_dim, dim)
        elif cond == "affine":
            self.cond_gamma = nn.Linear(self.cond_dim, dim)
            self.cond_beta = nn.Linear(self.cond_dim, dim)

    def scores(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame scores ``[..., H]`` of frames ``h`` ``[..., C]`` (conditions ``c`` ``[..., cond_dim]``)."""
        if self.cond == "concat":
            h = torch.cat([h, c], -1)
        elif self.cond == "gate":
            h = h * torch.sigmoid(self.cond_gate(c))
        elif self.cond == "affine":
            h = self.cond_gamma(c) * h + self.cond_beta(c)
        return self.score(torch.tanh(self.proj(h)))

    def _cond(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        if self.cond == "none":
            if cond is not None:
                raise ValueError("cond: this attention_pool was built with cond='none'; got a cond tensor")
            return
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (*x.shape[:2], self.cond_dim):
            got = list(cond.shape) if isinstance(cond, torch.Tensor) else cond
            raise ValueError(f"cond: expected a tensor [{x.shape[0]}, {x.shape[1]}, {self.cond_dim}], got {got}")

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_weights: bool = False, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``x`` ``[B, N, C]`` to ``[B, C]`` (and weights with ``return_weights``)."""
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            self._cond(x, cond)
        return super().forward(x, mask=mask, cu_seqlens=cu_seqlens, return_weights=return_weights, cond=cond)

    def pool(self, bags: Bags, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = None if cond is None else (cond[0] if bags.packed else cond)
        a = bags.softmax(self.scores(bags.x, c))
        h = bags.x.unflatten(-1, (self.n_heads, self.dim // self.n_heads))
        z = bags.weighted_sum(a, h).flatten(-2)
        return z, (a.squeeze(-1) if self.n_heads == 1 else a)

    def stream(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming outputs ``[B, N, C]``: ``z_t = S_t / Z_t`` over the kept frames ``<= t`` (zeros before the
        first kept frame), with a running max ``m_t``, ``S_t = sum exp(e - m_t) h`` and ``Z_t = sum exp(e - m_t)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a tensor [B, N, {self.dim}], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_pool_mask("mask", mask, tuple(x.shape[:2]))
        self._cond(x, cond)
        b, n, _ = x.shape
        e = self.scores(x, cond)
        h = x.unflatten(-1, (self.n_heads, self.dim // self.n_heads))
        m = e.new_full((b, self.n_heads), float("-inf"))
        s = h.new_zeros(b, self.n_heads, self.dim // self.n_heads)
        z = e.new_zeros(b, self.n_heads)
        outs = []
        for t in range(n):
            keep = torch.ones(b, 1, dtype=torch.bool, device=x.device) if mask is None else mask[:, t:t + 1]
            e_t = torch.where(keep, e[:, t], torch.full_like(e[:, t], float("-inf")))
            m_new = torch.maximum(m, e_t)
            safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            old = torch.where(torch.isfinite(m), torch.exp(m - safe), torch.zeros_like(m))
            new = torch.where(keep, torch.exp(e_t - safe), torch.zeros_like(e_t))
            s = s * old.unsqueeze(-1) + new.unsqueeze(-1) * h[:, t]
            z = z * old + new
            m = m_new
            outs.append((s / torch.where(z > 0, z, torch.ones_like(z)).unsqueeze(-1)).flatten(-2))
        return torch.stack(outs, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, cond={self.cond!r}"


def _x(b: int = 2, n: int = 7, c: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _constant_scores_is_mean() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentionPool, dim=8, n_heads=2)
    with torch.no_grad():
        m.score.weight.zero_()
    x = _x()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    return m(x, mask=keep), MeanPool(8)(x, mask=keep)


def _identical_copies() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentionPool, dim=8, per_dim=True)
    e = _x(n=1)
    return m(e.expand(2, 6, 8)), e[:, 0]


def _streaming_end_is_offline() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(AttentionPool, dim=8, n_heads=2, cond="gate", cond_dim=3)
    x, c = _x(), _x(c=3, seed=1)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    return m.stream(x, mask=keep, cond=c)[:, -1], m(x, mask=keep, cond=c)


register(
    "attention_pool", family=FAMILY, type="pooler", priority=1, input_kind="set",
    papers=("Attentive temporal pooling (streaming LID)", "AttSets", "Lexicon-conditioned attention pooling"),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the same module in float64 (padded path: masked softmax over the bag)", reference_kwargs={},
    test_kwargs={"dim": 32, "n_heads": 2},
    summary="Additive-score attention pooling v^T tanh(W h + b) with multi-head, per-dimension (AttSets), "
            "conditioned (concat / gate / affine) and streaming (running max, S_t / Z_t) variants.",
    reductions=(
        Reduction("constant_scores_is_mean", "constant scores (v = 0) give mean_pool", _constant_scores_is_mean),
        Reduction("identical_copies", "a set of identical copies returns the element", _identical_copies),
        Reduction("streaming_end_is_offline", "the streaming output at the last frame equals the offline output",
                  _streaming_end_is_offline),
    ),
)(AttentionPool)
