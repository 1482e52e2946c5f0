"""Dynamic-sparse attention on CPU: moba against causal mha (SDPA), topk_attention's memory, effective throughput.

Run: ``python benchmarks/bench_dynamic_sparse.py [--n 16384] [--repeats 3] [--threads 0] [--clock wall|cpu]``.

- ``moba`` (block 256, top_k 4) and ``mha`` with the same weights (``mha_from``), dim 512, 8 heads, float32,
  causal, forward + backward, interleaved rounds; wall time, every round printed (the spread) and the median.
  ``moba (flash tiles)``: the same moba with attnzoo's compiled kernels off (``ATTNZOO_NATIVE=0``), so its block
  routing runs on PyTorch's fused flash tiles (``--skip-flash-tiles`` leaves it out).
- Effective throughput: ``t_moba / (t_mha x density)``, ``density`` = attended pairs / causal pairs of the
  call (1 would be "sparse as fast as dense per attended pair").
- ``topk_attention`` (top_k 64) memory: bytes autograd saves for the backward, and the peak resident memory a
  forward + backward adds (each in a fresh process), per N (linear in N when the ratio per token stays flat),
  next to mha on SDPA; its time against mha's at the same N, and the effective throughput
  ``t_topk / (t_mha x density)``.
- ``--scorer predictor``: the topk section instead times ``topk_attention`` with Sparsifiner's connectivity
  predictor (``--rank``, default head_dim // 2) interleaved with the exact scorer and mha (same q/k/v/o weights),
  forward + backward, and the selection alone (``route``, forward, no grad) of each scorer next to mha's
  forward + backward.
- ``--paths``: instead, moba at small shapes (the blocks of 4 and 16 that ``attnzoo compare`` trains with, up to
  dim 512 at N 4096), causal forward + backward, on the compiled routed kernels against the fused flash tiles
  (``ATTNZOO_NATIVE=0``), interleaved rounds, median of ``--repeats``.
- The load average is printed before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, run_isolated  # noqa: E402

from attnzoo.layers.base import Call  # noqa: E402
from attnzoo.layers.testing import mha_from  # noqa: E402
from attnzoo.ops import native  # noqa: E402
from attnzoo.registry import create  # noqa: E402

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    t = clock()
    module(x, causal=True).sum().backward()
    return clock() - t


def moba_density(m: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        q, k, _ = m.project(x, x)
        r = m.route(q, k, None, Call(x=x, src=x, causal=True))
        n = x.shape[1]
        rows = r.block_mask(n).sum(-1).double() * m.block_size  # keys per query before the causal cut, own block full
        pos = torch.arange(n, dtype=torch.float64)
        attended = rows - (m.block_size - 1 - pos % m.block_size)  # own block cut at the query
        return (attended.mean() / ((pos + 1).mean())).item()


def without_native(fn):
    """``fn()`` with attnzoo's compiled kernels switched off (``ATTNZOO_NATIVE=0``): block routings then run on the
    fused flash tiles."""
    before = os.environ.get(native.ENV_DISABLE)
    os.environ[native.ENV_DISABLE] = "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ[native.ENV_DISABLE]
        else:
            os.environ[native.ENV_DISABLE] = before


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x, causal=True)
    y.sum().backward()
    return total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def peak_added_bytes(slug: str, n: int) -> None:
    """(Run in a fresh process.) Print JSON: peak resident memory a causal forward + backward adds at length n
    (Linux: the peak is reset through ``/proc/self/clear_refs`` right before the call)."""
    torch.manual_seed(0)
    topk = create("topk_attention", dim=512, n_heads=8, top_k=64)
    module = topk if slug == "topk_attention" else mha_from(topk).float()
    module(torch.randn(1, 64, 512, requires_grad=True), causal=True).sum().backward()  # libraries' first-use memory
    x = torch.randn(1, n, 512, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes()
    module(x, causal=True).sum().backward()
    peak = _peak_rss_bytes()
    print(json.dumps({"slug": slug, "n": n, "peak_added": peak - before}))


def topk_density(m: torch.nn.Module, n: int) -> float:
    """Attended / causal pairs of topk_attention at length n (query i attends min(top_k, i + 1) keys)."""
    pos = torch.arange(n, dtype=torch.float64)
    return (pos + 1).clamp(max=m.top_k).sum().item() / (pos + 1).sum().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-topk", action="store_true")
    ap.add_argument("--topk-n", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--scorer", choices=["exact", "predictor"], default="exact",
                    help="topk section: exact (memory and time) or predictor (time vs exact and mha)")
    ap.add_argument("--rank", type=int, nargs="+", default=[32], help="predictor ranks (with --scorer predictor)")
    ap.add_argument("--clock", choices=list(CLOCK), default="wall",
                    help="wall time, or process CPU time (with --threads 1: stable on a shared machine)")
    ap.add_argument("--skip-flash-tiles", action="store_true",
                    help="do not also time moba with the compiled kernels off (its fused flash tile path)")
    ap.add_argument("--paths", action="store_true",
                    help="only moba at small shapes: compiled routed kernels against the flash tiles")
    ap.add_argument("--one", choices=["topk_attention", "mha"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        peak_added_bytes(args.one, args.n)
        return
    print(machine(), f"clock: {args.clock}")
    print(f"load average (1, 5, 15 min) before: {os.getloadavg()}")
    torch.manual_seed(0)
    if args.paths:
        paths_section(args)
        print(f"\nload average (1, 5, 15 min) after: {os.getloadavg()}")
        return
    if not args.skip_speed:
        moba = create("moba", dim=512, n_heads=8, block_size=256, top_k=4)
        mha = mha_from(moba).float()
        x = torch.randn(1, args.n, 512)
        rounds = {"moba": [], "mha": []}
        if not args.skip_flash_tiles:
            rounds["moba (flash tiles)"] = []
        for module in (moba, mha):  # first calls (allocator, thread pools) are not timed
            fwd_bwd(module, x[:, :1024])
        for _ in range(args.repeats):
            rounds["moba"].append(fwd_bwd(moba, x))
            rounds["mha"].append(fwd_bwd(mha, x))
            if not args.skip_flash_tiles:
                rounds["moba (flash tiles)"].append(without_native(lambda: fwd_bwd(moba, x)))
            print("round: " + ", ".join(f"{name} {t[-1]:.2f}s" for name, t in rounds.items()), flush=True)
        tm, td = statistics.median(rounds["moba"]), statistics.median(rounds["mha"])
        dens = moba_density(moba, x)
        print(f"\nN={args.n} causal fwd+bwd, float32, dim 512, 8 heads")
        print("| module | rounds (s) | median (s) |\n|---|---|---|")
        for name in rounds:
            print(f"| {name} | {', '.join(f'{t:.2f}' for t in rounds[name])} | {statistics.median(rounds[name]):.2f} |")
        print(f"\nspeed-up mha/moba: {td / tm:.2f}x (rounds: "
              f"{', '.join(f'{d / s:.2f}' for s, d in zip(rounds['moba'], rounds['mha']))})")
        if not args.skip_flash_tiles:
            tf = statistics.median(rounds["moba (flash tiles)"])
            print(f"speed-up mha/moba on the flash tiles: {td / tf:.2f}x; flash tiles / compiled kernels: "
                  f"{tf / tm:.2f}x (rounds: "
                  f"{', '.join(f'{f / s:.2f}' for s, f in zip(rounds['moba'], rounds['moba (flash tiles)']))})")
        print(f"moba density (attended / causal pairs): {dens:.4f}; t_moba / (t_mha x density): "
              f"{tm / (td * dens):.2f}")
    if not args.skip_topk:
        (topk_scorer_section if args.scorer == "predictor" else topk_section)(args)
    print(f"\nload average (1, 5, 15 min) after: {os.getloadavg()}")


PATH_SHAPES = [  # (dim, heads, block_size, top_k, N, batch)
    (64, 4, 4, 2, 256, 32), (64, 4, 16, 2, 256, 32), (64, 4, 16, 2, 1024, 8), (128, 2, 32, 3, 2048, 4),
    (512, 8, 64, 4, 4096, 1), (512, 8, 256, 4, 4096, 1)]


def paths_section(args: argparse.Namespace) -> None:
    print("moba, causal forward + backward, float32: compiled routed kernels vs fused flash tiles (ATTNZOO_NATIVE=0),"
          f" interleaved, median of {args.repeats}")
    print("| dim | heads | block | top_k | N | batch | kernels (ms) | flash tiles (ms) | flash tiles / kernels |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dim, heads, block, top_k, n, batch in PATH_SHAPES:
        m = create("moba", dim=dim, n_heads=heads, block_size=block, top_k=top_k)
        x = torch.randn(batch, n, dim)
        fwd_bwd(m, x)
        without_native(lambda: fwd_bwd(m, x))  # noqa: B023 (called at once)
        kern, tiles = [], []
        for _ in range(args.repeats):
            kern.append(fwd_bwd(m, x))
            tiles.append(without_native(lambda: fwd_bwd(m, x)))  # noqa: B023
        a, b = statistics.median(kern), statistics.median(tiles)
        print(f"| {dim} | {heads} | {block} | {top_k} | {n} | {batch} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |",
              flush=True)


def topk_section(args: argparse.Namespace) -> None:
    print("\ntopk_attention (top_k 64) vs mha (SDPA), causal forward + backward, dim 512, 8 heads: bytes saved for "
          "backward, peak resident memory added (fresh process each), time (rounds) and t_topk / (t_mha x density)")
    print("| N | saved topk (MB) | per token (KB) | saved mha (MB) | peak topk (MB) | per token (KB) | peak mha (MB) "
          "| topk rounds (s) | mha rounds (s) | density | t_topk / (t_mha x density) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    topk = create("topk_attention", dim=512, n_heads=8, top_k=64)
    dense = mha_from(topk).float()
    for n in args.topk_n:
        x = torch.randn(1, n, 512)
        a, b = saved_bytes(topk, x), saved_bytes(dense, x)
        peaks = [run_isolated(__file__, ["--one", slug, "--n", str(n), "--threads", str(torch.get_num_threads())])
                 for slug in ("topk_attention", "mha")]
        pa, pb = (p.get("peak_added", float("nan")) for p in peaks)
        rt, rd = [], []
        for _ in range(args.repeats):
            rt.append(fwd_bwd(topk, x))
            rd.append(fwd_bwd(dense, x))
        dens = topk_density(topk, n)
        eff = statistics.median(rt) / (statistics.median(rd) * dens)
        print(f"| {n} | {a / 2**20:.1f} | {a / n / 1024:.1f} | {b / 2**20:.1f} | {pa / 2**20:.1f} | "
              f"{pa / n / 1024:.1f} | {pb / 2**20:.1f} | {', '.join(f'{t:.2f}' for t in rt)} | "
              f"{', '.join(f'{t:.2f}' for t in rd)} | {dens:.4f} | {eff:.1f} |", flush=True)


def select_time(module: torch.nn.Module, x: torch.Tensor) -> float:
    """The routing alone (scores + top-k per query), forward, no grad, on the module's own q and k."""
    with torch.no_grad():
        q, k, _ = module.project(x, x)
        t = clock()
        module.route(q, k, None, Call(x=x, src=x, causal=True))
        return clock() - t


def topk_scorer_section(args: argparse.Namespace) -> None:
    print("\ntopk_attention (top_k 64): predictor vs exact scorer vs mha (SDPA), causal forward + backward, dim 512, "
          "8 heads, interleaved; sel = the routing alone (forward)")
    names = ["exact"] + [f"predictor r{r}" for r in args.rank]
    head = " | ".join(f"{n} (s) | sel {n} (s)" for n in names)
    print(f"| N | {head} | mha (s) | density | " + " | ".join(f"eff {n}" for n in names) + " |")
    print("|---|" + "---|---|" * len(names) + "---|---|" + "---|" * len(names))
    torch.manual_seed(0)
    exact = create("topk_attention", dim=512, n_heads=8, top_k=64)
    mods = {"exact": exact}
    for r in args.rank:
        torch.manual_seed(0)
        mods[f"predictor r{r}"] = create("topk_attention", dim=512, n_heads=8, top_k=64, scorer="predictor", rank=r)
        mods[f"predictor r{r}"].load_state_dict(exact.state_dict(), strict=False)
    dense = mha_from(exact).float()
    for module in (*mods.values(), dense):  # first calls (allocator, thread pools) are not timed
        fwd_bwd(module, torch.randn(1, 1024, 512))
    for n in args.topk_n:
        x = torch.randn(1, n, 512)
        fb = {name: [] for name in [*names, "mha"]}
        sel = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                fb[name].append(fwd_bwd(mods[name], x))
                sel[name].append(select_time(mods[name], x))
            fb["mha"].append(fwd_bwd(dense, x))
        dens = topk_density(exact, n)
        td = statistics.median(fb["mha"])
        cells = " | ".join(f"{', '.join(f'{t:.2f}' for t in fb[nm])} | {', '.join(f'{t:.2f}' for t in sel[nm])}"
                           for nm in names)
        effs = " | ".join(f"{statistics.median(fb[nm]) / (td * dens):.0f}" for nm in names)
        print(f"| {n} | {cells} | {', '.join(f'{t:.2f}' for t in fb['mha'])} | {dens:.4f} | {effs} |", flush=True)

if __name__ == "__main__":
    main()
