"""Command-line subcommands of the benchmark harness, hooked into ``attnzoo`` by :func:`add_subcommands`.

``attnzoo compare``, ``attnzoo train``, ``attnzoo bench speed``, ``attnzoo results list|show|export``
and ``attnzoo report``. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from attnzoo.cli_args import (
    check_device,
    check_fits,
    check_writable,
    float_in,
    int_in,
    seed_int,
    threads_int,
    training_bytes,
)

__all__ = ["add_subcommands"]

_SIZE = int_in(1)
_LR = float_in(0, 10, low_open=True)  # AdamW steps are about lr: beyond 10 every weight overflows

_NO_BUDGET = "none"


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as JSON when it is JSON (``16``, ``true``), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (ValueError, KeyError, StoreError) -> one clear line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from attnzoo.bench.store import StoreError

        threads = getattr(args, "threads", None)
        if threads:
            import torch

            torch.set_num_threads(threads)
        try:
            return fn(args)
        except (ValueError, KeyError, StoreError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"attnzoo {args.command}: error: {msg}", file=sys.stderr)
            return 2

    return run


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from attnzoo.cli import _print_table

    _print_table(title, columns, rows)


# compare -------------------------------------------------------------------------------------
def _compare_target(args: argparse.Namespace) -> tuple[str | None, Any]:
    """(preset name, task): ``--task`` (with its ``--task-arg``) or ``--preset`` (default quick), not both."""
    from attnzoo.bench.tasks import get_task

    if args.task is None:
        if args.task_arg:
            raise ValueError(f"--task-arg: options of a task given with --task; got {args.task_arg} without one")
        return args.preset or "quick", None
    if args.preset is not None:
        raise ValueError(f"--task: runs one task instead of a preset; got --preset {args.preset} as well")
    return None, get_task(args.task, **dict(args.task_arg or []))


def _check_compare(args: argparse.Namespace) -> None:
    from attnzoo.bench.compare import resolve_preset

    check_device("--device", args.device)
    check_writable("--store", args.store, make_folders=True)
    if args.out is not None:
        check_writable("--out", os.path.join(args.out, "report.html"), make_folders=True)
    p = resolve_preset(*_compare_target(args))
    dim = max(args.dims or p.dims)
    for s in p.settings:
        batch, n_train, n_test = (args.batch_size or s.batch_size, args.n_train or s.n_train, args.n_test or s.n_test)
        task = s.task
        need = training_bytes(vocab=max(task.vocab_size_in or 0, task.n_outputs), seq_len=task.seq_len, dim=dim,
                              n_layers=p.n_layers, batch_size=batch, n_examples=n_train + n_test)
        check_fits(f"{task.label()} at width {dim}, batch {batch}, {n_train} + {n_test} examples", need)


def _cmd_compare(args: argparse.Namespace) -> int:
    from attnzoo.bench.compare import run_compare

    _check_compare(args)

    overrides = {"dims": args.dims, "lrs": args.lrs, "seq_lens": args.seq_lens, "epochs": args.epochs,
                 "max_steps": args.max_steps, "n_train": args.n_train, "n_test": args.n_test,
                 "batch_size": args.batch_size, "lengths": args.lengths, "seeds": args.seeds}
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget if args.time_budget > 0 else _NO_BUDGET  # finite, >= 0
    mixer_kwargs: dict[str, dict[str, Any]] = {}
    for spec in args.mixer_arg or []:
        if ":" not in spec:
            raise ValueError(f"--mixer-arg: expected MIXER:key=value, got {spec!r}")
        mixer, kv = spec.split(":", 1)
        k, v = _kv(kv)
        mixer_kwargs.setdefault(mixer, {})[k] = v
    preset, task = _compare_target(args)
    res = run_compare(preset, task=task, mixers=args.mixers, store=args.store, out=args.out, report=not args.no_report,
                      speed=not args.no_speed, overrides=overrides, mixer_kwargs=mixer_kwargs, device=args.device,
                      progress=not args.no_progress, yes=args.yes, estimate=not args.no_estimate)
    cols, rows = res.leaderboard
    if cols:
        _table(f"leaderboard ({preset or task.label()}, session {res.session})", cols, rows)
    rcols, rrows = res.recall
    if rrows:
        _table("recall lost against mha (same task and width)", rcols, rrows)
    for note in res.notes:
        print(f"note: {note}")
    print(f"results: {res.store}" + (f"; report: {res.report}" if res.report else ""))
    print(f"wall time: {res.wall_s:.0f} s ({res.wall_s / 60:.1f} min)")
    return 0


def _add_compare(sub: Any) -> None:
    from attnzoo.bench.compare import PRESETS
    from attnzoo.bench.tasks import TASKS

    p = sub.add_parser("compare", help="train, measure, store and report mechanisms side by side (the main job)",
                       description="Train tiny models on synthetic tasks (MQAR...), sweep speed and memory against "
                                   "SDPA dense, store every run and write an HTML report with a leaderboard.")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="quick (minutes on a CPU; the default), zoology (Zoology Figure 2), full (everything; GPU), "
                        "pooling (the poolers on MIL bags and set maximum)")
    p.add_argument("--task", choices=sorted(TASKS),
                   help="one task instead of a preset (1000 steps at width 64; on a bag task the pooling preset's "
                        "recipe) (default: none, the preset runs)")
    p.add_argument("--task-arg", action="append", type=_kv, metavar="KEY=VALUE",
                   help="an option of --task, e.g. max_bag=64 (repeatable; default: the task's defaults)")
    p.add_argument("--mixers", "--poolers", dest="mixers", nargs="+", metavar="SLUG",
                   help="mixers to compare, poolers on a bag task (default: the preset's); a slug or a variant "
                        "SLUG[KEY=VALUE,...] (e.g. 'moba[top_k=1]'), stored and reported under its label")
    p.add_argument("--mixer-arg", "--pooler-arg", dest="mixer_arg", action="append", metavar="MIXER:KEY=VALUE",
                   help="an argument for one mixer or pooler, e.g. sliding_window:window=32 (repeatable; default: "
                        "none)")
    p.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    p.add_argument("--out", metavar="DIR", help="report directory (default: beside the store, report/)")
    p.add_argument("--dims", nargs="+", type=_SIZE, metavar="D", help="model widths (default: the preset's)")
    p.add_argument("--lrs", nargs="+", type=_LR, metavar="LR", help="learning rates in (0, 10] (default: the preset's)")
    p.add_argument("--seq-lens", nargs="+", type=_SIZE, metavar="N",
                   help="keep only these MQAR settings (default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=seed_int, metavar="S", help="training seeds (default: the preset's)")
    p.add_argument("--epochs", type=_SIZE, help="epochs per run (default: the preset's)")
    p.add_argument("--max-steps", type=_SIZE, help="steps per run (default: the preset's)")
    p.add_argument("--n-train", type=_SIZE, help="training examples per task (default: the preset's)")
    p.add_argument("--n-test", type=_SIZE, help="test examples per task (default: the preset's)")
    p.add_argument("--batch-size", type=_SIZE, help="batch size (default: the preset's)")
    p.add_argument("--lengths", nargs="+", type=_SIZE, metavar="N", help="speed sweep lengths (default: the preset's)")
    p.add_argument("--time-budget", type=float_in(0), metavar="SECONDS",
                   help="seconds per training run, a finite number >= 0; 0 = no time budget, only the step budget "
                        "(default: the preset's)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed sweep")
    p.add_argument("--yes", action="store_true",
                   help="run even when the estimate on a CPU is over an hour (default: refuse such a run)")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the timing probe and wall-time estimate printed before training")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=threads_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_cmd_compare))


# train ---------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from attnzoo.bench.store import environment, open_store
    from attnzoo.bench.tasks import get_task
    from attnzoo.bench.train import TrainConfig, dist_info, secondary_text, train

    task = get_task(args.task, **dict(args.task_arg or []))
    mixer = args.mixer if args.mixer is not None else ("abmil" if task.kind == "bag" else "mha")
    cfg = TrainConfig(mixer=mixer, mixer_kwargs=dict(args.mixer_arg or []), dim=args.dim, n_layers=args.layers,
                      positional=args.positional, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      max_steps=args.max_steps, n_train=args.n_train, n_test=args.n_test, eval_every=args.eval_every,
                      early_stop=None if args.no_early_stop else 0.99, seed=args.seed, device=args.device,
                      context_parallel=args.context_parallel)
    from attnzoo.bench.models import check_entry

    check_entry(cfg.mixer, task)  # a mixer for a sequence task, a pooler for a bag task; before touching the store
    if cfg.context_parallel > 1:
        from attnzoo.parallel.layout import check_length

        check_length(task.seq_len, cfg.context_parallel, cfg.context_layout, "--context-parallel: the task's seq_len")
        world = os.environ.get("WORLD_SIZE")  # set by torchrun; without it train() says what is missing
        if world is not None and int(world) % cfg.context_parallel:
            raise ValueError(f"--context-parallel: {cfg.context_parallel} must divide the number of processes, got "
                             f"{world} (torchrun --nproc_per_node)")
    check_device("--device", args.device)
    if not args.no_store:
        check_writable("--store", args.store, make_folders=True)
    check_fits(f"{task.label()} at --dim {cfg.dim}, --layers {cfg.n_layers}, --batch-size {cfg.batch_size}, "
               f"{cfg.n_train} + {cfg.n_test} examples",
               training_bytes(vocab=max(task.vocab_size_in or 0, task.n_outputs), seq_len=task.seq_len, dim=cfg.dim,
                              n_layers=cfg.n_layers, batch_size=cfg.batch_size, n_examples=cfg.n_train + cfg.n_test))
    _check_model(task, cfg)
    rank, _, _ = dist_info()
    db = open_store(args.store) if rank == 0 and not args.no_store else None
    try:
        res = train(task, cfg, progress=not args.no_progress, log=print if rank == 0 else None)
        if rank == 0:
            m = res.metrics
            print(f"{task.label()} {cfg.mixer}: {m['metric']} {m[m['metric']]:.4f}{secondary_text(m)} after "
                  f"{m['steps']} steps ({m['train_time_s']:.1f} s, {res.world_size} process(es), {res.device})")
            if db is not None:
                run_id = db.add_run(kind="train", task=task.label(), mixer=cfg.mixer, session=args.session,
                                    config={**res.config, "task": res.task, "world_size": res.world_size},
                                    metrics=m, curves=res.curves, env=environment(res.device))
                print(f"stored as run {run_id} in {db.path}")
    finally:
        if db is not None:
            db.close()
    return 0


def _check_model(task: Any, cfg: Any) -> None:
    """Build the model on the meta device (no memory, no work): a bad ``--mixer-arg`` fails here. A bag
    classifier is small and probes its pooler with a forward pass: it is built on the CPU."""
    import contextlib

    import torch

    from attnzoo.bench.models import build_model

    option = "--pooler-arg: pooler" if task.kind == "bag" else "--mixer-arg: mixer"
    try:
        with torch.device("meta") if task.kind != "bag" else contextlib.nullcontext():
            build_model(task, cfg.mixer, dim=cfg.dim, n_layers=cfg.n_layers, mixer_kwargs=cfg.mixer_kwargs,
                        positional=cfg.positional, mlp_ratio=cfg.mlp_ratio)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{option} {cfg.mixer!r} with {cfg.mixer_kwargs}: {e}") from None
    except Exception:  # noqa: BLE001  (a constructor the meta device cannot run: training checks it itself)
        pass


def _add_train(sub: Any) -> None:
    from attnzoo.bench.tasks import TASKS

    bags = ", ".join(sorted(name for name, cls in TASKS.items() if cls.kind == "bag"))
    p = sub.add_parser("train", help="train one mixer on one task (runs under torchrun with DDP)",
                       description="Train a tiny model around one registered mixer on one synthetic task and store "
                                   f"the run (configuration, metrics, curves, environment); on the bag tasks ({bags}) "
                                   "a bag classifier around one registered pooler.")
    p.add_argument("--task", choices=sorted(TASKS), default="mqar", help="the task")
    p.add_argument("--task-arg", action="append", type=_kv, metavar="KEY=VALUE",
                   help="a task option, e.g. seq_len=128 (repeatable; default: the task's defaults)")
    p.add_argument("--mixer", "--pooler", dest="mixer", metavar="SLUG",
                   help=f"registered mixer slug (attnzoo list --type mixer); on the bag tasks ({bags}) a pooler "
                        "(attnzoo list --type pooler) (default: mha; abmil on a bag task)")
    p.add_argument("--mixer-arg", "--pooler-arg", dest="mixer_arg", action="append", type=_kv, metavar="KEY=VALUE",
                   help="an argument of the mixer or pooler (repeatable; default: none)")
    p.add_argument("--dim", type=_SIZE, default=64, help="model width")
    p.add_argument("--layers", type=_SIZE, default=2,
                   help="number of blocks (on a bag task: layers of the instance encoder)")
    p.add_argument("--positional", choices=["learned", "sinusoidal", "none"],
                   help="position embeddings (default: learned; none on a bag task, whose instances are a set)")
    p.add_argument("--lr", type=_LR, default=1e-3, help="AdamW learning rate, in (0, 10]")
    p.add_argument("--batch-size", type=_SIZE, default=64, help="examples per step")
    p.add_argument("--epochs", type=_SIZE, default=1, help="passes over the training set")
    p.add_argument("--max-steps", type=_SIZE, help="stop after this many steps (default: the epochs' steps)")
    p.add_argument("--n-train", type=_SIZE, default=10_000, help="training examples")
    p.add_argument("--n-test", type=_SIZE, default=1_000, help="test examples")
    p.add_argument("--eval-every", type=_SIZE, help="steps between evaluations (default: once per epoch)")
    p.add_argument("--no-early-stop", action="store_true", help="do not stop once the test accuracy exceeds 0.99")
    p.add_argument("--seed", type=seed_int, default=0, help="model seed, in [0, 2**63 - 1]")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--context-parallel", type=_SIZE, default=1, metavar="P",
                   help="split each sequence across P processes with ring attention (under torchrun; P must divide "
                        "the number of processes, data parallel across the groups; language-model tasks, mha "
                        "mixers)")
    p.add_argument("--threads", type=threads_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    p.add_argument("--no-store", action="store_true", help="do not record the run")
    p.add_argument("--session", help="group label stored with the run (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_guard(_cmd_train))


# bench speed ---------------------------------------------------------------------------------
def _cmd_speed(args: argparse.Namespace) -> int:
    from attnzoo.bench.speed import SpeedConfig, config_dict, run_speed
    from attnzoo.bench.store import environment, open_store

    cfg = SpeedConfig(mixers=args.mixers, lengths=args.lengths, modes=args.modes, dim=args.dim, n_heads=args.heads,
                      batch=args.batch, causal=not args.no_causal, repeats=args.repeats, warmup=args.warmup,
                      dtype=args.dtype, device=args.device, max_seconds=args.max_seconds)
    check_device("--device", args.device)
    if not args.no_store:
        check_writable("--store", args.store, make_folders=True)
    width = {"float64": 8, "float32": 4}.get(args.dtype, 2)
    check_fits(f"bench speed at --dim {args.dim}, --batch {args.batch}, N={min(args.lengths)}",
               (16 * args.dim * args.dim + 8 * args.batch * min(args.lengths) * args.dim) * width)
    db = open_store(args.store) if not args.no_store else None
    try:
        points = run_speed(cfg, progress=not args.no_progress, log=print)
        rows = []
        for p in points:
            d = p["detail"]
            rows.append([p["mixer"], str(p["n"]), p["mode"], p["status"],
                         "" if p["time_s"] is None else f"{p['time_s'] * 1e3:.2f}",
                         "" if p["ratio"] is None else f"{p['ratio']:.2f}x",
                         "" if p["peak_bytes"] is None else f"{p['peak_bytes'] / 2**20:.1f}",
                         "" if d.get("memory_ratio") is None else f"{d['memory_ratio']:.2f}x",
                         "" if p["flops"] is None else f"{p['flops']:.3g}",
                         (d.get("reason") or d.get("error") or "")[:60]])
        _table(f"speed (batch {cfg.batch}, width {cfg.dim}, {cfg.n_heads} heads, {cfg.dtype}, causal={cfg.causal})",
               ["mixer", "N", "mode", "status", "ms", "vs SDPA dense", "peak MiB", "mem vs SDPA", "FLOPs", "note"],
               rows)
        if db is not None:
            rid = db.add_run(kind="speed", session=args.session, config=config_dict(cfg),
                             metrics={"points": len(points)}, speed=points, env=environment(cfg.device))
            print(f"stored as run {rid} in {db.path}")
    finally:
        if db is not None:
            db.close()
    return 0


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed and memory sweeps, the CAB contract")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    s = bsub.add_parser("speed", help="forward and forward+backward time, peak memory and FLOPs vs SDPA dense")
    s.add_argument("--mixers", nargs="+", default=["mha"], metavar="SLUG", help="registered mixer slugs")
    s.add_argument("--lengths", nargs="+", type=_SIZE, default=[256, 1024, 4096], metavar="N",
                   help="sequence lengths (points that cannot fit in memory are recorded as oom or skipped)")
    s.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"], help="what to time")
    s.add_argument("--dim", type=_SIZE, default=128, help="model width")
    s.add_argument("--heads", type=_SIZE, default=2, help="attention heads (must divide --dim)")
    s.add_argument("--batch", type=_SIZE, default=1, help="batch size")
    s.add_argument("--no-causal", action="store_true", help="run the mixers non-causally")
    s.add_argument("--repeats", type=int_in(1, 1000), default=3, help="timed runs per point (the median is kept)")
    s.add_argument("--warmup", type=int_in(0, 100), default=1, help="untimed runs per point first")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                   help="input and weight dtype")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    s.add_argument("--max-seconds", type=float_in(0, low_open=True), default=60.0,
                   help="skip points predicted to take longer per run")
    s.add_argument("--threads", type=threads_int, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    s.add_argument("--no-store", action="store_true", help="do not record the sweep")
    s.add_argument("--session", help="group label stored with the sweep (default: none)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_guard(_cmd_speed))
    c = bsub.add_parser("cab", help="CAB contract: run each declared {causal, noncausal} x {self, cross} pattern")
    c.add_argument("--mixers", nargs="+", metavar="SLUG", help="mixers to check (default: every registered one)")
    c.set_defaults(func=_guard(_cmd_cab))


def _cmd_cab(args: argparse.Namespace) -> int:
    import attnzoo
    from attnzoo.bench.cab import CAB_PATTERNS, check
    from attnzoo.bench.models import check_mixer, mixer_slugs

    slugs = args.mixers or [s for s in mixer_slugs() if attnzoo.spec(s).slug == s]
    for s in slugs:
        check_mixer(s)
    rows, failures, not_applicable = [], [], []
    for s in slugs:
        try:
            res = check(s)
        except Exception as e:  # noqa: BLE001  (a mixer that cannot be built is a failure, reported in full)
            rows.append([s, *["build failed"] * 4])
            failures.append(f"{s}: {type(e).__name__}: {e}")
            continue
        cells = []
        for pat in CAB_PATTERNS:
            r = res[pat]
            if not r["declared"]:
                cells.append("-")
            elif r.get("applicable") is False:
                cells.append("n/a")
                not_applicable.append(f"{s} {pat}: {r['detail']}")
            elif r["ok"]:
                cells.append("pass")
            else:
                cells.append("FAIL")
                failures.append(f"{s} {pat}: {r['detail']}")
        rows.append([s, *cells])
    _table("CAB contract (declared patterns, run in float64; '-' = not declared, n/a = not applicable)",
           ["mixer", "NS", "CS", "NC", "CC"], rows)
    for title, lines in (("not applicable", not_applicable), ("failures", failures)):
        if lines:
            print(f"{title}:")
            for line in lines:
                print(f"  {line}")
    print(f"{len(slugs)} mixers: {len(failures)} failure(s), {len(not_applicable)} pattern(s) not applicable")
    return 1 if failures else 0


# results -------------------------------------------------------------------------------------
def _write_export(args: argparse.Namespace, db: Any, out: Any) -> int:
    if args.format == "json":
        runs = [db.run(r["id"]) for r in db.runs(kind=args.kind)]
        json.dump(runs, out, indent=2, default=str)
        out.write("\n")
        return len(runs)
    return db.export_csv(out, kind=args.kind)


def _export(args: argparse.Namespace, db: Any) -> None:
    if args.output in (None, "-"):
        _write_export(args, db, sys.stdout)
        return
    n = db.export_file(os.path.abspath(args.output), lambda f: _write_export(args, db, f))
    print(f"wrote {n} {'rows' if args.format == 'csv' else 'runs'} to {args.output}", file=sys.stderr)


def _show(args: argparse.Namespace, db: Any) -> None:
    run = db.run(args.id)
    if args.json:
        print(json.dumps(run, indent=2, default=str))
        return
    rows = [[k, "" if run[k] is None else str(run[k])] for k in ("id", "kind", "session", "created", "task", "mixer")]
    rows += [[f"config.{k}", json.dumps(v, default=str)] for k, v in run["config"].items()]
    rows += [[f"metrics.{k}", json.dumps(v, default=str)] for k, v in run["metrics"].items()]
    rows += [[f"env.{k}", str(v)] for k, v in run["env"].items()]
    if run["curves"]:
        names = sorted({c[1] for c in run["curves"]})
        rows.append(["curves", f"{len(run['curves'])} points: {', '.join(names)}"])
    _table(f"run {run['id']} ({run['kind']})", ["field", "value"], rows)
    if run["speed"]:
        _table(f"speed points of run {run['id']} ({len(run['speed'])})",
               ["mixer", "N", "mode", "status", "ms", "vs SDPA dense", "peak MiB", "note"],
               [[p["mixer"], str(p["n"]), p["mode"], p["status"],
                 "" if p["time_s"] is None else f"{p['time_s'] * 1e3:.2f}",
                 "" if p["ratio"] is None else f"{p['ratio']:.2f}x",
                 "" if p.get("peak_bytes") is None else f"{p['peak_bytes'] / 2**20:.1f}",
                 str((p.get("detail") or {}).get("reason") or (p.get("detail") or {}).get("error") or "")]
                for p in run["speed"]])


def _cmd_results(args: argparse.Namespace) -> int:
    from attnzoo.bench.store import open_store

    if args.results_command == "export":
        if getattr(args, "csv", False):
            args.format = "csv"
        if args.output not in (None, "-"):
            check_writable("--output", args.output)
    with open_store(args.store, readonly=True) as db:
        if args.results_command == "list":
            runs = db.runs(kind=args.kind, session=args.session, task=args.task, mixer=args.mixer)
            if args.json:
                print(json.dumps(runs, indent=2, default=str))
                return 0
            rows = []
            for r in runs:
                m = r["metrics"]
                metric = m.get("metric")
                value = m.get(metric) if metric else None
                summary = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else (
                    f"{m.get('points')} points" if r["kind"] == "speed" else f"failed: {m.get('error', '')}"[:60])
                rows.append([str(r["id"]), r["kind"], r["created"], r["session"] or "", r["task"] or "",
                             r["mixer"] or "", str(r["config"].get("dim", "")), str(r["config"].get("lr", "")),
                             summary])
            _table(f"runs in {db.path} ({len(rows)})",
                   ["id", "kind", "created (UTC)", "session", "task", "mixer", "dim", "lr", "result"], rows)
        elif args.results_command == "show":
            _show(args, db)
        else:
            _export(args, db)
    return 0


def _add_results(sub: Any) -> None:
    p = sub.add_parser("results", help="the results store: list, show and export runs")
    rsub = p.add_subparsers(dest="results_command", metavar="ACTION", required=True)
    ls = rsub.add_parser("list", help="stored runs")
    ls.add_argument("--kind", choices=["train", "speed"], help="only runs of this kind (default: every kind)")
    ls.add_argument("--session", help="only this session (default: all)")
    ls.add_argument("--task", help="only this task label (default: all)")
    ls.add_argument("--mixer", help="only this mixer (default: all)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = rsub.add_parser("show", help="one run: configuration, metrics, environment, curves, speed points")
    show.add_argument("id", type=_SIZE, help="run id (attnzoo results list)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    ex = rsub.add_parser("export", help="export runs of every kind as CSV (default) or JSON",
                         description="CSV: one row per run of every kind (config.*, metrics.*, env.* columns); with "
                                     "--kind speed one row per speed point. JSON: every run in full, with its "
                                     "curves and speed points.")
    ex.add_argument("--format", choices=["csv", "json"], default="csv", help="output format")
    ex.add_argument("--csv", action="store_true", help=argparse.SUPPRESS)  # the former spelling of --format csv
    ex.add_argument("--kind", choices=["train", "speed"],
                    help="only runs of this kind; speed in CSV: one row per speed point (default: every kind)")
    ex.add_argument("--output", "-o", metavar="PATH", help="file to write (default: stdout)")
    for q in (ls, show, ex):
        q.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    p.set_defaults(func=_guard(_cmd_results))


# report --------------------------------------------------------------------------------------
def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attnzoo.bench.report import build_report
    from attnzoo.bench.store import DEFAULT_STORE, open_store

    store = Path(args.store) if args.store else DEFAULT_STORE
    out_dir = Path(args.out) if args.out else store.parent / "report"
    check_writable("--out", out_dir / "report.html", make_folders=True)
    with open_store(store, readonly=True) as db:
        if args.session and args.session not in db.sessions():
            raise ValueError(f"--session: no session {args.session!r}; stored sessions: {', '.join(db.sessions())}")
        out = args.out or store.parent / "report"
        path = build_report(db, out, session=args.session, all_sessions=args.all)
    print(f"report: {path}")
    return 0


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="HTML report with plots and a leaderboard from the results store")
    p.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    p.add_argument("--session", help="report this session (default: the latest)")
    p.add_argument("--all", action="store_true", help="report every stored run")
    p.add_argument("--out", metavar="DIR", help="output directory (default: beside the store, report/)")
    p.set_defaults(func=_guard(_cmd_report))


_BUILDERS = {"compare": _add_compare, "train": _add_train, "bench": _add_bench, "results": _add_results,
             "report": _add_report}


def add_subcommands(sub: Any, only: Iterable[str] | None = None) -> None:
    """Add ``compare``, ``train``, ``bench``, ``results`` and ``report`` (or those in ``only``) to the
    ``attnzoo`` parser."""
    for name, builder in _BUILDERS.items():
        if only is None or name in only:
            builder(sub)
