"""``rope_buckets``: Attention Buckets: run a RoPE model with several bases and average the output distributions."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.positional._common import FAMILY
from attnzoo.layers.rotary import RotaryEmbedding
from attnzoo.registry import Reduction, register


class AttentionBuckets(nn.Module):
    """Attention Buckets: an inference-time ensemble of one model run with several RoPE bases.

    The model runs once per base ``b`` in ``bases`` with every
    :class:`RotaryEmbedding` inside it re-based to ``b`` (restored afterwards), and the
    output distributions are averaged: ``p = mean_b softmax(model_b(...))`` over the last
    dimension. ``forward`` returns ``log p`` (logits whose softmax is the aggregated
    distribution), so it drops in wherever the model's logits were used. Checked against
    the abstract (Chen et al., Attention Buckets): "multiple parallel processes", "each ...
    a distinct base angle for the rotary position embedding", an attention trough of one
    compensated by a peak of another. The abstract does not say how the outputs are
    aggregated or which bases are used: the mean of the distributions is the catalogue's
    "aggregate the B output distributions", and the default bases ``(1, 1.25, 1.5, 1.75, 2)``
    times the model's own base are a choice made here. The runs are sequential (one
    forward per base); pass no KV caches through it (each base needs its own).
    """

    def __init__(self, model: nn.Module, bases: Any = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
        ropes = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
        if not ropes:
            raise ValueError("model: contains no RotaryEmbedding to re-base (rope_buckets steers RoPE models)")
        self.model = model
        if bases is None:
            bases = [ropes[0].base * f for f in (1.0, 1.25, 1.5, 1.75, 2.0)]
        bases = [float(b) for b in bases]
        if not bases or any(not b > 1.0 for b in bases):
            raise ValueError(f"bases: expected a non-empty list of RoPE bases > 1, got {bases!r}")
        self.bases = tuple(bases)

    def _ropes(self) -> list[RotaryEmbedding]:
        return [m for m in self.model.modules() if isinstance(m, RotaryEmbedding)]

    @staticmethod
    def _set_base(rope: RotaryEmbedding, base: float) -> None:
        rope.base = base
        d = rope.rotary_dim
        rope.inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=rope.inv_freq.device) / d)

    def bucket_logits(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The model's output under each base (the model is left as it was)."""
        ropes = self._ropes()
        saved = [(r.base, r.inv_freq) for r in ropes]
        outs = []
        try:
            for base in self.bases:
                for r in ropes:
                    self._set_base(r, base)
                outs.append(self.model(*args, **kwargs))
        finally:
            for r, (base, inv) in zip(ropes, saved):
                r.base, r.inv_freq = base, inv
        return outs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log mean_b softmax(model_b(*args, **kwargs))`` over the last dimension."""
        logps = torch.stack([torch.log_softmax(y, dim=-1) for y in self.bucket_logits(*args, **kwargs)])
        return torch.logsumexp(logps, dim=0) - math.log(len(self.bases))


def _tiny_lm(seed: int = 0, **kw: Any) -> nn.Module:
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(seed)
    return TinyLM(**kw).double()


def _tokens(b: int = 2, n: int = 9, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def _buckets_one_is_base() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    t = _tokens()
    steered = AttentionBuckets(lm, bases=[10000.0])
    return steered(t).exp(), torch.softmax(lm(t), -1)


def _buckets_distribution() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    p = AttentionBuckets(lm, bases=[5000.0, 10000.0, 40000.0])(_tokens()).exp()
    ok = (p >= 0).all().to(torch.float64)
    return torch.cat([p.sum(-1).flatten(), ok.view(1)]), torch.ones(p[..., 0].numel() + 1, dtype=torch.float64)


def _buckets_is_mean() -> tuple[torch.Tensor, torch.Tensor]:
    lm = _tiny_lm()
    t = _tokens()
    steered = AttentionBuckets(lm, bases=[3000.0, 10000.0, 30000.0])
    each = []
    for base in steered.bases:  # each bucket = a model built with that base
        other = _tiny_lm()
        for r in other.modules():
            if isinstance(r, RotaryEmbedding):
                AttentionBuckets._set_base(r, base)
        each.append(torch.softmax(other(t), -1))
    return steered(t).exp(), torch.stack(each).mean(0)


register(
    "rope_buckets", family=FAMILY, type="steering", priority=3, papers=("Attention Buckets",),
    supports={"self", "causal", "padding"}, complexity="B x the model", backends=(),
    reference="the wrapped model's float64 reference (backend='reference'), run once per base",
    summary="Attention Buckets: run a RoPE model with several bases and average the output distributions.",
    test_kwargs={"bases": (10000.0, 20000.0, 40000.0)},
    reductions=(
        Reduction("one_bucket_is_base", "B = 1 with the default base gives the base model's distribution",
                  _buckets_one_is_base),
        Reduction("valid_distribution", "the aggregated output is a valid distribution (>= 0, rows sum to 1)",
                  _buckets_distribution),
        Reduction("mean_of_buckets", "the output is the mean of the distributions of models built with each base",
                  _buckets_is_mean),
    ),
)(AttentionBuckets)
