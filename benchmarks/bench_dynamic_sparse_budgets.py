"""Attention budgets of hip, superlinear_span, pyramid_sparse and tree_cross_attention: keys (or nodes) each query
attends, against dense attention, as the length grows (counts from the routers on random q/k, no timing).

Run: ``python benchmarks/bench_dynamic_sparse_budgets.py [--lengths 1024 4096 16384] [--time 2048 --repeats 3]``.

- ``hip`` (top_k 64), ``superlinear_span`` (top_k 3), causal: mean keys per query over the call, and the fraction
  of the causal pairs they are.
- ``pyramid_sparse`` (block 64, level_blocks (2, 2, 4)): pooled keys per query (2·64 + 2·32 + 4·16 = 256 once
  there are 8 blocks) and the fraction of the N keys.
- ``tree_cross_attention`` (beam 1 and 4): nodes per query over a context of N tokens (log2 N + 1 for beam 1).
- ``--time N``: forward + backward process CPU time (one thread, stable on a shared machine) at length N, dim 256,
  4 heads, float32, each entry next to ``mha`` with the same weights (causal for hip / superlinear_span, not for
  pyramid_sparse, cross-attention of N / 8 queries over N context tokens for tree_cross_attention), interleaved
  rounds after one warm-up, every round printed. The entries whose key lists are shared by blocks of queries
  (hip query_block, pyramid_sparse) are also timed with attnzoo's compiled kernels off (``ATTNZOO_NATIVE=0``:
  the fused flash tiles), in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

from attnzoo.layers.base import Call  # noqa: E402
from attnzoo.layers.dynamic_sparse.tree_cross_attention import build_tree, descend  # noqa: E402
from attnzoo.registry import create  # noqa: E402

HEAD_DIM = 32


def _qk(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, HEAD_DIM, generator=g) for _ in range(2))


def routed_keys(slug: str, n: int, **kw) -> tuple[float, float]:
    m = create(slug, dim=2 * HEAD_DIM, n_heads=2, **kw)
    q, k = _qk(n)
    with torch.no_grad():
        keys = m.route(q, k, None, Call(x=q, src=q, causal=True)).index
    per_query = (keys >= 0).sum(-1).double()
    causal_pairs = (torch.arange(n, dtype=torch.float64) + 1).sum() * 2
    return per_query.mean().item(), per_query.sum().item() / causal_pairs.item()


def pyramid_keys(n: int) -> tuple[float, float]:
    m = create("pyramid_sparse", dim=2 * HEAD_DIM, n_heads=2, block_size=64, level_blocks=(2, 2, 4))
    q, k = _qk(n)
    with torch.no_grad():
        levels = m.assign_levels(q, k, None, None)
    per_block = sum(((levels == lv).sum(-1) * (64 >> lv)) for lv in range(3)).double()
    return per_block.mean().item(), per_block.mean().item() / n


def tree_nodes(n: int, beam: int) -> float:
    q, k = _qk(n)
    q = q[:, :, :256]
    k_nodes, _, counts, offsets = build_tree(k, k, None)
    nodes, _ = descend(q, k_nodes, counts, offsets, beam, scale=HEAD_DIM ** -0.5)
    return (nodes >= 0).sum(-1).double().mean().item()


def cpu_fwd_bwd(m: torch.nn.Module, x: torch.Tensor, **kw) -> float:
    x = x.detach().requires_grad_()
    t = time.process_time()
    m(x, **kw).sum().backward()
    return time.process_time() - t


def timings(n: int, repeats: int) -> None:
    from attnzoo.layers.testing import mha_from

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, n, 256, generator=g), torch.randn(1, n, 256, generator=g)
    cases = [("hip top_k=64", "hip", {"top_k": 64}, {"causal": True}, False),
             ("hip top_k=64 query_block=32", "hip", {"top_k": 64, "query_block": 32}, {"causal": True}, True),
             ("superlinear_span top_k=3", "superlinear_span", {"top_k": 3}, {"causal": True}, False),
             ("pyramid_sparse 64 (2,2,4)", "pyramid_sparse", {"block_size": 64, "level_blocks": (2, 2, 4)}, {},
              True),
             ("tree_cross_attention beam=1", "tree_cross_attention", {"beam": 1}, {"context": ctx}, False)]
    print(f"| entry (N={n}) | entry CPU s per round | mha CPU s per round | entry / mha (median) "
          "| compiled kernels off: CPU s per round | off / on |")
    print("|---|---|---|---|---|---|")
    for name, slug, kw, call, paths in cases:
        torch.manual_seed(0)
        m = create(slug, dim=256, n_heads=4, **kw)
        d = mha_from(m).float()
        xq = x[:, : n // 8] if "context" in call else x
        got, ref, off = [], [], []
        cpu_fwd_bwd(m, xq, **call), cpu_fwd_bwd(d, xq, **call)  # warm-up
        for _ in range(repeats):
            got.append(cpu_fwd_bwd(m, xq, **call))
            ref.append(cpu_fwd_bwd(d, xq, **call))
            if paths:
                off.append(without_native(lambda: cpu_fwd_bwd(m, xq, **call)))  # noqa: B023 (called at once)
        ratio = statistics.median(got) / statistics.median(ref)
        extra = (f"{', '.join(f'{t:.3f}' for t in off)} | {statistics.median(off) / statistics.median(got):.2f}"
                 if off else "- | -")
        print(f"| {name} | {', '.join(f'{t:.3f}' for t in got)} | {', '.join(f'{t:.3f}' for t in ref)} "
              f"| {ratio:.2f} | {extra} |", flush=True)


def without_native(fn):
    """``fn()`` with attnzoo's compiled kernels switched off (``ATTNZOO_NATIVE=0``)."""
    before = os.environ.get("ATTNZOO_NATIVE")
    os.environ["ATTNZOO_NATIVE"] = "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["ATTNZOO_NATIVE"]
        else:
            os.environ["ATTNZOO_NATIVE"] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--time", type=int, default=0, help="also time forward + backward at this length")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    if args.time:
        timings(args.time, args.repeats)
    print("| N | hip k=64 keys/query (causal fraction) | superlinear_span k=3 | pyramid_sparse (fraction of N) "
          "| tree beam 1 nodes | tree beam 4 nodes |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        hk, hf = routed_keys("hip", n, top_k=64)
        sk, sf = routed_keys("superlinear_span", n, top_k=3)
        pk, pf = pyramid_keys(n)
        print(f"| {n} | {hk:.1f} ({hf:.4f}) | {sk:.1f} ({sf:.4f}) | {pk:.1f} ({pf:.4f}) | {tree_nodes(n, 1):.1f} "
              f"| {tree_nodes(n, 4):.1f} |", flush=True)


if __name__ == "__main__":
    main()
