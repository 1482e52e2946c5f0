"""Training the poolers on the bag and set tasks: bag accuracy / AUC and instance localisation.

:func:`run_pooling` trains a :class:`~attnzoo.bench.models.BagClassifier` per (task, pooler) and
returns one row each: test bag accuracy, bag AUC (binary tasks), localisation AUC (the AUC of the
pooler's weights against the true positive instances, over the real instances of the test bags;
None for poolers without weights) and the training time. :func:`run_pooling_compare` is
``attnzoo compare --preset pooling``: the P1/P2 poolers on :class:`MILBags` and :class:`SetMaximum`,
stored, reported and ranked like the other presets.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnzoo.bench.models import BagClassifier
from attnzoo.bench.pooling_tasks import BagData, MILBags, SetMaximum, auc
from attnzoo.bench.tasks import Task

__all__ = ["POOLING_PRESET_POOLERS", "evaluate_bags", "run_pooling", "run_pooling_compare", "train_bags"]

POOLING_PRESET_POOLERS = ("mean_pool", "attention_pool", "query_pool", "abmil", "attentive_stats_pool",
                          "set_transformer_pma")
POOLER_KWARGS: dict[str, dict[str, Any]] = {"query_pool": {"n_heads": 4}, "set_transformer_pma": {"n_heads": 4},
                                            "abmil": {"attn_dim": 32}, "mean_pool": {}, "attention_pool": {},
                                            "attentive_stats_pool": {"attn_dim": 32}}


def train_bags(task: Task, pooler: str, data: tuple[BagData, BagData], *, dim: int = 32, steps: int = 300,
               batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
               pooler_kwargs: dict[str, Any] | None = None) -> tuple[BagClassifier, float]:
    """Train a bag classifier with AdamW for ``steps`` steps; returns ``(model, train seconds)``."""
    torch.manual_seed(seed)
    train_set, _ = data
    model = BagClassifier(pooler, n_features=task.n_features, n_classes=task.n_outputs, dim=dim,
                          pooler_kwargs=POOLER_KWARGS.get(pooler, {}) if pooler_kwargs is None else pooler_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train_set), (batch_size,), generator=g)
        b = train_set.subset(idx)
        loss = F.cross_entropy(model(b.inputs, b.mask), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate_bags(model: BagClassifier, task: Task, test: BagData) -> dict[str, Any]:
    """Bag accuracy, bag AUC (binary tasks) and localisation AUC (poolers with weights) on ``test``."""
    model.eval()
    try:
        logits, w = model(test.inputs, test.mask, return_weights=True)
    except ValueError:  # a pooler without weights
        logits, w = model(test.inputs, test.mask), None
    acc = float((logits.argmax(-1) == test.labels).double().mean())
    bag_auc = auc(logits.softmax(-1)[:, 1], test.labels == 1) if task.n_outputs == 2 else None
    loc = None
    if w is not None and test.instance_labels is not None:
        keep = test.mask if test.mask is not None else torch.ones_like(test.instance_labels)
        pos_bags = test.labels == 1 if task.n_outputs == 2 else torch.ones_like(test.labels, dtype=torch.bool)
        sel = keep & pos_bags.unsqueeze(1)
        loc = auc(w[sel], test.instance_labels[sel])
    return {"accuracy": acc, "bag_auc": bag_auc, "localisation_auc": None if loc is None or math.isnan(loc) else loc}


def run_pooling(poolers: tuple[str, ...] = POOLING_PRESET_POOLERS, *, tasks: tuple[Task, ...] | None = None,
                n_train: int = 4000, n_test: int = 500, steps: int = 300, dim: int = 32, seed: int = 0,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train and evaluate every pooler on every task; one row per (task, pooler)."""
    tasks = tasks if tasks is not None else (MILBags(), SetMaximum())
    rows = []
    for task in tasks:
        data = task.splits(n_train, n_test, seed)
        for pooler in poolers:
            model, seconds = train_bags(task, pooler, data, dim=dim, steps=steps, seed=seed)
            m = evaluate_bags(model, task, data[1])
            row = {"task": task.label(), "pooler": pooler, **m, "train_time_s": seconds, "steps": steps}
            rows.append(row)
            log(f"{task.label()} {pooler}: accuracy {m['accuracy']:.3f}"
                + (f", bag AUC {m['bag_auc']:.3f}" if m["bag_auc"] is not None else "")
                + (f", localisation AUC {m['localisation_auc']:.3f}" if m["localisation_auc"] is not None else "")
                + f" ({seconds:.1f} s)")
    return rows


def run_pooling_compare(*, poolers: list[str] | None = None, store: str | Path | None = None,
                        out: str | Path | None = None, report: bool = True, steps: int = 300,
                        log: Callable[[str], None] = print) -> Any:
    """``attnzoo compare --preset pooling``: train, store each run, build the report and the leaderboard."""
    from attnzoo.bench.compare import CompareResult
    from attnzoo.bench.report import build_report, leaderboard
    from attnzoo.bench.store import DEFAULT_STORE, environment, open_store

    started = time.perf_counter()
    chosen = tuple(poolers) if poolers else POOLING_PRESET_POOLERS
    for p in chosen:
        BagClassifier(p, n_features=2, n_classes=2, dim=8)      # every pooler checked before any work
    store_path = Path(store) if store is not None else DEFAULT_STORE
    db = open_store(store_path)
    session = f"pooling-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    log(f"attnzoo compare --preset pooling: {len(chosen)} poolers ({', '.join(chosen)}) on mil_bags and "
        f"set_maximum, {steps} steps each; session {session}")
    try:
        for row in run_pooling(chosen, steps=steps, log=log):
            metrics = {"metric": "accuracy", "higher_is_better": True, "accuracy": row["accuracy"],
                       "bag_auc": row["bag_auc"], "localisation_auc": row["localisation_auc"],
                       "train_time_s": row["train_time_s"], "steps": row["steps"], "stopped_early": False}
            db.add_run(kind="train", task=row["task"], mixer=row["pooler"], session=session,
                       config={"preset": "pooling", "pooler": row["pooler"], "dim": 32, "steps": steps},
                       metrics=metrics, env=environment("cpu"))
        runs = db.runs(kind="train", session=session)
        board = leaderboard(runs, [])
        report_path = None
        if report:
            out_dir = Path(out) if out is not None else store_path.parent / "report"
            report_path = build_report(db, out_dir, session=session, title="attnzoo compare --preset pooling")
    finally:
        db.close()
    return CompareResult(session=session, store=store_path, report=report_path, leaderboard=board,
                         wall_s=time.perf_counter() - started, notes=[])
