"""seer_attention beyond the conformance contract: backends, decoding with the compressed-K cache, the distillation
target and gate loss, threshold selection, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.cache import KVCache
from attnzoo.layers.testing import mha_from, random_tokens
from attnzoo.registry import create


def _seer(**kw):
    torch.manual_seed(0)
    args = {"n_kv_heads": 2, "block_size": 4, "top_k": 2, **kw}
    return create("seer_attention", dim=32, n_heads=4, **args).double()


@pytest.mark.parametrize("kw", [{"top_k": 2}, {"top_k": None, "threshold": 0.3}])
@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference(kw, causal):
    m = _seer(**kw)
    ref = _seer(backend="reference", **kw)
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=23).double().requires_grad_()
    want = ref(x, causal=causal)
    gx_want = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in ("gather", "blocksparse", "sdpa"):
        m.backend = backend
        got = m(x, causal=causal)
        assert (got - want).abs().max() < 1e-12, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx_want).abs().max() < 1e-12, backend


@pytest.mark.parametrize("kw", [{"top_k": 2}, {"top_k": None, "threshold": 0.2}])
def test_decoding_with_the_compressed_k_cache_equals_the_full_forward(kw):
    m = _seer(block_size=3, **kw)
    x = random_tokens(n=14).double()
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(14)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12
    pooled, valid = cache.state["seer_compressed_k"]
    assert pooled.shape[2] == 14 // 3 and valid.all()


def test_the_routing_is_sparse_and_changes_the_output():
    m = _seer(block_size=2, top_k=2)
    x = random_tokens(n=16).double()
    assert (m(x, causal=True) - mha_from(m)(x, causal=True)).abs().max() > 1e-6


def test_target_is_the_block_max_pool_of_the_attention_map():
    m = _seer(n_kv_heads=4, block_size=3)
    x = random_tokens(n=8).double()
    _, w = mha_from(m)(x, return_weights=True)  # [B, H, N, N]
    q, k, _ = m.project(x, x)
    target, rows = m.gate_target(q, k, None, causal=False)
    want = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    for qb in range(3):
        for kb in range(3):
            want[:, :, qb, kb] = w[:, :, 3 * qb:3 * qb + 3, 3 * kb:3 * kb + 3].amax((-1, -2))
    want = want / want.sum(-1, keepdim=True)
    assert (target - want).abs().max() < 1e-12 and rows.all()


def test_gate_loss_is_the_kl_to_the_target_and_trains_only_the_gate():
    m = _seer(block_size=3)
    x = random_tokens(n=12).double()
    loss = m.gate_loss(x, causal=True)
    loss.backward()
    named = dict(m.named_parameters())
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in named if n.startswith("gate."))
    assert all(named[n].grad is None for n in named if not n.startswith("gate."))
    # the KL by hand, per query (per-query gate): target from mha's weights, maximum over each group's heads
    _, w = mha_from(m)(x, causal=True, return_weights=True)
    t = w.view(2, 2, 2, 12, 12).amax(2).view(2, 2, 12, 4, 3).amax(-1)
    t = t / t.sum(-1, keepdim=True)
    q, k, _ = m.project(x, x)
    logits, _ = m.gate_logits(q, k, None, True)
    g = torch.softmax(logits, -1)
    kl = torch.where(t > 0, t * (t.log() - g.log()), torch.zeros_like(t)).sum(-1).mean()
    assert abs(loss.item() - kl.item()) < 1e-12


def test_gate_training_lowers_the_gate_loss():
    m = _seer(block_size=3)
    x = random_tokens(n=12).double()
    first = m.gate_loss(x, causal=False).item()
    for _ in range(10):
        grads = torch.autograd.grad(m.gate_loss(x, causal=False), list(m.gate.parameters()))
        with torch.no_grad():
            for p, g in zip(m.gate.parameters(), grads):
                p -= 5.0 * g
    assert m.gate_loss(x, causal=False).item() < 0.75 * first


def test_threshold_keeps_the_blocks_above_it_and_the_own_block():
    m = _seer(top_k=None, threshold=0.3, block_size=3)
    x = random_tokens(n=12).double()
    q, k, _ = m.project(x, x)
    logits, own = m.gate_logits(q, k, None, True)
    probs = torch.softmax(logits, -1)
    kept = m.select(logits, own)
    want = (probs > 0.3) | (torch.arange(4).view(1, -1) == own.view(-1, 1))
    assert torch.equal(kept, want) and kept.sum() < kept.numel()


@pytest.mark.parametrize("kw,name", [
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2, "threshold": 0.1}, "threshold"),
    ({"top_k": None}, "top_k"),
    ({"top_k": None, "threshold": 1.5}, "threshold"),
    ({"block_size": 0}, "block_size"),
    ({"gate": "sometimes"}, "gate"),
    ({"gate_dim": 0}, "gate_dim"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        _seer(**kw)


def test_bad_calls_name_their_argument():
    x = random_tokens(n=12).double()
    with pytest.raises(ValueError, match=r"top_k: expected at most 3 \(the key blocks of 4 of this call\), got 4"):
        _seer(top_k=4)(x)
    with pytest.raises(ValueError, match="cache"):
        _seer(gate="pooled")(x, causal=True, cache=KVCache())
    with pytest.raises(ValueError, match="causal"):
        _seer(gate="per_query")(x)
    with pytest.raises(ValueError, match="context"):
        _seer()(x, context=x)


def test_weights_move_from_mha():
    m = _seer()
    d = mha_from(m)
    assert set(m.state_dict()) == set(d.state_dict()) | {"gate.q_weight", "gate.k_weight"}
    m2 = _seer()
    m2.load_state_dict(d.state_dict(), strict=False)
    m2.gate.load_state_dict(m.gate.state_dict())
    x = random_tokens(n=9).double()
    assert torch.equal(m2(x), m(x))


@pytest.mark.parametrize("causal", [False, True])
def test_target_built_in_chunks_equals_the_whole_map(monkeypatch, causal):
    from attnzoo.layers.dynamic_sparse import seer_attention

    m = _seer(block_size=3)
    x = random_tokens(n=14).double()
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[0, 10:] = False
    q, k, _ = m.project(x, x)
    whole = m.gate_target(q, k, keep, causal)
    monkeypatch.setattr(seer_attention, "TARGET_CHUNK_ELEMENTS", 2 * 4 * 14 * 3)  # one query block per chunk
    chunked = m.gate_target(q, k, keep, causal)
    assert torch.equal(whole[1], chunked[1]) and (whole[0] - chunked[0]).abs().max() < 1e-14
