"""set_transformer_pma and set_transformer_isab: packing, attention map shapes, padding of ISAB's inducing read."""

from __future__ import annotations

import torch

import attnzoo
from attnzoo.layers.pooling._common import MAB
from tests.layers.pooling._bags import bags


def test_pma_packed_equals_padded_and_matches_mab_on_each_bag():
    torch.manual_seed(0)
    m = attnzoo.create("set_transformer_pma", dim=16, n_heads=2, n_seeds=3).double()
    x, mask, packed, cu = bags()
    y = m(x, mask=mask)
    torch.testing.assert_close(m(packed, cu_seqlens=cu), y, rtol=1e-12, atol=1e-12)
    for b, n in enumerate(mask.sum(1).tolist()):  # MAB(S, rFF(Z)) on the unpadded bag, by the dense path
        z = m.ff(x[b:b + 1, :n])
        torch.testing.assert_close(y[b:b + 1], MAB.forward(m.mab, m.seeds[None], z))


def test_isab_attention_maps_are_m_by_n_and_n_by_m():
    torch.manual_seed(0)
    m = attnzoo.create("set_transformer_isab", dim=16, n_heads=2, n_inducing=3).double()
    x, mask, _, _ = bags()
    a_in, a_out = m.attention_maps(x, mask=mask)
    assert a_in.shape == (4, 2, 3, 9) and a_out.shape == (4, 2, 9, 3)
    assert (a_in.masked_select(~mask[:, None, None, :]) == 0).all()
    y = m(x, mask=mask)
    torch.testing.assert_close(m(x[:1, :6]), y[:1, :6])
