"""``torch.nn.functional.scaled_dot_product_attention`` for what it can express."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnzoo.ops.backends.base import Backend, Result, index_grid
from attnzoo.ops.config import limits
from attnzoo.ops.problem import Problem


class SDPA(Backend):
    """Full, top-left causal, or any pattern/additive score modifier as a materialised mask."""

    name = "sdpa"

    def why_not(self, p: Problem) -> str | None:
        if p.return_weights:
            return "SDPA does not return attention weights"
        if p.return_lse:
            return "SDPA does not return the log-sum-exp"
        if p.score_mod is not None and not getattr(p.score_mod, "additive", False):
            return f"score_mod {type(p.score_mod).__name__} is not additive, so it cannot be an SDPA float mask"
        if self.native(p) is None:
            s = p.shape
            mask_b = getattr(p.pattern, "per_batch", False) or getattr(p.score_mod, "per_batch", False)
            mask_h = getattr(p.pattern, "per_head", False) or getattr(p.score_mod, "per_head", False)
            elems = (s.batch if mask_b else 1) * (s.heads if mask_h else 1) * s.n_q * s.n_kv
            need = elems * (p.q.element_size() if p.score_mod is not None else 1)
            if need > limits.max_mask_bytes:
                return (
                    f"{type(p.pattern).__name__} needs a dense {need / 2**20:.0f} MiB mask, over "
                    f"attnzoo.ops.config.limits.max_mask_bytes = {limits.max_mask_bytes / 2**20:.0f} MiB"
                )
        return None

    @staticmethod
    def native(p: Problem) -> str | None:
        """``"full"``/``"causal"`` when SDPA runs this without a mask tensor, else None."""
        if p.score_mod is not None:
            return None
        if p.pattern is None:
            return "full"
        return p.pattern.sdpa_hint(p.shape)

    def prepare(self, p: Problem):
        native = self.native(p)
        if native is None:
            return super().prepare(p)
        causal, scale, gqa = native == "causal", p.scale, p.groups > 1
        sdpa = F.scaled_dot_product_attention
        return lambda q, k, v: Result(sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa))

    def run(self, p: Problem) -> Result:
        native = self.native(p)
        gqa = p.groups > 1
        if native is not None:
            out = F.scaled_dot_product_attention(
                p.q, p.k, p.v, is_causal=native == "causal", scale=p.scale, enable_gqa=gqa
            )
            return Result(out)
        b, h, qi, kvi = index_grid(p, p.q.device)
        mask = None
        row_any = None
        if p.pattern is not None:
            allowed = p.pattern.dense_mask(p.shape, p.q.device)
            row_any = allowed.any(-1, keepdim=True)
            mask = allowed | ~row_any  # fully masked rows attend everywhere, then are zeroed
        if p.score_mod is not None:
            zero = torch.zeros((), dtype=p.q.dtype, device=p.q.device)
            bias = p.score_mod(zero, b, h, qi, kvi, p.shape)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            # rows the bias leaves without a key attend everywhere (no kernel NaN), then are zeroed below
            bias_any = (mask != float("-inf")).any(-1, keepdim=True)
            mask = torch.where(bias_any, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
            row_any = bias_any if row_any is None else row_any & bias_any
        out = F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=mask, scale=p.scale, enable_gqa=gqa)
        if row_any is not None:
            out = out * row_any.to(out.dtype)
        return Result(out)
