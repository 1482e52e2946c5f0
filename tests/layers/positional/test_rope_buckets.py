"""Tests of ``rope_buckets`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers import TinyLM


def test_rope_buckets_needs_rope_and_valid_bases():
    with pytest.raises(ValueError, match="RotaryEmbedding"):
        attnzoo.create("rope_buckets", torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="bases"):
        attnzoo.create("rope_buckets", TinyLM(), bases=[])
    steered = attnzoo.create("rope_buckets", TinyLM())
    assert steered.bases == (10000.0, 12500.0, 15000.0, 17500.0, 20000.0)
