"""Speed and memory sweeps of token mixers against SDPA dense, in the same run.

For each sequence length ``N`` and mode (``fwd``: forward under ``no_grad``; ``fwd+bwd``:
forward and backward of the output against a fixed random gradient) every mixer, and the
baseline ``sdpa_dense`` (an ``mha`` of the same width on the ``sdpa`` backend, no pattern; causal
when the sweep is causal, so causal mixers are compared with SDPA causal), is timed: ``warmup``
runs first (excluded), then the median of ``repeats`` runs, each
between device synchronisations. Peak memory is the high-water mark of one run above what was
allocated before it (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set,
reset through ``/proc/self/clear_refs`` after returning freed memory with ``malloc_trim``).

FLOPs are counted in a forward pass: every op by ``torch.utils.flop_counter.FlopCounterMode``,
except :func:`attnzoo.attention` calls, which count ``2 B H N M (D + D_v)`` times the exact
density of their pattern (causal, window, padding...). ``fwd+bwd`` counts 3x the forward.
Ratios compare each point with ``sdpa_dense`` at the same ``N`` and mode.

An out-of-memory error is recorded as status ``oom`` and the sweep continues; a point whose
time or memory, extrapolated from the mixer's previous points, exceeds the limits, or that comes
after the sweep's time budget is used up, is recorded as ``skipped`` (or ``oom``) with the
reason, never silently left out. The sweep goes length by length, every mixer at each length.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import attnzoo
from attnzoo.bench.models import build_mixer, check_mixer, mixer_kwargs_for
from attnzoo.bench.train import pick_device, progress_bar
from attnzoo.layers.base import check_int

__all__ = ["BASELINE", "SpeedConfig", "count_flops", "run_speed", "measure"]

BASELINE = "sdpa_dense"
MODES = ("fwd", "fwd+bwd")


@dataclass
class SpeedConfig:
    """A sweep: mixers x lengths x modes, at batch ``batch`` and width ``dim`` (``n_heads`` heads)."""

    mixers: list[str] = field(default_factory=lambda: ["mha"])
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    dim: int = 128
    n_heads: int = 2
    batch: int = 1
    causal: bool = True
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"
    device: str = "auto"
    mixer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_seconds: float = 60.0         # skip a point whose single run is predicted to exceed this
    point_budget_s: float | None = None  # stop repeating a point after this long (default max_seconds)
    budget_s: float | None = None     # whole sweep: once used up, the remaining points are recorded as skipped
    memory_fraction: float = 0.8      # skip a point predicted to need more than this share of free memory
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"modes: unknown {bad}; valid modes: {', '.join(MODES)}")
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths: expected positive integers, got {self.lengths!r}")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"dtype: expected float32, float16, bfloat16 or float64, got {self.dtype!r}")
        if not self.mixers:
            raise ValueError("mixers: expected at least one mixer slug, got []")
        for name, low in (("dim", 1), ("n_heads", 1), ("batch", 1), ("repeats", 1), ("warmup", 0)):
            check_int(name, getattr(self, name), minimum=low)
        if self.dim % self.n_heads:
            raise ValueError(f"dim: must be divisible by n_heads={self.n_heads}, got dim={self.dim}")
        if not (isinstance(self.max_seconds, (int, float)) and self.max_seconds > 0):
            raise ValueError(f"max_seconds: expected a positive number, got {self.max_seconds!r}")
        for name in ("point_budget_s", "budget_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name}: expected a number >= 0 or None, got {v!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction: expected a fraction in (0, 1], got {self.memory_fraction!r}")
        for m in self.mixers:
            check_mixer(m, what="the speed sweep")


# Memory ----------------------------------------------------------------------------------------
def _proc_kib(field_name: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            m = re.search(rf"^{field_name}:\s+(\d+)", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _trim() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakMemory:
    """Peak bytes allocated during the ``with`` block, above what was allocated at its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            self.ok = False
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")
                self.ok = True
            self.base = _proc_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = _proc_kib("VmHWM")
            if self.ok and hwm is not None and self.base is not None:
                self.peak = max(0, hwm - self.base) * 1024


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    kib = _proc_kib("MemAvailable", "/proc/meminfo")
    return None if kib is None else kib * 1024


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if hasattr(torch, "OutOfMemoryError") and isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "not enough memory" in msg)


# FLOPs -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _attention_calls(on_call: Callable[[Callable[..., Any], tuple, dict], Any]) -> Iterator[None]:
    """Route every ``attnzoo.attention`` call made by attnzoo modules through ``on_call`` for the block."""
    import attnzoo.ops as ops

    orig = ops.attention

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return on_call(orig, args, kwargs)

    patched = []
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "") or ""
        if name.startswith("attnzoo") and getattr(mod, "attention", None) is orig:
            mod.attention = wrapped
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            mod.attention = orig


def count_flops(fn: Callable[[], Any]) -> float:
    """Forward FLOPs of ``fn()``: counted ops, with attention calls at their pattern's exact density."""
    from torch.utils.flop_counter import FlopCounterMode

    from attnzoo.ops.layout import Shape

    extra = [0.0]
    counter = FlopCounterMode(display=False)

    def on_call(orig: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        q, k, v = args[:3]
        before = counter.get_total_flops()
        out = orig(*args, **kwargs)
        inner = counter.get_total_flops() - before
        b, h, n, d = q.shape
        m, dv = k.shape[-2], v.shape[-1]
        pattern = kwargs.get("pattern")
        density = 1.0 if pattern is None else float(pattern.density(Shape(b, h, n, m)))
        extra[0] += 2.0 * b * h * n * m * (d + dv) * density - inner
        return out

    with torch.no_grad(), _attention_calls(on_call), counter:
        fn()
    return float(counter.get_total_flops()) + extra[0]


# Measuring -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(slug: str, cfg: SpeedConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, bool]:
    torch.manual_seed(cfg.seed)
    if slug == BASELINE:
        m = attnzoo.create("mha", dim=cfg.dim, n_heads=cfg.n_heads, backend="sdpa")
        return m.to(device=device, dtype=dtype), cfg.causal
    spec = check_mixer(slug)
    kwargs = mixer_kwargs_for(slug, n_heads=cfg.n_heads, extra=cfg.mixer_kwargs.get(slug))
    accepted = spec.accepted_arguments()
    if accepted is not None and "max_len" in accepted and "max_len" not in kwargs:
        kwargs["max_len"] = max(cfg.lengths)  # explicit-filter mixers (base_conv, hyena) sized for the sweep
    m = build_mixer(slug, cfg.dim, **kwargs)
    return m.to(device=device, dtype=dtype), cfg.causal and "causal" in spec.supports


def measure(module: nn.Module, x: torch.Tensor, *, mode: str, causal: bool, repeats: int, warmup: int,
            device: torch.device, max_seconds: float = math.inf) -> dict[str, Any]:
    """Median time (s), peak bytes and the individual times of ``module`` on ``x``.

    After the warm-up, repeats stop once their total exceeds ``max_seconds`` (at least one runs).
    """
    grad_out = torch.randn_like(x)

    def run() -> None:
        if mode == "fwd":
            with torch.no_grad():
                module(x, causal=causal)
        else:
            xi = x.detach().requires_grad_(True)
            y = module(xi, causal=causal)
            y.backward(grad_out)
            module.zero_grad(set_to_none=True)

    times: list[float] = []
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        if time.perf_counter() - t0 > max_seconds:  # too slow to repeat: one measured run only
            repeats = 1
    peak = None
    for i in range(repeats):
        with contextlib.ExitStack() as stack:
            mem = stack.enter_context(_PeakMemory(device)) if i == 0 else None
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - t0)
        if mem is not None:
            peak = mem.peak
        if sum(times) > max_seconds:
            break
    return {"time_s": statistics.median(times), "peak_bytes": peak, "times": times}


def _predict(history: list[tuple[int, float]], n: int, lo: float, hi: float) -> float | None:
    """Extrapolate a cost to length ``n`` from ``(length, cost)`` points with an exponent in [lo, hi]."""
    pts = [(a, c) for a, c in history if c and c > 0]
    if not pts:
        return None
    (n1, c1) = pts[-1]
    k = hi
    if len(pts) >= 2:
        (n0, c0) = pts[-2]
        if n1 > n0:
            k = min(hi, max(lo, math.log(c1 / c0) / math.log(n1 / n0)))
    return c1 * (n / n1) ** k


def run_speed(cfg: SpeedConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run the sweep (length by length, every mixer at each length); returns one dict per
    (mixer, N, mode) with ``status`` ``ok``/``oom``/``skipped``/``error``."""
    say = log or (lambda s: None)
    device = pick_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    names = [BASELINE, *[m for m in cfg.mixers if m != BASELINE]]
    points: list[dict[str, Any]] = []
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    mem_history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    modules: dict[str, tuple[nn.Module, bool]] = {}
    build_errors: dict[str, str] = {}
    for name in names:
        try:
            modules[name] = _build(name, cfg, device, dtype)
        except Exception as e:  # a mixer that cannot be built at this width: recorded at every point
            build_errors[name] = f"{type(e).__name__}: {e}"
    started = time.perf_counter()
    total = len(names) * len(cfg.lengths) * len(cfg.modes)
    with progress_bar(total, "speed sweep", enabled=progress) as bar:
        for n in sorted(cfg.lengths):
            x, why = _inputs(cfg, n, device, dtype)
            if x is None:  # the inputs alone cannot be allocated: every point at this length is oom
                for name in names:
                    for mode in cfg.modes:
                        bar.update(1, f"{name} N={n} {mode}")
                        points.append(_point(name, n, mode, "oom", detail={
                            "causal": modules.get(name, (None, cfg.causal))[1], "batch": cfg.batch, "dim": cfg.dim,
                            "dtype": cfg.dtype, "device": str(device), "reason": why}))
                say(f"  N={n}: {why}")
                continue
            for name in names:
                flops = None
                for mode in cfg.modes:
                    bar.update(1, f"{name} N={n} {mode}")
                    if name in build_errors:
                        points.append(_point(name, n, mode, "error", detail={"error": build_errors[name]}))
                        continue
                    module, causal = modules[name]
                    key = (name, mode)
                    detail: dict[str, Any] = {"causal": causal, "batch": cfg.batch, "dim": cfg.dim,
                                              "dtype": cfg.dtype, "device": str(device)}
                    elapsed = time.perf_counter() - started
                    if cfg.budget_s is not None and elapsed > cfg.budget_s:
                        points.append(_point(name, n, mode, "skipped", detail={
                            **detail, "reason": f"sweep time budget of {cfg.budget_s:g} s used up"}))
                        continue
                    t_pred = _predict(history.get(key, []), n, 1.0, 2.0)
                    m_pred = _predict(mem_history.get(key, []), n, 1.0, 2.0)
                    avail = _available_bytes(device)
                    if t_pred is not None and t_pred > cfg.max_seconds:
                        points.append(_point(name, n, mode, "skipped", detail={
                            **detail, "reason": f"predicted {t_pred:.0f} s per run > max_seconds={cfg.max_seconds:g}"}))
                        continue
                    if m_pred is not None and avail is not None and m_pred > cfg.memory_fraction * avail:
                        points.append(_point(name, n, mode, "oom", detail={
                            **detail, "reason": f"predicted peak {m_pred / 2**30:.1f} GiB > "
                                                f"{cfg.memory_fraction:g} x free {avail / 2**30:.1f} GiB; not run"}))
                        continue
                    try:
                        if flops is None:
                            flops = count_flops(lambda x=x, module=module, causal=causal: module(x, causal=causal))
                        res = measure(module, x, mode=mode, causal=causal, repeats=cfg.repeats, warmup=cfg.warmup,
                                      device=device, max_seconds=cfg.point_budget_s or cfg.max_seconds)
                    except Exception as e:
                        status = "oom" if _is_oom(e) else "error"
                        _free(device)
                        points.append(_point(name, n, mode, status, detail={**detail, "error": f"{type(e).__name__}: "
                                                                            f"{str(e).splitlines()[0][:300]}"}))
                        say(f"  {name} N={n} {mode}: {status}")
                        continue
                    history.setdefault(key, []).append((n, res["time_s"]))
                    if res["peak_bytes"]:
                        mem_history.setdefault(key, []).append((n, float(res["peak_bytes"])))
                    f = None if flops is None else flops * (3.0 if mode == "fwd+bwd" else 1.0)
                    detail.update(times=res["times"], tflops_per_s=(f / res["time_s"] / 1e12) if f else None)
                    points.append(_point(name, n, mode, "ok", time_s=res["time_s"], peak_bytes=res["peak_bytes"],
                                         flops=f, detail=detail))
            del x
            _free(device)
    modules.clear()
    _free(device)
    _add_ratios(points)
    order = {name: i for i, name in enumerate(names)}
    points.sort(key=lambda p: (order[p["mixer"]], p["n"], cfg.modes.index(p["mode"])))
    return points


def _inputs(cfg: SpeedConfig, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, str]:
    """The sweep's input ``[batch, n, dim]`` at length ``n``, or None and why when it cannot be allocated: its
    size (with the float32 draw it is made from) is over the free memory share, or the allocation fails."""
    elements = cfg.batch * n * cfg.dim
    need = elements * (4 + (torch.finfo(dtype).bits // 8 if (device.type != "cpu" or dtype != torch.float32) else 0))
    avail = _available_bytes(device)
    host = _available_bytes(torch.device("cpu"))
    limit = min(a for a in (avail, host) if a is not None) if (avail, host) != (None, None) else None
    if limit is not None and need > cfg.memory_fraction * limit:
        return None, (f"the inputs [{cfg.batch}, {n}, {cfg.dim}] need {need / 2**30:.1f} GiB > "
                      f"{cfg.memory_fraction:g} x free {limit / 2**30:.1f} GiB; not run")
    try:
        g = torch.Generator().manual_seed(cfg.seed + n)
        return torch.randn(cfg.batch, n, cfg.dim, generator=g).to(device=device, dtype=dtype), ""
    except Exception as e:
        if not _is_oom(e):
            raise
        _free(device)
        return None, f"allocating the inputs [{cfg.batch}, {n}, {cfg.dim}] failed: {str(e).splitlines()[0][:200]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _point(mixer: str, n: int, mode: str, status: str, *, time_s: float | None = None, peak_bytes: int | None = None,
           flops: float | None = None, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"mixer": mixer, "n": n, "mode": mode, "status": status, "time_s": time_s, "peak_bytes": peak_bytes,
            "flops": flops, "ratio": None, "detail": detail or {}}


def _add_ratios(points: list[dict[str, Any]]) -> None:
    """``ratio`` = time / SDPA-dense time at the same N and mode; memory ratio in ``detail``."""
    base = {(p["n"], p["mode"]): p for p in points if p["mixer"] == BASELINE and p["status"] == "ok"}
    for p in points:
        b = base.get((p["n"], p["mode"]))
        if p["status"] != "ok" or b is None:
            continue
        p["ratio"] = p["time_s"] / b["time_s"] if b["time_s"] else None
        if p["peak_bytes"] and b["peak_bytes"]:
            p["detail"]["memory_ratio"] = p["peak_bytes"] / b["peak_bytes"]


def config_dict(cfg: SpeedConfig) -> dict[str, Any]:
    return asdict(cfg)
