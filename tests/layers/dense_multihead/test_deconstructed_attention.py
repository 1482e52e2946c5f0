"""Tests of ``deconstructed_attention`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo


def test_decoupled_qk_with_its_own_width_needs_qk_source():
    m = attnzoo.create("deconstructed_attention", dim=8, n_heads=4, mode="decoupled_qk", qk_dim=5)
    with pytest.raises(ValueError, match="^qk_source: mode='decoupled_qk' with qk_dim=5 != dim=8"):
        m(torch.randn(2, 7, 8))
    assert m(torch.randn(2, 7, 8), qk_source=torch.randn(2, 7, 5)).shape == (2, 7, 8)


def test_deconstructed_qk_source_checks():
    m = attnzoo.create("deconstructed_attention", dim=32, n_heads=4, mode="decoupled_qk", qk_dim=16)
    assert m(torch.randn(2, 5, 32), qk_source=torch.randn(2, 5, 16)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="qk_source"):
        m(torch.randn(2, 5, 32), qk_source=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="qk_source"):
        attnzoo.create("deconstructed_attention", dim=32, n_heads=4)(torch.randn(1, 3, 32),
                                                                      qk_source=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="max_len"):
        attnzoo.create("deconstructed_attention", dim=32, n_heads=4, max_len=4)(torch.randn(1, 5, 32))
