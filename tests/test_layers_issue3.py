"""Features of the issue-3 entries beyond the conformance contract: options, steps, bad input."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers import KVCache, TinyLM
from attnzoo.layers.dense_multihead.moh import MixtureOfHeads


def _x(b=2, n=10, c=32, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    ("slug", "kwargs", "needle"),
    [
        ("moh", {"dim": 32, "n_heads": 4, "dispatch": "sparse"}, "dispatch"),
        ("deconstructed_attention", {"dim": 32, "n_heads": 4, "mode": "nope"}, "mode"),
        ("deconstructed_attention", {"dim": 30, "n_heads": 4}, "dim"),
        ("deconstructed_attention", {"dim": 32, "n_heads": 4, "max_len": 0}, "max_len"),
        ("flashblock", {"dim": 32, "n_heads": 4, "block_size": 0}, "block_size"),
        ("rcmha", {"dim": 32, "n_heads": 4, "kernel_size": 0}, "kernel_size"),
        ("rcmha", {"dim": 32, "n_heads": 4, "kernel_size": 4, "conv_causal": False}, "kernel_size"),
        ("attention_adversarial", {"eps": -1.0}, "eps"),
        ("attention_adversarial", {"variant": "pgd"}, "variant"),
        ("gin_attention", {"dim": 32, "n_heads": 4, "aggregation": "sum"}, "aggregation"),
    ],
)
def test_bad_constructor_arguments(slug, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        attnzoo.create(slug, **kwargs)


def test_rope_buckets_needs_rope_and_valid_bases():
    with pytest.raises(ValueError, match="RotaryEmbedding"):
        attnzoo.create("rope_buckets", torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="bases"):
        attnzoo.create("rope_buckets", TinyLM(), bases=[])
    steered = attnzoo.create("rope_buckets", TinyLM())
    assert steered.bases == (10000.0, 12500.0, 15000.0, 17500.0, 20000.0)


def test_moh_auto_dispatch_rule():
    m = MixtureOfHeads(32, 8, n_shared=2, top_k=2)  # top_k / routed = 1/3
    assert m.gathers(256) and not m.gathers(255) and not m.gathers(1024, return_weights=True)
    assert not MixtureOfHeads(32, 8, n_shared=2, top_k=4).gathers(4096)  # 2/3 of the tokens per head
    assert not MixtureOfHeads(32, 8, router="drop_one").gathers(4096)
    m.dispatch = "dense"
    assert not m.gathers(4096)


def test_moh_gather_gradients_equal_dense():
    torch.manual_seed(0)
    m = MixtureOfHeads(32, 6, head_dim=8, n_shared=2, top_k=2, n_kv_heads=3).double()
    x = _x(n=40).requires_grad_()
    grads = []
    for dispatch in ("dense", "gather"):
        m.dispatch, m.gather_chunk = dispatch, 8
        y = m(x, causal=True)
        grads.append(torch.autograd.grad((y ** 2).sum() + m.aux_loss, [x, *m.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_flashblock_denoise_and_commit_steps():
    torch.manual_seed(0)
    m = attnzoo.create("flashblock", dim=32, n_heads=4, block_size=4).double()
    cache = KVCache()
    blocks = [_x(n=4, seed=s) for s in range(3)]
    for blk in blocks:  # denoise (two steps, the second reusing the external part) then commit
        m.denoise(_x(n=4, seed=9), cache, refresh=True)
        m.denoise(blk, cache, refresh=False)
        m.commit(blk, cache)
    assert cache.position == 12 and len(cache) == 12 and "flashblock" not in cache.state
    with pytest.raises(ValueError, match="block"):
        m.denoise(_x(n=5), cache)


def test_deconstructed_qk_source_checks():
    m = attnzoo.create("deconstructed_attention", dim=32, n_heads=4, mode="decoupled_qk", qk_dim=16)
    assert m(torch.randn(2, 5, 32), qk_source=torch.randn(2, 5, 16)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="qk_source"):
        m(torch.randn(2, 5, 32), qk_source=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="qk_source"):
        attnzoo.create("deconstructed_attention", dim=32, n_heads=4)(torch.randn(1, 3, 32),
                                                                      qk_source=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="max_len"):
        attnzoo.create("deconstructed_attention", dim=32, n_heads=4, max_len=4)(torch.randn(1, 5, 32))


def test_adversarial_training_step_trains_and_leaves_module_idle():
    adv = attnzoo.create("attention_adversarial", eps=0.5)
    torch.manual_seed(0)
    m = attnzoo.create("mha", dim=32, n_heads=4, score_mod=adv)
    x = torch.randn(2, 6, 32)
    loss = adv.training_loss(lambda: m(x, causal=True).pow(2).sum())
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    plain = attnzoo.create("mha", dim=32, n_heads=4)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x))  # outside training_loss the modifier adds nothing
    with pytest.raises(RuntimeError, match="no attention call"):
        adv.training_loss(lambda: x.sum())


@pytest.mark.parametrize("cross", [False, True])
def test_probabilistic_em_steps_ignore_padding(cross):
    """The EM key update sees only unpadded queries and keys: padded content does not reach kept outputs."""
    torch.manual_seed(0)
    m = attnzoo.create("probabilistic_attention", dim=32, n_heads=4, em_steps=2).double()
    x = _x(b=2, n=9)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False
    keep[1, 2:4] = False
    noise = 5 * _x(b=2, n=9, seed=3)
    if cross:
        ctx = _x(b=2, n=7, seed=4)
        ctx_keep = torch.ones(2, 7, dtype=torch.bool)
        ctx_keep[0, 4:] = False
        y = m(x, mask=keep, context=ctx, context_mask=ctx_keep)
        ctx2 = torch.where(ctx_keep[..., None], ctx, 5 * _x(b=2, n=7, seed=5))
        y2 = m(torch.where(keep[..., None], x, noise), mask=keep, context=ctx2, context_mask=ctx_keep)
    else:
        y = m(x, mask=keep)
        y2 = m(torch.where(keep[..., None], x, noise), mask=keep)
    torch.testing.assert_close(y[keep], y2[keep])
    assert torch.isfinite(y).all()
    m.em_steps = 0  # the key update is live: without it the output differs
    y0 = m(x, mask=keep, context=ctx, context_mask=ctx_keep) if cross else m(x, mask=keep)
    assert not torch.allclose(y0[keep], y[keep])


def test_probabilistic_em_steps_refuse_causal_and_cache():
    m = attnzoo.create("probabilistic_attention", dim=32, n_heads=4, em_steps=1).double()
    with pytest.raises(ValueError, match="em_steps: the EM key update averages over every query"):
        m(_x(), causal=True)
    with pytest.raises(ValueError, match="em_steps"):
        m(_x(), cache=KVCache())
    m0 = attnzoo.create("probabilistic_attention", dim=32, n_heads=4).double()
    assert m0(_x(), causal=True).shape == (2, 10, 32)


def test_probabilistic_propagation_moves_outputs_toward_annotations():
    torch.manual_seed(0)
    p = attnzoo.create("probabilistic_attention", dim=32, n_heads=4).double()
    x, t = _x(), _x(seed=2)
    known = torch.zeros(2, 10, dtype=torch.bool)
    known[:, :5] = True
    base = p(x)
    moved = p.propagate(x, t, known, steps=5)
    assert not torch.allclose(moved, base)
    with pytest.raises(ValueError, match="targets"):
        p.propagate(x, t[..., :8], known)
