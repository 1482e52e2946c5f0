"""``attention_adversarial``: Adversarial training on attention logits: train on L(a) + L(a + eps
g/|g|) (AT; iAT variant).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import MultiHeadAttention, check_choice, seeded
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.registry import Reduction, register


class AttentionAdversarial(nn.Module):
    """Adversarial training on attention scores (Attention AT / iAT), as a score modifier.

    Host it in any attention mixer (``mha(..., score_mod=adv)``, several layers may share
    one); it adds nothing to the scores unless :meth:`training_loss` runs:

    1. a probing forward adds a zero tensor ``δ`` (requires grad) to every host call's
       logits ``s`` and gives ``L(a)``; ``g = ∂L/∂δ = ∂L/∂s``;
    2. ``r = ε·g/‖g‖`` (``variant="at"``) with the norm over the keys of each attention row
       (each softmax's logit vector gets a perturbation of norm ε; padded/masked keys get
       none), detached;
    3. a perturbed forward adds ``r`` to the same calls' logits and gives ``L(a + r)``;
    4. it returns ``L(a) + lam·L(a + r)`` (the official code's ``loss + lam_adv·loss_adv``).

    Checked against the abstract (Kitada & Iyatomi): AT "for attention mechanisms" and iAT,
    which "introduc[es] adversarial perturbation, which enhances the difference in the
    attention of the sentences". Details read in the official code
    (shunk031/attention-meets-perturbation @98a8c21, ``amep/modules/attention_layer/bc/advt.py``
    and ``amep/models/bc/at_advt.py``): the perturbation is added to the pre-softmax scores
    with ``F.normalize(grad)`` (L2 over the sequence) times ``xi``; for iAT the code builds
    the pairwise differences of the batch's attention vectors but its perturbation is
    ``xi·normalize(−∂L/∂s)`` (the difference terms enter with a zero coefficient), which is
    what ``variant="iat"`` does here. The catalogue's single-query scores become one
    perturbation per attention row ``[B, H, N, M]`` in a multi-head layer.

    After a step, ``perturbations`` holds the ``r`` of each host call.
    """

    def __init__(self, eps: float = 1.0, *, variant: str = "at", lam: float = 1.0) -> None:
        super().__init__()
        if not eps >= 0:
            raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
        self.eps, self.lam = float(eps), float(lam)
        self.variant = check_choice("variant", variant, ("at", "iat"))
        self._mode = "off"
        self._probes: list[torch.Tensor] = []
        self._calls = 0
        self.perturbations: list[torch.Tensor] = []

    def from_qk(self, q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, scale: float) -> Any:
        """The per-call score modifier: nothing, a zero probe, or the stored perturbation."""
        from attnzoo.patterns import Bias

        if self._mode == "off":
            return None
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if self._mode == "probe":
            delta = torch.zeros(shape, dtype=q.dtype, device=q.device, requires_grad=True)
            self._probes.append(delta)
            return Bias(delta)
        if self._calls >= len(self.perturbations):
            raise RuntimeError("attention_adversarial: the perturbed pass made more attention calls than the probe")
        r = self.perturbations[self._calls]
        self._calls += 1
        if tuple(r.shape) != shape:
            raise RuntimeError(f"attention_adversarial: call {self._calls} has scores {list(shape)}, the probe had "
                               f"{list(r.shape)}; loss_fn must make the same calls both times")
        return Bias(r.to(q.dtype))

    def perturbation(self, grad: torch.Tensor) -> torch.Tensor:
        """``r`` from ``g = ∂L/∂s`` ``[B, H, N, M]``: ``±ε·g/‖g‖`` per attention row."""
        direction = grad if self.variant == "at" else -grad
        return self.eps * torch.nn.functional.normalize(direction, p=2.0, dim=-1)

    def losses(self, loss_fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(a), L(a + r))``; ``loss_fn()`` runs the host model(s) and returns a scalar loss."""
        self._mode, self._probes = "probe", []
        try:
            loss = loss_fn()
        finally:
            self._mode = "off"
        probes, self._probes = self._probes, []
        if not probes:
            raise RuntimeError("attention_adversarial: loss_fn made no attention call through this modifier")
        grads = torch.autograd.grad(loss, probes, retain_graph=True, allow_unused=True)
        self.perturbations = [self.perturbation(torch.zeros_like(p) if g is None else g).detach()
                              for p, g in zip(probes, grads)]
        self._mode, self._calls = "perturb", 0
        try:
            adv = loss_fn()
        finally:
            self._mode = "off"
        if self._calls != len(self.perturbations):
            raise RuntimeError("attention_adversarial: the perturbed pass made fewer attention calls than the probe")
        return loss, adv

    def training_loss(self, loss_fn: Any) -> torch.Tensor:
        """``L(a) + lam·L(a + r)``: backpropagate it instead of ``L``."""
        loss, adv = self.losses(loss_fn)
        return loss + self.lam * adv

    def extra_repr(self) -> str:
        return f"eps={self.eps}, variant={self.variant!r}, lam={self.lam}"


def _adv_setup(eps: float, variant: str = "at") -> tuple[nn.Module, AttentionAdversarial, Any]:
    adv = AttentionAdversarial(eps, variant=variant)
    m = seeded(MultiHeadAttention, dim=32, n_heads=4, score_mod=adv)
    x = rand_x()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    target = rand_x(seed=5)
    return m, adv, lambda: ((m(x, causal=True, mask=keep) - target) ** 2).sum()


def _adv_norm() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for variant in ("at", "iat"):
        m, adv, loss_fn = _adv_setup(0.7, variant)
        adv.losses(loss_fn)
        (r,) = adv.perturbations
        norms = r.norm(dim=-1)
        # rows with one visible key have ∂L/∂s = 0 (a softmax over one logit is constant), and padded
        # query rows have no loss: those get r = 0; every other row gets ‖r‖ = ε
        i = torch.arange(10).view(1, 1, -1)
        live = (i >= 1) & ((torch.arange(2).view(-1, 1, 1) == 0) | (i < 7))
        live = live.expand_as(norms)
        got.append(torch.cat([norms[live], norms[~live]]))
        want.append(torch.cat([torch.full_like(norms[live], 0.7), torch.zeros_like(norms[~live])]))
    return torch.cat(got), torch.cat(want)


def _adv_eps_zero() -> tuple[torch.Tensor, torch.Tensor]:
    m, adv, loss_fn = _adv_setup(0.0)
    loss, adv_loss = adv.losses(loss_fn)
    plain = loss_fn()
    return torch.stack([loss, adv_loss]), torch.stack([plain, plain])


def _adv_direction() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    for variant, sign in (("at", 1.0), ("iat", -1.0)):
        m, adv, loss_fn = _adv_setup(0.3, variant)
        adv._mode, adv._probes = "probe", []
        g = torch.autograd.grad(loss_fn(), adv._probes)[0]
        adv._mode = "off"
        adv.losses(loss_fn)
        got.append(adv.perturbations[0] * g.norm(dim=-1, keepdim=True))
        want.append(sign * 0.3 * g)
    return torch.stack(got), torch.stack(want)


register(
    "attention_adversarial", family=FAMILY, type="score_mod", priority=3, papers=("Attention AT/iAT",),
    supports={"self", "cross", "causal", "padding", "decoding", "gqa", "training"}, complexity="O(N^2)",
    reference="the host mha with backend='reference' in float64",
    summary="Adversarial training on attention logits: train on L(a) + L(a + eps g/|g|) (AT; iAT variant).",
    test_kwargs={"eps": 0.5}, host=lambda m: {"score_mod": m},
    reductions=(
        Reduction("perturbation_norm", "‖r‖ = ε for every attention row that has keys (AT and iAT)", _adv_norm),
        Reduction("eps_zero_standard_loss", "ε = 0 gives the standard loss (both passes equal L)", _adv_eps_zero),
        Reduction("direction", "r ∥ +∂L/∂s per row for AT (ascent), ∥ −∂L/∂s for iAT (the official code)",
                  _adv_direction),
    ),
)(AttentionAdversarial)


