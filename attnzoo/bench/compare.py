"""``attnzoo compare``: train, measure, store and report in one command.

Presets:

- ``quick`` (``make demo``; at most 10 minutes on 2 idle CPU cores): whichever of ``mha``,
  ``base_conv``, ``sliding_window`` and ``linear_attention`` are registered, on MQAR at Zoology's
  (64, 4) setting (2 layers, width 64, one learning rate, 1000 steps, early stop at 0.99, seeds 0
  and 1, no time budget), and a speed/memory sweep against SDPA up to N = 16384.
- ``zoology-cpu``: Figure 2's (64, 4) and (128, 8) at widths 64 and 128 with ``mha``, ``base_conv``,
  ``hyena`` and ``based``, step budgets sized for about an hour on 2 idle cores.
- ``zoology``: Zoology's Figure 2 sweep: the four (seq, kv) settings, d_model 64-512, the four
  learning rates ``logspace(-4, -2, 4)``, 100k/3k examples, 64 epochs, the paper's batch sizes;
  the figure reports the best over learning rates. Options narrow it (``--seq-lens``,
  ``--dims``, ``--lrs``, ``--epochs``...) for a CPU.
- ``full``: every registered causal mixer on MQAR (64-256), induction, selective copy and
  in-context regression, plus ListOps for the mixers that run non-causally, at two widths and
  two learning rates, and the speed sweep. Long; meant for a GPU.
- ``pooling``: the P1/P2 poolers in a bag classifier on the MIL bags and the set maximum
  (:mod:`attnzoo.bench.pooling_tasks`): accuracy, bag AUC and localisation AUC (minutes on 2 cores).
- ``routing``: how much recall content routing loses: the quick preset's MQAR (64, 4) run with ``mha`` next
  to the variants ``moba[top_k=1]`` .. ``moba[top_k=3]`` (blocks of 4, so the pairs span two blocks none of
  the queries' own) and ``topk_attention[top_k=1]`` .. ``topk_attention[top_k=8]``, seeds 0 and 1 (about
  25 minutes on an idle 2-core CPU). The report's "Recall lost against mha" table has the difference per variant.

Mixers are slugs or *variants*: one entry at fixed arguments, ``SLUG[KEY=VALUE,...]`` such as
``moba[top_k=1]`` (:mod:`attnzoo.bench.variants`); the label is what the store, leaderboard and report show,
the run's configuration records the entry and every argument it was built with.

Instead of a preset, ``task=`` (``attnzoo compare --task NAME --task-arg KEY=VALUE``) runs one task
of :data:`~attnzoo.bench.tasks.TASKS` with its own recipe (:func:`task_preset`): the given mixers, or
poolers on a bag task (default: the quick preset's mixers, or the pooling preset's poolers).

Every choice is checked before any training starts: unknown mixers, tasks or options, and a
mixer that cannot do what a task needs, are errors listing the valid choices.
"""

from __future__ import annotations

import datetime as _dt
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from attnzoo.bench.models import build_mixer, check_entry, mixer_kwargs_for, mixer_slugs, pooler_slugs
from attnzoo.bench.pooling_tasks import MILBags, SetMaximum
from attnzoo.bench.report import build_report, leaderboard, recall_table
from attnzoo.bench.speed import SpeedConfig, config_dict, run_speed
from attnzoo.bench.store import DEFAULT_STORE, environment, open_store
from attnzoo.bench.tasks import MQAR, ICLLinearRegression, Induction, ListOps, SelectiveCopy, Task
from attnzoo.bench.train import TrainConfig, dist_info, pick_device, secondary_text, train
from attnzoo.bench.variants import merge_kwargs, parse_mixer

__all__ = ["POOLING_POOLERS", "PRESETS", "QUICK_MIXERS", "Preset", "Setting", "get_preset", "resolve_mixers",
           "run_compare", "task_preset"]

QUICK_MIXERS = ("mha", "base_conv", "sliding_window", "linear_attention")
ZOOLOGY_MIXERS = ("mha", "base_conv", "hyena", "based")
POOLING_POOLERS = ("mean_pool", "attention_pool", "query_pool", "abmil", "attentive_stats_pool",
                   "set_transformer_pma")
# Per-entry arguments the presets use (only the ones an entry accepts are passed).
MIXER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 16},
    # Small routings at MQAR's lengths (64 tokens: 4 blocks of 16, the own block and one routed block).
    "moba": {"block_size": 16, "top_k": 2},
    "topk_attention": {"top_k": 4},
    # The tasks train causal language models: balanced clusters are chosen over the whole call (not causal).
    "routing_transformer": {"assignment": "argmax"},
    "abmil": {"attn_dim": 32}, "attentive_stats_pool": {"attn_dim": 32},
    "query_pool": {"n_heads": 4}, "set_transformer_pma": {"n_heads": 4},
}


@dataclass
class Setting:
    """A task and how long to train on it."""

    task: Task
    batch_size: int = 64
    n_train: int = 10_000
    n_test: int = 1_000
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int | None = None
    time_budget_s: float | None = None   # per training run (the quick preset's guarantee of its wall time)


@dataclass
class Preset:
    name: str
    description: str
    settings: list[Setting]
    dims: list[int]
    lrs: list[float]
    n_layers: int = 2
    n_heads: int = 1
    candidates: tuple[str, ...] = QUICK_MIXERS
    all_mixers: bool = False          # every registered mixer that can run the tasks
    speed: SpeedConfig | None = None
    early_stop: float | None = 0.99
    warmup_steps: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    # per-entry arguments of this preset, over MIXER_DEFAULTS (a variant's own arguments still win)
    mixer_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


def _quick() -> Preset:
    # Zoology's (64, 4) setting and model at width 64 with ~1% of its training: batch 64, 16k examples
    # (repeated), 1000 steps (early stop at 0.99), two seeds, no time budget: every run reaches its
    # step budget. Attention against the attention-free BaseConv (Zoology's gated convolution), a
    # sliding window and linear attention. The (128, 8) setting costs ~4.5x a step and mha does not
    # reach 0.9 in a budget that fits 10 minutes on 2 cores; it is in zoology-cpu.
    settings = [
        Setting(MQAR.paper(64), batch_size=64, n_train=16_000, n_test=500, max_steps=1000, eval_every=100),
    ]
    speed = SpeedConfig(lengths=[256, 1024, 4096, 16384], dim=64, n_heads=1, repeats=3, warmup=1, max_seconds=60.0,
                        point_budget_s=5.0, budget_s=90.0)
    return Preset("quick", "MQAR (64, 4) at width 64, 1000 steps per run, 2 seeds, attention vs BaseConv; speed "
                  "sweep to N=16384", settings, dims=[64], lrs=[3e-3], speed=speed, seeds=[0, 1],
                  candidates=QUICK_MIXERS)


def _zoology_cpu() -> Preset:
    # Figure 2's (64, 4) and (128, 8) at widths 64 and 128 with attention and the paper's baselines,
    # sized for about an hour on 2 idle cores: one learning rate, step budgets instead of 64 epochs.
    # (128, 8): mha at width 64 was at 0.30 after a 1000-step schedule and at 0.98 after 1500 steps of a
    # 2000-step one (lr 3e-3, batch 64): the plateau's end depends on how long the learning rate stays high.
    settings = [
        Setting(MQAR.paper(64), batch_size=64, n_train=20_000, n_test=1_000, max_steps=1500, eval_every=250),
        Setting(MQAR.paper(128), batch_size=64, n_train=20_000, n_test=1_000, max_steps=2000, eval_every=250),
    ]
    return Preset("zoology-cpu", "Zoology Figure 2's (64, 4) and (128, 8) at d_model 64 and 128: mha, base_conv, "
                  "hyena, based; 1500 / 2000 steps, one lr, one seed", settings, dims=[64, 128], lrs=[3e-3],
                  candidates=ZOOLOGY_MIXERS)


def _zoology() -> Preset:
    batch = {64: 512, 128: 512, 256: 256, 512: 128}
    settings = [Setting(MQAR.paper(seq), batch_size=batch[seq], n_train=100_000, n_test=3_000, epochs=64)
                for seq in (64, 128, 256, 512)]
    lrs = [float(f"{x:.3g}") for x in torch.logspace(-4, -2, 4, dtype=torch.float64).tolist()]
    speed = SpeedConfig(lengths=[256, 1024, 4096, 16384], dim=128, n_heads=2, repeats=5, warmup=2, max_seconds=60.0)
    return Preset("zoology", "Zoology Figure 2: MQAR (64,4) (128,8) (256,16) (512,64), d_model 64-512, 4 lrs, "
                  "64 epochs; best over lrs", settings, dims=[64, 128, 256, 512], lrs=lrs, speed=speed,
                  candidates=ZOOLOGY_MIXERS)


def _full() -> Preset:
    settings = [
        Setting(MQAR.paper(64), batch_size=128, n_train=20_000, n_test=1_000, epochs=16),
        Setting(MQAR.paper(128), batch_size=128, n_train=20_000, n_test=1_000, epochs=16),
        Setting(MQAR.paper(256), batch_size=64, n_train=20_000, n_test=1_000, epochs=16),
        Setting(Induction(seq_len=128, vocab_size=256), batch_size=64, n_train=10_000, n_test=1_000, epochs=8),
        Setting(SelectiveCopy(seq_len=256, n_tokens=16, n_symbols=16), batch_size=64, n_train=10_000, n_test=1_000,
                epochs=8),
        Setting(ICLLinearRegression(n_dims=8, n_points=32), batch_size=64, n_train=20_000, n_test=1_000, epochs=8),
        Setting(ListOps(max_depth=6, max_args=6, min_length=50, max_length=256), batch_size=64, n_train=10_000,
                n_test=1_000, epochs=8),
    ]
    speed = SpeedConfig(lengths=[256, 1024, 4096, 16384, 65536], dim=128, n_heads=2, repeats=5, warmup=2,
                        max_seconds=60.0)
    return Preset("full", "every registered mixer on MQAR, induction, selective copy, ICL regression and ListOps; "
                  "speed sweep to N=65536", settings, dims=[64, 128], lrs=[1e-3, 3e-3], all_mixers=True, speed=speed,
                  n_heads=2)


# MQAR puts its key-value pairs first: (64, 4) is ``k1 v1 .. k4 v4`` at positions 0-7, then the queries and
# filler at 8-63. With moba's preset block of 16 every pair sits in block 0, next to several queries; a query's
# routing then has only one block worth picking, and the comparison says little. Blocks of 4 put the pairs in
# blocks 0 and 1 and the queries in blocks 2-15: under causality a query's own block (always attended, top_k
# counts it) never holds a pair, so top_k=1 cannot recall (the floor), top_k=2 must route to the one block of
# the two that holds its key (among up to 15 earlier ones), top_k=3 can hold both pair blocks but must still
# prefer them to the filler and query blocks. topk_attention keeps k of up to 64 keys per query: a query needs
# one value (and the first layer the key before it); at top_k=1 its q and k get no gradient (a softmax over one
# key is constant), so its selection is never trained.
ROUTING_MIXERS = ("mha", "moba[top_k=1]", "moba[top_k=2]", "moba[top_k=3]", "topk_attention[top_k=1]",
                  "topk_attention[top_k=2]", "topk_attention[top_k=4]", "topk_attention[top_k=8]")
ROUTING_BLOCK_SIZE = 4


def _routing() -> Preset:
    # The quick preset's MQAR (64, 4) run (width 64, 1000 steps, early stop at 0.99), where mha reaches 0.99,
    # with routed variants next to it; two seeds; no speed sweep (bench_dynamic_sparse.py measures speed).
    settings = [
        Setting(MQAR.paper(64), batch_size=64, n_train=16_000, n_test=500, max_steps=1000, eval_every=100),
    ]
    return Preset("routing", f"MQAR (64, 4) at width 64: how much recall routing loses against mha: moba (blocks "
                  f"of {ROUTING_BLOCK_SIZE}, top_k 1-3) and topk_attention (top_k 1-8), 1000 steps, 2 seeds",
                  settings, dims=[64], lrs=[3e-3], seeds=[0, 1], candidates=ROUTING_MIXERS,
                  mixer_defaults={"moba": {"block_size": ROUTING_BLOCK_SIZE}})


def _bag_setting(task: Task) -> Setting:
    return Setting(task, batch_size=64, n_train=4000, n_test=500, max_steps=300, eval_every=100)


# The bag classifiers' learning rate under the harness's recipe (AdamW, weight decay 0.1, cosine decay over
# 300 steps): at 3e-3 no pooler beat the majority class on set_maximum (0.870) and abmil settled on MIL at
# 0.60 with its weights on the non-witnesses; at 1e-2 they reach 0.94 and 0.86 (seed 0, one run each).
BAG_LR = 1e-2


def _pooling() -> Preset:
    # Each pooler in a bag classifier (instance MLP to width 32, the pooler, a linear head), 300 steps.
    return Preset("pooling", "the P1/P2 poolers in a bag classifier on MIL bags (bag accuracy / AUC, localisation "
                  "AUC from the weights) and the set maximum, 300 steps each",
                  [_bag_setting(MILBags()), _bag_setting(SetMaximum())], dims=[32], lrs=[BAG_LR],
                  candidates=POOLING_POOLERS, early_stop=None)


PRESETS: dict[str, Callable[[], Preset]] = {"quick": _quick, "zoology": _zoology, "zoology-cpu": _zoology_cpu,
                                             "full": _full, "pooling": _pooling, "routing": _routing}


def task_preset(task: Task) -> Preset:
    """The recipe of ``attnzoo compare --task``: ``task`` alone. A bag task trains the pooling preset's poolers
    as that preset does; another task trains the quick preset's mixers (those that can run it) as the quick
    preset trains MQAR, one seed, no speed sweep. Options override it as they override a preset."""
    if task.kind == "bag":
        return Preset(f"task-{task.name}", f"{task.label()}: poolers in a bag classifier, 300 steps each",
                      [_bag_setting(task)],
                      dims=[32], lrs=[BAG_LR], candidates=POOLING_POOLERS, early_stop=None)
    setting = Setting(task, batch_size=64, n_train=16_000, n_test=500, max_steps=1000, eval_every=100)
    return Preset(f"task-{task.name}", f"{task.label()}: 2-layer models at width 64, 1000 steps each", [setting],
                  dims=[64],
                  lrs=[3e-3], candidates=QUICK_MIXERS)


def _count(n: int, noun: str) -> str:
    """``1 mixer``, ``2 mixers``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve_mixers(preset: Preset, mixers: list[str] | None) -> tuple[list[str], list[str]]:
    """(mixers to run, notes). Explicit ``mixers`` (slugs or variant labels such as ``moba[top_k=1]``,
    :mod:`attnzoo.bench.variants`, returned in their canonical spelling, duplicates dropped) must all be valid
    for every task (else ``ValueError``): token mixers for sequence tasks, poolers for bag tasks
    (:func:`~attnzoo.bench.models.check_entry`); by default the preset's candidates that are registered and can
    run its tasks (a candidate variant whose entry is not registered is left out with a note)."""
    tasks = [s.task for s in preset.settings]
    notes: list[str] = []
    if mixers:
        seen = []
        for m in mixers:
            label = parse_mixer(m).label
            for task in tasks:
                check_entry(label, task)
            if label not in seen:
                seen.append(label)
        return seen, notes
    pool = mixer_slugs() if preset.all_mixers else list(preset.candidates)
    registered = set(mixer_slugs()) | set(pooler_slugs())
    chosen = []
    for m in pool:
        if m.partition("[")[0] not in registered:
            notes.append(f"{m}: not registered in this build, left out")
            continue
        try:
            for task in tasks:
                check_entry(m, task)
        except ValueError as e:
            if preset.all_mixers:
                continue
            notes.append(f"{m}: left out ({e})")
            continue
        chosen.append(m)
    if not chosen:
        raise ValueError(f"no registered mixer can run preset {preset.name!r}; registered mixers: "
                         f"{', '.join(sorted(registered))}")
    return chosen, notes


def _mixer_kwargs(mixer: str, n_heads: int, extra: dict[str, dict[str, Any]] | None,
                  preset_defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every argument ``mixer`` (a slug or variant label) is built with: :data:`MIXER_DEFAULTS` of its entry,
    the preset's ``mixer_defaults`` for it, its label's arguments, ``extra`` given for its slug or its label (a
    value that differs from the label's is a ``ValueError``: the label would not say what ran), and ``n_heads``
    unless one of those sets it."""
    import attnzoo

    variant = parse_mixer(mixer)
    spec = attnzoo.spec(variant.slug)
    accepted = spec.accepted_arguments()
    defaults = {k: v for k, v in {**MIXER_DEFAULTS.get(spec.slug, {}), **(preset_defaults or {}).get(spec.slug, {})
                                  }.items() if accepted is None or k in accepted}
    given: dict[str, Any] = {}
    for name, kw in (extra or {}).items():  # a label may be spelled differently where its arguments are given
        if name == variant.slug or ("[" in name and parse_mixer(name).label == variant.label):
            given.update(kw or {})
    return mixer_kwargs_for(variant.slug, n_heads=n_heads, extra={**defaults, **merge_kwargs(variant, given)})


def _preflight(mixers: list[str], kwargs_of: dict[str, dict[str, Any]], p: Preset) -> tuple[list[str], list[str]]:
    """Build every mixer (or pooler) at every width (and as the speed sweep will) so a bad argument fails
    before training, and run each token mixer once on a zero sequence of every task's length (as its model
    will: causal in a language model) so an argument the task's length cannot honour (a ``top_k`` above the
    keys or blocks of the sequence) fails before training too. Returns (mixers to run, notes): a preset of
    every registered mixer leaves out, with a note, one whose default arguments cannot run one of its tasks
    (as it leaves out one that cannot take the task at all); otherwise that is a ``ValueError``."""
    kept, notes = [], []
    for m in mixers:
        try:
            _preflight_one(m, kwargs_of[m], p)
        except ValueError as e:
            if not p.all_mixers:
                raise
            notes.append(f"{m}: left out ({e})")
            continue
        kept.append(m)
    return kept, notes


def _preflight_one(m: str, kwargs: dict[str, Any], p: Preset) -> None:
    import attnzoo

    slug = parse_mixer(m).slug
    builds = [(dim, dict(kwargs)) for dim in p.dims]
    if p.speed is not None:
        rest = {k: v for k, v in kwargs.items() if k != "n_heads"}
        builds.append((p.speed.dim, mixer_kwargs_for(slug, n_heads=p.speed.n_heads, extra=rest)))
    pooler = attnzoo.spec(slug).type == "pooler"
    for i, (dim, kw) in enumerate(builds):
        try:
            module = attnzoo.create(slug, dim=dim, **kw) if pooler else build_mixer(slug, dim, **kw)
        except Exception as e:
            raise ValueError(f"mixer {m!r} cannot be built at width {dim} with {kw}: {e}") from None
        if pooler or i >= len(p.dims):
            continue
        for s in p.settings:
            if s.task.kind == "bag":
                continue
            try:
                with torch.no_grad():
                    module(torch.zeros(1, s.task.seq_len, dim), causal=s.task.kind in ("lm", "regress"))
            except ValueError as e:
                raise ValueError(f"mixer {m!r} with {kw} cannot run {s.task.label()} (length "
                                 f"{s.task.seq_len}): {e}") from None


def _session_id(preset: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{preset}-{stamp}-{secrets.token_hex(3)}"


@dataclass
class CompareResult:
    session: str
    store: Path
    report: Path | None
    leaderboard: tuple[list[str], list[list[str]]]
    wall_s: float
    notes: list[str]
    # recall lost against mha at the same task and width (report.recall_table); empty without mha or others
    recall: tuple[list[str], list[list[str]]] = ([], [])


LONG_RUN_S = 3600.0  # a CPU run estimated longer than this needs ``yes=True`` (``--yes``)
PROBE_STEPS = 3


def run_steps(setting: Setting) -> int:
    """The step budget of one training run of ``setting`` (``max_steps``, else epochs x batches)."""
    if setting.max_steps is not None:
        return setting.max_steps
    return setting.epochs * math.ceil(setting.n_train / setting.batch_size)


def probe_step_seconds(setting: Setting, mixer: str, kwargs: dict[str, Any], dim: int, p: Preset, *,
                       device: str = "auto") -> float:
    """Wall seconds per training step of ``mixer`` at width ``dim`` on ``setting``: the slope between
    runs of :data:`PROBE_STEPS` and ``3 * PROBE_STEPS`` steps on freshly generated examples, so the fixed
    costs (model build, first-call warm-up, the evaluation) cancel; the longer run's mean when noise makes
    the slope non-positive."""
    data = setting.task.splits(setting.batch_size, 8, 1)

    def timed(steps: int) -> float:
        cfg = TrainConfig(mixer=mixer, mixer_kwargs=kwargs, dim=dim, n_layers=p.n_layers, lr=p.lrs[0],
                          batch_size=setting.batch_size, max_steps=steps, n_train=setting.batch_size, n_test=8,
                          eval_every=10 * steps, early_stop=None, device=device)
        t0 = time.perf_counter()
        try:
            train(setting.task, cfg, data=data, progress=False)
        except (FloatingPointError, RuntimeError):  # a run that diverges fails (and is recorded) in the real loop
            pass
        return time.perf_counter() - t0

    short, long = timed(PROBE_STEPS), timed(3 * PROBE_STEPS)
    slope = (long - short) / (2 * PROBE_STEPS)
    return slope if slope > 0 else long / (3 * PROBE_STEPS)


def check_time_budgets(p: Preset) -> None:
    """A time budget must leave room for warm-up: refuse one shorter than the warm-up of its runs."""
    for s in p.settings:
        if s.time_budget_s is not None and s.time_budget_s <= 0:
            raise ValueError(f"time_budget_s: {s.time_budget_s:g} s leaves no training steps "
                             f"(warm-up is {p.warmup_steps} steps) for {s.task.label()}")


def estimate_wall_s(p: Preset, mixers: list[str], kwargs_of: dict[str, dict[str, Any]], *, device: str = "auto",
                    log: Callable[[str], None] = print) -> tuple[int, int, float]:
    """(training runs, training steps, estimated wall seconds on this machine): every run's step
    budget times its step time from :func:`probe_step_seconds` (one probe per setting, mixer and
    width; seeds and learning rates share it). A run whose time budget leaves fewer steps than its
    warm-up is a ``ValueError`` naming both."""
    runs = steps = 0
    wall = 0.0
    per = len(p.lrs) * len(p.seeds)
    for s in p.settings:
        for m in mixers:
            for dim in p.dims:
                step_s = probe_step_seconds(s, m, kwargs_of[m], dim, p, device=device)
                n = run_steps(s)
                if s.time_budget_s is not None:
                    fits = int(s.time_budget_s / step_s)
                    if fits < p.warmup_steps:
                        raise ValueError(f"time_budget_s: {s.time_budget_s:g} s leaves about {fits} steps of {m} "
                                         f"at width {dim} on {s.task.label()}, fewer than warmup_steps="
                                         f"{p.warmup_steps}")
                    n = min(n, max(fits, 1))
                runs += per
                steps += per * n
                wall += per * n * step_s
    return runs, steps, wall


def _clock(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_compare(preset: str | None = "quick", *, task: Task | None = None, mixers: list[str] | None = None,
                store: str | Path | None = None, out: str | Path | None = None, report: bool = True,
                speed: bool = True, overrides: dict[str, Any] | None = None,
                mixer_kwargs: dict[str, dict[str, Any]] | None = None, device: str = "auto", progress: bool = True,
                log: Callable[[str], None] = print, yes: bool = False, estimate: bool = True) -> CompareResult:
    """Run a preset, or one ``task`` (``preset=None``; :func:`task_preset`); ``overrides``: ``dims``, ``lrs``,
    ``seq_lens`` (MQAR settings), ``epochs``, ``max_steps``, ``n_train``, ``n_test``, ``batch_size``,
    ``lengths`` (speed), ``seeds``. ``mixers`` are poolers on a bag task.

    Before any training a short probe times a few steps of every (setting, mixer, width) and the
    runs, steps and estimated wall time are printed (``estimate=False`` skips it); on a CPU an
    estimate over an hour is a ``ValueError`` unless ``yes``."""
    started = time.perf_counter()
    p = _apply_overrides(resolve_preset(preset, task), overrides or {})
    command = f"attnzoo compare --task {task.name}" if task is not None else f"attnzoo compare --preset {p.name}"
    chosen, notes = resolve_mixers(p, mixers)          # every check before any work
    kwargs_of = {m: _mixer_kwargs(m, p.n_heads, mixer_kwargs, p.mixer_defaults) for m in chosen}
    chosen, left_out = _preflight(chosen, kwargs_of, p)
    notes += left_out
    if not chosen:
        raise ValueError(f"no mixer of preset {p.name!r} can run its tasks: {'; '.join(left_out)}")
    check_time_budgets(p)
    for s_ in p.settings:
        if s_.batch_size > s_.n_train:
            raise ValueError(f"batch_size: {s_.batch_size} is larger than the training set n_train={s_.n_train} "
                             f"({s_.task.label()}); lower --batch-size or raise --n-train")
    if estimate:
        n_est, steps_est, wall_est = estimate_wall_s(p, chosen, kwargs_of, device=device, log=log)
        on_cpu = pick_device(device).type == "cpu"
        log(f"estimate: {_count(n_est, 'training run')}, {steps_est} steps, about {_clock(wall_est)} of training "
            f"on this machine now (from a short timing probe per setting, mixer and width; a loaded "
            "machine is slower)")
        if on_cpu and wall_est > LONG_RUN_S and not yes:
            raise ValueError(f"preset {p.name!r} is estimated at {_clock(wall_est)} on this CPU (over "
                             f"{_clock(LONG_RUN_S)}); pass --yes to run it anyway, or narrow it (--seq-lens, "
                             "--dims, --lrs, --epochs, --max-steps)")
    rank, world, _ = dist_info()
    store_path = Path(store) if store is not None else DEFAULT_STORE
    db = open_store(store_path) if rank == 0 else None  # a foreign or corrupt store fails here, before training
    session = _session_id(p.name)
    say = log if rank == 0 else (lambda s: None)
    for n in notes:
        say(f"note: {n}")
    n_runs = len(p.settings) * len(chosen) * len(p.dims) * len(p.lrs) * len(p.seeds)
    sweep = f", speed sweep to N={max(p.speed.lengths)}" if p.speed and speed else ""
    say(f"{command}: {_count(len(chosen), 'mixer')} ({', '.join(chosen)}), "
        f"{_count(len(p.settings), 'task setting')}, {_count(n_runs, 'training run')}{sweep}; session {session}")
    try:
        k = 0
        for setting in p.settings:
            task = setting.task
            t0 = time.perf_counter()
            data = task.splits(setting.n_train, setting.n_test, 0)
            say(f"{task.label()}: generated {setting.n_train} + {setting.n_test} examples in "
                f"{time.perf_counter() - t0:.1f} s")
            for mixer in chosen:
                slug = parse_mixer(mixer).slug
                # the store, the leaderboard and the report name the run by its label; its configuration
                # records the entry and every argument it was built with
                label_cfg = {"label": mixer, "variant_kwargs": parse_mixer(mixer).kwargs}
                for dim in p.dims:
                    for lr in p.lrs:
                        for seed in p.seeds:
                            k += 1
                            cfg = TrainConfig(mixer=slug, mixer_kwargs=kwargs_of[mixer], dim=dim, n_layers=p.n_layers,
                                              lr=lr, batch_size=setting.batch_size, epochs=setting.epochs,
                                              max_steps=setting.max_steps, n_train=setting.n_train,
                                              n_test=setting.n_test, eval_every=setting.eval_every,
                                              early_stop=p.early_stop, seed=seed, device=device,
                                              time_budget_s=setting.time_budget_s, warmup_steps=p.warmup_steps)
                            try:
                                res = train(task, cfg, data=data, progress=progress,
                                            desc=f"[{k}/{n_runs}] {mixer} d={dim} lr={lr:g} {task.label()}")
                            except (FloatingPointError, RuntimeError) as e:  # diverged or failed: record, go on
                                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                say(f"[{k}/{n_runs}] {task.label()} {mixer} d={dim} lr={lr:g}: FAILED ({msg})")
                                notes.append(f"{task.label()} {mixer} d={dim} lr={lr:g} failed: {msg}")
                                if db is not None:
                                    db.add_run(kind="train", task=task.label(), mixer=mixer, session=session,
                                               config={**asdict(cfg), **label_cfg, "task": task.config(),
                                                       "preset": p.name},
                                               metrics={"metric": task.metric, "higher_is_better":
                                                        task.higher_is_better, task.metric: None, "error": msg},
                                               env=environment(device))
                                continue
                            m = res.metrics
                            say(f"[{k}/{n_runs}] {task.label()} {mixer} d={dim} lr={lr:g}: {m['metric']} "
                                f"{m[m['metric']]:.4f}{secondary_text(m)} ({m['steps']} steps, "
                                f"{m['train_time_s']:.1f} s"
                                + (", early stop" if m["stopped_early"] else "")
                                + (", time budget" if m.get("stopped_by_time") else "") + ")")
                            if db is not None:
                                db.add_run(kind="train", task=task.label(), mixer=mixer, session=session,
                                           config={**res.config, **label_cfg, "task": res.task, "preset": p.name,
                                                   "world_size": res.world_size},
                                           metrics=m, curves=res.curves, env=environment(res.device))
        if rank == 0 and speed and p.speed is not None:
            scfg = replace(p.speed, mixers=list(chosen), device=device,
                           mixer_kwargs={m: {k2: v for k2, v in kwargs_of[m].items() if k2 != "n_heads"}
                                         for m in chosen})
            t0 = time.perf_counter()
            say(f"speed sweep: {', '.join(['sdpa_dense', *chosen])} at N = {scfg.lengths}, batch {scfg.batch}, "
                f"width {scfg.dim}, {scfg.n_heads} head(s)")
            points = run_speed(scfg, progress=progress, log=say)
            say(f"speed sweep: {len(points)} points in {time.perf_counter() - t0:.1f} s "
                f"({sum(pt['status'] != 'ok' for pt in points)} not ok)")
            if db is not None:
                db.add_run(kind="speed", session=session, config={**config_dict(scfg), "preset": p.name},
                           metrics={"points": len(points)}, speed=points, env=environment(scfg.device))
        report_path = None
        board: tuple[list[str], list[list[str]]] = ([], [])
        recall: tuple[list[str], list[list[str]]] = ([], [])
        if db is not None:
            runs = db.runs(kind="train", session=session)
            points = db.speed_points(session=session)
            board = leaderboard(runs, points)
            recall = recall_table(runs)
            cut = [r for r in runs if r["metrics"].get("stopped_by_time")]
            if cut:
                notes.append(f"{len(cut)} of {len(runs)} training runs hit their time budget before their step "
                             f"budget (steps reached: {min(r['metrics']['steps'] for r in cut)}-"
                             f"{max(r['metrics']['steps'] for r in cut)}); on a faster or idle machine they train "
                             "further")
            if report:
                out_dir = Path(out) if out is not None else store_path.parent / "report"
                report_path = build_report(db, out_dir, session=session, title=command)
    finally:
        if db is not None:
            db.close()
    return CompareResult(session=session, store=store_path, report=report_path, leaderboard=board,
                         wall_s=time.perf_counter() - started, notes=notes, recall=recall)


def resolve_preset(preset: str | None, task: Task | None) -> Preset:
    """The preset named ``preset``, or :func:`task_preset` of ``task``: exactly one of them."""
    if (preset is None) == (task is None):
        raise ValueError(f"preset: give a preset or a task, not {'both' if task is not None else 'neither'} "
                         f"(preset={preset!r}, task={None if task is None else task.label()!r})")
    if task is not None:
        if not isinstance(task, Task):
            raise ValueError(f"task: expected an attnzoo.bench.tasks.Task, got {type(task).__name__}")
        return task_preset(task)
    return get_preset(preset)


def _apply_overrides(p: Preset, o: dict[str, Any]) -> Preset:
    known = {"dims", "lrs", "seq_lens", "epochs", "max_steps", "n_train", "n_test", "batch_size", "lengths", "seeds",
             "eval_every", "time_budget_s"}
    bad = sorted(set(o) - known)
    if bad:
        raise ValueError(f"overrides: unknown {bad}; valid: {', '.join(sorted(known))}")
    o = {k: v for k, v in o.items() if v is not None}
    if o.get("time_budget_s") == "none":  # explicitly no time budget
        for s in p.settings:
            s.time_budget_s = None
        del o["time_budget_s"]
    if "dims" in o:
        p.dims = list(o["dims"])
    if "lrs" in o:
        p.lrs = list(o["lrs"])
    if "seeds" in o:
        p.seeds = list(o["seeds"])
    if "seq_lens" in o:
        have = {s.task.seq_len: s for s in p.settings if isinstance(s.task, MQAR)}
        missing = sorted(set(o["seq_lens"]) - set(have))
        if missing:
            raise ValueError(f"seq_lens: preset {p.name!r} has MQAR settings at {sorted(have)}, not {missing}")
        p.settings = [s for s in p.settings if not isinstance(s.task, MQAR) or s.task.seq_len in o["seq_lens"]]
    for s in p.settings:
        for key in ("epochs", "max_steps", "n_train", "n_test", "batch_size", "eval_every", "time_budget_s"):
            if key in o:
                setattr(s, key, o[key])
    if "lengths" in o and p.speed is not None:
        p.speed = replace(p.speed, lengths=list(o["lengths"]))
    for v in p.dims:
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"dims: expected positive integers, got {p.dims!r}")
    if any(not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)) for v in p.lrs):
        raise ValueError(f"lrs: expected positive numbers, got {p.lrs!r}")
    return p
