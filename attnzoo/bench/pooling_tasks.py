"""Bag and set tasks for the poolers, generated offline and seeded.

- :class:`MILBags`: multiple-instance learning with known positive instances. Negative instances
  are ``N(0, I)`` in ``n_features`` dimensions; a positive instance is a negative one plus
  ``signal`` along a fixed unit direction ``u``, and a bag is positive when it holds at least one
  positive instance (``witness_rate`` of its instances, at least one). Bag sizes vary in
  ``[min_bag, max_bag]`` (padded, ``mask`` marks real instances). Negative bags receive the same
  mean shift spread over all their instances (``signal * k / n`` along ``u`` for the k witnesses
  a positive bag of that size would have), so a linear probe on the bag mean cannot separate the
  classes; the witnesses can be found only instance by instance. ``instance_labels`` marks the
  positives, for localisation (the AUC of the pooler's weights against them).
- :class:`SetMaximum`: the Set Transformer's "maximum of a set" as classification: each element
  is a one-hot of a value in ``0 .. n_values - 1`` plus noise; the label is the largest value in
  the set. A mean over the set loses it; attention pooling (PMA) need not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnzoo.bench.tasks import Task, TaskData

__all__ = ["BagData", "MILBags", "SetMaximum", "POOLING_TASKS", "auc"]


@dataclass
class BagData(TaskData):
    """:class:`TaskData` with per-instance labels ``[E, L]`` (bool; None when the task has none)."""

    instance_labels: torch.Tensor | None = None

    def subset(self, index: torch.Tensor | slice) -> BagData:
        return BagData(self.inputs[index], self.labels[index], None if self.mask is None else self.mask[index],
                       None if self.instance_labels is None else self.instance_labels[index])

    def to(self, device: torch.device | str) -> BagData:
        return BagData(self.inputs.to(device), self.labels.to(device),
                       None if self.mask is None else self.mask.to(device),
                       None if self.instance_labels is None else self.instance_labels.to(device))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half); NaN without both classes."""
    s, y = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = s.argsort(stable=True)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    _, inv, counts = torch.unique(s, return_inverse=True, return_counts=True)
    avg = torch.zeros(counts.numel(), dtype=torch.float64).index_add(0, inv, ranks) / counts.double()
    return float((avg[inv][y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class MILBags(Task):
    """MIL bags with known witnesses (see the module docstring). Inputs ``[E, max_bag, n_features]`` float."""

    n_features: int = 16
    min_bag: int = 8
    max_bag: int = 48
    witness_rate: float = 0.05
    signal: float = 3.0

    name: ClassVar[str] = "mil_bags"
    kind: ClassVar[str] = "bag"
    causal: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ("max_bag", "witness_rate")

    def __post_init__(self) -> None:
        for name in ("n_features", "min_bag", "max_bag"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.max_bag < self.min_bag:
            raise ValueError(f"max_bag: expected >= min_bag = {self.min_bag}, got {self.max_bag}")
        if not 0 < self.witness_rate <= 1:
            raise ValueError(f"witness_rate: expected 0 < witness_rate <= 1, got {self.witness_rate!r}")

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return self.max_bag

    @property
    def n_outputs(self) -> int:
        return 2

    def direction(self) -> torch.Tensor:
        """The unit witness direction ``u`` (fixed by the task, not the seed)."""
        u = torch.randn(self.n_features, generator=torch.Generator().manual_seed(12345))
        return u / u.norm()

    def generate(self, n: int, seed: int) -> BagData:
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(self.min_bag, self.max_bag + 1, (n,), generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, self.max_bag, self.n_features, generator=g)
        mask = torch.arange(self.max_bag)[None] < sizes[:, None]
        witnesses = (sizes.double() * self.witness_rate).ceil().long().clamp(min=1)
        u = self.direction()
        inst = torch.zeros(n, self.max_bag, dtype=torch.bool)
        for e in range(n):
            k, size = int(witnesses[e]), int(sizes[e])
            if labels[e] == 1:
                pick = torch.randperm(size, generator=g)[:k]
                inst[e, pick] = True
                x[e, pick] += self.signal * u
            else:
                x[e, :size] += self.signal * k / size * u
        x = x * mask.unsqueeze(-1)
        return BagData(x, labels, mask, inst)


@dataclass
class SetMaximum(Task):
    """The maximum of a set as ``n_values``-way classification (Set Transformer); inputs ``[E, max_set, n_values]``."""

    n_values: int = 16
    min_set: int = 16
    max_set: int = 64
    noise: float = 0.3

    name: ClassVar[str] = "set_maximum"
    kind: ClassVar[str] = "bag"
    causal: ClassVar[bool] = False
    label_keys: ClassVar[tuple[str, ...]] = ("n_values", "max_set")

    def __post_init__(self) -> None:
        for name in ("n_values", "min_set", "max_set"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.max_set < self.min_set:
            raise ValueError(f"max_set: expected >= min_set = {self.min_set}, got {self.max_set}")

    @property
    def seq_len(self) -> int:  # type: ignore[override]
        return self.max_set

    @property
    def n_features(self) -> int:
        return self.n_values

    @property
    def n_outputs(self) -> int:
        return self.n_values

    def generate(self, n: int, seed: int) -> BagData:
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(self.min_set, self.max_set + 1, (n,), generator=g)
        values = torch.randint(0, self.n_values, (n, self.max_set), generator=g)
        mask = torch.arange(self.max_set)[None] < sizes[:, None]
        labels = values.masked_fill(~mask, -1).amax(1)
        x = torch.nn.functional.one_hot(values, self.n_values).float()
        x = (x + self.noise * torch.randn(x.shape, generator=g)) * mask.unsqueeze(-1)
        return BagData(x, labels, mask, (values == labels[:, None]) & mask)


POOLING_TASKS: dict[str, type[Task]] = {t.name: t for t in (MILBags, SetMaximum)}
