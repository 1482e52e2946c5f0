"""Past one machine: context-parallel (ring) attention over ``torch.distributed``.

:func:`ring_attention` runs softmax attention over a sequence sharded across processes (gloo on CPU,
NCCL on CUDA); :func:`shard` / :func:`unshard` split and reassemble tensors in the ``contiguous`` or
``zigzag`` layout; :func:`sequence_sharded` switches the attention mixers of a model to ring attention, so
a model trains with its sequence sharded (``attnzoo train --context-parallel P`` under ``torchrun``).
"""

from attnzoo.parallel.context import current, sequence_sharded
from attnzoo.parallel.layout import LAYOUTS, assemble, positions, shard, unshard
from attnzoo.parallel.ring import reset_traffic, ring_attention, traffic

__all__ = ["LAYOUTS", "assemble", "current", "positions", "reset_traffic", "ring_attention", "sequence_sharded",
           "shard", "traffic", "unshard"]
