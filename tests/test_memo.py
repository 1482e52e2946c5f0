"""The dispatch memo: repeated calls skip validation but stay correct and hold no tensors."""

from __future__ import annotations

import gc
import weakref

import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops import dispatch as attention_module


def _qkv(n: int = 70, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64).requires_grad_(grad) for _ in range(3))


def test_repeated_calls_hit_the_memo_and_match_the_reference() -> None:
    pattern = P.SlidingWindow(5, causal=True)
    attention_module._MEMO.clear()
    for seed in range(3):
        q, k, v = _qkv(seed=seed)
        out = attnzoo.attention(q, k, v, pattern=pattern, backend="blocksparse")
        ref = attnzoo.attention(q, k, v, pattern=pattern, backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert len(attention_module._MEMO) == 2  # one entry per backend, reused across seeds


def test_memo_keeps_no_input_tensor_alive() -> None:
    pattern = P.Document([30, 40])
    for backend in ("blocksparse", "sdpa", "reference"):
        q, k, v = _qkv()
        attnzoo.attention(q, k, v, pattern=pattern, backend=backend)
        ref = weakref.ref(q)
        del q, k, v
        gc.collect()
        assert ref() is None, backend


def test_grad_mode_is_part_of_the_key() -> None:
    pattern = P.SlidingWindow(3)
    q, k, v = _qkv(grad=True)
    with torch.no_grad():
        attnzoo.attention(q, k, v, pattern=pattern)
    out = attnzoo.attention(q, k, v, pattern=pattern)
    assert out.requires_grad
    (gq,) = torch.autograd.grad(out.sum(), q)
    ref = attnzoo.attention(q, k, v, pattern=pattern, backend="reference")
    (gr,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, gr, atol=1e-12, rtol=1e-12)


def test_large_bias_is_not_memoised() -> None:
    q, k, v = _qkv(n=300)
    bias = P.Bias(torch.zeros(1, 2, 300, 300, dtype=torch.float64))
    attention_module._MEMO.clear()
    attnzoo.attention(q, k, v, score_mod=bias)
    assert len(attention_module._MEMO) == 0


def test_bad_input_after_a_hit_is_still_rejected() -> None:
    pattern = P.Causal()
    q, k, v = _qkv()
    attnzoo.attention(q, k, v, pattern=pattern)
    try:
        attnzoo.attention(q, k.float(), v, pattern=pattern)
    except TypeError as err:
        assert "k: expected dtype" in str(err)
    else:
        raise AssertionError("a dtype mismatch after a memo hit was accepted")
