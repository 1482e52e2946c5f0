"""``attention``: one call for every pattern and backend; ``explain``: why a backend was chosen (the dispatcher)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnzoo.ops.backends import BACKENDS, Result
from attnzoo.ops.backends.base import DENSE_FRACTION
from attnzoo.ops.backends.blocksparse import default_block
from attnzoo.ops.backends.gather import problem_skip_reason
from attnzoo.ops.backends.triton_local import auto_enabled
from attnzoo.ops.config import limits
from attnzoo.ops.problem import Problem, make_problem


@dataclass
class Explanation:
    """The backend ``auto`` picks and, for every other backend, why it was not used."""

    backend: str
    reasons: dict[str, str] = field(default_factory=dict)
    tile_fraction: float | None = None
    path: str | None = None  # how the chosen backend runs the call (blocksparse: tile plan or block layout)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        if self.path is not None:
            lines.append(f"{self.backend} runs: {self.path}")
        if self.tile_fraction is not None:
            lines.append(f"fraction of (query block, key block) tiles visited: {self.tile_fraction:.4f}")
        lines += [f"  not {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


_REF_NOTE = "reference materialises every score; auto uses it only for return_weights (or pass backend='reference')"
_FLEX_CPU_NOTE = (
    "on CPU FlexAttention compiles per shape (seconds) and blocksparse runs without compiling; "
    "pass backend='flex' to use it anyway"
)


def _decide(p: Problem) -> tuple[str, float | None, dict[str, str]]:
    """The backend ``auto`` runs, the fraction of tiles visited (when computed), and notes on the
    feasible backends it passed over. Cheap: no backend is asked ``why_not`` on the fast paths."""
    if p.return_weights:
        reason = BACKENDS["reference"].why_not(p)
        if reason is not None:  # only the reference returns weights: fail here, not with an out-of-memory
            raise ValueError(f"return_weights: only the reference backend returns weights, and {reason}")
        return "reference", None, {}
    if p.device.type == "cuda" and auto_enabled() and BACKENDS["triton"].why_not(p) is None:  # ATTNZOO_TRITON_LOCAL=1
        note = "the triton backend runs this windowed pattern as a fused kernel (ATTNZOO_TRITON_LOCAL=1)"
        return "triton", None, {"reference": _REF_NOTE, "sdpa": note, "flex": note, "blocksparse": note}
    sdpa = BACKENDS["sdpa"]
    if not p.return_lse and sdpa.native(p) is not None:
        return "sdpa", None, {"reference": _REF_NOTE, "blocksparse": "SDPA runs this pattern natively",
                              "flex": "SDPA runs this pattern natively"}
    if p.device.type == "cpu" and p.pattern is not None and BACKENDS["gather"].why_not(p) is None:
        keys = BACKENDS["gather"].keys_per_query(p)
        if problem_skip_reason(p, keys) is None:
            note = f"gather runs this pattern's {keys} keys per query directly (compiled CPU kernel)"
            return "gather", None, {"reference": _REF_NOTE, "flex": _FLEX_CPU_NOTE, "sdpa": note,
                                    "blocksparse": note}
    if p.device.type == "cuda" and BACKENDS["flex"].why_not(p) is None:
        return "flex", None, {"reference": _REF_NOTE, "blocksparse": "flex runs this pattern as a fused kernel here",
                              "sdpa": "flex skips masked blocks; SDPA would need a dense mask"}
    fraction = BACKENDS["blocksparse"].work_fraction(p) if p.pattern is not None else 1.0
    if fraction >= DENSE_FRACTION and sdpa.why_not(p) is None:
        dense_note = f"{fraction:.0%} of tiles are active: a dense masked kernel is cheaper"
        return "sdpa", fraction, {"reference": _REF_NOTE, "flex": _FLEX_CPU_NOTE, "blocksparse": dense_note}
    return "blocksparse", fraction, {
        "reference": _REF_NOTE, "flex": _FLEX_CPU_NOTE,
        "sdpa": f"only {fraction:.1%} of tiles are active: a dense masked kernel would waste the sparsity",
    }


def _choose(p: Problem) -> Explanation:
    name, fraction, notes = _decide(p)
    reasons = {}
    for other, backend in BACKENDS.items():
        if other != name:
            note = notes.get(other) or (backend.auto_note(p) if hasattr(backend, "auto_note") else None)
            reasons[other] = backend.why_not(p) or note or f"{name} is preferred for this call"
    path = BACKENDS["blocksparse"].path(p) if name == "blocksparse" else None
    return Explanation(name, dict(sorted(reasons.items())), fraction, path)


# Validated calls seen recently: a repeated call (same pattern object with the same data, shapes,
# dtypes, devices and grad mode) skips validation and dispatch. Entries hold the pattern, the score
# modifier and the tensors they read, so the ids in a key cannot be reused by other objects while the
# entry lives; a tensor of the pattern changed in place moves its version counter, so the key changes.
_MEMO: OrderedDict[tuple, tuple[Callable[..., Result], Any, Any, list[torch.Tensor]]] = OrderedDict()
_MEMO_SIZE = 128


# Calls whose score modifier reads more elements than this are not memoised, so that per-call
# bias tensors are not kept alive by the memo.
_MEMO_MAX_MOD_ELEMENTS = 1 << 16


def _memo_key(q, k, v, pattern, score_mod, scale, backend, return_weights, return_lse) -> tuple | None:
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    mod_tensors = score_mod.tensors() if hasattr(score_mod, "tensors") else []
    if sum(t.numel() for t in mod_tensors) > _MEMO_MAX_MOD_ELEMENTS:
        return None
    grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or any(t.requires_grad for t in mod_tensors)
    )
    data = pattern.data_version() if hasattr(pattern, "data_version") else None
    if pattern is not None and data is None:  # a pattern whose tensors cannot be tracked: always validated
        return None
    mods = tuple((id(t), t.shape) for t in mod_tensors)  # values may change (trained), shapes are validated
    return (backend, id(pattern), data, id(score_mod), mods, q.shape, k.shape, v.shape, q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, grad, scale, return_weights, return_lse,
            limits.max_weights_bytes, limits.max_mask_bytes, limits.max_layout_elements,
            backend == "auto" and auto_enabled())


def _remember(key: tuple, runner: Callable[..., Result], pattern: Any, score_mod: Any) -> None:
    held = [*(pattern.tensors() if hasattr(pattern, "tensors") else []),
            *(score_mod.tensors() if hasattr(score_mod, "tensors") else [])]
    _MEMO[key] = (runner, pattern, score_mod, held)
    if len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Any = None,
    score_mod: Any = None,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Explanation:
    """Which backend ``attention(..., backend="auto")`` would use, and why each other was not."""
    p = make_problem(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale,
                     return_weights=return_weights, return_lse=return_lse)
    return _choose(p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Any = None,
    score_mod: Any = None,
    scale: float | None = None,
    backend: str = "auto",
    return_weights: bool = False,
    return_lse: bool = False,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Softmax attention of ``q`` ``[B, H, N, D]`` over ``k`` ``[B, H_kv, M, D]``, ``v`` ``[B, H_kv, M, D_v]``.

    ``H_kv`` must divide ``H`` (grouped-query attention; query head ``h`` reads key head
    ``h // (H // H_kv)``). ``pattern`` restricts which keys each query sees (an
    :mod:`attnzoo.patterns` object); ``score_mod`` changes the logits (a ScoreMod, a list of
    them, or a FlexAttention-style callable). ``scale`` defaults to ``1/sqrt(D)``.

    ``backend``: ``"auto"``, ``"reference"``, ``"sdpa"``, ``"flex"``, ``"blocksparse"``, ``"gather"``
    (compiled CPU kernels for neighbourhoods, built at first use) or ``"triton"`` (fused GPU kernels
    for windowed patterns; ``auto`` picks it only with ``ATTNZOO_TRITON_LOCAL=1``);
    :func:`explain` tells which one ``auto`` picks and why. Query rows that see no key
    return zeros (and zero gradients), never NaN.

    Returns ``out`` ``[B, H, N, D_v]``, or a tuple ``(out, weights [B, H, N, M])``,
    ``(out, lse [B, H, N])`` or ``(out, weights, lse)`` when those are asked for.
    """
    key = None if check_finite else _memo_key(q, k, v, pattern, score_mod, scale, backend, return_weights, return_lse)
    hit = _MEMO.get(key) if key is not None else None
    if hit is not None:
        _MEMO.move_to_end(key)
        result = hit[0](q, k, v)
    else:
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {['auto', *BACKENDS]}, got {backend!r}")
        p = make_problem(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale,
                         return_weights=return_weights, return_lse=return_lse, check_finite=check_finite)
        if backend == "auto":
            name = _decide(p)[0]
        else:
            reason = BACKENDS[backend].why_not(p)
            if reason is not None:
                raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
            name = backend
        if key is not None:
            _remember(key, BACKENDS[name].prepare(p), pattern, score_mod)
        result = BACKENDS[name].run(p)
    if not (return_weights or return_lse):
        return result.out
    extra = [t for t, want in ((result.weights, return_weights), (result.lse, return_lse)) if want]
    return (result.out, *extra)


__all__ = ["Explanation", "attention", "default_block", "explain"]
