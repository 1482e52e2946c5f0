"""varied_size_window beyond the conformance contract: the sampler, gradients in scale and offset, constant cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.layers.dynamic_sparse.varied_size_window import bilinear_sample
from attnzoo.layers.testing import random_grid, random_tokens
from attnzoo.registry import create


def _double(**kw):
    torch.manual_seed(0)
    return create("varied_size_window", dim=32, n_heads=4, **kw).double()


def _regressing(m, seed=1):
    """Give the window regression non-zero weights (scales and offsets that vary per window and head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (m.scale_head, m.offset_head):
            lin.weight.copy_(0.2 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
    return m


def test_bilinear_sample_equals_grid_sample_aligned_corners_zero_padding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5 * 7, 4, generator=g, dtype=torch.float64)
    pos = torch.rand(2, 3, 20, 2, generator=g, dtype=torch.float64) * torch.tensor([7.0, 9.0]) - 1.0
    got = bilinear_sample(t, pos, (5, 7))
    fmap = t.view(6, 5, 7, 4).permute(0, 3, 1, 2)
    norm = torch.stack([2 * pos[..., 1] / 6 - 1, 2 * pos[..., 0] / 4 - 1], -1).view(6, 20, 1, 2)  # (x, y)
    want = F.grid_sample(fmap, norm, mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(got, want.view(2, 3, 4, 20).transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_output_is_differentiable_in_scale_and_offset_gradcheck():
    m = _double(window=(2, 3))
    x = random_grid(b=1, grid=(4, 6), c=32)
    flat = x.reshape(1, -1, 32)
    q, k, v = m.project(flat, flat)
    g = torch.Generator().manual_seed(2)
    s = (0.3 * torch.randn(1, 4, 2, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    o = (0.4 * torch.randn(1, 4, 2, 2, 2, generator=g, dtype=torch.float64) + 0.13).requires_grad_()
    m.backend = "reference"

    def out(s_, o_):
        return m.window_attend(q.detach(), k.detach(), v.detach(), s_, o_, (4, 6))[0]

    assert torch.autograd.gradcheck(out, (s, o), eps=1e-6, atol=1e-7, fast_mode=True)
    m.backend = "auto"  # the fast path gives the same gradients
    gs, go = torch.autograd.grad(out(s, o).square().sum(), (s, o))
    m.backend = "reference"
    ws, wo = torch.autograd.grad(out(s, o).square().sum(), (s, o))
    torch.testing.assert_close((gs, go), (ws, wo), rtol=1e-10, atol=1e-12)


def test_training_reaches_the_regression_through_the_sampling():
    m = _regressing(_double(window=(3, 4)))
    m(random_grid(grid=(6, 8))).square().sum().backward()
    for lin in (m.scale_head, m.offset_head):
        assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0


def test_cost_does_not_depend_on_the_predicted_window_size():
    x = random_grid(grid=(6, 8))
    flops = []
    for scale in (-0.5, 0.0, 3.0):
        m = _double(window=(3, 4))
        with torch.no_grad():
            m.scale_head.bias.fill_(scale)
        with FlopCounterMode(display=False) as counter:
            m(x)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] == flops[2] > 0


def test_regressed_windows_change_the_output_and_rows_sum_to_one_over_samples():
    m = _double(window=(3, 4))
    x = random_grid(grid=(6, 8))
    plain = m(x)
    _regressing(m)
    y, w = m(x, return_weights=True)
    assert (y - plain).abs().max() > 1e-3
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert (w.count_nonzero(-1) <= 12).all()  # the window's 3 x 4 sampled slots


def test_padding_reads_zeros_and_padded_content_changes_nothing():
    m = _regressing(_double(window=4))
    x = random_tokens(n=12)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[0, 6:] = False
    y = m(x, mask=keep)
    x2 = torch.where(keep.unsqueeze(-1), x, 7 * random_tokens(n=12, seed=3))
    torch.testing.assert_close(m(x2, mask=keep), y, rtol=1e-12, atol=1e-12)
    assert (y[0, 6:] == 0).all()


@pytest.mark.parametrize("kw,x,name", [
    ({"window": 0}, None, "window"),
    ({"window": (2, 2, 2)}, None, "window"),
    ({"window": 4}, random_grid(grid=(6, 8)), "extent"),
    ({"window": 2}, random_grid(grid=(2, 2, 2)), "spatial axes"),
    ({"window": 2}, random_grid(grid=(4, 4)).float(), "dtype"),
])
def test_bad_input_names_the_argument(kw, x, name):
    with pytest.raises((ValueError, TypeError), match=name):
        _double(**kw)(x)


def test_causal_and_cache_are_refused():
    from attnzoo.layers.cache import KVCache

    m = _double(window=2)
    with pytest.raises(ValueError, match="causal"):
        m(random_tokens(n=4), causal=True)
    with pytest.raises(ValueError, match="cache"):
        m(random_tokens(n=4), cache=KVCache())
