"""``attention``: one call for every pattern and backend; ``explain``: why a backend was chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.backends.blocksparse import default_block
from attnzoo.ops.problem import Problem, make_problem

# Above this fraction of visited tiles a masked dense kernel beats skipping blocks.
DENSE_FRACTION = 0.5


@dataclass
class Explanation:
    """The backend ``auto`` picks and, for every other backend, why it was not used."""

    backend: str
    reasons: dict[str, str] = field(default_factory=dict)
    tile_fraction: float | None = None

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        if self.tile_fraction is not None:
            lines.append(f"fraction of (query block, key block) tiles visited: {self.tile_fraction:.4f}")
        lines += [f"  not {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


def _choose(p: Problem) -> Explanation:
    why = {name: b.why_not(p) for name, b in BACKENDS.items()}
    reasons = {name: r for name, r in why.items() if r is not None}
    can = [name for name, r in why.items() if r is None]

    def pick(name: str, fraction: float | None = None, **later: str) -> Explanation:
        for other in can:
            if other != name:
                reasons.setdefault(other, later.get(other, f"{name} is preferred for this call"))
        return Explanation(name, dict(sorted(reasons.items())), fraction)

    ref_note = "reference materialises every score; auto uses it only for return_weights (or pass backend='reference')"
    if p.return_weights:
        if "reference" not in can:  # only the reference returns weights: fail here, not with an out-of-memory
            raise ValueError(f"return_weights: only the reference backend returns weights, and {reasons['reference']}")
        return pick("reference")
    sdpa = BACKENDS["sdpa"]
    if "sdpa" in can and sdpa.native(p) is not None:
        return pick("sdpa", reference=ref_note)
    if "sdpa" not in reasons and sdpa.native(p) is None:
        reasons_sdpa = "pattern/score_mod needs a materialised mask"
    else:
        reasons_sdpa = ""
    on_gpu = p.device.type == "cuda"
    if on_gpu and "flex" in can:
        return pick("flex", reference=ref_note, sdpa=reasons_sdpa or "flex is preferred",
                    blocksparse="flex runs the same pattern as a fused kernel on this GPU")
    fraction = BACKENDS["blocksparse"].layout(p).active_fraction if p.pattern is not None else 1.0
    if "sdpa" in can and fraction >= DENSE_FRACTION:
        return pick("sdpa", fraction, reference=ref_note,
                    blocksparse=f"{fraction:.0%} of tiles are active: a dense masked kernel is cheaper")
    flex_note = (
        "on CPU FlexAttention compiles per shape (seconds) and blocksparse runs without compiling; "
        "pass backend='flex' to use it anyway"
    )
    return pick(
        "blocksparse", fraction, reference=ref_note, flex=flex_note,
        sdpa=f"only {fraction:.1%} of tiles are active: a dense masked kernel would waste the sparsity",
    )


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

    ``backend``: ``"auto"``, ``"reference"``, ``"sdpa"``, ``"flex"`` or ``"blocksparse"``;
    :func:`explain` tells which one ``auto`` picks and why. Query rows that see no key
    return zeros (and zero gradients), never NaN.

    Returns ``out`` ``[B, H, N, D_v]``, or a tuple ``(out, weights [B, H, N, M])``,
    ``(out, lse [B, H, N])`` or ``(out, weights, lse)`` when those are asked for.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {['auto', *BACKENDS]}, got {backend!r}")
    p = make_problem(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale,
                     return_weights=return_weights, return_lse=return_lse, check_finite=check_finite)
    if backend == "auto":
        name = _choose(p).backend
    else:
        reason = BACKENDS[backend].why_not(p)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        name = backend
    result = BACKENDS[name].run(p)
    if not (return_weights or return_lse):
        return result.out
    extra = [t for t, want in ((result.weights, return_weights), (result.lse, return_lse)) if want]
    return (result.out, *extra)


__all__ = ["Explanation", "attention", "default_block", "explain"]
