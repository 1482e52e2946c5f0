"""seer_attention, tidal_decode and landmark on CPU, each next to mha with the same weights, in one run.

Run: ``python benchmarks/bench_dyn_decode.py [--n 4096] [--context 4096] [--repeats 5] [--threads 1]``.

- ``seer_attention`` (block 128, top_k 4, dim 512, 8 heads, 2 kv heads, float32): forward + backward, causal
  (per-query gate, gather path) and non-causal (pooled gate, block tiles), against ``mha`` (SDPA); and one
  ``gate_loss`` step (the distillation: dense attention map + block max-pool), against the causal mha forward.
- ``tidal_decode``: a decoding step (mean of 8 consecutive steps; KV cache of ``--context`` tokens) of a 4-layer
  stack (selection at layer 0, top_k 256) against the same stack with every layer dense.
- ``landmark``: a decoding step (``--context`` tokens of cache, block 64) in retrieval mode (top_k 4, window 1)
  against training mode (every block): both compute every score densely, so the step times are about equal;
  the attended tokens per query are printed too.
- ``topk_attention`` (top_k 64): a decoding step (``--context`` tokens of cache) with Sparsifiner's predictor
  (rank 32) against the exact scorer.

``--sections`` runs some of them (default: all).

Process CPU time (``clock="cpu"``), one thread by default (stable on a shared machine); median of ``--repeats``
with the min-max spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine  # noqa: E402

from attnzoo.layers.cache import KVCache  # noqa: E402
from attnzoo.layers.dynamic_sparse.landmark import landmark_mask  # noqa: E402
from attnzoo.layers.testing import mha_from  # noqa: E402
from attnzoo.registry import create  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) CPU seconds of ``fn`` after one warm-up call, divided by ``fn.steps`` when it has them."""
    fn()
    per = getattr(fn, "steps", 1)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) / per)
    return statistics.median(times), min(times), max(times)


def show(name: str, res: tuple[float, float, float], base: tuple[float, float, float] | None = None) -> None:
    ratio = f"  ratio to baseline {res[0] / base[0]:.2f}" if base else ""
    print(f"  {name:48s} {res[0] * 1e3:9.1f} ms  [{res[1] * 1e3:.1f}, {res[2] * 1e3:.1f}]{ratio}")


def fwd_bwd(m, x, **kw):
    def run():
        xx = x.detach().requires_grad_()
        m(xx, **kw).sum().backward()
    return run


def clone(cache: KVCache) -> KVCache:
    """A copy that a decoding step can extend without touching ``cache`` (its views hold no spare room, so appending
    to the copy grows a buffer of its own)."""
    out = KVCache()
    out.k, out.v, out.keep, out.position = cache.k, cache.v, cache.keep, cache.position
    out.state = {key: [clone(c) for c in val] if key == "layers" else val for key, val in cache.state.items()}
    return out


def decode_step(m, x, step, steps: int = 8):
    """``steps`` decoding steps of ``step`` after a prefill of ``x``, each repeat from a copy of the same prefilled
    cache; the timed value is the time per step (the copy's first step grows the cache's buffers, the others write
    one entry each, as in a long generation)."""
    cache = KVCache()
    with torch.no_grad():
        m(x, causal=True, cache=cache)

    def run():
        c = clone(cache)
        with torch.no_grad():
            for _ in range(steps):
                m(step, causal=True, cache=c)
    run.steps = steps
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    torch.manual_seed(0)
    dim, heads = 512, 8

    for name in args.sections:
        SECTIONS[name](args, dim, heads)


def seer_section(args: argparse.Namespace, dim: int, heads: int) -> None:
    print(f"seer_attention, N={args.n}, forward + backward")
    seer = create("seer_attention", dim=dim, n_heads=heads, n_kv_heads=2, block_size=128, top_k=4)
    mha = mha_from(seer).float()
    x = torch.randn(1, args.n, dim)
    base = timed(fwd_bwd(mha, x, causal=True), args.repeats)
    show("mha causal (SDPA)", base)
    show("seer_attention causal (per-query gate, gather)", timed(fwd_bwd(seer, x, causal=True), args.repeats), base)
    base_nc = timed(fwd_bwd(mha, x), args.repeats)
    show("mha non-causal (SDPA)", base_nc)
    show("seer_attention non-causal (pooled gate, tiles)", timed(fwd_bwd(seer, x), args.repeats), base_nc)
    fwd = timed(lambda: mha(x, causal=True), args.repeats)

    def gate_step():
        seer.gate_loss(x, causal=True).backward()
    show("mha causal forward", fwd)
    show("seer gate_loss forward + backward (causal)", timed(gate_step, args.repeats), fwd)


def tidal_section(args: argparse.Namespace, dim: int, heads: int) -> None:
    print(f"tidal_decode, a decoding step with {args.context} cached tokens (4 layers, top_k 256; mean of 8 "
          "consecutive steps)")
    tidal = create("tidal_decode", dim=dim, n_heads=heads, top_k=256, n_layers=4, first_sparse=1)
    dense = create("tidal_decode", dim=dim, n_heads=heads, top_k=256, n_layers=4, first_sparse=3)
    for layer in dense.layers:
        layer.role = "dense"
    dense.load_state_dict(tidal.state_dict())
    ctx = torch.randn(1, args.context, dim)
    step = torch.randn(1, 1, dim)
    base = timed(decode_step(dense, ctx, step), args.repeats)
    show("4 dense layers", base)
    show("tidal_decode (1 selection + 3 sparse layers)", timed(decode_step(tidal, ctx, step), args.repeats), base)


def landmark_section(args: argparse.Namespace, dim: int, heads: int) -> None:
    ctx = torch.randn(1, args.context, dim)
    step = torch.randn(1, 1, dim)
    print(f"landmark, a decoding step with {args.context} cached tokens (block 64; mean of 8 consecutive steps)")
    train = create("landmark", dim=dim, n_heads=heads, block_size=64)
    retr = create("landmark", dim=dim, n_heads=heads, block_size=64, top_k=4, window=1)
    retr.load_state_dict(train.state_dict())
    base = timed(decode_step(train, ctx, step), args.repeats)
    show("training mode (every block)", base)
    show("retrieval (top_k 4, window 1)", timed(decode_step(retr, ctx, step), args.repeats), base)
    full = torch.cat([ctx, step], 1)
    with torch.no_grad():
        for name, m in (("training", train), ("retrieval", retr)):
            _, w = m(full[:, -1024:], causal=True, return_weights=True)
            regular = ~landmark_mask(w.shape[-1], 64)
            print(f"  attended regular tokens, last query ({name}, 1024 tokens): "
                  f"{int(((w[0, :, -1] > 0) & regular).sum(-1).max())}")


def topk_section(args: argparse.Namespace, dim: int, heads: int) -> None:
    print(f"topk_attention (top_k 64), a decoding step with {args.context} cached tokens (mean of 8 consecutive "
          "steps)")
    exact = create("topk_attention", dim=dim, n_heads=heads, top_k=64)
    predictor = create("topk_attention", dim=dim, n_heads=heads, top_k=64, scorer="predictor", rank=32)
    predictor.load_state_dict(exact.state_dict(), strict=False)
    ctx = torch.randn(1, args.context, dim)
    step = torch.randn(1, 1, dim)
    base = timed(decode_step(exact, ctx, step), args.repeats)
    show("exact scorer", base)
    show("predictor (rank 32)", timed(decode_step(predictor, ctx, step), args.repeats), base)


SECTIONS = {"seer": seer_section, "tidal": tidal_section, "landmark": landmark_section, "topk": topk_section}

if __name__ == "__main__":
    main()
