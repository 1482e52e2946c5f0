"""``attention_contrastive_decoding``: AVC: contrastive logits against the over-attended ("blind") visual tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, installed
from attnzoo.inspect.steer import key_mask
from attnzoo.inspect.steering._common import COMMON, SteeringWrapper, check_targets, layer_heads, recorded, tiny_lm
from attnzoo.registry import Reduction, register


def blind_tokens(a: torch.Tensor, visual: torch.Tensor, lam: float) -> torch.Tensor:
    """Blind visual keys per query row: bool ``[B, N, M]`` from the mean attention ``a`` ``[B, N, M]``.

    Key j is blind for row i when it is visual, visible to the row (``a_ij > 0``) and
    ``a_ij > mean_i + λ·std_i`` over the row's visible visual keys.
    """
    vis = visual.view(1, 1, -1) & (a > 0)
    cnt = vis.sum(-1, keepdim=True).clamp_min(1).to(a.dtype)
    av = torch.where(vis, a, torch.zeros_like(a))
    mean = av.sum(-1, keepdim=True) / cnt
    var = (torch.where(vis, a - mean, torch.zeros_like(a)) ** 2).sum(-1, keepdim=True) / cnt
    return vis & (a > mean + lam * var.sqrt())


class AttentionContrastiveDecoding(SteeringWrapper):
    """AVC: ``logits = (1 + α)·ℓ(all visual tokens) − α·ℓ(blind tokens only)``.

    A first pass records the attention of ``layers`` (default all), averaged over layers and heads;
    for each query row the blind tokens are the ``visual`` keys attended above ``mean + λ·std`` of
    that row's visual attention. The second pass keeps, in every layer, only the blind visual keys
    of each row (plus every non-visual key; renormalised). Rows without blind tokens keep the
    original logits. ``beta > 0`` adds the adaptive plausibility cut: tokens with probability
    below ``beta`` times the row's best under ``ℓ(all)`` get ``-inf``. ``α = 0`` (one pass) or no
    blind token reproduces the original logits. Works on attnzoo and Hugging Face causal LMs
    (``.logits`` of their output).
    """

    single_pass = False

    def __init__(self, host: nn.Module, visual: Any, *, lam: float = 1.0, alpha: float = 1.0, beta: float = 0.0,
                 layers: Any = None) -> None:
        super().__init__(host)
        if float(alpha) < 0 or not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"alpha, beta: expected alpha >= 0 and beta in [0, 1], got {alpha!r}, {beta!r}")
        self.visual, self.lam, self.alpha, self.beta = visual, float(lam), float(alpha), float(beta)
        self.layers = list(check_targets(host, layers))
        self.n_layers = len(layer_heads(host)[0])

    @staticmethod
    def _logits(out: Any) -> torch.Tensor:
        return out.logits if hasattr(out, "logits") else out

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.alpha == 0:
            return self._logits(self.host(*args, **kwargs))
        with recorded(self.host, self.layers) as maps:
            full = self._logits(self.host(*args, **kwargs))
        a = torch.stack([maps[i].detach().mean(1) for i in self.layers]).mean(0)  # [B, N, M]
        vis = key_mask(self.visual, a.shape[-1], a.device)
        blind = blind_tokens(a, vis, self.lam)
        has = blind.any(-1)  # [B, N]
        if not bool(has.any()):
            return full
        allow = ~vis.view(1, 1, -1) | blind

        def edit(w: torch.Tensor) -> torch.Tensor:
            if w.shape[-2:] != allow.shape[-2:]:
                return w
            out = w * allow.unsqueeze(1).to(w.dtype)
            s = out.sum(-1, keepdim=True)
            return torch.where(s > 0, out / s.clamp_min(torch.finfo(w.dtype).tiny), out)

        with installed(self.host, {i: LayerEdit(layer=i, weight_edits=[edit]) for i in range(self.n_layers)}):
            only = self._logits(self.host(*args, **kwargs))
        out = (1 + self.alpha) * full - self.alpha * only
        if self.beta > 0:
            p = torch.softmax(full.float(), -1)
            out = out.masked_fill(p < self.beta * p.amax(-1, keepdim=True), float("-inf"))
        return torch.where(has.unsqueeze(-1), out, full)


def _alpha_zero() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    return AttentionContrastiveDecoding(host, [1, 2, 3, 4], alpha=0.0)(tokens), host(tokens)


def _no_blind_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    return AttentionContrastiveDecoding(host, [1, 2, 3, 4], lam=1e6, alpha=2.0)(tokens), host(tokens)


register(
    "attention_contrastive_decoding", priority=3, papers=("AVC (attentional vision calibration)",),
    supports={"self", "causal", "padding"},
    reference="(1 + α)ℓ(all) − αℓ(blind visual keys only), blind = above mean + λ·std of the row's visual attention",
    summary="AVC: contrast the logits with those of a pass that sees only the over-attended visual tokens.",
    test_kwargs={"visual": list(range(1, 7)), "lam": 0.5, "alpha": 1.0},
    reductions=(Reduction("alpha_zero", "α = 0 reproduces the original logits", _alpha_zero),
                Reduction("no_blind", "an empty blind-token set leaves the logits unchanged", _no_blind_tokens)),
    **COMMON,
)(AttentionContrastiveDecoding)
