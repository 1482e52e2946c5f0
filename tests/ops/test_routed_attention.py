"""Routed attention over key and block routings: every backend against the float64 reference (forward and
gradients), empty routings give zeros, bad routings are refused, explain covers the op."""

from __future__ import annotations

import pytest
import torch

from attnzoo.ops.routed import Routing, blocks_from_index, key_routing_mask
from attnzoo.patterns.routed import (
    BlockRouted,
    block_routed_attention,
    explain_key_routed,
    explain_routed,
    key_routed_attention,
    routed_attention,
)


def _qkv(seed=0, b=2, h=3, n=29, m=29, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_() for t in (n, m, m)]


def _grads(out, inputs):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * w).sum(), inputs)


def _close(got, want, tol=1e-12):
    assert (got - want).abs().max().item() < tol


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_q,block_k,backend", [(1, 8, "gather"), (1, 8, "blocksparse"), (4, 8, "gather"),
                                                     (8, 8, "blocksparse"), (3, 5, "sdpa"), (1, 4, "auto")])
def test_block_routing_backends_equal_reference(causal, block_q, block_k, backend):
    q, k, v = _qkv(n=29, m=31 if not causal else 29)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(2, 3, -(-29 // block_q), -(-k.shape[2] // block_k), generator=g) < 0.4
    blocks[0, 1, 2] = False  # a query block with no key block
    ref = block_routed_attention(q, k, v, blocks, block_q=block_q, block_k=block_k, causal=causal,
                                 backend="reference")
    out = block_routed_attention(q, k, v, blocks, block_q=block_q, block_k=block_k, causal=causal, backend=backend)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)
    rows = slice(2 * block_q, 3 * block_q)
    assert out[0, 1, rows].abs().max() == 0  # selects nothing: zeros


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["gather", "sdpa"])
def test_key_routing_backends_equal_reference(causal, backend):
    q, k, v = _qkv(n=23, m=23)
    g = torch.Generator().manual_seed(2)
    keys = torch.stack([torch.randperm(23, generator=g)[:6] for _ in range(2 * 3 * 23)]).view(2, 3, 23, 6)
    keys[..., -1] = -1
    keys[1, 2, 5] = -1  # selects nothing
    ref = key_routed_attention(q, k, v, keys, causal=causal, backend="reference")
    out = key_routed_attention(q, k, v, keys, causal=causal, backend=backend)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)
    assert out[1, 2, 5].abs().max() == 0


def test_select_everything_is_dense_attention():
    q, k, v = _qkv(n=17, m=17)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    keys = torch.arange(17).expand(2, 3, 17, 17).contiguous()
    _close(key_routed_attention(q, k, v, keys), dense)
    _close(block_routed_attention(q, k, v, torch.ones(2, 3, 17, 3, dtype=torch.bool), block_q=1, block_k=6), dense)


def test_reference_uses_the_routing_mask():
    q, k, v = _qkv(n=9, m=9, h=1, b=1)
    keys = torch.tensor([[[[0, 3], [1, -1], [2, 8], [0, 1], [4, 5], [6, 7], [8, 0], [3, 2], [1, 5]]]])
    allow = key_routing_mask(keys, 9)
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~allow, float("-inf"))
    _close(key_routed_attention(q, k, v, keys, backend="reference"), torch.softmax(s, -1) @ v)


def test_block_pattern_bounds_are_exact():
    g = torch.Generator().manual_seed(3)
    blocks = torch.rand(2, 2, 7, 5, generator=g) < 0.3
    q, k, v = _qkv(b=2, h=2, n=50, m=50, d=8)
    pat = BlockRouted(blocks, 8, 11, causal=True)
    from attnzoo.ops.layout import Shape
    layout = pat.block_layout(Shape(2, 2, 50, 50), 16, 16)
    dense = pat.dense_mask(Shape(2, 2, 50, 50))
    tiles = torch.nn.functional.pad(dense, (0, 14, 0, 14)).view(2, 2, 4, 16, 4, 16)
    assert torch.equal(layout.state != 0, tiles.any(-1).any(-2))


def test_bad_routings_are_refused():
    q, k, v = _qkv(n=8, m=8)
    with pytest.raises(ValueError, match="keys"):
        key_routed_attention(q, k, v, torch.zeros(2, 3, 8, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="keys"):
        key_routed_attention(q, k, v, torch.full((2, 3, 8, 2), 8))
    with pytest.raises(ValueError, match="keys"):
        key_routed_attention(q, k, v, torch.zeros(2, 3, 8, 2, dtype=torch.int64))  # repeated key
    with pytest.raises(ValueError, match="blocks"):
        block_routed_attention(q, k, v, torch.ones(2, 3, 8, 3, dtype=torch.bool), block_q=1, block_k=4)
    with pytest.raises(ValueError, match="block_k"):
        block_routed_attention(q, k, v, torch.ones(2, 3, 8, 2, dtype=torch.bool), block_q=1, block_k=0)
    with pytest.raises(ValueError, match="backend"):
        key_routed_attention(q, k, v, torch.zeros(2, 3, 8, 1, dtype=torch.int64), backend="nope")
    with pytest.raises(ValueError, match="index"):
        blocks_from_index(torch.tensor([[0, 5]]), 4)


def test_blocks_from_index():
    got = blocks_from_index(torch.tensor([[0, 2], [-1, 3], [-1, -1]]), 4)
    assert got.tolist() == [[True, False, True, False], [False, False, False, True], [False] * 4]


def test_explain_covers_routed_attention():
    q, k, v = (t.detach().float() for t in _qkv(n=256, m=256, d=32))
    per_query = torch.rand(2, 3, 256, 4) < 0.3
    assert explain_routed(q, k, v, Routing("blocks", per_query, 1, 64)).startswith("backend: gather")
    keys = torch.arange(4).expand(2, 3, 256, 4).contiguous()
    assert explain_routed(q, k, v, Routing("keys", keys), causal=True).startswith("backend: gather (the routing")
    padded = torch.ones(2, 256, dtype=torch.bool)
    padded[0, -5:] = False
    text = explain_routed(q, k, v, Routing("blocks", per_query, 1, 64), keep=padded)
    assert "attnzoo.attention's choice; key padding" in text
    q, k, v = (torch.zeros(2, 3, 1024, 32) for _ in range(3))
    tiles = torch.eye(16, dtype=torch.bool).expand(2, 3, 16, 16)
    text = explain_routed(q, k, v, Routing("blocks", tiles, 64, 64), causal=True)
    assert "backend: blocksparse" in text and "flex" in text


def test_flex_path_dispatches_from_the_routing_on_cpu():
    """On CPU flex runs forward only (no backward, no float64); with a CUDA device it is auto's choice."""
    q, k, v = (t.detach().float() for t in _qkv(n=64, m=64, d=32))
    blocks = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(5)) < 0.6
    blocks[..., 0] = True
    ref = block_routed_attention(q, k, v, blocks, block_q=32, block_k=32, causal=True, backend="reference")
    out = block_routed_attention(q, k, v, blocks, block_q=32, block_k=32, causal=True, backend="flex")
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_block_gather_splits_busy_routes_into_sub_routes(causal):
    from attnzoo.ops.routed import block_routed_gather

    q, k, v = _qkv(n=30, m=30)
    blocks = torch.rand(2, 3, 30, 4, generator=torch.Generator().manual_seed(7)) < 0.7
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=causal, backend="reference")
    out = block_routed_gather(q, k, v, blocks, block_q=1, block_k=8, causal=causal, cap=4)  # ~5 sub-routes each
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)


def _block_case(n, m, block_k, causal, seed, own=False, dtype=torch.float64, dv=None):
    q, k, v = _qkv(seed=seed, n=n, m=m, dtype=dtype)
    if dv is not None:
        v = torch.randn(*v.shape[:-1], dv, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    nkb = -(-m // block_k)
    blocks = torch.rand(2, 3, n, nkb, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    if own:
        blocks[..., torch.arange(n), (torch.arange(n) + m - n) // block_k] = True
    blocks[1, 0, 3] = False  # a query with no key block
    return q, k, v, blocks


def _block_path(path):
    """The CPU fast paths of block routings, called directly: the compiled routed kernels or the fused flash
    tiles (what the ``gather`` backend runs when the kernels cannot)."""
    from attnzoo.ops.routed_blocks import block_routed_flash
    from attnzoo.ops.routed_blocks_native import block_routed_native

    return {"native": block_routed_native, "flash": block_routed_flash}[path]


@pytest.mark.parametrize("path", ["native", "flash"])
@pytest.mark.parametrize("n,m,block_k,causal,own", [
    (5, 29, 8, True, False),    # decoding shape: the queries are the last 5 of 29 keys, ragged last block
    (32, 32, 8, True, True),    # every query keeps its own block, N a multiple of block_k: no copies
    (32, 32, 8, False, False),
    (29, 31, 8, False, False),  # ragged last key block seen whole
    (200, 200, 96, True, True),   # units of more queries than a kernel strip; causal own blocks over several strips
    (150, 181, 40, False, False),  # ragged last block of 21 keys
])
def test_block_fast_paths_equal_reference(path, n, m, block_k, causal, own):
    from attnzoo.ops.routed_blocks import flash_routing_ok
    from attnzoo.ops.routed_blocks_native import native_routing_reason

    q, k, v, blocks = _block_case(n, m, block_k, causal, seed=11, own=own)
    assert flash_routing_ok(q, k, v, causal) and native_routing_reason(q, k, v, causal) is None
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=block_k, causal=causal, backend="reference")
    out = _block_path(path)(q, k, v, blocks, block_q=1, block_k=block_k, causal=causal)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)
    assert out[1, 0, 3].abs().max() == 0


def _token_major(t):
    """The same values as a head split of ``[B, N, H*D]`` memory (how a mixer's projections arrive)."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def _as_lists(blocks):
    """The block-list form (int64 ``[..., K]``, -1 empty, shuffled order) of a bool block routing."""
    k = int(blocks.sum(-1).max())
    val, idx = blocks.to(torch.int64).sort(dim=-1, descending=True, stable=True)
    lists = idx[..., :k].masked_fill(val[..., :k] == 0, -1)
    return lists.flip(-1)


@pytest.mark.parametrize("n,m,block_k,causal,own", [
    (5, 29, 8, True, False),
    (12, 29, 8, True, True),    # chunked decoding: the queries straddle two key blocks
    (32, 32, 8, True, True),
    (32, 32, 8, True, False),
    (29, 31, 8, False, False),
])
@pytest.mark.parametrize("q_layout,kv_layout,grad_layout", [
    ("token", "token", "token"), ("token", "heads", "heads"), ("heads", "token", "token"),
    ("heads", "cache", "heads")])
@pytest.mark.parametrize("path", ["native", "flash"])
def test_block_fast_paths_read_every_layout_and_block_lists(n, m, block_k, causal, own, q_layout, kv_layout,
                                                            grad_layout, path):
    q, k, v, blocks = _block_case(n, m, block_k, causal, seed=21, own=own)
    if q_layout == "token":
        q = _token_major(q)
    if kv_layout == "token":
        k, v = _token_major(k), _token_major(v)
    if kv_layout == "cache":  # the first M positions of a longer (token-major) cache buffer
        k, v = (torch.cat([t.detach(), torch.randn_like(t)], 2).transpose(1, 2).contiguous().transpose(1, 2)[:, :, :m]
                .requires_grad_() for t in (k, v))
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=block_k, causal=causal, backend="reference")
    for routing in (blocks, _as_lists(blocks)):
        out = _block_path(path)(q, k, v, routing, block_q=1, block_k=block_k, causal=causal)
        _close(out, ref)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        if grad_layout == "token":
            w = w.transpose(1, 2).contiguous().transpose(1, 2)
        got = torch.autograd.grad(out, (q, k, v), w)
        want = torch.autograd.grad(ref, (q, k, v), w, retain_graph=True)
        for a, b in zip(got, want):
            _close(a, b)
        assert out[1, 0, 3].abs().max() == 0


def test_block_flash_path_units_split_busy_key_blocks():
    from attnzoo.ops.routed_blocks import block_routed_flash

    q, k, v, blocks = _block_case(40, 40, 8, True, seed=22, own=True)
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=True, backend="reference")
    want = _grads(ref, (q, k, v))
    for cap in (3, 8):
        out = block_routed_flash(q, k, v, _as_lists(blocks), block_q=1, block_k=8, causal=True, cap=cap)
        _close(out, ref)
        for a, b in zip(_grads(out, (q, k, v)), want):
            _close(a, b)


def test_block_lists_equal_the_bool_routing_on_every_backend():
    q, k, v = _qkv(n=24, m=24)
    blocks = torch.rand(2, 3, 6, 3, generator=torch.Generator().manual_seed(23)) < 0.5
    lists = _as_lists(blocks)
    for backend in ("reference", "gather", "blocksparse", "sdpa"):
        a = block_routed_attention(q, k, v, blocks, block_q=4, block_k=8, causal=True, backend=backend)
        b = block_routed_attention(q, k, v, lists, block_q=4, block_k=8, causal=True, backend=backend)
        _close(a, b)


def test_key_routing_auto_runs_dense_routings_of_small_calls_densely(monkeypatch):
    import attnzoo.patterns.routed as routed

    q, k, v = _qkv(n=32, m=32)
    g = torch.Generator().manual_seed(24)
    dense_keys = torch.stack([torch.randperm(32, generator=g)[:12] for _ in range(2 * 3 * 32)]).view(2, 3, 32, 12)
    sparse_keys = dense_keys[..., :1].clone()
    sparse_keys[:, :, ::2] = -1  # 1 key for half the queries: 1/64 of the pairs, below the density threshold
    assert "< KEY_DENSE_MIN_QUERIES" in routed.explain_key_routed(q, k, v, dense_keys)  # 32 queries: gather
    monkeypatch.setattr(routed, "KEY_DENSE_MIN_QUERIES", 32)
    assert routed.explain_key_routed(q, k, v, dense_keys).startswith("backend: dense mask")
    assert "< KEY_DENSE_MIN_DENSITY" in routed.explain_key_routed(q, k, v, sparse_keys)
    for keys in (dense_keys, sparse_keys):
        ref = key_routed_attention(q, k, v, keys, causal=True, backend="reference")
        out = key_routed_attention(q, k, v, keys, causal=True)
        _close(out, ref)
        for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
            _close(a, b)
    calls = []
    monkeypatch.setattr(routed, "key_routed_gather", lambda *a, **kw: calls.append(1) or a[0] * 0)
    key_routed_attention(q, k, v, sparse_keys)
    key_routed_attention(q, k, v, dense_keys)
    assert calls == [1]  # only the sparse routing took the gather path
    monkeypatch.setattr(routed, "KEY_DENSE_MAX_ELEMENTS", 2 * 3 * 32 * 32 - 1)  # the mask would be too big
    assert "over KEY_DENSE_MAX_ELEMENTS" in routed.explain_key_routed(q, k, v, dense_keys)
    key_routed_attention(q, k, v, dense_keys)
    assert calls == [1, 1]


def _shared_keys(b, h, n_blocks, width, m, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.randperm(m, generator=g)[:width] for _ in range(b * h * n_blocks)])
    keys = keys.view(b, h, n_blocks, width)
    keys[..., -1] = -1
    keys[1, 2, 1] = -1  # a block of queries with no key
    return keys


@pytest.mark.parametrize("n,m,block_q,causal", [(29, 29, 4, True), (29, 29, 4, False), (5, 29, 2, True),
                                                (32, 32, 8, True), (30, 37, 7, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_key_lists_shared_by_query_blocks_equal_the_reference(n, m, block_q, causal, dtype):
    q, k, v = _qkv(seed=25, n=n, m=m, dtype=dtype)
    keys = _shared_keys(2, 3, -(-n // block_q), 9, m, seed=26)
    per_query = keys.repeat_interleave(block_q, 2)[:, :, :n]
    ref = key_routed_attention(q, k, v, per_query, causal=causal, backend="reference")
    want = _grads(ref, (q, k, v))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for backend in ("gather", "auto", "sdpa", "reference"):
        out = key_routed_attention(q, k, v, keys, causal=causal, backend=backend, block_q=block_q)
        assert (out - ref).abs().max().item() < tol
        for a, b in zip(_grads(out, (q, k, v)), want):
            assert (a - b).abs().max().item() < tol * 10
        assert out[1, 2, block_q:2 * block_q].abs().max() == 0  # the block with no key: zeros


@pytest.mark.parametrize("path", ["native", "flash"])
@pytest.mark.parametrize("n,m,block_q,width,causal", [
    (29, 29, 4, 9, True), (7, 40, 3, 9, True),  # decoding shape: the queries are the last 7 of 40 keys
    (150, 150, 100, 70, True),  # a block of more queries than a kernel strip, more keys than a key panel
    (130, 151, 16, 40, False)])
def test_shared_key_list_fast_paths_equal_the_reference(path, n, m, block_q, width, causal):
    from attnzoo.ops.routed_blocks_native import key_block_native
    from attnzoo.ops.routed_key_blocks import key_block_flash

    q, k, v = _qkv(seed=31, n=n, m=m)
    k, v = _token_major(k), _token_major(v)
    keys = _shared_keys(2, 3, -(-n // block_q), width, m, seed=32)
    ref = key_routed_attention(q, k, v, keys, causal=causal, backend="reference", block_q=block_q)
    run = {"native": key_block_native, "flash": key_block_flash}[path]
    out = run(q, k, v, keys, block_q=block_q, causal=causal)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)
    assert out[1, 2, block_q:2 * block_q].abs().max() == 0


def test_key_lists_shared_by_query_blocks_off_the_flash_path():
    q, k, v = _qkv(seed=27, n=20, m=20)
    v = torch.randn(2, 3, 20, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(28)).requires_grad_()
    keys = _shared_keys(2, 3, 5, 6, 20, seed=29)
    ref = key_routed_attention(q, k, v, keys, causal=True, backend="reference", block_q=4)
    out = key_routed_attention(q, k, v, keys, causal=True, backend="gather", block_q=4)  # value width 10 != 16
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)
    assert "blocks of 4 queries" in explain_key_routed(q, k, v, keys, block_q=4)


def test_bad_shared_key_lists_are_refused():
    q, k, v = _qkv(n=20, m=20)
    keys = _shared_keys(2, 3, 5, 6, 20, seed=30)
    with pytest.raises(ValueError, match=r"keys: expected an int64 tensor \[2, 3, 7, K\]"):
        key_routed_attention(q, k, v, keys, block_q=3)
    with pytest.raises(ValueError, match="block_q: expected an int >= 1, got 0"):
        key_routed_attention(q, k, v, keys, block_q=0)


def test_bad_block_lists_are_refused():
    q, k, v = _qkv(n=24, m=24)
    good = torch.zeros(2, 3, 24, 2, dtype=torch.int64)
    good[..., 1] = -1
    block_routed_attention(q, k, v, good, block_q=1, block_k=8)
    bad = good.clone()
    bad[0, 0, 0, 1] = 3  # 3 key blocks: indices 0..2
    with pytest.raises(ValueError, match=r"blocks: block indices must lie in \[-1, 3\)"):
        block_routed_attention(q, k, v, bad, block_q=1, block_k=8)
    bad[0, 0, 0, 1] = 0  # the same block twice
    with pytest.raises(ValueError, match="blocks: a query block lists the same key block twice"):
        block_routed_attention(q, k, v, bad, block_q=1, block_k=8)
    with pytest.raises(ValueError, match=r"blocks: expected a bool tensor \[2, 3, 24, 3\] or int64 block lists"):
        block_routed_attention(q, k, v, good[:, :, :5], block_q=1, block_k=8)
    with pytest.raises(ValueError, match="blocks: expected a bool tensor"):
        block_routed_attention(q, k, v, good.to(torch.int32), block_q=1, block_k=8)


@pytest.mark.parametrize("path", ["native", "flash"])
def test_block_fast_paths_in_float32(path):
    q, k, v, blocks = _block_case(100, 100, 24, True, seed=12, dtype=torch.float32, own=True)
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=24, causal=True, backend="reference")
    out = _block_path(path)(q, k, v, blocks, block_q=1, block_k=24, causal=True)
    assert (out - ref).abs().max() < 1e-5
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        assert (a - b).abs().max() < 1e-4


def test_block_native_path_is_the_same_on_any_number_of_threads():
    from attnzoo.ops.routed_blocks_native import block_routed_native

    q, k, v, blocks = _block_case(120, 120, 32, True, seed=14, own=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = block_routed_native(q, k, v, blocks, block_q=1, block_k=32, causal=True)
            results.append((out, *_grads(out, (q, k, v))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_gather_runs_the_native_kernels_and_falls_back_to_flash_tiles(monkeypatch):
    from attnzoo.ops import native

    q, k, v, blocks = _block_case(40, 40, 8, True, seed=15, own=True)
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=True, backend="reference")
    want = _grads(ref, (q, k, v))
    routing = Routing("blocks", blocks, 1, 8)
    assert "compiled routed kernels:" in explain_routed(q, k, v, routing, causal=True)
    try:
        monkeypatch.setenv(native.ENV_DISABLE, "0")
        native.reset()
        text = explain_routed(q, k, v, routing, causal=True)
        assert "fused CPU flash tiles (not the compiled routed kernels: " in text and "ATTNZOO_NATIVE=0" in text
        out = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=True, backend="gather")
        _close(out, ref)
        for a, b in zip(_grads(out, (q, k, v)), want):
            _close(a, b)
    finally:
        monkeypatch.delenv(native.ENV_DISABLE)
        native.reset()
    q16 = q[..., :12].detach()  # a head dim the kernels cannot take (12 is not a multiple of 8 doubles)
    assert "multiples of 8" in explain_routed(q16, k[..., :12], v[..., :12], routing, causal=True)


def test_block_autograd_fallback():
    from attnzoo.ops.routed_blocks import flash_routing_ok
    q, k, v, blocks = _block_case(20, 20, 8, True, seed=13, dv=10)  # value width != key width: autograd path
    assert not flash_routing_ok(q, k, v, True)
    ref = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=True, backend="reference")
    out = block_routed_attention(q, k, v, blocks, block_q=1, block_k=8, causal=True, backend="gather")
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_of_a_routing_comes_from_its_layout(causal):
    """The routed flex path builds its block mask from the routing's exact bounds (no pass over every pair); it
    equals create_block_mask's, and flex's forward equals the reference (CPU, float32)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from attnzoo.ops.backends.flex import FLEX_BLOCK, layout_block_mask
    from attnzoo.ops.layout import Shape

    n = 2 * FLEX_BLOCK + 40  # a ragged last tile
    g = torch.Generator().manual_seed(9)
    blocks = torch.rand(2, 3, -(-n // 32), -(-n // 64), generator=g) < 0.4
    pat = BlockRouted(blocks, 32, 64, causal)
    shape = Shape(2, 3, n, n)
    got = layout_block_mask(pat, shape, "cpu")
    want = create_block_mask(pat.mask_mod(shape), 2, 3, n, n, device="cpu", BLOCK_SIZE=FLEX_BLOCK)
    # The layout's tiles are a superset (its causal bound may visit a tile whose routed pairs are all in the
    # future: mask_mod drops them), and it calls a ragged last tile full when every real pair is allowed
    # (create_block_mask evaluates the padding); the forward checks both.
    assert bool((got.to_dense() >= want.to_dense()).all())
    assert bool((got.full_kv_num_blocks >= want.full_kv_num_blocks).all())
    if not causal:
        assert torch.equal(got.to_dense(), want.to_dense())
    q, k, v = (t.detach().float() for t in _qkv(n=n, m=n, d=32))
    ref = block_routed_attention(q, k, v, blocks, block_q=32, block_k=64, causal=causal, backend="reference")
    out = block_routed_attention(q, k, v, blocks, block_q=32, block_k=64, causal=causal, backend="flex")
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind,backend", [("keys", "gather"), ("keys", "sdpa"), ("blocks", "auto"),
                                          ("blocks", "blocksparse")])
def test_key_padding_on_every_routing_kind(kind, backend):
    """``keep`` pads keys for key and block routings too (the one op's argument), equal to the reference."""
    q, k, v = _qkv(n=21, m=21)
    g = torch.Generator().manual_seed(7)
    if kind == "keys":
        routing = Routing("keys", torch.stack([torch.randperm(21, generator=g)[:5] for _ in range(2 * 3 * 21)])
                          .view(2, 3, 21, 5))
    else:
        routing = Routing("blocks", torch.rand(2, 3, 21, 3, generator=g) < 0.5, 1, 8)
    keep = torch.rand(2, 21, generator=g) < 0.7
    ref = routed_attention(q, k, v, routing, causal=True, keep=keep, backend="reference")
    out = routed_attention(q, k, v, routing, causal=True, keep=keep, backend=backend)
    _close(out, ref)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        _close(a, b)


def test_arguments_a_routing_cannot_take_are_refused():
    q, k, v = _qkv(n=8, m=8)
    blocks = Routing("blocks", torch.ones(2, 3, 8, 2, dtype=torch.bool), 1, 4)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 0] = False
    with pytest.raises(ValueError, match="keep: the gather path of a block routing"):
        routed_attention(q, k, v, blocks, keep=keep, backend="gather")
    with pytest.raises(ValueError, match="chunk: only a 'queries' routing"):
        routed_attention(q, k, v, blocks, chunk=4)
