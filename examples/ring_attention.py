"""Ring attention over the processes of a ``torchrun`` job (or one process without it).

    torchrun --nproc_per_node 4 examples/ring_attention.py     # gloo on CPU, NCCL on CUDA
    python examples/ring_attention.py                          # one process: checks against attnzoo.attention

Every process builds the same full sequence (a real job loads only its shard), keeps its zigzag shard, runs
causal sliding-window attention over the whole sequence with its neighbours, and checks its output shard and
gradients against attention on the whole sequence.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import attnzoo
import attnzoo.patterns as P
from attnzoo.parallel import ring_attention, shard, traffic


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4096, 64, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = P.SlidingWindow(256, causal=True)
    mine = [shard(t.detach(), 2, "zigzag", rank=rank, world_size=world).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, pattern=pattern, layout="zigzag")
    out.sum().backward()

    full = attnzoo.attention(q, k, v, pattern=pattern)
    full.sum().backward()
    torch.testing.assert_close(out, shard(full, 2, "zigzag", rank=rank, world_size=world))
    for t, local in zip((q, k, v), mine):
        torch.testing.assert_close(local.grad, shard(t.grad, 2, "zigzag", rank=rank, world_size=world))
    print(f"process {rank}/{world}: shard {list(out.shape)} matches; sent {traffic()['bytes_sent'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
