"""FlexAttention: compiled kernels driven by a pattern's ``mask_mod`` and cached block mask."""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnzoo.ops.backends.base import Backend, Result
from attnzoo.ops.layout import Shape
from attnzoo.ops.problem import Problem

FLEX_BLOCK = 128


@functools.cache
def _flex() -> Any:
    """The flex module, or the reason it cannot be imported."""
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as err:  # pragma: no cover - depends on the torch build
        return f"torch.nn.attention.flex_attention cannot be imported: {err}"
    return flex


@functools.cache
def _compiled() -> Any:
    # Every pattern and score modifier is its own graph; Dynamo's default limit of 8 would
    # silently fall back to the unfused eager path (which materialises all scores) after 8.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 256))
    return torch.compile(_flex().flex_attention, dynamic=False)


def block_mask(p: Problem) -> Any:
    """The pattern's FlexAttention block mask for this problem (None without a pattern)."""
    return None if p.pattern is None else pattern_block_mask(p.pattern, p.shape, p.device)


def pattern_block_mask(pattern: Any, shape: Shape, device: torch.device | str) -> Any:
    """``create_block_mask`` of ``pattern.mask_mod(shape)``, cached on the pattern per shape and device."""
    flex = _flex()
    if isinstance(flex, str):
        raise RuntimeError(flex)
    key = ("flex_block_mask", shape, str(device))
    cached = pattern._cache_get(key)
    if cached is None and getattr(pattern, "flex_from_layout", False):
        cached = layout_block_mask(pattern, shape, device)
        pattern._cache_put(key, cached)
    if cached is None:
        cached = flex.create_block_mask(
            pattern.mask_mod(shape),
            shape.batch if pattern.per_batch else None,
            shape.heads if pattern.per_head else None,
            shape.n_q,
            shape.n_kv,
            device=device,
            BLOCK_SIZE=FLEX_BLOCK,
        )
        pattern._cache_put(key, cached)
    return cached


def layout_block_mask(pattern: Any, shape: Shape, device: torch.device | str) -> Any:
    """The block mask built from the pattern's exact block layout (its ``bounds``), without evaluating the mask
    over every pair as ``create_block_mask`` does: for patterns rebuilt per call (a routing) whose bounds are
    exact and cheap. Partial tiles keep ``pattern.mask_mod``."""
    from attnzoo.ops.layout import FULL, PARTIAL

    flex = _flex()
    if isinstance(flex, str):
        raise RuntimeError(flex)
    state = pattern.block_layout(shape, FLEX_BLOCK, FLEX_BLOCK, device).state
    state = state.expand(shape.batch if pattern.per_batch else 1, shape.heads if pattern.per_head else 1,
                         *state.shape[2:])

    def lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # the selected blocks first, in order
        return sel.sum(-1, dtype=torch.int32), order.to(torch.int32).contiguous()

    (kv_num, kv_idx), (full_num, full_idx) = lists(state == PARTIAL), lists(state == FULL)
    return flex.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                         mask_mod=pattern.mask_mod(shape), seq_lengths=(shape.n_q, shape.n_kv))


class Flex(Backend):
    name = "flex"

    def why_not(self, p: Problem) -> str | None:
        flex = _flex()
        if isinstance(flex, str):
            return flex
        if p.return_weights:
            return "FlexAttention does not return attention weights"
        if p.device.type == "cpu" and p.needs_grad:
            return "FlexAttention has no CPU backward in PyTorch (it raises NotImplementedError); use blocksparse"
        if p.device.type == "cpu" and p.q.dtype == torch.float64:
            return "FlexAttention's CPU kernels do not support float64"
        if p.device.type == "cpu" and p.q.shape[-1] <= 16:
            return "FlexAttention on CPU gives wrong results for head dim 16 in PyTorch 2.13 (seen at N % 16 == 8)"
        if p.device.type == "cpu" and p.return_lse:
            return "FlexAttention cannot return the log-sum-exp on CPU (PyTorch raises NotImplementedError)"
        if p.device.type not in ("cpu", "cuda"):
            return f"FlexAttention runs on CPU and CUDA, got device {p.device}"
        if p.score_mod is not None and any(d != p.device for d in p.score_mod.devices()):
            found = sorted(str(d) for d in p.score_mod.devices())
            return (
                f"score_mod reads tensors on {found} but q is on {p.device}; FlexAttention needs them on the "
                f"same device (e.g. ALiBi(slopes.to(device)) or module.to(device))"
            )
        if p.q.shape[-1] < 16 or p.v.shape[-1] < 16:
            return f"FlexAttention needs head dims >= 16, got D={p.q.shape[-1]}, D_v={p.v.shape[-1]}"
        return None

    def prepare(self, p: Problem):
        if p.return_lse:
            return super().prepare(p)
        fn, bm, scale, gqa = _compiled(), block_mask(p), p.scale, p.groups > 1
        score_mod = p.score_mod.flex(p.shape) if p.score_mod is not None else None
        return lambda q, k, v: Result(fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa))

    def run(self, p: Problem) -> Result:
        score_mod = p.score_mod.flex(p.shape) if p.score_mod is not None else None
        kwargs = {"return_aux": _flex().AuxRequest(lse=True)} if p.return_lse else {}
        result = _compiled()(
            p.q, p.k, p.v,
            score_mod=score_mod,
            block_mask=block_mask(p),
            scale=p.scale,
            enable_gqa=p.groups > 1,
            **kwargs,
        )
        if p.return_lse:
            out, aux = result
            return Result(out, None, aux.lse)
        return Result(result)
