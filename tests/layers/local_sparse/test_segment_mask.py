"""Tests of ``segment_mask`` beyond the conformance contract."""

from __future__ import annotations

from attnzoo.layers.local_sparse.segment_mask import lait_stack


def test_lait_stack_schedule():
    layers = lait_stack(32, 4, 4, 2, segment_size=3)
    assert [layer.segment_local for layer in layers] == [True, True, False, False]
