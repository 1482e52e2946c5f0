"""Shared machinery of the poolers: input checks and :class:`Bags`, one view of padded or packed bags.

Pooler contract: ``forward(x [B, N, C], *, mask=None, cu_seqlens=None, return_weights=False)
-> [B, C_out]`` (or ``[B, K, C_out]``). ``mask`` is bool ``[B, N]`` (True = keep). ``cu_seqlens``
``[S + 1]`` packs ``S`` bags one after another into ``x`` ``[1, T, C]`` (no padding) and gives
``[S, C_out]``, equal to the same bags padded. A bag without any kept instance gives zeros. With
``return_weights=True`` an entry that has weights also returns them per instance, in the
layout of ``x``: ``[B, N, *heads]`` (``[1, T, *heads]`` when packed), zero on padding.

An entry computes per-instance quantities pointwise (``Linear`` layers on the last axis work on
padded ``[B, N, ...]`` and packed ``[T, ...]`` rows alike) and reduces them with the methods of
:class:`Bags`, so one ``pool`` method serves both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.ops.segment import check_cu_seqlens, segment_ids, segment_max, segment_softmax, segment_sum

__all__ = ["MAB", "Bags", "Pooler", "bag_attention", "dense_attention", "masked_softmax", "rank_in_bag", "rff",
           "check_bag_input", "check_grid_call", "check_pool_mask", "local_average", "FAMILY"]

FAMILY = "pooling"
_LOW = (torch.float16, torch.bfloat16)


def check_pool_mask(name: str, mask: Any, shape: tuple[int, ...]) -> None:
    """``mask`` must be a bool tensor of ``shape`` (``ValueError`` naming ``name`` otherwise)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a bool tensor {list(shape)}, got {got}")


def check_grid_call(name: str, x: Any, dim: int, mask: Any, causal: bool, context: Any) -> None:
    """The checks of a non-causal, self-only grid mixer ``name``: ``x`` a channels-last grid
    ``[B, *spatial, dim]`` (1-3 spatial axes), ``mask`` bool ``[B, *spatial]``; ``causal`` and ``context``
    are refused (its average reads both sides of each token)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4, 5) or x.shape[-1] != dim:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a channels-last grid [B, N, {dim}], [B, H, W, {dim}] or "
                         f"[B, T, H, W, {dim}], got {got}")
    check_pool_mask("mask", mask, tuple(x.shape[:-1]))
    if causal:
        raise ValueError(f"causal: {name} averages both sides of each token; it has no causal form")
    if context is not None:
        raise ValueError(f"context: {name} mixes tokens of x only; it takes no context")


def _box_sum(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Sum over a centred window of ``size`` along ``axis`` (zero padding): same shape as ``t``."""
    r = size // 2
    pad = [0, 0] * (t.dim() - 1 - axis) + [r, r]
    return F.pad(t, pad).unfold(axis, size, 1).sum(-1)


def local_average(x: torch.Tensor, keep: torch.Tensor | None, pool: int) -> torch.Tensor:
    """Mean of each token's ``pool``-wide box (``pool`` per spatial axis) over the kept tokens in it.

    ``x`` channels-last ``[B, *spatial, C]`` with 1, 2 or 3 spatial axes; ``keep`` bool ``[B, *spatial]``.
    Boxes are cut at the border (``count_include_pad=False``); half precision is summed in float32.
    """
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf = x.float() if low else x
    w = torch.ones_like(xf[..., :1]) if keep is None else keep.unsqueeze(-1).to(xf.dtype)
    num, den = xf * w, w
    for axis in range(1, x.dim() - 1):
        num, den = _box_sum(num, axis, pool), _box_sum(den, axis, pool)
    out = num / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(x.dtype)


def check_bag_input(x: Any, mask: Any, cu_seqlens: Any, dim: int) -> None:
    """Validate ``x`` ``[B, N, dim]``, ``mask`` bool ``[B, N]`` and ``cu_seqlens`` (with ``B = 1``, no mask)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor [B, N, {dim}], got {got}")
    check_pool_mask("mask", mask, tuple(x.shape[:2]))
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens: packed bags take x [1, T, C], got x with B = {x.shape[0]}")
        if mask is not None:
            raise ValueError("mask: packed bags (cu_seqlens) have no padding; pass mask=None")
        check_cu_seqlens(cu_seqlens, x.shape[1])


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` of the entries where ``keep`` (broadcastable bool) is True; the others get exactly
    0, and a slice without any kept entry gets all zeros (never NaN, finite gradients)."""
    if keep is None:
        return torch.softmax(scores, dim)
    s = scores.masked_fill(~keep, float("-inf"))
    top = s.detach().amax(dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(s - top)
    den = e.sum(dim, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


@dataclass
class Bags:
    """Bags of instances, padded (``x`` ``[B, N, C]`` with ``mask``) or packed (``x`` ``[T, C]`` with ``ids``).

    Per-instance tensors have the instance axis at 1 when padded (``[B, N, ...]``) and at 0
    when packed (``[T, ...]``); per-bag results are ``[B, ...]`` in both layouts.
    """

    x: torch.Tensor
    mask: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    n_bags: int = 0

    @classmethod
    def build(cls, x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> Bags:
        if cu_seqlens is not None:
            cu = cu_seqlens.long().to(x.device)
            return cls(x[0], None, segment_ids(cu, x.shape[1]), cu, cu.numel() - 1)
        if mask is not None:
            if bool(mask.all()):
                mask = None
            else:
                x = x.masked_fill(~mask.unsqueeze(-1), 0)
        return cls(x, mask, None, None, x.shape[0])

    @property
    def packed(self) -> bool:
        return self.ids is not None

    @property
    def axis(self) -> int:
        """The instance axis of per-instance tensors."""
        return 0 if self.packed else 1

    def _keep(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None:
            return None
        return self.mask.view(*self.mask.shape, *([1] * (like.dim() - 2)))

    def counts(self) -> torch.Tensor:
        """``[B]`` number of kept instances per bag."""
        if self.packed:
            return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(self.x.dtype)
        if self.mask is None:
            return torch.full((self.n_bags,), self.x.shape[1], dtype=self.x.dtype, device=self.x.device)
        return self.mask.sum(1).to(self.x.dtype)

    def nonempty(self) -> torch.Tensor:
        """``[B]`` bool: the bag has at least one kept instance."""
        return self.counts() > 0

    def broadcast(self, per_bag: torch.Tensor) -> torch.Tensor:
        """Align a per-bag tensor ``[B, ...]`` with the instances (``[B, 1, ...]`` or ``[T, ...]``)."""
        return per_bag.index_select(0, self.ids) if self.packed else per_bag.unsqueeze(1)

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """Sum over the kept instances: ``[B, ...]``."""
        if self.packed:
            return segment_sum(v, self.ids, self.n_bags)
        keep = self._keep(v)
        return (v if keep is None else v.masked_fill(~keep, 0)).sum(1)

    def mean(self, v: torch.Tensor) -> torch.Tensor:
        """Mean over the kept instances (zeros for an empty bag): ``[B, ...]``."""
        n = self.counts().clamp(min=1)
        return self.sum(v) / n.view(-1, *([1] * (v.dim() - 1 - self.axis))).to(v.dtype)

    def max(self, v: torch.Tensor) -> torch.Tensor:
        """Maximum over the kept instances (zeros for an empty bag): ``[B, ...]``."""
        if self.packed:
            top = segment_max(v, self.ids, self.n_bags)
        else:
            keep = self._keep(v)
            top = (v if keep is None else v.masked_fill(~keep, float("-inf"))).amax(1)
        return torch.where(torch.isfinite(top), top, torch.zeros_like(top))

    def min(self, v: torch.Tensor) -> torch.Tensor:
        """Minimum over the kept instances (zeros for an empty bag): ``[B, ...]``."""
        return -self.max(-v)

    def softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax of per-instance ``scores`` over each bag's kept instances (per trailing index).

        Padding gets exactly zero weight; an empty bag gets none. Half precision is computed in float32.
        """
        s = scores.float() if scores.dtype in _LOW else scores
        if self.packed:
            return segment_softmax(s, self.ids, self.n_bags).to(scores.dtype)
        return masked_softmax(s, self._keep(s), 1).to(scores.dtype)

    def logsumexp(self, scores: torch.Tensor) -> torch.Tensor:
        """``log sum_i exp(scores_i)`` over each bag's kept instances, per trailing index: ``[B, ...]``;
        ``-inf`` for an empty bag or where every score is ``-inf`` (with zero gradients, never NaN)."""
        s = scores.float() if scores.dtype in _LOW else scores
        if not self.packed and self.mask is not None:
            s = s.masked_fill(~self._keep(s), float("-inf"))
        top = self.max(s)                                       # zero where nothing is finite
        total = self.sum(torch.exp(s - self.broadcast(top)))
        safe = torch.where(total > 0, total, torch.ones_like(total))
        out = torch.where(total > 0, top + torch.log(safe), torch.full_like(total, float("-inf")))
        return out.to(scores.dtype)

    def weighted_sum(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i v_i`` per bag: ``w`` ``[., H]`` with ``v`` ``[., D]`` (shared by the H weightings) or
        ``[., H, D]``; returns ``[B, H, D]``.

        Packed with shared values and ``B * H <= D``, the sum is one matmul with the ``[H, B, T]`` matrix
        holding each row's weight in its bag's row (smaller than the ``[T, H, D]`` products); otherwise
        the products are summed per bag with ``index_add``. Memory stays linear in ``T`` either way.
        """
        shared = v.dim() == w.dim()
        if self.packed:
            if shared and self.n_bags * w.shape[-1] <= v.shape[-1]:
                onehot = self.ids.unsqueeze(0) == torch.arange(self.n_bags, device=w.device).unsqueeze(1)
                assign = onehot.to(w.dtype).unsqueeze(0) * w.t().unsqueeze(1)          # [H, B, T]
                return (assign @ v).transpose(0, 1)
            prod = w.unsqueeze(-1) * (v.unsqueeze(-2) if shared else v)
            return segment_sum(prod, self.ids, self.n_bags)
        if shared:
            return torch.einsum("bnh,bnd->bhd", w, v)
        return torch.einsum("bnh,bnhd->bhd", w, v)

    def first(self, v: torch.Tensor) -> torch.Tensor:
        """The first kept instance of each bag (zeros for an empty bag): ``[B, ...]``."""
        if self.packed:
            idx = self.cu_seqlens[:-1].clamp(max=max(v.shape[0] - 1, 0))
            return v.index_select(0, idx) * self._nonempty_like(v)
        if self.mask is None:
            return v[:, 0]
        idx = self.mask.long().argmax(1)
        return v[torch.arange(v.shape[0], device=v.device), idx] * self._nonempty_like(v)

    def last(self, v: torch.Tensor) -> torch.Tensor:
        """The last kept instance of each bag, whatever side the padding is on (zeros for an empty bag)."""
        if self.packed:
            idx = (self.cu_seqlens[1:] - 1).clamp(min=0)
            return v.index_select(0, idx) * self._nonempty_like(v)
        if self.mask is None:
            return v[:, -1]
        n = self.mask.shape[1]
        idx = n - 1 - self.mask.flip(1).long().argmax(1)
        return v[torch.arange(v.shape[0], device=v.device), idx] * self._nonempty_like(v)

    def _nonempty_like(self, v: torch.Tensor) -> torch.Tensor:
        return self.nonempty().to(v.dtype).view(-1, *([1] * (v.dim() - 1 - self.axis)))

    def to_instances(self, per_instance: torch.Tensor) -> torch.Tensor:
        """Per-instance values in the layout of ``x``: ``[B, N, ...]`` (``[1, T, ...]`` when packed)."""
        return per_instance.unsqueeze(0) if self.packed else per_instance


def rank_in_bag(bags: Bags, scores: torch.Tensor) -> torch.Tensor:
    """Rank (0 = highest) of each instance's score within its bag, per trailing index; padding ranks last."""
    if not bags.packed:
        s = scores if bags.mask is None else scores.masked_fill(~bags.mask.unsqueeze(-1), float("-inf"))
        order = s.argsort(dim=1, descending=True, stable=True)
        return order.argsort(dim=1, stable=True)
    t = scores.shape[0]
    start = bags.cu_seqlens[:-1].index_select(0, bags.ids)
    ranks = []
    for col in scores.unbind(-1):
        order = (-col).argsort(stable=True)
        order = order[bags.ids[order].argsort(stable=True)]
        rank = torch.empty(t, dtype=torch.long, device=col.device)
        rank[order] = torch.arange(t, device=col.device) - start[order]
        ranks.append(rank)
    return torch.stack(ranks, -1)


class Pooler(nn.Module):
    """Base class of the poolers: checks the input, builds :class:`Bags`, calls :meth:`pool`.

    Subclasses set ``self.dim`` and implement ``pool(bags, **extra) -> (out [B, ...], weights)``
    (``weights`` per instance or None). Outputs of empty bags are set to zero.
    """

    dim: int

    def pool(self, bags: Bags, **extra: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_weights: bool = False, **extra: Any) -> Any:
        """Pool ``x`` ``[B, N, C]`` (``mask`` bool ``[B, N]``) or packed ``[1, T, C]`` (``cu_seqlens``)."""
        check_bag_input(x, mask, cu_seqlens, self.dim)
        bags = Bags.build(x, mask, cu_seqlens)
        out, weights = self.pool(bags, **extra)
        keep = bags.nonempty().view(-1, *([1] * (out.dim() - 1)))
        out = torch.where(keep, out, torch.zeros_like(out))
        if not return_weights:
            return out
        if weights is None:
            raise ValueError(f"return_weights: {type(self).__name__} has no attention weights to return")
        return out, bags.to_instances(weights)


def _bag_scores(bags: Bags, q: torch.Tensor, k: torch.Tensor, *, per_bag: bool, topk: int | None) -> torch.Tensor:
    """Scores ``[., M, H]`` of each instance against each query-head, beyond each bag's ``topk`` best -inf."""
    if per_bag:
        s = torch.einsum("...hd,...mhd->...mh", k, bags.broadcast(q))
    else:
        s = torch.einsum("...hd,mhd->...mh", k, q)
    if topk is not None:
        flat = s.flatten(-2)
        s = flat.masked_fill(rank_in_bag(bags, flat) >= topk, float("-inf")).view_as(s)
    return s


def bag_attention(bags: Bags, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, per_bag: bool,
                  topk: int | None = None, extra: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head cross-attention of M queries over each bag's instances.

    ``q`` ``[B, M, H, d]`` (``per_bag``) or ``[M, H, d]`` (the same queries for every bag), already
    scaled; ``k``, ``v`` per instance ``[., H, d]``. ``topk`` keeps each query-head's k highest
    scores. ``extra = (k_e, v_e)``, ``[B, J, H, d]`` or ``[J, H, d]``, are J more keys and values every
    bag's queries see besides its instances, in the same softmax (the queries themselves, for class
    attention over ``[CLS; tokens]``); ``topk`` selects among the instances only. Returns
    ``(z [B, M, H * d], weights [., M, H])``, the weights of the instances (with ``extra`` they sum to
    the share of the instances, below 1).
    """
    if extra is not None:
        return _attention_with_extra(bags, q, k, v, per_bag=per_bag, topk=topk, extra=extra)
    m, h, d = q.shape[-3:]
    s = _bag_scores(bags, q, k, per_bag=per_bag, topk=topk)
    a = bags.softmax(s)
    if bags.packed:
        z = segment_sum(a.unsqueeze(-1) * v.unsqueeze(-3), bags.ids, bags.n_bags)
    else:
        z = torch.einsum("bnmh,bnhd->bmhd", a, v)
    return z.flatten(-2), a


def _attention_with_extra(bags: Bags, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, per_bag: bool,
                          topk: int | None, extra: tuple[torch.Tensor, torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bag_attention` over the instances and ``extra``: the two softmaxes merged by their log-sum-exps."""
    k_e, v_e = extra
    h, d = q.shape[-2:]
    s = _bag_scores(bags, q, k, per_bag=per_bag, topk=topk)
    a = bags.softmax(s)
    lse = bags.logsumexp(s)                                                   # [B, M, H]
    s_e = torch.einsum("...mhd,...jhd->...mhj", q, k_e)                       # [B or -, M, H, J]
    lse_all = torch.logaddexp(lse, torch.logsumexp(s_e, -1))
    share = torch.exp(lse - lse_all)                                          # the instances' share [B, M, H]
    p_e = torch.exp(s_e - lse_all.unsqueeze(-1))
    if bags.packed:
        z = segment_sum(a.unsqueeze(-1) * v.unsqueeze(-3), bags.ids, bags.n_bags)
    else:
        z = torch.einsum("bnmh,bnhd->bmhd", a, v)
    z = share.unsqueeze(-1) * z + torch.einsum("...mhj,...jhd->...mhd", p_e, v_e)
    return z.flatten(-2), a * bags.broadcast(share)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded multi-head attention: ``q`` ``[B, N, H, d]`` (scaled) over ``k``, ``v`` ``[B, M, H, d]`` with
    ``key_mask`` bool ``[B, M]``. Returns ``(out [B, N, H * d], weights [B, H, N, M])``; a query that sees
    no key gets zeros."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k)
    low = s.dtype in _LOW
    a = masked_softmax(s.float() if low else s, None if key_mask is None else key_mask[:, None, None, :], -1)
    a = a.to(s.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", a, v).flatten(-2), a


def rff(dim: int, hidden: int | None = None) -> nn.Module:
    """A row-wise feed-forward layer ``W_2 relu(W_1 x + b_1) + b_2``."""
    hidden = hidden or dim
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class MAB(nn.Module):
    """Set Transformer's multihead attention block: ``MAB(X, Y) = LN(H + rFF(H))``, ``H = LN(X + MHA(X, Y, Y))``.

    :meth:`over_bags` attends M query rows per bag over the bag's instances (padded or packed);
    :meth:`forward` attends every row of ``x`` ``[B, N, C]`` over ``y`` ``[B, M, C]`` (``y_mask``).
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"n_heads: must divide dim={dim}, got n_heads={n_heads}")
        self.dim, self.n_heads = dim, n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln0, self.ln1 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = rff(dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.n_heads, self.dim // self.n_heads))

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = self.ln0(x + self.o(attn))
        return self.ln1(h + self.ff(h))

    def over_bags(self, x: torch.Tensor, bags: Bags, y: torch.Tensor, *,
                  per_bag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[M, C]`` (or ``[B, M, C]`` with ``per_bag``) over per-instance ``y``; ``([B, M, C], weights)``."""
        scale = (self.dim // self.n_heads) ** -0.5
        q = self._split(self.q(x)) * scale
        z, a = bag_attention(bags, q, self._split(self.k(y)), self._split(self.v(y)), per_bag=per_bag)
        return self._finish(x.expand(bags.n_bags, *x.shape[-2:]), z), a

    def attend(self, x: torch.Tensor, y: torch.Tensor,
               y_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(MAB(x, y) [B, N, C], weights [B, H, N, M])``."""
        scale = (self.dim // self.n_heads) ** -0.5
        q = self._split(self.q(x)) * scale
        z, a = dense_attention(q, self._split(self.k(y)), self._split(self.v(y)), y_mask)
        return self._finish(x, z), a

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, y, y_mask)[0]
