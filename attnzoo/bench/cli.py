"""Command-line subcommands of the benchmark harness, hooked into ``attnzoo`` by :func:`add_subcommands`.

``attnzoo compare``, ``attnzoo train``, ``attnzoo bench speed``, ``attnzoo results list|show|export``
and ``attnzoo report``. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_subcommands"]

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
def _cmd_compare(args: argparse.Namespace) -> int:
    from attnzoo.bench.compare import run_compare

    overrides = {"dims": args.dims, "lrs": args.lrs, "seq_lens": args.seq_lens, "epochs": args.epochs,
                 "max_steps": args.max_steps, "n_train": args.n_train, "n_test": args.n_test,
                 "batch_size": args.batch_size, "lengths": args.lengths, "seeds": args.seeds}
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget if args.time_budget > 0 else _NO_BUDGET
    mixer_kwargs: dict[str, dict[str, Any]] = {}
    for spec in args.mixer_arg or []:
        if ":" not in spec:
            raise ValueError(f"--mixer-arg: expected MIXER:key=value, got {spec!r}")
        mixer, kv = spec.split(":", 1)
        k, v = _kv(kv)
        mixer_kwargs.setdefault(mixer, {})[k] = v
    res = run_compare(args.preset, mixers=args.mixers, store=args.store, out=args.out, report=not args.no_report,
                      speed=not args.no_speed, overrides=overrides, mixer_kwargs=mixer_kwargs, device=args.device,
                      progress=not args.no_progress)
    cols, rows = res.leaderboard
    if cols:
        _table(f"leaderboard ({args.preset}, session {res.session})", cols, rows)
    for note in res.notes:
        print(f"note: {note}")
    print(f"results: {res.store}" + (f"; report: {res.report}" if res.report else ""))
    print(f"wall time: {res.wall_s:.0f} s ({res.wall_s / 60:.1f} min)")
    return 0


def _add_compare(sub: Any) -> None:
    from attnzoo.bench.compare import PRESETS

    p = sub.add_parser("compare", help="train, measure, store and report mechanisms side by side (the main job)",
                       description="Train tiny models on synthetic tasks (MQAR...), sweep speed and memory against "
                                   "SDPA dense, store every run and write an HTML report with a leaderboard.")
    p.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="quick (minutes on a CPU), zoology (Zoology Figure 2), full (everything; GPU), pooling "
                        "(the poolers on MIL bags and set maximum)")
    p.add_argument("--mixers", nargs="+", metavar="SLUG", help="mixers to compare (default: the preset's)")
    p.add_argument("--mixer-arg", action="append", metavar="MIXER:KEY=VALUE",
                   help="an argument for one mixer, e.g. sliding_window:window=32 (repeatable)")
    p.add_argument("--store", metavar="PATH", help="results database (default ./attnzoo-results/results.sqlite)")
    p.add_argument("--out", metavar="DIR", help="report directory (default: beside the store, report/)")
    p.add_argument("--dims", nargs="+", type=int, metavar="D", help="model widths (override the preset)")
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning rates (override)")
    p.add_argument("--seq-lens", nargs="+", type=int, metavar="N", help="keep only these MQAR settings")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="training seeds (override)")
    p.add_argument("--epochs", type=int, help="epochs per run (override)")
    p.add_argument("--max-steps", type=int, help="steps per run (override)")
    p.add_argument("--n-train", type=int, help="training examples per task (override)")
    p.add_argument("--n-test", type=int, help="test examples per task (override)")
    p.add_argument("--batch-size", type=int, help="batch size (override)")
    p.add_argument("--lengths", nargs="+", type=int, metavar="N", help="speed sweep lengths (override)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="seconds per training run (override; 0 = no time budget, only the step budget)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed sweep")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(_cmd_compare))


# train ---------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from attnzoo.bench.store import environment, open_store
    from attnzoo.bench.tasks import get_task
    from attnzoo.bench.train import TrainConfig, dist_info, train

    task = get_task(args.task, **dict(args.task_arg or []))
    cfg = TrainConfig(mixer=args.mixer, mixer_kwargs=dict(args.mixer_arg or []), dim=args.dim, n_layers=args.layers,
                      positional=args.positional, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                      max_steps=args.max_steps, n_train=args.n_train, n_test=args.n_test, eval_every=args.eval_every,
                      early_stop=None if args.no_early_stop else 0.99, seed=args.seed, device=args.device)
    from attnzoo.bench.models import check_mixer

    check_mixer(cfg.mixer, task.needs(), what=f"task {task.label()}")  # before touching the store
    rank, _, _ = dist_info()
    db = open_store(args.store) if rank == 0 and not args.no_store else None
    try:
        res = train(task, cfg, progress=not args.no_progress, log=print if rank == 0 else None)
        if rank == 0:
            m = res.metrics
            print(f"{task.label()} {cfg.mixer}: {m['metric']} {m[m['metric']]:.4f} after {m['steps']} steps "
                  f"({m['train_time_s']:.1f} s, {res.world_size} process(es), {res.device})")
            if db is not None:
                run_id = db.add_run(kind="train", task=task.label(), mixer=cfg.mixer, session=args.session,
                                    config={**res.config, "task": res.task, "world_size": res.world_size},
                                    metrics=m, curves=res.curves, env=environment(res.device))
                print(f"stored as run {run_id} in {db.path}")
    finally:
        if db is not None:
            db.close()
    return 0


def _add_train(sub: Any) -> None:
    from attnzoo.bench.tasks import TASKS

    p = sub.add_parser("train", help="train one mixer on one task (runs under torchrun with DDP)")
    p.add_argument("--task", choices=sorted(TASKS), default="mqar")
    p.add_argument("--task-arg", action="append", type=_kv, metavar="KEY=VALUE",
                   help="a task option, e.g. seq_len=128 (repeatable)")
    p.add_argument("--mixer", default="mha")
    p.add_argument("--mixer-arg", action="append", type=_kv, metavar="KEY=VALUE", help="a mixer argument (repeatable)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--positional", default="learned", choices=["learned", "sinusoidal", "none"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=1_000)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--no-early-stop", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--store", metavar="PATH")
    p.add_argument("--no-store", action="store_true", help="do not record the run")
    p.add_argument("--session", help="group label stored with the run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guard(_cmd_train))


# bench speed ---------------------------------------------------------------------------------
def _cmd_speed(args: argparse.Namespace) -> int:
    from attnzoo.bench.speed import SpeedConfig, config_dict, run_speed
    from attnzoo.bench.store import environment, open_store

    cfg = SpeedConfig(mixers=args.mixers, lengths=args.lengths, modes=args.modes, dim=args.dim, n_heads=args.heads,
                      batch=args.batch, causal=not args.no_causal, repeats=args.repeats, warmup=args.warmup,
                      dtype=args.dtype, device=args.device, max_seconds=args.max_seconds)
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
    p = sub.add_parser("bench", help="benchmarks: speed and memory sweeps")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    s = bsub.add_parser("speed", help="forward and forward+backward time, peak memory and FLOPs vs SDPA dense")
    s.add_argument("--mixers", nargs="+", default=["mha"], metavar="SLUG")
    s.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096], metavar="N")
    s.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    s.add_argument("--dim", type=int, default=128)
    s.add_argument("--heads", type=int, default=2)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--no-causal", action="store_true", help="run the mixers non-causally")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    s.add_argument("--device", default="auto")
    s.add_argument("--max-seconds", type=float, default=60.0, help="skip points predicted to take longer per run")
    s.add_argument("--threads", type=int)
    s.add_argument("--store", metavar="PATH")
    s.add_argument("--no-store", action="store_true")
    s.add_argument("--session", help="group label stored with the sweep")
    s.add_argument("--no-progress", action="store_true")
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
    rows, failed = [], 0
    for s in slugs:
        try:
            res = check(s)
        except Exception as e:
            rows.append([s, *["build failed"] * 4, str(e)[:80]])
            failed += 1
            continue
        cells = []
        for pat in CAB_PATTERNS:
            r = res[pat]
            cells.append("-" if not r["declared"] else ("pass" if r["ok"] else "FAIL"))
            failed += r["declared"] and not r["ok"]
        notes = "; ".join(f"{p}: {r['detail']}" for p, r in res.items() if r["declared"] and not r["ok"])
        rows.append([s, *cells, notes[:100]])
    _table("CAB contract (declared patterns, run in float64; '-' = not declared)",
           ["mixer", "NS", "CS", "NC", "CC", "failures"], rows)
    return 1 if failed else 0


# results -------------------------------------------------------------------------------------
def _cmd_results(args: argparse.Namespace) -> int:
    from attnzoo.bench.store import open_store

    with open_store(args.store, create=False) as db:
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
            run = db.run(args.id)
            if args.json:
                print(json.dumps(run, indent=2, default=str))
                return 0
            rows = [[k, json.dumps(run[k], default=str) if isinstance(run[k], (dict, list)) else str(run[k])]
                    for k in ("id", "kind", "session", "created", "task", "mixer")]
            rows += [[f"config.{k}", json.dumps(v, default=str)] for k, v in run["config"].items()]
            rows += [[f"metrics.{k}", json.dumps(v, default=str)] for k, v in run["metrics"].items()]
            rows += [[f"env.{k}", str(v)] for k, v in run["env"].items()]
            rows.append(["curves", f"{len(run['curves'])} points: " + ", ".join(sorted({c[1] for c in run['curves']}))])
            if run["speed"]:
                rows.append(["speed", f"{len(run['speed'])} points"])
            _table(f"run {run['id']}", ["field", "value"], rows)
            for p in run["speed"]:
                print(f"  {p['mixer']:>20s} N={p['n']:<6d} {p['mode']:<8s} {p['status']:<8s} "
                      + ("" if p["time_s"] is None else f"{p['time_s'] * 1e3:10.2f} ms")
                      + ("" if p["ratio"] is None else f"  {p['ratio']:.2f}x SDPA"))
        else:  # export
            if args.output in (None, "-"):
                n = db.export_csv(sys.stdout, kind=args.kind or "train")
            else:
                with open(args.output, "w", newline="") as f:
                    n = db.export_csv(f, kind=args.kind or "train")
                print(f"wrote {n} rows to {args.output}", file=sys.stderr)
    return 0


def _add_results(sub: Any) -> None:
    p = sub.add_parser("results", help="the results store: list, show and export runs")
    rsub = p.add_subparsers(dest="results_command", metavar="ACTION", required=True)
    ls = rsub.add_parser("list", help="stored runs")
    ls.add_argument("--kind", choices=["train", "speed"])
    ls.add_argument("--session")
    ls.add_argument("--task")
    ls.add_argument("--mixer")
    ls.add_argument("--json", action="store_true")
    show = rsub.add_parser("show", help="one run: configuration, metrics, environment, curves, speed points")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    ex = rsub.add_parser("export", help="export runs as CSV")
    ex.add_argument("--csv", action="store_true", required=True, help="CSV output (the only format)")
    ex.add_argument("--kind", choices=["train", "speed"], default="train",
                    help="train: one row per run; speed: one row per speed point")
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
    with open_store(store, create=False) as db:
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


def add_subcommands(sub: Any) -> None:
    """Add ``compare``, ``train``, ``bench``, ``results`` and ``report`` to the ``attnzoo`` parser."""
    _add_compare(sub)
    _add_train(sub)
    _add_bench(sub)
    _add_results(sub)
    _add_report(sub)
