"""GPU: routed attention on flex (block mask built from the routing) vs a FlexAttention block mask rebuilt per call.

Run on a GPU: ``python benchmarks/bench_routed_flex.py [--n 8192 32768] [--json PATH]``; on a machine without CUDA
it checks both paths against the reference on CPU at a small size (forward only, float32) and skips the timing.

Per call, as a model does: a MoBA-style block routing from the call's own ``q``/``k`` (query block of 128 scores
the mean-pooled key blocks, own block forced, future blocks excluded, top-k), then

- ``routed flex``: :func:`attnzoo.patterns.routed.block_routed_attention` with ``backend="flex"`` (the block mask
  comes from the routing's exact tile bounds, ``BlockMask.from_kv_blocks``);
- ``flex + create_block_mask``: what a user writes by hand, ``create_block_mask`` over a ``mask_mod`` that reads
  the routing, rebuilt every call, then the compiled ``flex_attention``;
- ``sdpa causal``: dense causal SDPA (the pairs the routing drops included).

bf16, B=1, H=16, D=128; forward and forward+backward medians (routing included) side by side in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine, median_time  # noqa: E402

from attnzoo.patterns.routed import block_routed_attention  # noqa: E402

BLOCK = 128


def route(q: torch.Tensor, k: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool ``[B, H, nb, nb]``: each query block's ``top_k`` key blocks by mean-pooled ``q·k`` (own forced, causal)."""
    b, h, n, d = q.shape
    nb = -(-n // BLOCK)
    pad = nb * BLOCK - n
    qm = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(b, h, nb, BLOCK, d).float().mean(3)
    km = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, nb, BLOCK, d).float().mean(3)
    s = qm @ km.transpose(-1, -2)
    blk = torch.arange(nb, device=q.device)
    s = s.masked_fill(blk.view(1, -1) > blk.view(-1, 1), float("-inf"))
    s = s.masked_fill(blk.view(1, -1) == blk.view(-1, 1), float("inf"))
    val, idx = s.topk(min(top_k, nb), -1)
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, val > float("-inf"))


def routed_flex(q, k, v, top_k):
    with torch.no_grad():
        blocks = route(q, k, top_k)
    return block_routed_attention(q, k, v, blocks, block_q=BLOCK, block_k=BLOCK, causal=True, backend="flex")


_FLEX = None


def flex_rebuilt(q, k, v, top_k):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        _FLEX = torch.compile(flex_attention, dynamic=False)
    with torch.no_grad():
        blocks = route(q, k, top_k)

    def mask_mod(b, h, qi, ki):
        return blocks[b, h, qi // BLOCK, ki // BLOCK] & (ki <= qi)

    b, h, n, _ = q.shape
    bm = create_block_mask(mask_mod, b, h, n, n, device=q.device, BLOCK_SIZE=BLOCK)
    return _FLEX(q, k, v, block_mask=bm)


def sdpa_causal(q, k, v, top_k):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


CASES = {"routed flex": routed_flex, "flex + create_block_mask": flex_rebuilt, "sdpa causal": sdpa_causal}


def density(q, k, top_k) -> float:
    n = q.shape[2]
    with torch.no_grad():
        blocks = route(q, k, top_k)
    allow = blocks.repeat_interleave(BLOCK, 2)[:, :, :n].repeat_interleave(BLOCK, 3)[..., :n]
    allow &= torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return allow.double().mean().item() / ((n + 1) / (2 * n))


def check_on_cpu(top_k: int) -> None:
    """Both flex paths against the routed reference on CPU (forward, float32, N=300: a ragged last block)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=g) for _ in range(3))
    with torch.no_grad():
        blocks = route(q, k, top_k)
        want = block_routed_attention(q, k, v, blocks, block_q=BLOCK, block_k=BLOCK, causal=True,
                                      backend="reference")
        for name in ("routed flex", "flex + create_block_mask"):
            err = (CASES[name](q, k, v, top_k) - want).abs().max().item()
            print(f"check on CPU: {name} vs reference, max abs error {err:.2e}")
            if err > 1e-4:
                raise SystemExit(f"{name}: differs from the reference by {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--top-k", type=int, default=8, help="key blocks per query block, own block included")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON lines")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    check_on_cpu(args.top_k)
    if not torch.cuda.is_available():
        print("no CUDA device: the timing runs on a GPU only (skipped)")
        return
    rows = []
    print("| N | top_k | density | path | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|")
    for n in args.n:
        q, k, v = (torch.randn(1, args.heads, n, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dens = density(q, k, args.top_k)
        for name, fn in CASES.items():
            def fwd(fn=fn, qkv=(q, k, v)):
                with torch.no_grad():
                    fn(*qkv, args.top_k)

            def fwd_bwd(fn=fn, qkv=(q, k, v)):
                fn(*qkv, args.top_k).sum().backward()

            tf = median_time(fwd, "cuda", repeats=args.repeats, warmup=2)
            tb = median_time(fwd_bwd, "cuda", repeats=args.repeats, warmup=2)
            rows.append({"n": n, "top_k": args.top_k, "density": dens, "path": name, "fwd_ms": tf * 1e3,
                         "fwd_bwd_ms": tb * 1e3})
            print(f"| {n} | {args.top_k} | {dens:.3f} | {name} | {tf * 1e3:.3f} | {tb * 1e3:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
