"""mean_pool: every mode on padded and packed bags, left and right padding, bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.pooling.mean_pool import MODES
from tests.layers.pooling._bags import bags


@pytest.mark.parametrize("mode", [m for m in MODES if m != "subset"])
def test_packed_equals_padded_and_closed_form(mode):
    x, mask, packed, cu = bags()
    m = attnzoo.create("mean_pool", dim=16, mode=mode)
    y = m(x, mask=mask)
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y, rtol=1e-12, atol=1e-12)
    for b, n in enumerate(mask.sum(1).tolist()):
        bag = x[b, :n]
        want = {"mean": bag.mean(0), "max": bag.amax(0), "cls": bag[0], "last": bag[-1]}[mode]
        torch.testing.assert_close(y[b], want)


def test_cls_under_left_padding_is_first_kept_token():
    x, mask, _, _ = bags()
    left = torch.stack([torch.roll(x[b], int((~mask[b]).sum()), 0) for b in range(x.shape[0])])
    lmask = torch.stack([torch.roll(mask[b], int((~mask[b]).sum()), 0) for b in range(x.shape[0])])
    m = attnzoo.create("mean_pool", dim=16, mode="cls")
    torch.testing.assert_close(m(left, mask=lmask), m(x, mask=mask))


def test_subset_is_mean_over_marked_tokens():
    x, mask, _, _ = bags()
    subset = torch.zeros_like(mask)
    subset[:, 1:3] = True
    y = attnzoo.create("mean_pool", dim=16, mode="subset")(x, mask=mask, subset=subset)
    torch.testing.assert_close(y[0], x[0, 1:3].mean(0))
    torch.testing.assert_close(y[2], torch.zeros(16, dtype=torch.float64))  # bag of 1: no marked token kept


def test_bad_input():
    m = attnzoo.create("mean_pool", dim=16)
    x, mask, packed, cu = bags()
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[4, 9\], got torch.int64 \[4, 9\]"):
        m(x, mask=mask.long())
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[4, 9\], got torch.bool \[4, 8\]"):
        m(x, mask=mask[:, :8])
    with pytest.raises(ValueError, match=r"x: expected a tensor \[B, N, 16\], got \[4, 9, 8\]"):
        m(x[..., :8])
    with pytest.raises(ValueError, match="cu_seqlens: packed bags take x"):
        m(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens: expected the last boundary"):
        m(packed, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="subset: mode='subset' needs"):
        attnzoo.create("mean_pool", dim=16, mode="subset")(x)
    with pytest.raises(ValueError, match="return_weights: mean_pool"):
        m(x, return_weights=True)
    with pytest.raises(ValueError, match="mode: expected one of"):
        attnzoo.create("mean_pool", dim=16, mode="median")
