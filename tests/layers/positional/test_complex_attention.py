"""Tests of ``complex_attention`` beyond the conformance contract."""

from __future__ import annotations

import math

import attnzoo


def test_complex_attention_head_specific():
    c = attnzoo.create("complex_attention", head_dim=8, n_heads=2)
    assert {n for n, _ in c.named_parameters()} == {"alpha", "beta"}
    assert math.isclose(float(c.alpha[0].detach()), 1.0)
