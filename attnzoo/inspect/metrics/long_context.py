"""Long-context head identification from local keys (catalogue 11.17 ``long_context_head_id``)."""

from __future__ import annotations

import math

import torch

from attnzoo.inspect.metrics._common import metric

__all__ = ["far_mass_estimate", "long_context_head_id"]


def far_mass_estimate(q: torch.Tensor, k_mean: torch.Tensor, k_cov: torch.Tensor, n_far: int,
                      scale: float | None = None) -> torch.Tensor:
    """``n_far · exp(μ + σ²/2)``: Σ over far keys of ``exp(q·k·s)`` for Gaussian keys ``N(k_mean, k_cov)``.

    ``q`` ``[..., D]``; ``μ = s q·k_mean``, ``σ² = s² qᵀ Σ q``.
    """
    s = q.shape[-1] ** -0.5 if scale is None else scale
    mu = s * (q * k_mean).sum(-1)
    var = s * s * torch.einsum("...d,de,...e->...", q, k_cov, q)
    return n_far * torch.exp(mu + var / 2)


@metric("long_context_head_id", priority=3, papers=("Adaptive long-context head identification",),
        summary="Per query and head: is the estimated far-key softmax mass (Gaussian second-moment model, "
                "from local keys only) above a threshold?",
        reference="exact Σ exp(q·k/√d) over the far keys in float64", supports={"self", "causal"})
def long_context_head_id(q: torch.Tensor, k_local: torch.Tensor, n_far: int, *, threshold: float = 0.1,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(needs_far [B, H, N] bool, far_share [B, H, N])`` from ``q`` ``[B, H, N, D]`` and local keys
    ``k_local`` ``[B, H, W, D]``: the far keys are modelled with the local keys' mean and covariance."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    km = k_local.mean(-2)  # [B, H, D]
    kc = k_local - km[..., None, :]
    cov = kc.transpose(-1, -2) @ kc / max(1, k_local.shape[-2] - 1)  # [B, H, D, D]
    mu = s * torch.einsum("bhnd,bhd->bhn", q, km)
    var = s * s * torch.einsum("bhnd,bhde,bhne->bhn", q, cov, q)
    if n_far < 0:
        raise ValueError(f"n_far: expected a number of far keys >= 0, got {n_far}")
    if n_far == 0:  # no far keys: nothing to need
        share = torch.zeros_like(mu)
        return share > threshold, share
    log_far = math.log(n_far) + mu + var / 2
    log_local = torch.logsumexp(s * q @ k_local.transpose(-1, -2), -1)
    share = torch.sigmoid(log_far - log_local)  # far / (far + local)
    return share > threshold, share
