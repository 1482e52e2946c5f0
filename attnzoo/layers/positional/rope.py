"""``rope``: Rotary position embedding on q/k (base, rotary_dim, scaling, KV-cache offsets)."""

from __future__ import annotations

import torch

from attnzoo.layers.positional._common import FAMILY, HOST_SUPPORT, rand_qk
from attnzoo.layers.rotary import RotaryEmbedding
from attnzoo.registry import Reduction, register


def _rope_shift() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk()
    outs = []
    for r in (RotaryEmbedding(8), RotaryEmbedding(8, rotary_dim=4, interleaved=True)):
        a = r(q, k)
        b = r(q, k, q_offset=37, k_offset=37)
        outs.append((a[0] @ a[1].transpose(-1, -2), b[0] @ b[1].transpose(-1, -2)))
    return torch.stack([o[1] for o in outs]), torch.stack([o[0] for o in outs])


def _rope_zero_identity() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk(n=1)
    return RotaryEmbedding(8)(q, k)[0], q


def _rope_norm() -> tuple[torch.Tensor, torch.Tensor]:
    q, k = rand_qk()
    return RotaryEmbedding(8)(q, k, q_offset=5)[0].norm(dim=-1), q.norm(dim=-1)


register(
    "rope", family=FAMILY, type="score_mod", priority=1, papers=("baseline",), supports=HOST_SUPPORT,
    complexity="O(N d)", reference="the host mha with backend='reference' in float64",
    summary="Rotary position embedding on q/k (base, rotary_dim, scaling, KV-cache offsets).",
    test_kwargs={"head_dim": 8}, host=lambda m: {"rope": m},
    reductions=(
        Reduction("shift_invariant", "adding the same offset to every position leaves the scores unchanged",
                  _rope_shift),
        Reduction("position_zero_identity", "position 0 is the identity rotation", _rope_zero_identity),
        Reduction("norm_preserving", "rotations preserve the norm of q", _rope_norm),
    ),
)(RotaryEmbedding)
