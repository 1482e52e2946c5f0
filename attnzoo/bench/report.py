"""``attnzoo report``: a self-contained HTML page and PNG plots from the results store.

Plots (matplotlib, the optional extra ``attnzoo[report]``; without it the page has the tables
only): accuracy against model width per mechanism, one panel per task setting (the layout of
Zoology's Figure 2, best over learning rates); test metric against training step; time and peak
memory against sequence length (log-log, SDPA dense dashed). Tables: a leaderboard, every
training run, every speed point, and the environment. Every string that comes from the store
(mixer names, task labels, configurations, environment) is HTML-escaped; the images are
embedded as data URIs so the page stands alone, and written beside it as PNG files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnzoo.bench.speed import BASELINE
from attnzoo.bench.store import ResultsStore

__all__ = ["RECALL_BASELINE", "build_report", "efficiency_length", "leaderboard", "measured_crossover",
           "best_by_setting", "recall_loss", "recall_table", "seed_stats", "seed_stats_by_width", "select_runs"]


# Data ------------------------------------------------------------------------------------------
def select_runs(store: ResultsStore, session: str | None = None, *, all_sessions: bool = False
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(train runs, speed points, session) of ``session`` (default: the latest one; every run with ``all_sessions``)."""
    if not all_sessions and session is None:
        sessions = store.sessions()
        session = sessions[-1] if sessions else None
    if all_sessions:
        session = None
    runs = store.runs(kind="train", session=session)
    points = store.speed_points(session=session) if session is not None else store.speed_points()
    return runs, points, session


def _natural(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value (``seq_len=64`` before ``seq_len=128``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _metric(run: dict[str, Any]) -> tuple[str, float | None, bool]:
    m = run["metrics"]
    name = m.get("metric") or ("accuracy" if "accuracy" in m else "mse")
    higher = m.get("higher_is_better", name != "mse")
    v = m.get(name)
    return name, (None if v is None else float(v)), bool(higher)


def best_by_setting(runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(task label, mixer, dim) -> the run with the best metric over learning rates (and seeds)."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in runs:
        name, v, higher = _metric(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = (r["task"], r["mixer"], int(r["config"].get("dim", 0)))
        cur = best.get(key)
        if cur is None or (v > _metric(cur)[1] if higher else v < _metric(cur)[1]):
            best[key] = r
    return best


NOT_LEARNED_BELOW = 0.2  # a task whose best mechanism stays below this accuracy was not learned in budget


def _seed_groups(runs: list[dict[str, Any]]) -> tuple[dict[tuple[str, str, int, float], list[float]], dict[str, bool]]:
    """(task label, mixer, width, lr) -> the metric of each seed; task label -> higher is better."""
    groups: dict[tuple[str, str, int, float], list[float]] = defaultdict(list)
    higher_of: dict[str, bool] = {}
    for r in runs:
        _name, v, higher = _metric(r)
        if v is None or math.isnan(v):
            continue
        higher_of[r["task"]] = higher
        groups[(r["task"], r["mixer"], int(r["config"].get("dim", 0)), float(r["config"].get("lr", 0.0)))].append(v)
    return groups, higher_of


def _best_over(groups: dict[tuple[str, str, int, float], list[float]], higher_of: dict[str, bool],
               key: Callable[[tuple[str, str, int, float]], tuple[Any, ...]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for g, vals in groups.items():
        mean = sum(vals) / len(vals)
        std = (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        higher = higher_of[g[0]]
        cur = out.get(key(g))
        if cur is None or (mean > cur["mean"] if higher else mean < cur["mean"]):
            out[key(g)] = {"mean": mean, "std": std, "n": len(vals), "higher": higher, "dim": g[2], "lr": g[3]}
    return out


def seed_stats(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task label, mixer) -> the best configuration (width, lr) by mean over seeds: ``mean``,
    ``std`` (sample standard deviation over seeds, 0 for one seed), ``n`` seeds, ``higher``."""
    groups, higher_of = _seed_groups(runs)
    return _best_over(groups, higher_of, lambda g: (g[0], g[1]))


def seed_stats_by_width(runs: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(task label, mixer, width) -> the best learning rate by mean over seeds, as :func:`seed_stats`."""
    groups, higher_of = _seed_groups(runs)
    return _best_over(groups, higher_of, lambda g: (g[0], g[1], g[2]))


def _mean_std(vals: list[float]) -> tuple[float, float]:
    mean = sum(vals) / len(vals)
    return mean, (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0


def secondary_names(runs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Task label -> the secondary metrics its runs report (``metrics["secondary_metrics"]``, in order)."""
    out: dict[str, list[str]] = {}
    for r in runs:
        for name in r["metrics"].get("secondary_metrics") or []:
            if name not in out.setdefault(r["task"], []):
                out[r["task"]].append(name)
    return out


def _of_best(runs: list[dict[str, Any]], best: dict[str, Any] | None, task: str, mixer: str,
             name: str) -> list[float]:
    """The metric ``name`` of the runs (seeds) of the configuration ``best`` ranked ``mixer`` by on ``task``."""
    if best is None:
        return []
    vals = [r["metrics"].get(name) for r in runs if r["task"] == task and r["mixer"] == mixer
            and int(r["config"].get("dim", 0)) == best["dim"] and float(r["config"].get("lr", 0.0)) == best["lr"]
            and _metric(r)[1] is not None]
    return [float(v) for v in vals if isinstance(v, (int, float)) and not math.isnan(v)]


def _secondary(runs: list[dict[str, Any]], best: dict[str, Any] | None, task: str, mixer: str, name: str) -> str:
    """The secondary metric ``name`` over the seeds of the configuration ``best`` ranked ``mixer`` by on
    ``task`` ("n/a" where the runs have none, e.g. a localisation AUC of a pooler without weights)."""
    if best is None:
        return ""
    vals = _of_best(runs, best, task, mixer, name)
    if not vals:
        return "n/a"
    mean, std = _mean_std(vals)
    return f"{mean:.3f} ± {std:.3f}" if len(vals) > 1 else f"{mean:.3f}"


def _pm(s: dict[str, Any] | None) -> str:
    if s is None:
        return ""
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def leaderboard(runs: list[dict[str, Any]], points: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows: per mechanism, its metric per task as mean ± standard deviation over seeds
    (best width and learning rate by the mean), followed by the task's secondary metrics (the bag and
    localisation AUC of the MIL task) of that configuration, the mean accuracy over the tasks some mechanism
    learned, forward+backward time and memory against SDPA (causal when the sweep is) at the
    longest length both ran, and the mean training time of those best configurations' runs. A task where
    every mechanism stays below :data:`NOT_LEARNED_BELOW` accuracy is labelled "not learned in budget" and
    does not count; a mechanism with no learned task is not ranked ("-"). Sorted by mean accuracy, then by
    time."""
    stats = seed_stats(runs)
    tasks = sorted({k[0] for k in stats}, key=_natural)
    mixers = sorted({k[1] for k in stats} | {p["mixer"] for p in points if p["mixer"] != BASELINE})
    learned = {t: not all(s["higher"] and s["mean"] < NOT_LEARNED_BELOW for (t2, _), s in stats.items() if t2 == t)
               for t in tasks}
    speed_cols = _speed_summary(points)
    extra = secondary_names(runs)
    task_cols = []
    for t in tasks:
        task_cols += [t if learned[t] else f"{t} (not learned in budget)", *[f"{t} {x}" for x in extra.get(t, [])]]
    columns = ["#", "mechanism", *task_cols,
               "mean acc (learned tasks)", "fwd+bwd vs SDPA causal", "memory vs SDPA causal", "at N",
               "train time per run (s)"]
    rows = []
    for m in mixers:
        accs = [stats[(t, m)]["mean"] for t in tasks if (t, m) in stats and learned[t] and stats[(t, m)]["higher"]]
        mean = sum(accs) / len(accs) if accs else None
        s = speed_cols.get(m, {})
        cells = []
        for t in tasks:
            cells += [_pm(stats.get((t, m))),
                      *[_secondary(runs, stats.get((t, m)), t, m, x) for x in extra.get(t, [])]]
        times = [v for t in tasks for v in _of_best(runs, stats.get((t, m)), t, m, "train_time_s")]
        rows.append((mean, s.get("ratio", math.inf), [
            m, *cells, _fmt(mean), _ratio(s.get("ratio")),
            _ratio(s.get("memory_ratio")), str(s.get("n", "")) if s else "",
            f"{sum(times) / len(times):.1f}" if times else ""]))
    rows.sort(key=lambda r: (r[0] is None, -(r[0] or 0.0), r[1]))
    out, rank = [], 0
    for mean, _, cells in rows:
        if mean is not None:
            rank += 1
        out.append([str(rank) if mean is not None else "-", *cells])
    return columns, out


RECALL_BASELINE = "mha"


def recall_loss(runs: list[dict[str, Any]], baseline: str = RECALL_BASELINE) -> list[dict[str, Any]]:
    """What each mechanism loses against ``baseline`` (a mixer name as stored: ``mha``) at the same task and width.

    For every (task, width) where ``baseline`` has runs of a higher-is-better metric (MQAR's accuracy is its
    recall), and every other mechanism with runs there: both at their best learning rate by the mean over seeds
    (:func:`seed_stats_by_width`); ``lost = baseline mean - mean`` (positive: the mechanism recalls less),
    ``se`` its standard error ``sqrt(sd^2/n + sd_base^2/n_base)`` (0 with one seed each), ``kept = mean /
    baseline mean``, the per-seed ``values`` (by seed) and ``built`` (the entry and arguments the runs were built with).
    Rows ordered by task, width, then mechanism."""
    stats = seed_stats_by_width(runs)
    by_seed = sorted(runs, key=lambda r: r["config"].get("seed", 0))
    out = []
    for (task, mixer, dim), st in stats.items():
        base = stats.get((task, baseline, dim))
        if mixer == baseline or base is None or not st["higher"]:
            continue
        cfgs = [r["config"] for r in runs if r["task"] == task and r["mixer"] == mixer
                and int(r["config"].get("dim", 0)) == dim and float(r["config"].get("lr", 0.0)) == st["lr"]]
        kw = (cfgs[0].get("mixer_kwargs") or {}) if cfgs else {}
        built = f"{cfgs[0].get('mixer', mixer)}(" + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")" \
            if cfgs else ""
        out.append({"task": task, "mixer": mixer, "dim": dim, "mean": st["mean"], "std": st["std"], "n": st["n"],
                    "base_mean": base["mean"], "base_std": base["std"], "base_n": base["n"],
                    "lost": base["mean"] - st["mean"],
                    "se": math.sqrt(st["std"] ** 2 / st["n"] + base["std"] ** 2 / base["n"]),
                    "kept": st["mean"] / base["mean"] if base["mean"] else None,
                    "values": _of_best(by_seed, st, task, mixer, _metric_name(runs, task)), "built": built})
    out.sort(key=lambda r: (_natural(r["task"]), r["dim"], _natural(r["mixer"])))
    return out


def _metric_name(runs: list[dict[str, Any]], task: str) -> str:
    return next((_metric(r)[0] for r in runs if r["task"] == task), "accuracy")


def recall_table(runs: list[dict[str, Any]], baseline: str = RECALL_BASELINE) -> tuple[list[str], list[list[str]]]:
    """:func:`recall_loss` as table columns and rows (strings); no rows when nothing shares a task and width
    with ``baseline``."""
    columns = ["task", "width", "mechanism", "built with", f"{baseline} (mean ± sd)", "mechanism (mean ± sd)",
               "per seed (seed order)", f"lost ({baseline} − mechanism) ± se", f"kept (/ {baseline})"]
    rows = [[r["task"], str(r["dim"]), r["mixer"], r["built"],
             _pm({"mean": r["base_mean"], "std": r["base_std"], "n": r["base_n"]}), _pm(r),
             " / ".join(f"{v:.3f}" for v in r["values"]), f"{r['lost']:+.3f} ± {r['se']:.3f}",
             "" if r["kept"] is None else f"{r['kept']:.2f}"] for r in recall_loss(runs, baseline)]
    return columns, rows


def _speed_summary(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mixer: time and memory ratio at the longest N where it and SDPA dense both ran (fwd+bwd)."""
    out: dict[str, dict[str, Any]] = {}
    ok = [p for p in points if p["status"] == "ok" and p["ratio"] is not None]
    for mode in ("fwd+bwd", "fwd"):
        for p in sorted((p for p in ok if p["mode"] == mode), key=lambda p: p["n"]):
            if p["mixer"] == BASELINE or (p["mixer"] in out and out[p["mixer"]]["mode"] != mode):
                continue
            out[p["mixer"]] = {"n": p["n"], "mode": mode, "ratio": p["ratio"],
                               "memory_ratio": p["detail"].get("memory_ratio")}
    return out


def efficiency_length(points: list[dict[str, Any]], mixer: str, *, mode: str = "fwd",
                      key: str = "time_s") -> float | None:
    """CAB's efficiency length: the N where a quadratic fit of SDPA dense's cost meets a linear fit of
    ``mixer``'s cost (``key``: ``time_s`` or ``peak_bytes``), from the points both measured.

    Returns the smallest positive crossing beyond which the mixer is cheaper, ``0.0`` when it is
    cheaper at every length, or None (fewer than 3 common points, or no crossing: never cheaper).
    """
    import numpy as np

    def series(name: str) -> dict[int, float]:
        return {p["n"]: float(p[key]) for p in points
                if p["mixer"] == name and p["mode"] == mode and p["status"] == "ok" and p[key]}

    base, mine = series(BASELINE), series(mixer)
    ns = sorted(set(base) & set(mine))
    if len(ns) < 3:
        return None
    x = np.array(ns, dtype=np.float64)
    q = np.polyfit(x, [base[n] for n in ns], 2)
    lin = np.polyfit(x, [mine[n] for n in ns], 1)
    diff = np.array([q[0], q[1] - lin[0], q[2] - lin[1]])  # vanilla - efficient, as a polynomial in N
    roots = sorted(r.real for r in np.roots(diff) if abs(r.imag) < 1e-9 and r.real > 0)
    if diff[0] <= 0:
        return None  # the quadratic term does not dominate: no crossing to report
    if not roots:
        return 0.0
    return float(roots[-1])


def _fit_cell(fit: float | None, ns: list[int]) -> str:
    """A CAB fit as a table cell: an extrapolation past the longest measured length says so."""
    if fit is None or not ns:
        return ""
    if fit == 0.0:
        return f"< {min(ns)}"
    if fit > max(ns):
        return f"{fit:.0f} (extrapolated; measured to {max(ns)})"
    return f"{fit:.0f}"


def measured_crossover(points: list[dict[str, Any]], mixer: str, *, mode: str = "fwd",
                       key: str = "time_s") -> int | None:
    """The smallest measured N from which ``mixer`` costs less than SDPA dense at every longer measured N."""
    base = {p["n"]: p[key] for p in points if p["mixer"] == BASELINE and p["mode"] == mode and p["status"] == "ok"}
    mine = {p["n"]: p[key] for p in points if p["mixer"] == mixer and p["mode"] == mode and p["status"] == "ok"}
    ns = sorted(n for n in set(base) & set(mine) if base[n] and mine[n])
    best = None
    for n in reversed(ns):
        if mine[n] < base[n]:
            best = n
        else:
            break
    return best


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _ratio(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _bytes(v: int | None) -> str:
    if v is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


# Plots -----------------------------------------------------------------------------------------
def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


_PALETTE: dict[str, str] = {}


def _color(mixer: str) -> str | None:
    """One colour per mechanism across every plot of a report (SDPA dense is black)."""
    if mixer == BASELINE:
        return "black"
    if mixer not in _PALETTE:
        cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"]
        _PALETTE[mixer] = cycle[len(_PALETTE) % len(cycle)]
    return _PALETTE[mixer]


def _accuracy_figure(plt: Any, runs: list[dict[str, Any]]) -> bytes | None:
    stats = seed_stats_by_width(runs)
    tasks = sorted({k[0] for k in stats}, key=_natural)
    if not tasks:
        return None
    metric_of = {r["task"]: _metric(r)[0] for r in runs}
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        by_mixer: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for (t, mixer, dim), st in sorted(stats.items()):
            if t == task:
                by_mixer[mixer].append((dim, st["mean"], st["std"]))
        for mixer, pts in sorted(by_mixer.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=mixer, color=_color(mixer))
        metric = metric_of.get(task, "accuracy")
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("model width (d_model)")
        ax.set_ylabel(f"test {metric} (mean ± sd over seeds)")
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Test metric vs model width (best learning rate by the mean over seeds; bars: sd over seeds)")
    return _png(fig)


def _curves_figure(plt: Any, runs: list[dict[str, Any]], curves: dict[int, list[tuple]]) -> bytes | None:
    best = best_by_setting(runs)
    tasks = sorted({k[0] for k in best}, key=_natural)
    if not tasks or not curves:
        return None
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for (t, mixer, dim), r in sorted(best.items()):
            if t != task:
                continue
            metric = _metric(r)[0]
            pts = [(s, v) for s, n, v in curves.get(r["id"], []) if n == f"test/{metric}"]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{mixer} d={dim}",
                        color=_color(mixer), alpha=1.0 if dim == max(k[2] for k in best if k[1] == mixer) else 0.5)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"test {_metric(next(r for r in runs if r['task'] == task))[0]}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("Test metric during training (best run per mechanism and width)")
    return _png(fig)


def _speed_figure(plt: Any, points: list[dict[str, Any]], key: str, ylabel: str, scale: float = 1.0) -> bytes | None:
    ok = [p for p in points if p["status"] == "ok" and p[key]]
    if not ok:
        return None
    modes = [m for m in ("fwd", "fwd+bwd") if any(p["mode"] == m for p in ok)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.0), squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        mixers = sorted({p["mixer"] for p in ok if p["mode"] == mode}, key=lambda m: (m != BASELINE, m))
        for m in mixers:
            pts = sorted((p["n"], p[key] * scale) for p in ok if p["mode"] == mode and p["mixer"] == m)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=m,
                    linestyle="--" if m == BASELINE else "-", color=_color(m))
        bad = [p for p in points if p["mode"] == mode and p["status"] in ("oom", "skipped")]
        if bad:
            ax.text(0.02, 0.98, "not run: " + ", ".join(f"{p['mixer']}@{p['n']} ({p['status']})" for p in bad)[:160],
                    transform=ax.transAxes, fontsize=6, va="top")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.set_title(mode)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _png(fig)


# HTML ------------------------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _word(v: Any) -> Any:
    """Booleans as words in tables."""
    return ("yes" if v else "no") if isinstance(v, bool) else v


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(_word(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code{background:#f4f4f4;padding:0 3px}
.note{color:#555;font-size:0.9em}
"""


def build_report(store: ResultsStore, out_dir: str | Path, *, session: str | None = None,
                 all_sessions: bool = False, title: str = "attnzoo compare") -> Path:
    """Write ``report.html`` and the PNG plots into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, points, session = select_runs(store, session, all_sessions=all_sessions)
    runs = [r for r in runs if r["mixer"] is not None]  # a run stored through the API without one has no place
    curves = {r["id"]: store.run(r["id"])["curves"] for r in runs}
    _PALETTE.clear()
    for m in sorted({r["mixer"] for r in runs} | {p["mixer"] for p in points}):
        _color(m)
    plt = _plt()
    images: list[tuple[str, str, bytes]] = []
    if plt is not None:
        figs = [
            ("accuracy.png", "Accuracy vs model width", lambda: _accuracy_figure(plt, runs)),
            ("curves.png", "Training curves", lambda: _curves_figure(plt, runs, curves)),
            ("speed_time.png", "Time vs sequence length", lambda: _speed_figure(plt, points, "time_s", "seconds")),
            ("speed_memory.png", "Peak memory vs sequence length",
             lambda: _speed_figure(plt, points, "peak_bytes", "MiB", 1 / 2**20)),
        ]
        for fname, caption, make in figs:
            data = make()
            plt.close("all")
            if data:
                (out / fname).write_bytes(data)
                images.append((fname, caption, data))

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    env = (runs or [{}])[0].get("env") if runs else None
    if env is None and points:
        speed_runs = store.runs(kind="speed", session=session)
        env = speed_runs[0]["env"] if speed_runs else None
    parts.append(f"<p class='note'>session <code>{_e(session or 'all')}</code>; {len(runs)} training runs, "
                 f"{len(points)} speed points.</p>")
    cols, rows = leaderboard(runs, points)
    parts.append("<h2>Leaderboard</h2>" + _table(cols, rows))
    parts.append("<p class='note'>Task columns: the best test metric over widths and learning rates "
                 "(accuracy: Zoology's per-example rule; higher is better), mean ± sd over seeds, then any "
                 "secondary metric of the task for that width and learning rate, from the final model (bag AUC; "
                 "localisation AUC: the pooler's weights against the true positive instances; n/a: a pooler "
                 "without weights). Train time: the mean wall time of a training run of those configurations (a "
                 "loaded machine is slower). Speed: forward+backward time and peak memory divided by SDPA (causal "
                 "when the sweep is) at the same N, at the longest N both ran (below 1 is faster / smaller).</p>")
    rcols, rrows = recall_table(runs)
    if rrows:
        parts.append(f"<h2>Recall lost against {_e(RECALL_BASELINE)}</h2>" + _table(rcols, rrows))
        parts.append(f"<p class='note'>Each mechanism against {_e(RECALL_BASELINE)} at the same task and width, "
                     "both at their best learning rate by the mean over seeds: the test accuracy (on MQAR, the "
                     f"fraction of queries recalled), the difference {_e(RECALL_BASELINE)} − mechanism (positive: "
                     "recall lost, e.g. to a routing that did not select the key's block) with its standard error "
                     "over seeds, and the ratio. A variant (<code>moba[top_k=1]</code>) is one entry at fixed "
                     "arguments; <em>built with</em> lists every argument of its runs.</p>")
    if plt is None:
        parts.append("<p class='note'>Plots need matplotlib: <code>pip install 'attnzoo[report]'</code>.</p>")
    for fname, caption, data in images:
        uri = "data:image/png;base64," + base64.b64encode(data).decode()
        parts.append(f"<h2>{_e(caption)}</h2><img alt='{_e(caption)}' src='{uri}'>"
                     f"<p class='note'>also <code>{_e(fname)}</code></p>")
    if runs:
        trows = []
        for r in runs:
            name, v, _ = _metric(r)
            m, c = r["metrics"], r["config"]
            others = ", ".join(f"{k} " + ("n/a" if m.get(k) is None else _fmt(m[k], 4))
                               for k in m.get("secondary_metrics") or [])
            trows.append([r["id"], r["task"], r["mixer"], c.get("dim"), c.get("lr"),
                          json.dumps(c.get("mixer_kwargs", {}), sort_keys=True), name, _fmt(v, 4), others,
                          m.get("steps"), m.get("stopped_early"), m.get("stopped_by_time", False),
                          m.get("train_time_s"), m.get("params")])
        parts.append("<h2>Training runs</h2>" + _table(
            ["id", "task", "mixer", "dim", "lr", "mixer kwargs", "metric", "value", "other metrics", "steps",
             "early stop", "time budget hit", "time (s)", "params"], trows))
        if any(r["metrics"].get("stopped_by_time") for r in runs):
            parts.append("<p class='note'>Runs that hit their time budget stopped before their step budget: "
                         "their numbers depend on the machine's speed (and on what else it was running).</p>")
    if points:
        prow = []
        for p in points:
            d = p["detail"] or {}
            prow.append([p["mixer"], p["n"], p["mode"], p["status"], _fmt(p["time_s"], 5), _ratio(p["ratio"]),
                         _bytes(p["peak_bytes"]), _ratio(d.get("memory_ratio")),
                         "" if p["flops"] is None else f"{p['flops']:.3g}",
                         "" if not d.get("tflops_per_s") else f"{d['tflops_per_s']:.3f}",
                         d.get("reason") or d.get("error") or ""])
        parts.append("<h2>Speed and memory</h2>" + _table(
            ["mixer", "N", "mode", "status", "median time (s)", "time vs SDPA", "peak memory", "memory vs SDPA",
             "FLOPs", "TFLOP/s", "note"], prow))
        parts.append("<p class='note'>Median of repeats after warm-up, device synchronised; FLOPs from each "
                     "pattern's exact density (forward+backward = 3x forward).</p>")
        erows = []
        for m in sorted({p["mixer"] for p in points if p["mixer"] != BASELINE}):
            cells = []
            for mode in ("fwd", "fwd+bwd"):
                for key in ("time_s", "peak_bytes"):
                    fit = efficiency_length(points, m, mode=mode, key=key)
                    ns = [p["n"] for p in points if p["mixer"] == m and p["mode"] == mode and p["status"] == "ok"]
                    cells.append(_fit_cell(fit, ns))
                    meas = measured_crossover(points, m, mode=mode, key=key)
                    cells.append("" if meas is None else str(meas))
            erows.append([m, *cells])
        if erows:
            parts.append("<h2>Efficiency length (CAB)</h2>" + _table(
                ["mixer", "time fwd: CAB fit", "time fwd: measured", "memory fwd: CAB fit", "memory fwd: measured",
                 "time fwd+bwd: CAB fit", "time fwd+bwd: measured", "memory fwd+bwd: CAB fit",
                 "memory fwd+bwd: measured"], erows))
            parts.append("<p class='note'>The sequence length beyond which the mechanism is cheaper than SDPA "
                         "dense. Fit: CAB's definition, where a quadratic fit of SDPA dense's cost meets a linear "
                         "fit of the mechanism's, over this sweep's lengths (dominated by the longest ones). "
                         "Measured: the shortest length of the sweep from which it is cheaper at every longer "
                         "one. A fit beyond the longest measured length is labelled as an extrapolation: nothing "
                         "was measured there. Blank: fewer than 3 common points, or never cheaper.</p>")
    if env:
        parts.append("<h2>Environment</h2>" + _table(["field", "value"], [[k, v] for k, v in env.items()]))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
