"""tidal_decode beyond the conformance contract: the selection object, backends, re-selection while decoding."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.cache import KVCache
from attnzoo.layers.dynamic_sparse.tidal_decode import TidalDecode, TidalDecodeAttention, TokenSelection, schedule
from attnzoo.layers.testing import random_tokens
from attnzoo.ops.routed import key_routing_mask
from attnzoo.registry import create
from tests.helpers import assert_backends_equal_reference


def _stack(**kw):
    torch.manual_seed(0)
    args = {"top_k": 3, "n_layers": 5, "first_sparse": 2, "reselect": (3,), **kw}
    return create("tidal_decode", dim=32, n_heads=4, **args).double()


def test_schedule_follows_the_paper_layout():
    assert schedule(6, 2, (4,)) == ("dense", "select", "sparse", "sparse", "select", "sparse")
    assert _stack().roles == ("dense", "select", "sparse", "select", "sparse")


@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference(causal):
    m = _stack()
    ref = _stack(backend="reference")
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=13).double().requires_grad_()
    assert_backends_equal_reference(m, ref, x, causal)


def test_decoding_with_reselection_equals_the_full_forward():
    m = _stack(top_k=2)
    x = random_tokens(n=15).double()
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(15)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12
    assert [len(c) for c in cache.state["layers"]] == [15] * 5 and cache.position == 15


def test_sparse_layers_attend_exactly_the_selected_positions():
    m = _stack()
    x = random_tokens(n=12).double()
    sel = TokenSelection()
    m(x, causal=True, selection=sel)
    layer = m.layers[2]
    h = x
    flow = TokenSelection()
    for i in range(2):
        h = h + m.layers[i](h, causal=True, selection=flow)
    _, w = layer(h, causal=True, selection=flow, return_weights=True)
    chosen = key_routing_mask(flow.index, 12)
    assert (w[~chosen] == 0).all() and ((w > 0) == chosen).all()
    assert ((flow.index >= 0).sum(-1) == torch.arange(12).clamp(max=2) + 1).all()  # min(k, i + 1) keys


def test_a_query_with_an_empty_selection_returns_zeros():
    layer = TidalDecodeAttention(32, 4, top_k=2, role="sparse", bias=False).double()
    x = random_tokens(n=6).double().requires_grad_()
    sel = TokenSelection()
    sel.index = torch.full((2, 4, 6, 2), -1, dtype=torch.int64)
    sel.index[:, :, 3:, 0] = 0
    y = layer(x, causal=True, selection=sel)
    assert (y[:, :3] == 0).all() and (y[:, 3:] != 0).any()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_padding_keeps_padded_keys_out_of_the_selection():
    m = _stack(top_k=4)
    x = random_tokens(n=10).double()
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, 2:5] = False
    sel = TokenSelection()
    m(x, causal=True, mask=keep, selection=sel)
    idx = sel.index[0]
    assert not ((idx >= 2) & (idx < 5)).any()


@pytest.mark.parametrize("kw,name", [
    ({"top_k": 0}, "top_k"),
    ({"first_sparse": 5}, "first_sparse"),
    ({"first_sparse": 0}, "first_sparse"),
    ({"reselect": (1,)}, "reselect"),
    ({"n_layers": 0}, "n_layers"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        _stack(**kw)


def test_bad_calls_name_the_selection():
    with pytest.raises(ValueError, match="role"):
        TidalDecodeAttention(32, 4, role="sometimes")
    layer = TidalDecodeAttention(32, 4, top_k=2, role="sparse").double()
    x = random_tokens(n=6).double()
    with pytest.raises(ValueError, match="selection"):
        layer(x)
    with pytest.raises(ValueError, match="selection"):
        layer(x, selection={"index": None})
    sel = TokenSelection()
    sel.index = torch.zeros(2, 4, 5, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="selection"):
        layer(x, selection=sel)
    with pytest.raises(ValueError, match="context"):
        TidalDecode(32, 4)(x, context=x)


def test_weights_move_between_the_layers_and_mha():
    from attnzoo.layers.testing import mha_from

    layer = TidalDecodeAttention(32, 4, top_k=2, role="dense").double()
    x = random_tokens(n=7).double()
    assert (layer(x, causal=True) - mha_from(layer)(x, causal=True)).abs().max() < 1e-12
