"""One attention call, validated: tensors, pattern, score modifier and what the caller asks for."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.ops.layout import Shape
from attnzoo.ops.score_mod import as_score_mod

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Problem:
    """``q`` ``[B, H, N, D]``, ``k`` ``[B, H_kv, M, D]``, ``v`` ``[B, H_kv, M, D_v]`` and options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Any
    score_mod: Any
    scale: float
    shape: Shape
    return_weights: bool
    return_lse: bool

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        mod_tensors = self.score_mod.tensors() if self.score_mod is not None else []
        return any(t.requires_grad for t in (self.q, self.k, self.v, *mod_tensors))

    @property
    def device(self) -> torch.device:
        return self.q.device


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: Any,
    score_mod: Any,
    scale: float | None,
    return_weights: bool,
    return_lse: bool,
    check_finite: bool = False,
) -> Problem:
    """Validate the inputs of :func:`attnzoo.attention`; errors name the argument and both values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, N, D], got {_describe(t)}")
    dtype, device = q.dtype, q.device
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of q), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of q), got {t.device}")
    (b, h, n, d), (kb, hkv, m, kd), (vb, vh, vm, _) = q.shape, k.shape, v.shape
    if kb != b or vb != b:
        raise ValueError(f"k, v: expected batch size {b} (from q), got k {kb} and v {vb}")
    if vh != hkv:
        raise ValueError(f"v: expected {hkv} heads (the heads of k), got {vh}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"k: key/value heads must divide query heads, got H={h} and H_kv={hkv}")
    if kd != d:
        raise ValueError(f"k: expected head dim {d} (from q), got {kd}")
    if vm != m:
        raise ValueError(f"v: expected {m} tokens (the length of k), got {vm}")
    if n == 0 or m == 0:
        raise ValueError(f"q, k: expected at least one token, got N={n} and M={m}")
    if b == 0 or h == 0:
        raise ValueError(f"q: expected at least one batch element and one head, got B={b} and H={h}")
    if d == 0 or v.shape[-1] == 0:
        raise ValueError(f"q, v: expected head dims >= 1, got D={d} and D_v={v.shape[-1]}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: contains {int((~torch.isfinite(t)).sum())} non-finite values")
    if pattern is not None and not hasattr(pattern, "allow"):
        raise TypeError(f"pattern: expected an attnzoo Pattern or None, got {type(pattern).__name__}")
    score_mod = as_score_mod(score_mod) if score_mod is not None else None
    shape = Shape(b, h, n, m)
    if pattern is not None:
        pattern.check(shape)
    if score_mod is not None:
        score_mod.check(shape)
        if check_finite:
            score_mod.check_finite()
    return Problem(q, k, v, pattern, score_mod, float(scale), shape, return_weights, return_lse)
