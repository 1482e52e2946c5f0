"""Direct logit attribution (catalogue 11.9 ``direct_logit_attribution``), per component and per source token.

With the final LayerNorm's scale frozen, ``LN(Σ_c x_c) = Σ_c γ ⊙ (x_c − mean(x_c)) / s + β`` (``s``
the standard deviation of the full residual), so the logit of the answer splits exactly into one
term per residual-stream component plus the bias term ``u·β``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.inspect.metrics._common import metric

__all__ = ["decompose_tinylm", "direct_logit_attribution", "per_source_dla"]


def _frozen_ln(resid: torch.Tensor, ln: nn.LayerNorm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale [..., 1], gamma [C], beta [C])`` of ``ln`` at ``resid``."""
    c = resid.shape[-1]
    if ln is None:
        one = torch.ones(c, dtype=resid.dtype, device=resid.device)
        return torch.ones_like(resid[..., :1]), one, torch.zeros_like(one)
    s = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + ln.eps)
    g = ln.weight if ln.weight is not None else torch.ones(c, dtype=resid.dtype, device=resid.device)
    b = ln.bias if ln.bias is not None else torch.zeros(c, dtype=resid.dtype, device=resid.device)
    return s, g.to(resid.dtype), b.to(resid.dtype)


@metric("direct_logit_attribution", priority=2,
        papers=("Chinchilla circuit analysis", "Additive mechanisms in factual recall"),
        summary="DLA: each residual component's contribution to the answer logit through the frozen final norm "
                "and unembedding; per-source split of a head.",
        reference="float64 decomposition that sums exactly to the model's logit")
def direct_logit_attribution(components: dict[str, torch.Tensor], resid: torch.Tensor, unembed: torch.Tensor,
                             answer: Any, ln: nn.LayerNorm | None = None,
                             unembed_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{name: [...]}`` contributions to the logit of ``answer`` (an int or a ``[...]`` long tensor).

    ``components`` ``{name: [..., C]}`` sum to ``resid`` (the final residual, before ``ln``);
    ``unembed`` ``[V, C]``. The entry ``"bias"`` holds ``u·β`` (+ the unembedding bias), so the
    values sum to the logit.
    """
    s, g, b = _frozen_ln(resid, ln)
    u = unembed[answer] if isinstance(answer, int) else unembed[answer.long()]  # [C] or [..., C]
    out = {}
    for name, x in components.items():
        xc = x - x.mean(-1, keepdim=True) if ln is not None else x
        out[name] = ((xc / s) * g * u).sum(-1)
    bias = (b * u).sum(-1) * torch.ones_like(s[..., 0])
    if unembed_bias is not None:
        bias = bias + (unembed_bias[answer] if isinstance(answer, int) else unembed_bias[answer.long()])
    out["bias"] = bias
    return out


def per_source_dla(weights: torch.Tensor, values: torch.Tensor, w_o: torch.Tensor, unembed_dir: torch.Tensor,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-source DLA of each head ``[B, H, N, M]``: ``u·(a_ij v_j W_O^h)/s`` (sums over ``j`` to the head's DLA).

    ``weights`` ``[B, H, N, M]``, ``values`` ``[B, H, M, D]``, ``w_o`` ``[H, D, C]``, ``unembed_dir``
    ``[C]`` (``γ ⊙ u`` for a frozen LayerNorm; centre ``w_o`` first if the norm subtracts the mean),
    ``scale`` ``[B, N]`` (the frozen norm scale, default 1).
    """
    vo = torch.einsum("bhmd,hdc,c->bhm", values, w_o, unembed_dir)  # [B, H, M]
    out = weights * vo[:, :, None, :]
    return out if scale is None else out / scale[:, None, :, None]


def decompose_tinylm(model: nn.Module, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Residual components of :class:`attnzoo.layers.lm.TinyLM` at every position, and the final residual.

    Components: ``"embed"``, ``"L{li}H{h}"`` (each head through its slice of W_O), ``"L{li}.o_bias"``,
    ``"L{l}.mlp"``. Their sum is the final residual.
    """
    from attnzoo.inspect.capture import capture

    comps: dict[str, torch.Tensor] = {}
    hooks = [model.embed.register_forward_hook(lambda m, i, o: comps.__setitem__("embed", o.detach()))]
    for li, blk in enumerate(model.blocks):
        hooks.append(blk["mlp"].register_forward_hook(
            lambda m, i, o, li=li: comps.__setitem__(f"L{li}.mlp", o.detach())))
    final: dict[str, torch.Tensor] = {}
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: final.__setitem__("resid", a[0].detach())))
    try:
        cache = capture(model, tokens, what=("head_outputs",))
    finally:
        for h in hooks:
            h.remove()
    out = {"embed": comps["embed"]}
    for li, blk in enumerate(model.blocks):
        att = blk["attn"]
        z = cache["head_outputs", li]  # [B, H, N, D]
        wo = att.o_proj.weight.detach().view(att.dim, att.n_heads, -1)  # [C, H, D]
        for h in range(att.n_heads):
            out[f"L{li}H{h}"] = z[:, h] @ wo[:, h].T
        if att.o_proj.bias is not None:
            out[f"L{li}.o_bias"] = att.o_proj.bias.detach().expand_as(comps["embed"])
        out[f"L{li}.mlp"] = comps[f"L{li}.mlp"]
    return out, final["resid"]
