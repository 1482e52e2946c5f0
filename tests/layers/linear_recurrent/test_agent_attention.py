"""Tests of ``agent_attention`` beyond the conformance contract."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_agent_attention_pooling_and_padding(request):
    from attnzoo.layers.linear_recurrent._common import pool_matrix

    p = pool_matrix(10, 4, None, torch.float64, "cpu")
    x = node_tokens(request, b=1, n=10, c=3)
    torch.testing.assert_close(p @ x, torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2),
                               **TOL)
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 7:] = False
    pk = pool_matrix(10, 4, keep, torch.float64, "cpu")
    assert (pk[0, :, 7:] == 0).all() and torch.allclose(pk[0, :3].sum(-1), torch.ones(3, dtype=torch.float64))
    assert (pk[0, 3] == 0).all()  # the last bin is all padding
