"""Differential testing of ``attnzoo.attention``: random calls, every backend against the float64 reference.

Each seed draws one call: shapes (batch, heads with GQA, N != M, head dims that are not multiples of 16,
D_v != D), a pattern (1-D masks, grid patterns, their ``&`` / ``|`` / ``~``, per-head patterns, key
padding with fully padded rows), a score modifier (ALiBi with learnable slopes, soft-capping, biases,
relative positions), float32 or float64, non-contiguous inputs, ``return_lse`` and a custom scale. Every
backend whose ``why_not`` is None (``sdpa``, ``blocksparse`` with its default and a small block,
``gather``, and ``auto``) must give the reference's output, lse and gradients of q, k, v and the
modifier's tensors. It found three bugs that the fixed test matrices had missed (see the git log).

``python -m tests.differential 0 2000`` runs seeds [0, 2000) and prints each failing seed with its call;
``tests/test_differential.py`` runs a fixed range in the suite.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops.backends import BACKENDS
from attnzoo.ops.problem import make_problem

FAST_BACKENDS = ("sdpa", "blocksparse", "gather")
TOL = {torch.float64: 1e-7, torch.float32: 2e-3}


@dataclass
class Call:
    """One random call: the shapes, pattern and modifier, and a description to reproduce it."""

    b: int
    h: int
    h_kv: int
    n: int
    m: int
    d: int
    dv: int
    dtype: torch.dtype
    pattern: Any
    score_mod: Any
    mod_tensors: list[torch.Tensor]
    scale: float | None
    return_lse: bool
    transposed: bool
    text: list[str] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Draw:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def pick(self, xs: list) -> Any:
        return self.r.choice(xs)

    def chance(self, p: float) -> bool:
        return self.r.random() < p


def _sequence_pattern(dr: _Draw, b: int, h: int, n: int, m: int) -> Any:
    offset = None if dr.chance(0.6) else dr.int(-3, 5)
    kinds = ["causal", "window", "dilated", "prefix", "global", "padding", "sharded", "segments"]
    if n == m:
        kinds += ["neighborhood", "documents", "partition", "grid_partition"]
    kind = dr.pick(kinds)
    if kind == "causal":
        return P.Causal(offset)
    if kind == "window":
        window = [dr.int(1, 12) for _ in range(dr.pick(_divisors(h)))] if dr.chance(0.25) else dr.int(1, min(40, m))
        return P.SlidingWindow(window, causal=dr.chance(0.5), n_sink=dr.pick([0, 0, 1, 3, m + 2]), offset=offset)
    if kind == "dilated":
        return P.DilatedWindow(dr.int(1, 6), dr.int(1, 5), causal=dr.chance(0.5), offset=offset)
    if kind == "prefix":
        return P.PrefixLM(torch.tensor([dr.int(0, m) for _ in range(b)]) if dr.chance(0.5) else dr.int(0, m))
    if kind == "global":
        return P.GlobalTokens(dr.int(0, 4))
    if kind == "padding":
        return P.KeyPadding(torch.rand(b, m, generator=dr.g) < 0.7)
    if kind == "sharded":
        return P.HeadSharded(dr.int(1, 4), causal=dr.chance(0.5))
    if kind == "segments":
        ids = torch.randint(0, dr.int(1, 4), (m,), generator=dr.g).sort().values
        return P.SegmentMask(ids, global_keys=dr.pick([None, 1, 2]), causal=dr.chance(0.5))
    if kind == "neighborhood":
        k = dr.int(1, min(n, 9))
        causal = dr.chance(0.3)
        return P.Neighborhood(k, dilation=dr.int(1, max(1, min(4, n // k))), stride=1 if causal else dr.int(1, k),
                              causal=causal)
    if kind == "documents":
        lengths, left = [], n
        while left > 0:
            lengths.append(min(left, dr.int(0, max(1, n // 2))))
            left -= lengths[-1]
        return P.Document(lengths)
    if kind == "partition":
        w = dr.pick(_divisors(n))
        return P.WindowPartition(w, shift=dr.int(0, w - 1), halo=dr.int(0, 2))
    return P.GridPartition(dr.pick(_divisors(n)))


def _grid_pattern(dr: _Draw, grid: tuple[int, ...]) -> Any:
    kind = dr.pick(["neighborhood", "neighborhood", "partition", "grid_partition"])
    if kind == "neighborhood":
        ks = tuple(dr.int(1, min(extent, 7)) for extent in grid)
        causal = tuple(dr.chance(0.25) for _ in grid)
        return P.Neighborhood(ks, dilation=tuple(dr.int(1, max(1, min(3, e // k))) for e, k in zip(grid, ks)),
                              stride=tuple(1 if c else dr.int(1, k) for c, k in zip(causal, ks)), causal=causal,
                              grid=grid)
    if kind == "partition":
        w = tuple(dr.pick(_divisors(e)) for e in grid)
        return P.WindowPartition(w, grid=grid, shift=tuple(dr.int(0, x - 1) for x in w),
                                 halo=tuple(dr.int(0, 2) for _ in grid))
    return P.GridPartition(tuple(dr.pick(_divisors(e)) for e in grid), grid=grid)


def _compose(dr: _Draw, atom: Callable[[], Any], depth: int = 0) -> Any:
    p, roll = atom(), dr.r.random()
    if depth >= 2 or roll < 0.45:
        return p
    if roll < 0.7:
        return p & _compose(dr, atom, depth + 1)
    if roll < 0.85:
        return p | _compose(dr, atom, depth + 1)
    return ~p


def _score_mod(dr: _Draw, c: Call, grid: tuple[int, ...] | None) -> None:
    kind = dr.pick(["none"] * 5 + ["alibi", "alibi_learned", "softcap", "bias", "relative", "grid_bias", "chain"])
    c.text.append(f"score_mod: {kind}")
    if kind == "alibi":
        c.score_mod = P.ALiBi(c.h)
    elif kind == "alibi_learned":
        slopes = (torch.rand(c.h, generator=dr.g, dtype=torch.float64) * 0.5).requires_grad_()
        c.score_mod, c.mod_tensors = P.ALiBi(slopes, offset=None if dr.chance(0.5) else dr.int(-2, 3)), [slopes]
    elif kind == "softcap":
        c.score_mod = P.SoftCap(dr.pick([0.5, 2.0, 30.0]))
    elif kind == "bias":
        bias = torch.randn(dr.pick([1, c.b]), dr.pick([1, c.h]), c.n, c.m, generator=dr.g, dtype=torch.float64)
        c.score_mod, c.mod_tensors = P.Bias(bias.requires_grad_()), [bias]
    elif kind == "relative":
        rpb = P.RelativePositionBias(c.h, max_distance=dr.int(1, 10)).double()
        with torch.no_grad():
            rpb.table.copy_(torch.randn(rpb.table.shape, generator=dr.g, dtype=torch.float64))
        c.score_mod, c.mod_tensors = rpb, list(rpb.parameters())
    elif kind == "grid_bias" and c.n == c.m:
        axes = grid or (c.n,)
        bias = P.GridRelativeBias(c.h, tuple(dr.int(1, 5) for _ in axes), step=tuple(dr.int(1, 2) for _ in axes),
                                  init_std=1.0).double()
        c.score_mod, c.mod_tensors = bias.at(axes), list(bias.parameters())
    elif kind == "chain":
        c.score_mod = [P.ALiBi(c.h), P.SoftCap(3.0)]


def draw_call(seed: int) -> Call:
    """The random call of ``seed`` (deterministic)."""
    dr = _Draw(seed)
    h = dr.pick([1, 2, 3, 4, 6])
    d = dr.pick([1, 3, 8, 16, 24, 40, 64])
    c = Call(b=dr.pick([1, 1, 2, 3]), h=h, h_kv=dr.pick(_divisors(h)), n=0, m=0, d=d,
             dv=d if dr.chance(0.7) else dr.pick([1, 5, 8, 32]),
             dtype=torch.float64 if dr.chance(0.8) else torch.float32, pattern=None, score_mod=None, mod_tensors=[],
             scale=None if dr.chance(0.8) else dr.pick([0.3, 1.0, 2.5]), return_lse=dr.chance(0.4),
             transposed=dr.chance(0.3))
    grid = None
    if dr.chance(0.3):
        grid = tuple(dr.int(1, 9) for _ in range(2)) if dr.chance(0.7) else tuple(dr.int(1, 5) for _ in range(3))
        c.n = c.m = math.prod(grid)

        def atom() -> Any:
            return _grid_pattern(dr, grid) if dr.chance(0.75) else _sequence_pattern(dr, c.b, c.h, c.n, c.m)
    else:
        lo, hi = dr.pick([(1, 4), (5, 40), (41, 140), (141, 300)])
        c.n = dr.int(lo, hi)
        c.m = c.n if dr.chance(0.6) else dr.int(lo, hi)

        def atom() -> Any:
            return _sequence_pattern(dr, c.b, c.h, c.n, c.m)
    roll = dr.r.random()
    if roll < 0.08:
        c.pattern = None
    elif roll < 0.2 and h > 1:
        c.pattern = P.PerHead([_compose(dr, atom, 1) for _ in range(dr.pick([x for x in _divisors(h) if x > 1]))])
    else:
        c.pattern = _compose(dr, atom)
    if c.pattern is not None and dr.chance(0.25):
        c.pattern = c.pattern & P.KeyPadding(torch.arange(c.m) < torch.tensor([[dr.int(0, c.m)] for _ in range(c.b)]))
    _score_mod(dr, c, grid)
    c.text = [f"seed {seed}: B={c.b} H={c.h} H_kv={c.h_kv} N={c.n} M={c.m} D={c.d} D_v={c.dv} {c.dtype} "
              f"transposed={c.transposed} return_lse={c.return_lse} scale={c.scale}",
              f"pattern: {c.pattern!r}", *c.text]
    return c


def _inputs(c: Call, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 7 + 1)

    def leaf(heads: int, length: int, dim: int) -> torch.Tensor:
        shape = (c.b, length, heads, dim) if c.transposed else (c.b, heads, length, dim)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(c.dtype).requires_grad_()

    leaves = [leaf(c.h, c.n, c.d), leaf(c.h_kv, c.m, c.d), leaf(c.h_kv, c.m, c.dv)]
    dout = torch.randn(c.b, c.h, c.n, c.dv, generator=g, dtype=torch.float64)
    dlse = torch.randn(c.b, c.h, c.n, generator=g, dtype=torch.float64)
    return leaves, dout, dlse


def _run(c: Call, backend: str, leaves: list[torch.Tensor], dout: torch.Tensor, dlse: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    q, k, v = (t.transpose(1, 2) if c.transposed else t for t in leaves)
    res = attnzoo.attention(q, k, v, pattern=c.pattern, score_mod=c.score_mod, scale=c.scale, backend=backend,
                            return_lse=c.return_lse)
    out, lse = res if c.return_lse else (res, None)
    loss = (out.double() * dout).sum()
    if lse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse.double(), 0.0).mul(dlse).sum()
    wrt = leaves + [t for t in c.mod_tensors if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
    return out.detach(), None if lse is None else lse.detach(), [g.detach() for g in grads]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape or not torch.equal(torch.isinf(a), torch.isinf(b)):
        return math.inf
    if not torch.isfinite(a[~torch.isinf(a)]).all():
        return math.inf
    a, b = a[torch.isfinite(b)], b[torch.isfinite(b)]
    return float((a - b).abs().max() / (1.0 + b.abs().max())) if a.numel() else 0.0


def check(seed: int) -> list[str]:
    """The mismatches of the call of ``seed`` (empty: every backend agrees with the reference)."""
    c = draw_call(seed)
    leaves, dout, dlse = _inputs(c, seed)
    q, k, v = (t.transpose(1, 2) if c.transposed else t for t in leaves)
    try:
        ref = _run(c, "reference", leaves, dout, dlse)
    except ValueError:
        return []  # an invalid draw (e.g. a pattern that does not fit the shape): rejected with a message
    problem = make_problem(q, k, v, pattern=c.pattern, score_mod=c.score_mod, scale=c.scale,
                           return_weights=False, return_lse=c.return_lse)
    runs = [(name, name, None) for name in FAST_BACKENDS if BACKENDS[name].why_not(problem) is None]
    if BACKENDS["blocksparse"].why_not(problem) is None:
        runs.append(("blocksparse, block 16", "blocksparse", 16))
    runs.append(("auto", "auto", None))
    failures = []
    for label, backend, block in runs:
        engine = BACKENDS["blocksparse"]
        saved = engine.block
        engine.block = block if block is not None else saved
        try:
            got = _run(c, backend, leaves, dout, dlse)
        except Exception as exc:  # noqa: BLE001 - every crash of a backend that accepted the call is a finding
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        finally:
            engine.block = saved
        errors = {"out": _error(got[0], ref[0])}
        if got[1] is not None:
            errors["lse"] = _error(got[1], ref[1])
        errors.update({f"grad{i}": _error(a, b) for i, (a, b) in enumerate(zip(got[2], ref[2]))})
        bad = {name: e for name, e in errors.items() if e > TOL[c.dtype]}
        if bad:
            failures.append(f"{label}: " + ", ".join(f"{name} {e:.2e}" for name, e in bad.items()))
    return [*c.text, *failures] if failures else []


def main(argv: list[str]) -> int:
    start, stop = (int(x) for x in argv[:2])
    torch.set_num_threads(1)
    bad = 0
    for seed in range(start, stop):
        failures = check(seed)
        if failures:
            bad += 1
            print("\n".join(failures), flush=True)
    print(f"{stop - start} seeds, {bad} with a mismatch")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
