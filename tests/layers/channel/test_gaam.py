"""gaam: weights sum to 1 along the axis, the peak sits at mu + delta, padding passes unchanged."""

from __future__ import annotations

import torch

import attnzoo


def test_weights_sum_to_one_along_the_axis():
    torch.manual_seed(0)
    for axis, dims in (("channel", 1), ("spatial", (2, 3))):
        m = attnzoo.create("gaam", channels=16, n_heads=1, axis=axis).double()
        x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
        w = m.weights(x)
        torch.testing.assert_close(w.sum(dims), torch.ones_like(w.sum(dims)))


def test_peak_weight_at_mu_plus_delta():
    m = attnzoo.create("gaam", channels=1, n_gaussians=1, axis="spatial").double()
    with torch.no_grad():
        m.delta.fill_(0.5)
    x = torch.linspace(-2, 2, 401, dtype=torch.float64).view(1, 1, -1)
    w = m.weights(x)[0, 0]
    target = x.mean() + 0.5
    assert abs(x[0, 0, w.argmax()] - target) <= 0.01 + 1e-12


def test_padding_passes_unchanged_and_does_not_change_the_rest():
    torch.manual_seed(0)
    m = attnzoo.create("gaam", channels=8, axis="spatial", n_heads=2).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, 3:] = False
    y = m(x, mask)
    pad = ~mask.unsqueeze(1).expand_as(x)
    assert (y[pad] == x[pad]).all()
    x2 = torch.where(pad, 10 * torch.randn_like(x), x)
    torch.testing.assert_close(m(x2, mask)[~pad], y[~pad])
