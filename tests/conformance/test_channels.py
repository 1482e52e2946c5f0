"""The channel contract (:data:`attnzoo.contracts.CHANNEL`) on every registered channel module.

``(B, C, H, W)`` -> the same shape: shapes and dtypes, the float64 reference (forward and
gradients), gradients for every parameter, batch independence, determinism under a seed and a
safetensors round trip. Modules run in eval mode. Nothing here names an entry; the last test
checks the checks on a probe (a squeeze-and-excitation gate) and a broken one.
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
    channel_inputs,
    channel_specs,
    check_against_reference,
    check_every_parameter_gets_a_gradient,
    check_safetensors_round_trip,
    check_seeded,
    first_output,
    registered_probes,
)

SPECS = channel_specs()




def check_shape_dtype(spec):
    m = built_eval(spec)
    for dtype in (torch.float32, torch.float64):
        m = m.to(dtype)
        x = channel_inputs(dtype=dtype)
        y = first_output(m, x)
        assert y.shape == x.shape and y.dtype == dtype, f"{spec.slug}: {list(y.shape)} {y.dtype} from {list(x.shape)}"
        assert torch.isfinite(y).all(), f"{spec.slug}: non-finite output"


def check_reference(spec):
    m, ref = build_pair(spec)
    check_against_reference(spec.slug, m.eval(), ref.eval(), first_output, channel_inputs(seed=3), {})


def check_gradients(spec):
    x = channel_inputs(dtype=torch.float64)
    check_every_parameter_gets_a_gradient(spec.slug, built_eval(spec).double(),
                                          lambda m: first_output(m, x).pow(2).sum())


def check_batch_independence(spec):
    m = built_eval(spec).double()
    x = channel_inputs(b=3, dtype=torch.float64)
    torch.testing.assert_close(first_output(m, x[1:2]), first_output(m, x)[1:2], rtol=1e-10, atol=1e-12)


def check_seed(spec):
    x = channel_inputs()
    check_seeded(lambda seed: built_eval(spec, seed=seed), lambda m: first_output(m, x))


def check_safetensors(spec):
    x = channel_inputs()
    check_safetensors_round_trip(lambda seed: built_eval(spec, seed=seed), lambda m: first_output(m, x))


CHECKS = {
    "shape/dtype": check_shape_dtype, "float64-reference": check_reference, "gradients": check_gradients,
    "batch-independence": check_batch_independence, "seed": check_seed, "safetensors": check_safetensors,
}


def _cases(specs):
    from attnzoo.contracts import checks_for

    return [pytest.param(s, name, id=f"{s.slug}-{name}") for s in specs for name in checks_for(s) if name in CHECKS]


@pytest.mark.parametrize(("spec", "check"), _cases(SPECS))
def test_channel_contract(spec, check):
    CHECKS[check](spec)


def test_every_channel_check_is_implemented():
    from attnzoo.contracts import CHANNEL

    assert set(CHANNEL.checks(registry.Spec("probe", "channel", "channel", nn.Identity))) == set(CHECKS)


# The checks, checked ------------------------------------------------------------------------
class _SqueezeExcite(nn.Module):
    """A right channel gate: x * σ(W2 relu(W1 mean_hw(x))); ``mix_batch`` wrongly pools over the batch too."""

    def __init__(self, dim: int, *, mix_batch: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim // 4), nn.Linear(dim // 4, dim)
        self.mix_batch = mix_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((0, 2, 3), keepdim=True).flatten(1).expand(x.shape[0], -1) if self.mix_batch else x.mean((2, 3))
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))[:, :, None, None]


def test_the_checks_pass_a_right_module_and_fail_one_that_mixes_the_batch():
    kinds = {"probe_channel_right": {"dim": DIM}, "probe_channel_wrong": {"dim": DIM, "mix_batch": True}}
    with registered_probes(_SqueezeExcite, "channel", "channel", kinds, input_kind="feature_map") as probes:
        for check in CHECKS.values():
            check(probes["probe_channel_right"])
        with pytest.raises(AssertionError):
            check_batch_independence(probes["probe_channel_wrong"])
