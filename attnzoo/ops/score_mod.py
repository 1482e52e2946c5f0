"""The score-modifier protocol: a change to the logits ``s = q.k * scale`` before the softmax.

A score modifier is called as ``mod(score, b, h, q_idx, kv_idx, shape)`` with broadcasting
index tensors, like a FlexAttention ``score_mod`` with the problem shape added.
``tensors()`` lists the tensors it reads that may need gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnzoo.ops.layout import Shape


class ScoreMod:
    """Base class: override :meth:`__call__`."""

    per_batch: bool = False
    per_head: bool = False
    additive: bool = False  # True when mod(s) = s + f(b, h, q, kv): SDPA can take f as a float mask

    def __call__(self, score, b, h, q, kv, shape: Shape) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        return []

    def check(self, shape: Shape) -> None:
        """Raise ``ValueError`` if the modifier cannot apply to ``shape``."""

    def check_finite(self) -> None:
        """Raise ``ValueError`` if a tensor the modifier reads holds NaN or an infinity (``attention(...,
        check_finite=True)``); a modifier to which ``-inf`` means "masked" overrides this."""
        for i, t in enumerate(self.tensors()):
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                raise ValueError(f"score_mod: {type(self).__name__}'s tensor {i} {list(t.shape)} holds "
                                 f"{int(bad.sum())} non-finite value(s) (NaN or +-inf)")

    def indexed_bias(self) -> torch.Tensor | None:
        """``table [H, T]`` when the modifier is ``s + table[h, self.index(q, kv)]`` (a per-head bias
        read at an integer index of the pair, e.g. relative positions), else None."""
        return None

    def has_pair_bias(self) -> bool:
        """Whether the modifier is ``s + table[h, index(q, kv)]``: see :meth:`pair_bias_index`."""
        return self.indexed_bias() is not None

    def pair_bias_index(self, q: torch.Tensor, kv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, int]:
        """For a modifier with :meth:`has_pair_bias`: the integer index of each pair of the broadcasting
        position tensors ``q``, ``kv`` (in a call of ``shape``) and the table size it needs. It depends on
        positions only, so callers may cache it; :meth:`pair_bias_table` gives the values."""
        return self.index(q, kv), int(self.indexed_bias().shape[1])

    def pair_bias_table(self, size: int) -> torch.Tensor:
        """``table [H, size]`` of a modifier with :meth:`has_pair_bias` (differentiable in its parameters)."""
        return self.indexed_bias()

    def pair_bias_reason(self, heads: int, where: str) -> str | None:
        """Why a kernel that adds a per-head pair bias itself (``where`` names it) cannot take this modifier,
        or None when it can: it must have :meth:`has_pair_bias` and a table ``[heads, T]``."""
        if not self.has_pair_bias():
            return (f"score_mod {type(self).__name__} is not supported by {where} (it takes additive per-head biases "
                    "read at an index of the pair: GridRelativeBias, ALiBi)")
        table = self.pair_bias_table(1)
        if table.dim() != 2 or table.shape[0] != heads:
            return f"{where} needs a bias table [H={heads}, T], got {list(table.shape)}"
        return None

    def flex(self, shape: Shape) -> Callable[..., torch.Tensor]:
        """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` bound to ``shape``.

        The same function object is returned for the same shape, so compiled kernels are reused.
        """
        cache = self.__dict__.setdefault("_flex_fns", {})
        if shape not in cache:
            cache[shape] = lambda score, b, h, q, kv: self(score, b, h, q, kv, shape)
        return cache[shape]

    def on(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``t`` on the device and dtype of ``like`` (a no-op when it already is)."""
        if t.device == like.device and t.dtype == like.dtype:
            return t
        return t.to(device=like.device, dtype=like.dtype)

    def devices(self) -> set[torch.device]:
        """Devices of the tensors this modifier reads."""
        return {t.device for t in self.tensors()}

class Chain(ScoreMod):
    """Apply modifiers in order (e.g. ``[ALiBi(...), SoftCap(30.0)]``)."""

    def __init__(self, mods: Sequence[ScoreMod]) -> None:
        self.mods = tuple(as_score_mod(m) for m in mods)
        self.additive = all(m.additive for m in self.mods)
        self.per_batch = any(m.per_batch for m in self.mods)
        self.per_head = any(m.per_head for m in self.mods)

    def __call__(self, score, b, h, q, kv, shape):
        for mod in self.mods:
            score = mod(score, b, h, q, kv, shape)
        return score

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in self.mods for t in m.tensors()]

    def check(self, shape: Shape) -> None:
        for m in self.mods:
            m.check(shape)

    def check_finite(self) -> None:
        for m in self.mods:
            m.check_finite()


class CustomScore(ScoreMod):
    """Wrap a FlexAttention-style ``score_mod(score, b, h, q_idx, kv_idx)``.

    Tensors it captures get gradients on the ``reference`` backend; list them in
    ``tensors`` so the ``blocksparse`` and ``flex`` backends propagate them too.
    """

    per_batch = True
    per_head = True

    def __init__(self, fn: Callable[..., torch.Tensor], *, tensors: Sequence[torch.Tensor] = ()) -> None:
        if not callable(fn):
            raise TypeError(f"score_mod: expected a callable (score, b, h, q_idx, kv_idx), got {fn!r}")
        self.fn, self._tensors = fn, list(tensors)

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def __call__(self, score, b, h, q, kv, shape):
        out = self.fn(score, b, h, q, kv)
        if torch.compiler.is_compiling():  # traced by FlexAttention, which checks its own dtypes
            return out
        if not isinstance(out, torch.Tensor) or out.dtype != score.dtype:
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"score_mod: the custom score_mod must return the scores in their dtype {score.dtype}, "
                            f"got {got} (a captured tensor of another dtype promotes them: cast it to the inputs' "
                            "dtype)")
        return out


def as_score_mod(mod: object) -> ScoreMod:
    """Accept a ScoreMod, a list of them (chained), or a plain flex-style callable."""
    if isinstance(mod, ScoreMod):
        return mod
    if isinstance(mod, (list, tuple)):
        return Chain(mod)
    if callable(mod):
        return CustomScore(mod)
    raise TypeError(f"score_mod: expected a ScoreMod, a list of them or a callable, got {type(mod).__name__}")
