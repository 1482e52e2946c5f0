"""User patterns from a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnzoo.patterns.base import Pattern


class Custom(Pattern):
    """Wrap ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` written with broadcasting torch ops.

    Its block layout is found by evaluating it tile by tile (exact, cached per shape).
    Declare ``per_batch=False`` / ``per_head=False`` when the rule ignores ``b`` / ``h``
    so that layouts and FlexAttention block masks are shared across them.

    Tensors the rule reads are watched: a change in place (or a new tensor bound to the name) rebuilds
    what was cached. They are found in its closure, defaults, bound object and the module globals it
    names; list any other (e.g. read through an attribute of another object) in ``tensors``.
    """

    def __init__(
        self, mask_mod: Callable[..., torch.Tensor], *, per_batch: bool = True, per_head: bool = True, name: str = "",
        tensors: Sequence[torch.Tensor] = (),
    ) -> None:
        if not callable(mask_mod):
            raise TypeError(f"mask_mod: expected a callable (b, h, q_idx, kv_idx) -> bool tensor, got {mask_mod!r}")
        bad = [i for i, t in enumerate(tensors) if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"tensors: expected a list of tensors, item {bad[0]} is {type(tensors[bad[0]]).__name__}")
        self.fn = mask_mod
        self.watched = tuple(tensors)
        self.per_batch, self.per_head = per_batch, per_head
        self.name = name or getattr(mask_mod, "__name__", "mask_mod")

    def allow(self, b, h, q, kv, shape):
        return self.fn(b, h, q, kv)

    def __repr__(self) -> str:
        return f"Custom({self.name})"
