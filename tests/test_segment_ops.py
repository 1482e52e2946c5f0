"""Segment ops over packed bags against their float64 loop references (forward and gradients)."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.segment import (
    check_cu_seqlens,
    segment_ids,
    segment_max,
    segment_softmax,
    segment_softmax_reference,
    segment_sum,
    segment_sum_reference,
)

CU = torch.tensor([0, 3, 3, 10, 11, 17])


def test_segment_ids():
    assert segment_ids(CU).tolist() == [0] * 3 + [2] * 7 + [3] + [4] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_softmax_matches_reference_with_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(17, 3, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ids = segment_ids(CU)
    w = segment_softmax(s, ids, 5)
    ref = segment_softmax_reference(s64, CU)
    torch.testing.assert_close(w.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
    grad = torch.randn(17, 3, generator=g, dtype=torch.float64)
    (w * grad.to(dtype)).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
    sums = segment_sum(w.detach().double(), ids, 5)
    torch.testing.assert_close(sums, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])[:, None].expand(5, 3).double())


def test_segment_softmax_large_scores_are_finite():
    s = torch.tensor([1e4, 1e4 - 1, -1e4, 3e4]).double()
    w = segment_softmax(s, segment_ids(torch.tensor([0, 3, 4])), 2)
    assert torch.isfinite(w).all() and w[3] == 1


def test_segment_sum_and_max():
    x = torch.randn(17, 4, dtype=torch.float64, requires_grad=True)
    ids = segment_ids(CU)
    torch.testing.assert_close(segment_sum(x, ids, 5), segment_sum_reference(x, CU))
    top = segment_max(x, ids, 5)
    assert torch.isinf(top[1]).all()
    torch.testing.assert_close(top[2], x[3:10].amax(0))


@pytest.mark.parametrize("cu, total, match", [
    (torch.tensor([0, 4, 2, 6]), 6, r"cu_seqlens: expected non-decreasing boundaries, got cu_seqlens\[1\] = 4"),
    (torch.tensor([0, 2, 5]), 6, "cu_seqlens: expected the last boundary to equal the number of rows N = 6, got 5"),
    (torch.tensor([1, 6]), 6, r"cu_seqlens: expected cu_seqlens\[0\] = 0, got 1"),
    (torch.tensor([0.0, 6.0]), 6, "cu_seqlens: expected an integer dtype, got torch.float32"),
    (torch.tensor([[0, 6]]), 6, r"cu_seqlens: expected a 1-D integer tensor \[S \+ 1\]"),
])
def test_bad_cu_seqlens(cu, total, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(cu, total)
