"""``mean_pool``: non-attentive pooling baselines (masked mean, max, CLS, last token, subset mean).

``z = sum_i m_i x_i / sum_i m_i`` over the kept instances; ``max`` takes the masked maximum;
``cls`` the first kept token; ``last`` the last kept token whatever side the padding is on;
``subset`` the mean over the kept tokens that a per-call ``subset`` mask marks (entity mentions,
a dependency path). ``[B, N, C] -> [B, C]``; packed bags (``cu_seqlens``) give the same results.
"""

from __future__ import annotations

import torch

from attnzoo.layers.base import check_choice, check_int
from attnzoo.layers.pooling._common import FAMILY, Bags, Pooler, check_pool_mask
from attnzoo.registry import Reduction, register

__all__ = ["MeanPool", "MODES"]

MODES = ("mean", "max", "cls", "last", "subset")


class MeanPool(Pooler):
    """Masked mean / max / cls / last / subset pooling ``[B, N, C] -> [B, C]`` (no parameters).

    ``subset`` (mode ``"subset"`` only) is bool ``[B, N]`` (``[1, T]`` when packed) marking the
    tokens to average; it is intersected with ``mask``.
    """

    def __init__(self, dim: int, *, mode: str = "mean") -> None:
        super().__init__()
        self.dim = check_int("dim", dim)
        self.mode = check_choice("mode", mode, MODES)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                return_weights: bool = False, subset: torch.Tensor | None = None) -> torch.Tensor:
        """Pool ``x`` ``[B, N, C]`` to ``[B, C]`` (see the class docstring for ``subset``)."""
        if self.mode == "subset":
            if subset is None:
                raise ValueError("subset: mode='subset' needs a bool subset mask [B, N], got None")
            check_pool_mask("subset", subset, tuple(x.shape[:2]) if isinstance(x, torch.Tensor) else ())
            if cu_seqlens is not None:
                raise ValueError("subset: mode='subset' takes padded bags (mask); pad the bags instead of cu_seqlens")
            mask = subset if mask is None else mask & subset
        elif subset is not None:
            raise ValueError(f"subset: only used by mode='subset', got mode={self.mode!r}")
        if return_weights:
            raise ValueError(f"return_weights: mean_pool (mode={self.mode!r}) has no attention weights to return")
        return super().forward(x, mask=mask, cu_seqlens=cu_seqlens)

    def pool(self, bags: Bags) -> tuple[torch.Tensor, None]:
        x = bags.x
        if self.mode in ("mean", "subset"):
            return bags.mean(x), None
        if self.mode == "max":
            return bags.max(x), None
        if self.mode == "cls":
            return bags.first(x), None
        return bags.last(x), None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mode={self.mode!r}"


def _x(b: int = 3, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _last_left_vs_right() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    lengths = (9, 5, 2)
    right = torch.zeros_like(x)
    left = torch.zeros_like(x)
    keep_r = torch.zeros(3, 9, dtype=torch.bool)
    keep_l = torch.zeros(3, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        right[b, :n], keep_r[b, :n] = x[b, :n], True
        left[b, 9 - n:], keep_l[b, 9 - n:] = x[b, :n], True
    m = MeanPool(8, mode="last")
    return m(left, mask=keep_l), m(right, mask=keep_r)


def _mean_max_permutation() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    got = torch.stack([MeanPool(8, mode=m)(x[:, perm]) for m in ("mean", "max")])
    want = torch.stack([MeanPool(8, mode=m)(x) for m in ("mean", "max")])
    return got, want


def _mean_is_sum_over_count() -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    keep = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) > 0.4
    keep[:, 0] = True
    want = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    return MeanPool(8)(x, mask=keep), want


register(
    "mean_pool", family=FAMILY, type="pooler", priority=1, input_kind="set",
    papers=("baseline", "LLM embedding pooling study", "Biomedical RE pooling study"),
    supports={"padding", "varlen"}, complexity="O(N)", backends=(),
    reference="the closed forms (masked sum / count, masked max, first / last kept token) in float64",
    reference_kwargs={}, test_kwargs={"dim": 32},
    summary="Masked mean, max, CLS, last-token (left or right padding) and subset-mean pooling.",
    reductions=(
        Reduction("last_left_right_padding", "last returns the same hidden state under left and right padding",
                  _last_left_vs_right),
        Reduction("mean_max_permutation", "mean and max are permutation-invariant", _mean_max_permutation),
        Reduction("masked_mean", "z = sum_i m_i x_i / sum_i m_i", _mean_is_sum_over_count),
    ),
)(MeanPool)
