"""Training and evaluation of the tiny models on the benchmark tasks.

The recipe follows Zoology: AdamW (weight decay 0.1) with cosine decay to 0 and no warm-up by
default, fixed seeds, evaluation on the test set once per epoch (or every ``eval_every``
steps) with Zoology's rule (per-example accuracy over the labelled positions, averaged over
examples), and early stopping once the test accuracy exceeds 0.99. The loss is the
cross-entropy over the labelled positions only (the same value as Zoology's cross-entropy with
``ignore_index=-100``; the head is only applied where there is a label).

Runs on CPU, on CUDA when there is a device. Under ``torchrun`` (``WORLD_SIZE > 1``) the model
is wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA): each rank takes its share
of every global batch and of the test set, and the metrics are all-reduced, so a run on N
processes follows the same schedule as on one. With ``context_parallel = P > 1`` (a language-model task, a
plain ``mha`` mixer) the processes form groups of ``P`` consecutive ranks that split each sequence
(:func:`attnzoo.parallel.sequence_sharded`, ring attention): context parallel inside a group, data parallel
across the groups; the loss and gradients are those of the run on one process. Evaluation runs whole
sequences.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.bench.models import build_model, model_defaults
from attnzoo.bench.tasks import IGNORE, Task, TaskData
from attnzoo.layers.base import check_int

__all__ = ["RunResult", "TrainConfig", "dist_info", "evaluate", "pick_device", "progress_bar", "secondary_text",
           "train"]


@dataclass
class TrainConfig:
    """Model and optimisation settings of one training run (JSON-friendly)."""

    mixer: str = "mha"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 64
    n_layers: int = 2
    positional: str | None = None       # None: the task's default (learned; none in a bag classifier)
    mlp_ratio: float | None = None      # None: the task's default (0 for language models, as Zoology)
    dropout: float = 0.0
    embed_dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 0
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None        # total steps (default: epochs over the training set)
    n_train: int = 10_000
    n_test: int = 1_000
    eval_every: int | None = None       # steps between evaluations (default: once per epoch)
    early_stop: float | None = 0.99     # stop once the test accuracy exceeds this
    grad_clip: float | None = None
    time_budget_s: float | None = None  # stop (and evaluate) once training has taken this long
    seed: int = 0
    data_seed: int = 0
    device: str = "auto"
    context_parallel: int = 1           # processes that split each sequence (ring attention); 1: none
    context_layout: str = "zigzag"      # how they split it (attnzoo.parallel.LAYOUTS)

    def __post_init__(self) -> None:
        from attnzoo.parallel import LAYOUTS

        if self.context_layout not in LAYOUTS:
            raise ValueError(f"context_layout: expected one of {LAYOUTS}, got {self.context_layout!r}")
        for name in ("dim", "n_layers", "batch_size", "epochs", "n_train", "n_test", "context_parallel"):
            check_int(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"lr: expected a finite positive number, got {self.lr!r}")
        for name in ("max_steps", "eval_every"):  # None: the default
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.batch_size > self.n_train:  # a batch would repeat examples within one step
            raise ValueError(f"batch_size: {self.batch_size} is larger than the training set n_train="
                             f"{self.n_train}; use a batch of at most n_train or more training examples")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is more than the step budget max_steps="
                             f"{self.max_steps}; the learning rate would never finish warming up")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            # a negative clip norm would flip the gradients' sign
            raise ValueError(f"grad_clip: expected a positive number or None, got {self.grad_clip!r}")
        if self.time_budget_s is not None and not (isinstance(self.time_budget_s, (int, float))
                                                   and self.time_budget_s >= 0):
            raise ValueError(f"time_budget_s: expected a number >= 0 or None, got {self.time_budget_s!r}")
        if self.mlp_ratio is not None and not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio >= 0):
            raise ValueError(f"mlp_ratio: expected a number >= 0 or None, got {self.mlp_ratio!r}")
        for name in ("dropout", "embed_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
        pick_device(self.device)

    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(self.n_train / self.batch_size)

    def steps_per_eval(self) -> int:
        return self.eval_every or math.ceil(self.n_train / self.batch_size)


@dataclass
class RunResult:
    """What a run produced: its configuration, metrics and per-step curves ``(step, name, value)``."""

    task: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    curves: list[tuple[int, str, float]]
    device: str
    world_size: int = 1


# Distributed helpers ---------------------------------------------------------------------------
def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; initialises the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (``cuda:local_rank``) when available, else CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto' or a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from exc


# Progress bars ---------------------------------------------------------------------------------
class _Bar:
    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.impl: Any = None
        self.kind = "none"
        self.desc = desc
        if not enabled or not sys.stderr.isatty():  # no bar in logs (make demo > file, CI)
            return
        try:
            from tqdm.auto import tqdm

            self.impl = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
            self.kind = "tqdm"
            return
        except ImportError:
            pass
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.impl = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
            self.impl.start()
            self.task_id = self.impl.add_task(desc, total=total, info="")
            self.kind = "rich"
        except ImportError:
            pass

    def update(self, n: int = 1, info: str = "") -> None:
        if self.kind == "tqdm":
            self.impl.update(n)
            if info:
                self.impl.set_postfix_str(info, refresh=False)
        elif self.kind == "rich":
            self.impl.update(self.task_id, advance=n, info=info)

    def close(self) -> None:
        if self.kind in ("tqdm", "rich"):
            self.impl.close() if self.kind == "tqdm" else self.impl.stop()


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[_Bar]:
    """A progress bar on a terminal (tqdm, else rich, else none) that is closed on exit."""
    bar = _Bar(total, desc, enabled)
    try:
        yield bar
    finally:
        bar.close()


# Loss and evaluation ---------------------------------------------------------------------------
def _forward(model: nn.Module, task: Task, batch: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) at the positions that carry a label."""
    if task.kind == "lm":
        select = batch.labels != IGNORE
        return model(batch.inputs, select=select), batch.labels[select]
    if task.kind == "regress":
        select = torch.zeros(batch.inputs.shape[:2], dtype=torch.bool, device=batch.inputs.device)
        select[:, -1] = True
        return model(batch.inputs, select=select).squeeze(-1), batch.labels
    return model(batch.inputs, mask=batch.mask), batch.labels


def _context_group(rank: int, world: int, cp: int) -> Any:
    """The process group of this rank's ``cp`` consecutive ranks (every rank creates every group)."""
    groups = [torch.distributed.new_group(list(range(start, start + cp))) for start in range(0, world, cp)]
    return groups[rank // cp]


def _check_context_parallel(model: nn.Module, task: Task, cfg: TrainConfig, seq_len: int, world: int) -> None:
    from attnzoo.bench.models import Block
    from attnzoo.parallel.layout import check_length

    cp = cfg.context_parallel
    if world % cp:
        raise ValueError(f"context_parallel: {cp} must divide the number of processes, got {world} process(es)")
    if task.kind != "lm":
        raise ValueError(f"context_parallel: splitting the sequence needs a language-model task, {task.label()} is "
                         f"a {task.kind} task")
    for block in (m for m in model.modules() if isinstance(m, Block)):
        reason = getattr(block.mixer, "sequence_sharding_reason", lambda: "it is not an attention mixer")()
        if reason is not None:
            raise ValueError(f"context_parallel: mixer {cfg.mixer!r} cannot run with its sequence split: {reason}")
    check_length(seq_len, cp, cfg.context_layout, "seq_len")


def _sharded_forward_loss(net: nn.Module, batch: TaskData, group: Any, cfg: TrainConfig) -> torch.Tensor:
    """This process's share of the language-model loss of ``batch`` with the sequence split across ``group``:
    its summed cross-entropy times the group size over the group's labelled positions, so that the gradients
    averaged over the processes are those of the mean over the whole batch."""
    from attnzoo.parallel import sequence_sharded, shard

    with sequence_sharded(group, cfg.context_layout) as where:
        inputs, labels = (shard(t, 1, where.layout, rank=where.rank, world_size=where.world_size)
                          for t in (batch.inputs, batch.labels))
        select = labels != IGNORE
        out = net(inputs, select=select)
    count = select.sum().double().reshape(1)
    torch.distributed.all_reduce(count, group=group)
    total = F.cross_entropy(out.float(), labels[select], reduction="sum")
    return total * cfg.context_parallel / count.clamp(min=1).to(total.dtype)


def _loss(task: Task, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task.kind == "regress":
        return F.mse_loss(out.float(), target.float())
    return F.cross_entropy(out.float(), target)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, data: TaskData, *, batch_size: int = 256,
             device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> dict[str, float]:
    """The task's metric on ``data`` (the mean of per-example scores) and the loss.

    Under DDP each rank scores ``data[rank::world]`` and the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    idx = torch.arange(rank, len(data), world)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # score sum, scored examples, loss sum
    for start in range(0, len(idx), batch_size):
        batch = data.subset(idx[start:start + batch_size]).to(device)
        out, target = _forward(model, task, batch)
        loss = _loss(task, out, target)
        if task.kind == "lm":
            preds = torch.full_like(batch.labels, IGNORE - 1)
            preds[batch.labels != IGNORE] = out.argmax(-1)
            scores = task.score(preds, batch)
        else:
            scores = task.score(out, batch)
        ok = ~torch.isnan(scores)
        total += torch.stack([scores[ok].sum(), ok.sum().double(), loss.double() * len(batch)])
    total = _all_reduce(total, world)
    model.train(was_training)
    n = max(float(total[1]), 1.0)
    return {task.metric: float(total[0]) / n, "loss": float(total[2]) / max(len(data), 1)}


def _cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def secondary_text(metrics: dict[str, Any]) -> str:
    """``", bag_auc 0.9312, localisation_auc 0.9810"``: a run's secondary metrics for a log line ("" without)."""
    return "".join(f", {k} " + ("n/a" if metrics.get(k) is None else f"{metrics[k]:.4f}")
                   for k in metrics.get("secondary_metrics", []))


# Training --------------------------------------------------------------------------------------
def train(task: Task, cfg: TrainConfig, *, data: tuple[TaskData, TaskData] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None, desc: str | None = None) -> RunResult:
    """Train ``cfg.mixer`` on ``task``; returns the :class:`RunResult` (every rank returns the same metrics).

    The mixer is checked against what the task needs before anything else (``ValueError``).
    ``data`` reuses already generated ``(train, test)`` sets.
    """
    model_kwargs = dict(dim=cfg.dim, n_layers=cfg.n_layers, mixer_kwargs=cfg.mixer_kwargs, positional=cfg.positional,
                        mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout)
    torch.manual_seed(cfg.seed)
    model = build_model(task, cfg.mixer, **model_kwargs)  # raises before any data or training work
    rank, world, local_rank = dist_info()
    cp = cfg.context_parallel
    dp, dp_rank = max(world // cp, 1), rank // cp  # data-parallel replicas, each splitting its sequences
    if cfg.batch_size % dp:
        raise ValueError(f"batch_size: {cfg.batch_size} must be divisible by the number of data-parallel "
                         f"replicas {dp} ({world} process(es) / context_parallel {cp})")
    device = pick_device(cfg.device, local_rank)
    train_data, test_data = data if data is not None else task.splits(cfg.n_train, cfg.n_test, cfg.data_seed)
    context_group = None
    if cp > 1:
        _check_context_parallel(model, task, cfg, int(train_data.inputs.shape[1]), world)
        context_group = _context_group(rank, world, cp)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # as Zoology: all params
    total_steps, per_eval = cfg.total_steps(), cfg.steps_per_eval()
    local_bs = cfg.batch_size // dp
    curves: list[tuple[int, str, float]] = []
    best, last_eval, stopped_early, stopped_by_time = None, None, False, False
    better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
    say = log if (log is not None and rank == 0) else (lambda s: None)
    started = time.perf_counter()
    step, epoch, running = 0, 0, 0.0
    order = torch.empty(0, dtype=torch.long)
    cursor = 0
    net.train()
    with progress_bar(total_steps, desc or f"{cfg.mixer} on {task.label()}", enabled=progress and rank == 0) as bar:
        while step < total_steps:
            if cursor + cfg.batch_size > len(order):
                g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
                order = torch.randperm(len(train_data), generator=g)
                cursor, epoch = 0, epoch + 1
                if len(order) < cfg.batch_size:
                    order = order.repeat(math.ceil(cfg.batch_size / max(1, len(order))))
            idx = order[cursor:cursor + cfg.batch_size][dp_rank::dp]
            cursor += cfg.batch_size
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _cosine(step, total_steps, cfg.warmup_steps)
            batch = train_data.subset(idx).to(device)
            if context_group is not None:
                loss = _sharded_forward_loss(net, batch, context_group, cfg)
            else:
                out, target = _forward(net, task, batch)
                loss = _loss(task, out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            value = float(_all_reduce(loss.detach().double().clone(), world)) / world
            if not math.isfinite(value):
                raise FloatingPointError(f"{cfg.mixer} on {task.label()}: the loss became {value} at step {step}")
            running = value if step == 1 else 0.9 * running + 0.1 * value
            if step % max(1, total_steps // 200) == 0 or step == total_steps:
                curves.append((step, "train/loss", value))
            info = f"loss {running:.3f}" + (f" | {task.metric} {last_eval:.3f}" if last_eval is not None else "")
            bar.update(1, info)
            out_of_time = cfg.time_budget_s is not None and time.perf_counter() - started > cfg.time_budget_s
            if cfg.time_budget_s is not None and world > 1:  # every rank stops at the same step
                flag = torch.tensor([float(out_of_time)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if step % per_eval == 0 or step == total_steps or out_of_time:
                ev = evaluate(net, task, test_data, batch_size=max(local_bs, 256), device=device, rank=rank,
                              world=world)
                last_eval = ev[task.metric]
                curves.append((step, f"test/{task.metric}", last_eval))
                curves.append((step, "test/loss", ev["loss"]))
                if best is None or better(last_eval, best):
                    best = last_eval
                say(f"  step {step}/{total_steps}: loss {running:.4f}, test {task.metric} {last_eval:.4f}")
                if (cfg.early_stop is not None and task.higher_is_better and last_eval > cfg.early_stop):
                    stopped_early = True
                    break
                if out_of_time:
                    stopped_by_time = True
                    say(f"  time budget of {cfg.time_budget_s:g} s reached after {step} steps")
                    break
    elapsed = time.perf_counter() - started
    metrics = {
        "metric": task.metric, "higher_is_better": task.higher_is_better, task.metric: best,
        f"final_{task.metric}": last_eval, "train_loss": running, "steps": step,
        "epochs": round(step * cfg.batch_size / len(train_data), 3), "stopped_early": stopped_early,
        "stopped_by_time": stopped_by_time,
        "train_time_s": round(elapsed, 3), "time_per_step_ms": round(1000 * elapsed / max(step, 1), 3),
        "params": n_params,
    }
    if hasattr(task, "ridge_error"):
        metrics["ridge_mse"] = task.ridge_error(test_data)
    if task.secondary_metrics:  # of the final model (the metric above is the best evaluation's)
        metrics.update(task.extra_metrics(model, test_data, device=device))
        metrics["secondary_metrics"] = list(task.secondary_metrics)
    config = asdict(cfg)
    for key, default in model_defaults(task).items():  # record what the model used (Zoology's MQAR: no MLP)
        if config[key] is None:
            config[key] = default
    return RunResult(task=task.config(), config=config, metrics=metrics, curves=curves, device=str(device),
                     world_size=world)
