"""Row views and row gathers of [B, H, M, D] tensors in any memory order."""

from __future__ import annotations

import torch

from attnzoo.ops.rows import gather_rows, row_view


def _cases():
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(2, 3, 10, 4, generator=g)
    yield buf[:, :, 2:7], True                                          # a cache buffer's stored part
    yield torch.randn(2, 5, 3, 4, generator=g).transpose(1, 2), True    # a head split of [B, N, H*D]
    yield torch.randn(2, 3, 5, 8, generator=g)[..., ::2], False         # strided last dim: a copy


def test_gathered_rows_equal_indexing_and_are_read_in_place_when_possible():
    idx = torch.randint(0, 5, (2, 3, 4, 6), generator=torch.Generator().manual_seed(1))
    for t, in_place in _cases():
        want = t[torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), idx]
        assert torch.equal(gather_rows(t, idx), want)
        assert torch.equal(gather_rows(row_view(t), idx), want)
        assert (row_view(t)[0].data_ptr() == t.data_ptr()) == in_place
