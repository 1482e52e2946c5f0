"""One process of a ring-attention check group (started by tests/parallel/test_ring.py, never collected).

Every process builds the same full float64 inputs, runs ``ring_attention`` on its shards and compares its
output shard and the gradients of its shards with the single-process reference on the full sequence.
Failures are written, one line each, to ``<out>.<rank>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist

import attnzoo
import attnzoo.patterns as P
from attnzoo.parallel import reset_traffic, ring_attention, shard, traffic
from attnzoo.parallel import ring as ring_module

TOL = 1e-10


def cases(world: int) -> list[tuple[str, dict]]:
    """(name, spec): spec gives shapes and builds the pattern / score modifier of the full sequence."""
    n = 24
    ids = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 13 + [1] * 11])
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :7] = False  # with Causal, the first 7 queries of batch 1 see no key
    keep[0, 10:15] = False
    return [
        ("full", dict(pattern=lambda h: None)),
        ("causal", dict(pattern=lambda h: P.Causal())),
        ("sliding", dict(pattern=lambda h: P.SlidingWindow(3))),
        ("sliding_causal_sinks", dict(pattern=lambda h: P.SlidingWindow(4, causal=True, n_sink=2))),
        ("document", dict(pattern=lambda h: P.Document([5, 11, 8]))),
        ("document_ids_causal", dict(pattern=lambda h: P.Document.from_ids(ids) & P.Causal())),
        ("key_padding_causal_empty_rows", dict(pattern=lambda h: P.Causal() & P.KeyPadding(keep))),
        ("gqa_causal", dict(h=4, h_kv=2, pattern=lambda h: P.Causal())),
        ("gqa_window_dv", dict(h=4, h_kv=1, d_v=6, pattern=lambda h: P.SlidingWindow(5))),
        ("alibi_causal", dict(pattern=lambda h: P.Causal(), score_mod=lambda h: P.ALiBi(h))),
        ("softcap", dict(pattern=lambda h: None, score_mod=lambda h: P.SoftCap(2.0))),
        ("relative_bias_learned", dict(pattern=lambda h: P.Causal(), learned=True,
                                       score_mod=lambda h: P.RelativePositionBias(h, max_distance=6))),
        ("aligned_blocks_causal", dict(n=128 * 2 * world, d=4, b=1, h=1, h_kv=1, span_min=64,
                                       pattern=lambda h: P.Causal())),
        ("aligned_blocks_window", dict(n=128 * 2 * world, d=4, b=1, h=2, h_kv=1, span_min=64,
                                       pattern=lambda h: P.SlidingWindow(40, causal=True))),
    ]


def run_case(name: str, spec: dict, layout: str, rank: int, world: int) -> list[str]:
    b, h, h_kv = spec.get("b", 2), spec.get("h", 2), spec.get("h_kv", spec.get("h", 2))
    n, d = spec.get("n", 24), spec.get("d", 8)
    d_v = spec.get("d_v", d)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, n, d_v, generator=g, dtype=torch.float64)
    dout = torch.randn(b, h, n, d_v, generator=g, dtype=torch.float64)
    pattern = spec["pattern"](h)
    mod = spec["score_mod"](h) if "score_mod" in spec else None
    if spec.get("learned"):
        mod = mod.double()
        with torch.no_grad():
            mod.table.copy_(torch.randn(mod.table.shape, generator=g, dtype=torch.float64))
    # Tiny shards: send keys in spans of 2+ tokens so that partial spans are exercised (the aligned case keeps the
    # default, so the block views read the global layout).
    ring_module.SPAN_BLOCK_MIN = spec.get("span_min", 2)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attnzoo.attention(*full, pattern=pattern, score_mod=mod, backend="reference")
    ref_mod_grad = None
    if spec.get("learned"):
        ref_grads = torch.autograd.grad(ref, [*full, mod.table], dout)
        ref_mod_grad = ref_grads[3]
    else:
        ref_grads = torch.autograd.grad(ref, full, dout)
    local = [shard(t, 2, layout, rank=rank, world_size=world).clone().requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*local, pattern=pattern, score_mod=mod, layout=layout)
    inputs = [*local, mod.table] if spec.get("learned") else local
    grads = torch.autograd.grad(out, inputs, shard(dout, 2, layout, rank=rank, world_size=world))
    errors = []
    checks = [("out", out, ref)] + [(f"d{x}", gr, rg) for x, gr, rg in zip("qkv", grads, ref_grads)]
    for what, got, want in checks:
        want = shard(want, 2, layout, rank=rank, world_size=world)
        err = float((got.detach() - want.detach()).abs().max())
        if not err <= TOL or torch.isnan(got).any():
            errors.append(f"{name} {layout} P={world} rank {rank}: {what} differs by {err:.3g}")
    if ref_mod_grad is not None:  # each process holds its share of the modifier's gradient
        total = grads[3].clone()
        dist.all_reduce(total)
        err = float((total - ref_mod_grad).abs().max())
        if not err <= TOL:
            errors.append(f"{name} {layout} P={world} rank {rank}: score_mod table gradient differs by {err:.3g}")
    return errors


def check_errors(rank: int, world: int) -> list[str]:
    """Refusals: shards of different lengths across processes; an odd zigzag shard."""
    errors = []
    n = 4 if rank == 0 else 6
    x = torch.randn(1, 1, n, 4, dtype=torch.float64)
    try:
        ring_attention(x, x, x)
        errors.append(f"rank {rank}: shards of different lengths were not refused")
    except ValueError as e:
        if "same shapes" not in str(e):
            errors.append(f"rank {rank}: unclear error for different shard lengths: {e}")
    y = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    try:
        ring_attention(y, y, y, layout="zigzag")
        errors.append(f"rank {rank}: an odd zigzag shard was not refused")
    except ValueError as e:
        if "even" not in str(e):
            errors.append(f"rank {rank}: unclear error for an odd zigzag shard: {e}")
    return errors


def check_traffic(rank: int, world: int) -> list[str]:
    """Bytes sent in the forward: a sliding window of 3 sends its two neighbours the 4 keys (two spans of 2) at
    the shard's edges; causal (contiguous) sends the whole shard to the later processes only."""
    b, h, seg, d = 1, 2, 8, 4
    ring_module.SPAN_BLOCK_MIN = 2
    x = torch.randn(b, h, seg, d, dtype=torch.float64)
    per_token = b * h * 2 * d * 8  # k and v, float64
    errors = []
    for name, pattern, expect in (
        ("sliding window", P.SlidingWindow(3), 4 * ((rank > 0) + (rank < world - 1))),
        ("causal", P.Causal(), seg * (world - 1 - rank)),
    ):
        reset_traffic()
        with torch.no_grad():
            ring_attention(x, x, x, pattern=pattern)
        sent = traffic()["bytes_sent"]
        if sent != expect * per_token:
            errors.append(f"rank {rank}: {name} sent {sent} bytes, expected {expect} tokens of {per_token} bytes")
    return errors


def check_mixer(rank: int, world: int) -> list[str]:
    """A GQA layer with rotary embeddings, causal and key padding, under ``sequence_sharded``: its output shard and
    its parameters' gradients (summed over the processes) equal the layer on the whole sequence."""
    from attnzoo.layers import MultiHeadAttention
    from attnzoo.parallel import sequence_sharded

    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, n_kv_heads=2, rope=True).double()
    g = torch.Generator().manual_seed(1)
    n = 8 * world
    x = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    w = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 3:6] = False
    params = list(layer.parameters())
    ref = layer(x, mask=mask, causal=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    errors = []
    for layout in ("contiguous", "zigzag"):
        part = {"rank": rank, "world_size": world}
        with sequence_sharded(layout=layout):
            y = layer(shard(x, 1, layout, **part), mask=shard(mask, 1, layout, **part), causal=True)
        grads = torch.autograd.grad((y * shard(w, 1, layout, **part)).sum(), params)
        err = float((y.detach() - shard(ref, 1, layout, **part).detach()).abs().max())
        for got, want in zip(grads, ref_grads):
            total = got.clone()
            dist.all_reduce(total)
            err = max(err, float((total - want).abs().max()))
        if not err <= TOL:
            errors.append(f"rank {rank}: MultiHeadAttention under sequence_sharded ({layout}) differs by {err:.3g}")
    return errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--train", help="JSON list of `attnzoo` arguments (a training run) to run after the checks")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    errors: list[str] = []
    try:
        for layout in ("contiguous", "zigzag"):
            for name, spec in cases(world):
                if args.only and name not in args.only:
                    continue
                errors += run_case(name, spec, layout, rank, world)
        errors += check_errors(rank, world)
        errors += check_traffic(rank, world)
        errors += check_mixer(rank, world)
        if args.train:
            from attnzoo.cli import main as cli

            code = cli(json.loads(args.train))
            if code:
                errors.append(f"rank {rank}: attnzoo {' '.join(json.loads(args.train))} exited with {code}")
    except Exception:  # noqa: BLE001 - reported to the test
        errors.append(f"rank {rank}: " + traceback.format_exc())
    with open(f"{args.out}.{rank}", "w") as f:
        f.write("\n".join(errors))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
