"""``kdgqa``: GQA whose query-head-to-group allocation follows the key-head norms (KDGQA, DGQA)."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.layers.base import MultiHeadAttention, check_choice, load_shared, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.layers.dense_multihead.gqa import GroupedQueryAttention
from attnzoo.registry import Reduction, register


def allocate_heads(ratios: torch.Tensor, n_heads: int, minimum: int = 0) -> torch.Tensor:
    """Integer head counts ``[..., G]`` summing to ``n_heads``: ``minimum`` each, the rest ∝ ``ratios``
    (largest remainder)."""
    if minimum:
        g = ratios.shape[-1]
        if minimum * g > n_heads:
            raise ValueError(f"n_heads: {n_heads} heads cannot give {g} groups {minimum} each")
        return minimum + allocate_heads(ratios, n_heads - minimum * g)
    raw = ratios / ratios.sum(-1, keepdim=True) * n_heads
    raw = torch.round(raw * 1e6) / 1e6  # equal ratios give exact integers despite rounding noise
    base = raw.floor()
    rest = (n_heads - base.sum(-1, keepdim=True)).long()
    order = torch.argsort(raw - base, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    return (base + (rank < rest).to(base.dtype)).long()


class KeyDrivenGQA(MultiHeadAttention):
    """KDGQA / DGQA: grouped-query attention with key-norm-driven head allocation.

    ``mode="kdgqa"``: in each forward pass (per batch element) every group gets one query
    head and the other ``n_heads − n_kv_heads`` are shared out ∝ the norm ratio of key
    head g (mean key norm over kept tokens), by the largest-remainder rule; heads are
    assigned to groups in order. The one-head minimum (no key/value head is left unread)
    is a choice made here; it is what makes the catalogue's "g = h gives MHA" hold. ``mode="dgqa"``: the
    ratios are an EMA (``momentum``) updated in training and used as is in eval. Checked
    against the abstract (KDGQA/DGQA/PGQA): KDGQA "looks at the ratios of the norms of the
    key heads during each forward pass", DGQA at "the ratios of the norms as they evolve
    through training". PGQA ("subtracting noise from the attention maps") is not
    implemented: the abstract does not give the noise, and the only code found was an
    unattributed excerpt (Gaussian noise with each attention-map row's mean and standard
    deviation, zero diagonal) that does not show where or when it is subtracted. The
    allocation uses the whole sequence (every key head's norm), so the layer is not causal:
    a causal variant would need a different allocation per query position, which the
    catalogue does not ask for.
    """

    causal_ok = False

    def __init__(self, dim: int, n_heads: int = 8, n_kv_heads: int = 2, *, mode: str = "kdgqa",
                 momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(dim, n_heads, n_kv_heads=n_kv_heads, **kw)
        self.mode = check_choice("mode", mode, ("kdgqa", "dgqa"))
        self.momentum = float(momentum)
        self.register_buffer("ema_ratios", torch.full((n_kv_heads,), 1.0 / n_kv_heads))

    def key_norms(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Mean key norm per group ``[B, G]``."""
        norms = k.detach().norm(dim=-1)  # [B, G, M]
        w = torch.ones_like(norms) if keep is None else keep[:, None, :].to(norms.dtype).expand_as(norms)
        return (norms * w).sum(-1) / w.sum(-1).clamp(min=1)

    def allocation(self, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Query heads per group ``[B, G]`` (integers summing to ``n_heads``)."""
        norms = self.key_norms(k, keep)
        total = norms.sum(-1, keepdim=True)
        ratios = torch.where(total > 0, norms / total.clamp_min(torch.finfo(norms.dtype).tiny),
                             torch.full_like(norms, 1.0 / norms.shape[-1]))  # no kept token: uniform
        if self.mode == "dgqa":
            if self.training:
                with torch.no_grad():
                    self.ema_ratios.mul_(self.momentum).add_((1 - self.momentum) * ratios.mean(0).to(self.ema_ratios))
            ratios = self.ema_ratios.to(norms).expand_as(norms)
        return allocate_heads(ratios, self.n_heads, minimum=1)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        counts = self.allocation(k, None if call is None else call.kv_keep)  # [B, G]
        bounds = counts.cumsum(-1)  # query head i -> first group whose cumulative count exceeds i
        heads = torch.arange(self.n_heads, device=q.device)
        group = (heads.view(1, -1, 1) >= bounds.unsqueeze(1)).sum(-1)  # [B, H]
        idx = group[:, :, None, None]
        k_full = k.gather(1, idx.expand(-1, -1, *k.shape[2:]))
        v_full = v.gather(1, idx.expand(-1, -1, *v.shape[2:]))
        return super().attend(q, k_full, v_full, pattern, want_weights, call=call)


def _kdgqa_equal_is_gqa() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=2)
    m.key_norms = lambda k, keep: k.new_ones(k.shape[0], k.shape[1])
    g = GroupedQueryAttention(32, 4, 2).double()
    load_shared(m, g)
    x = rand_x()
    return m(x), g(x)


def _kdgqa_integers() -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.rand(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = allocate_heads(r, 8)
    return counts.sum(-1).to(torch.float64), torch.full((50,), 8.0, dtype=torch.float64)


def _kdgqa_groups_eq_heads_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=4)
    ref = MultiHeadAttention(32, 4).double()
    load_shared(m, ref)
    x = rand_x()
    return m(x), ref(x)


def _kdgqa_one_group_is_mqa() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(KeyDrivenGQA, dim=32, n_heads=4, n_kv_heads=1)
    g = GroupedQueryAttention(32, 4, 1).double()
    load_shared(m, g)
    x = rand_x()
    return m(x), g(x)


register(
    "kdgqa", family=FAMILY, type="mixer", priority=3, papers=("KDGQA/DGQA/PGQA",),
    supports={"self", "cross", "padding", "gqa"},
    summary="GQA whose query-head-to-group allocation follows the key-head norms (KDGQA, DGQA).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_kv_heads": 2},
    reductions=(
        Reduction("equal_norms_is_gqa", "equal key norms give the uniform allocation (= gqa)", _kdgqa_equal_is_gqa),
        Reduction("integer_allocation", "allocations are integers summing to n_heads", _kdgqa_integers),
        Reduction("groups_eq_heads_is_mha", "n_kv_heads = n_heads gives mha", _kdgqa_groups_eq_heads_is_mha),
        Reduction("one_group_is_mqa", "n_kv_heads = 1 gives MQA", _kdgqa_one_group_is_mqa),
    ),
)(KeyDrivenGQA)
