"""The pooler contract (:data:`attnzoo.contracts.POOLER`) on every registered pooler.

``(B, N, C)`` + ``mask`` -> ``(B, C_out)`` or ``(B, K, C_out)``: shapes and dtypes, the float64
reference (forward and gradients, with padding), gradients for every parameter, batch
independence, determinism under a seed, a safetensors round trip, padded content changing
nothing, a fully masked bag giving zeros (finite gradients), and for ``input_kind == "set"``
invariance to the order of the tokens. Poolers run in eval mode. Nothing here names an entry;
the last tests check the checks on two probe poolers, one right and one that ignores the mask.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnzoo import registry
from tests.conformance._build import (
    DIM,
    build_pair,
    built_eval,
    check_against_reference,
    check_every_parameter_gets_a_gradient,
    check_safetensors_round_trip,
    check_seeded,
    first_output,
    pooler_inputs,
    pooler_specs,
    registered_probes,
)

SPECS = pooler_specs()
IDS = [s.slug for s in SPECS]




def check_shape_dtype(spec):
    m = built_eval(spec)
    for dtype in (torch.float32, torch.float64):
        m = m.to(dtype)
        x, keep = pooler_inputs(dtype=dtype)
        y = first_output(m, x, mask=keep)
        assert y.dim() in (2, 3) and y.shape[0] == x.shape[0], f"{spec.slug}: output {list(y.shape)}, expected " \
                                                              "[B, C_out] or [B, K, C_out]"
        assert y.dtype == dtype and torch.isfinite(y).all(), f"{spec.slug}: {y.dtype} or non-finite output"


def check_reference(spec):
    m, ref = build_pair(spec)
    m.eval()
    ref.eval()
    _, keep = pooler_inputs()
    for kw in ({}, {"mask": keep}):
        check_against_reference(spec.slug, m, ref, first_output, pooler_inputs(seed=3)[0], kw)


def check_gradients(spec):
    x, keep = pooler_inputs(dtype=torch.float64)
    check_every_parameter_gets_a_gradient(spec.slug, built_eval(spec).double(),
                                          lambda m: first_output(m, x, mask=keep).pow(2).sum())


def check_batch_independence(spec):
    m = built_eval(spec).double()
    x, keep = pooler_inputs(b=3, dtype=torch.float64)
    y = first_output(m, x, mask=keep)
    torch.testing.assert_close(first_output(m, x[1:2], mask=keep[1:2]), y[1:2], rtol=1e-10, atol=1e-12)


def check_seed(spec):
    x, keep = pooler_inputs()
    check_seeded(lambda seed: built_eval(spec, seed=seed), lambda m: first_output(m, x, mask=keep))


def check_safetensors(spec):
    x, keep = pooler_inputs()
    check_safetensors_round_trip(lambda seed: built_eval(spec, seed=seed), lambda m: first_output(m, x, mask=keep))


def check_padding(spec):
    m = built_eval(spec).double()
    x, keep = pooler_inputs(dtype=torch.float64)
    y = first_output(m, x, mask=keep)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 5)
    torch.testing.assert_close(first_output(m, x2, mask=keep), y, rtol=1e-10, atol=1e-12,
                               msg=lambda s: f"{spec.slug}: padded content changed the output: {s}")


def check_all_masked_zeros(spec):
    m = built_eval(spec).double()
    x, keep = pooler_inputs(dtype=torch.float64)
    keep[0] = False
    x = x.requires_grad_()
    y = first_output(m, x, mask=keep)
    assert torch.isfinite(y).all() and (y[0] == 0).all(), f"{spec.slug}: a fully masked bag must pool to zeros"
    y.sum().backward()
    assert torch.isfinite(x.grad).all(), f"{spec.slug}: non-finite gradient through a fully masked bag"


def check_permutation_invariance(spec):
    m = built_eval(spec).double()
    x, keep = pooler_inputs(dtype=torch.float64)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first_output(m, x[:, perm], mask=keep[:, perm]), first_output(m, x, mask=keep),
                               rtol=1e-10, atol=1e-12,
                               msg=lambda s: f"{spec.slug}: a set pooler depends on token order: {s}")


CHECKS = {
    "shape/dtype": check_shape_dtype, "float64-reference": check_reference, "gradients": check_gradients,
    "batch-independence": check_batch_independence, "seed": check_seed, "safetensors": check_safetensors,
    "padding": check_padding, "all-masked-zeros": check_all_masked_zeros,
    "permutation-invariance": check_permutation_invariance,
}


def _cases(specs):
    from attnzoo.contracts import checks_for

    return [pytest.param(s, name, id=f"{s.slug}-{name}") for s in specs for name in checks_for(s) if name in CHECKS]


@pytest.mark.parametrize(("spec", "check"), _cases(SPECS))
def test_pooler_contract(spec, check):
    CHECKS[check](spec)


def test_every_pooler_check_is_implemented():
    from attnzoo.contracts import POOLER

    names = set(POOLER.checks(registry.Spec("probe", "pooling", "pooler", nn.Identity, input_kind="set")))
    assert names == set(CHECKS)


# The checks, checked ------------------------------------------------------------------------
class _MaskedMean(nn.Module):
    """A right pooler: masked mean, then a linear map; zeros for an empty bag."""

    def __init__(self, dim: int, *, ignore_mask: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.ignore_mask = ignore_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        w = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None or self.ignore_mask else mask.to(x.dtype)
        count = w.sum(1, keepdim=True)
        y = self.proj((x * w.unsqueeze(-1)).sum(1) / count.clamp(min=1))
        return y * (count > 0).to(x.dtype)


def test_the_checks_pass_a_right_pooler_and_fail_one_that_ignores_the_mask():
    kinds = {"probe_pool_right": {"dim": DIM}, "probe_pool_wrong": {"dim": DIM, "ignore_mask": True}}
    with registered_probes(_MaskedMean, "pooling", "pooler", kinds, input_kind="set") as probes:
        for check in CHECKS.values():
            check(probes["probe_pool_right"])
        for check in (check_padding, check_all_masked_zeros):
            with pytest.raises(AssertionError):
                check(probes["probe_pool_wrong"])
