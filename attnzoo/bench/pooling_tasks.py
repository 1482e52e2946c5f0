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

Both are registry entries of type ``task`` (family ``benchmark``; bench tasks the catalogue does not
list) and in :data:`~attnzoo.bench.tasks.TASKS`: ``attnzoo train --task mil_bags --pooler abmil``,
``attnzoo compare --task set_maximum --mixers mean_pool set_transformer_pma``. Their kind is
``"bag"``: the model is a :class:`~attnzoo.bench.models.BagClassifier` around a registered pooler,
and :meth:`MILBags.bag_metrics` adds the bag AUC and the localisation AUC to the accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attnzoo.bench.tasks import TASKS, Task, TaskData, _check_n_seed
from attnzoo.registry import Reduction, register

__all__ = ["BagData", "BagTask", "MILBags", "SetMaximum", "POOLING_TASKS", "auc"]


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


class BagTask(Task):
    """A task of bags or sets (kind ``"bag"``): a pooler in a bag classifier, no causality, no mixer
    capabilities needed; :meth:`extra_metrics` adds the bag AUC (binary tasks) and the localisation AUC."""

    kind: ClassVar[str] = "bag"
    causal: ClassVar[bool] = False

    def needs(self) -> frozenset[str]:
        return frozenset()

    @torch.no_grad()
    def extra_metrics(self, model: torch.nn.Module, data: TaskData, *, device: torch.device | str = "cpu",
                      batch_size: int = 256) -> dict[str, float | None]:
        """``bag_auc``: the AUC of the positive class's probability (binary tasks, else None);
        ``localisation_auc``: the AUC of the pooler's weights (``model(..., return_weights=True)``) against
        the true positive instances, over the real instances of the positive bags (every bag when the task
        is not binary); None for a pooler without weights or data without instance labels."""
        was_training = model.training
        model.eval()
        logits, weights = [], []
        has_weights = True
        for start in range(0, len(data), batch_size):
            b = data.subset(slice(start, start + batch_size)).to(device)
            if has_weights:
                try:
                    out, w = model(b.inputs, b.mask, return_weights=True)
                    weights.append(w.float().cpu())
                except ValueError:  # a pooler without weights
                    has_weights = False
                    out = model(b.inputs, b.mask)
            else:
                out = model(b.inputs, b.mask)
            logits.append(out.float().cpu())
        model.train(was_training)
        scores = torch.cat(logits)
        binary = self.n_outputs == 2
        out_metrics: dict[str, float | None] = {"bag_auc": None, "localisation_auc": None}
        if binary:
            value = auc(scores.softmax(-1)[:, 1], data.labels == 1)
            out_metrics["bag_auc"] = None if math.isnan(value) else value
        instance_labels = getattr(data, "instance_labels", None)
        if has_weights and instance_labels is not None:
            keep = data.mask if data.mask is not None else torch.ones_like(instance_labels)
            bags = data.labels == 1 if binary else torch.ones_like(data.labels, dtype=torch.bool)
            sel = keep & bags.unsqueeze(1)
            value = auc(torch.cat(weights)[sel], instance_labels[sel])
            out_metrics["localisation_auc"] = None if math.isnan(value) else value
        return {k: out_metrics[k] for k in self.secondary_metrics}


@dataclass
class MILBags(BagTask):
    """MIL bags with known witnesses (see the module docstring). Inputs ``[E, max_bag, n_features]`` float."""

    n_features: int = 16
    min_bag: int = 8
    max_bag: int = 48
    witness_rate: float = 0.05
    signal: float = 3.0

    name: ClassVar[str] = "mil_bags"
    secondary_metrics: ClassVar[tuple[str, ...]] = ("bag_auc", "localisation_auc")
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
        if isinstance(self.signal, bool) or not isinstance(self.signal, (int, float)) or not math.isfinite(self.signal):
            raise ValueError(f"signal: expected a finite number, got {self.signal!r}")

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
        _check_n_seed(n, seed)
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
class SetMaximum(BagTask):
    """The maximum of a set as ``n_values``-way classification (Set Transformer); inputs ``[E, max_set, n_values]``."""

    n_values: int = 16
    min_set: int = 16
    max_set: int = 64
    noise: float = 0.3

    name: ClassVar[str] = "set_maximum"
    secondary_metrics: ClassVar[tuple[str, ...]] = ("localisation_auc",)
    label_keys: ClassVar[tuple[str, ...]] = ("n_values", "max_set")

    def __post_init__(self) -> None:
        for name in ("n_values", "min_set", "max_set"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.max_set < self.min_set:
            raise ValueError(f"max_set: expected >= min_set = {self.min_set}, got {self.max_set}")
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or not 0 <= self.noise < math.inf:
            raise ValueError(f"noise: expected a finite number >= 0, got {self.noise!r}")

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
        _check_n_seed(n, seed)
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(self.min_set, self.max_set + 1, (n,), generator=g)
        values = torch.randint(0, self.n_values, (n, self.max_set), generator=g)
        mask = torch.arange(self.max_set)[None] < sizes[:, None]
        labels = values.masked_fill(~mask, -1).amax(1)
        x = torch.nn.functional.one_hot(values, self.n_values).float()
        x = (x + self.noise * torch.randn(x.shape, generator=g)) * mask.unsqueeze(-1)
        return BagData(x, labels, mask, (values == labels[:, None]) & mask)


POOLING_TASKS: dict[str, type[Task]] = {t.name: t for t in (MILBags, SetMaximum)}
TASKS.update(POOLING_TASKS)


def _mil_witnesses() -> tuple[torch.Tensor, torch.Tensor]:
    task = MILBags(n_features=8, min_bag=3, max_bag=40, witness_rate=0.1)
    d = task.generate(256, seed=6)
    sizes = d.mask.sum(1)
    expected = torch.where(d.labels == 1, (sizes.double() * task.witness_rate).ceil().clamp(min=1), 0.0)
    got = torch.stack([(d.instance_labels & d.mask).any(1).double(), (d.instance_labels & d.mask).sum(1).double()])
    return got, torch.stack([d.labels.double(), expected])


def _mil_seeded() -> tuple[torch.Tensor, torch.Tensor]:
    task = MILBags()
    a, b = task.generate(16, seed=5), task.generate(16, seed=5)
    return (torch.cat([a.inputs.flatten().double(), a.labels.double(), a.instance_labels.flatten().double()]),
            torch.cat([b.inputs.flatten().double(), b.labels.double(), b.instance_labels.flatten().double()]))


@register(
    "mil_bags", family="benchmark", type="task", priority=2, papers=("ACMIL", "MIDAM"), supports=(),
    complexity="n/a", backends=(),
    reference="the generator's own witnesses: a bag is positive exactly when it holds one, with "
              "ceil(witness_rate * size) of them (at least one)",
    reference_kwargs={}, reductions=(
        Reduction("witnesses", "a bag is positive exactly when it holds a witness, and a positive bag of n "
                  "instances holds max(1, ceil(witness_rate * n)) of them", _mil_witnesses),
        Reduction("seeded", "the same seed gives the same bags", _mil_seeded),
    ),
    summary="MIL bags with known witnesses (bag means carry no signal): bag accuracy and AUC, and the "
            "localisation AUC of the pooler's weights",
)
def mil_bags(n_features: int = 16, min_bag: int = 8, max_bag: int = 48, witness_rate: float = 0.05,
             signal: float = 3.0) -> MILBags:
    """The MIL bag task (see :class:`attnzoo.bench.pooling_tasks.MILBags`)."""
    return MILBags(n_features=n_features, min_bag=min_bag, max_bag=max_bag, witness_rate=witness_rate,
                   signal=signal)


def _set_oracle() -> tuple[torch.Tensor, torch.Tensor]:
    d = SetMaximum(n_values=12, min_set=2, max_set=30, noise=0.0).generate(256, seed=4)
    read = d.inputs.argmax(-1).masked_fill(~d.mask, -1).amax(1)
    return read.double(), d.labels.double()


def _set_seeded() -> tuple[torch.Tensor, torch.Tensor]:
    task = SetMaximum()
    a, b = task.generate(16, seed=5), task.generate(16, seed=5)
    return (torch.cat([a.inputs.flatten().double(), a.labels.double()]),
            torch.cat([b.inputs.flatten().double(), b.labels.double()]))


@register(
    "set_maximum", family="benchmark", type="task", priority=2, papers=("Set Transformer",), supports=(),
    complexity="n/a", backends=(),
    reference="without noise, reading each element's value (its one-hot's argmax) and taking the largest "
              "gives the label",
    reference_kwargs={}, reductions=(
        Reduction("oracle", "without noise the largest decoded value over the real elements is the label",
                  _set_oracle),
        Reduction("seeded", "the same seed gives the same sets", _set_seeded),
    ),
    summary="the Set Transformer's maximum of a set as classification (a mean over the set loses it)",
)
def set_maximum(n_values: int = 16, min_set: int = 16, max_set: int = 64, noise: float = 0.3) -> SetMaximum:
    """The set maximum task (see :class:`attnzoo.bench.pooling_tasks.SetMaximum`)."""
    return SetMaximum(n_values=n_values, min_set=min_set, max_set=max_set, noise=noise)
