"""A query row that sees no key returns zeros and zero gradients on every backend, however it was masked.

The pattern path is covered in ``test_backends.py``; here the row is emptied by the logits: a ``Bias``
of ``-inf`` (how Hugging Face masks arrive), a custom score_mod returning ``-inf``, and a pattern and a
bias that each leave keys but together none. Every backend that accepts the call is run (forward and
gradients, or forward only where it has no backward here); its live rows equal the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo import patterns as P
from attnzoo.ops.backends import BACKENDS
from attnzoo.patterns.score_mods import Bias, Chain, CustomScore, SoftCap

B, H, N, D = 2, 2, 6, 4


def _bias(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A finite random bias with -inf holes, and the rows ``[B, 1, N]`` it leaves empty."""
    bias = torch.randn(B, 1, N, N, generator=g, dtype=torch.float64)
    bias[0, :, 1] = -math.inf  # row 1 of batch 0 sees nothing
    bias[1, :, :, :2] = -math.inf  # keys 0, 1 hidden from batch 1 ...
    bias[1, :, 4, 2:] = -math.inf  # ... so its row 4 sees nothing
    empty = torch.zeros(B, 1, N, dtype=torch.bool)
    empty[0, :, 1] = empty[1, :, 4] = True
    return bias, empty


def _case(name: str, g: torch.Generator):
    """``(pattern, score_mod, empty rows [B, 1|H, N])``."""
    bias, empty = _bias(g)
    if name == "bias":
        return None, Bias(bias), empty
    if name == "bias_softcap":
        return None, Chain([SoftCap(2.0), Bias(bias)]), empty
    if name == "custom":
        rows = torch.tensor([False, False, True, False, False, True])
        mod = CustomScore(lambda s, b, h, q, kv: torch.where(rows[q] & (h == 1), torch.full_like(s, -math.inf), s))
        return None, mod, rows.view(1, 1, N).expand(B, H, N) & (torch.arange(H) == 1).view(1, H, 1)
    if name == "pattern_and_bias":  # the causal pattern leaves row 0 only key 0, which the bias hides
        only = torch.zeros(B, 1, N, N, dtype=torch.float64)
        only[:, :, 0, 0] = -math.inf
        e = torch.zeros(B, 1, N, dtype=torch.bool)
        e[:, :, 0] = True
        return P.Causal(), Bias(only), e
    raise KeyError(name)


def _run(backend: str, q, k, v, pattern, mod, grad: bool):
    q, k, v = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    with torch.set_grad_enabled(grad):
        out = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend=backend)
    if not grad:
        return out, None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return out, torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("case", ["bias", "bias_softcap", "custom", "pattern_and_bias"])
def test_row_without_keys_is_zero_everywhere(case, backend):
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    pattern, mod, empty = _case(case, g)
    empty = empty.expand(B, H, N)
    ref_out, ref_grads = _run("reference", q, k, v, pattern, mod, True)
    grad = True
    try:
        out, grads = _run(backend, q, k, v, pattern, mod, True)
    except ValueError as e:
        if "cannot run this call" not in str(e):
            raise
        try:  # a backend without a backward here may still run the forward
            grad = False
            out, grads = _run(backend, q, k, v, pattern, mod, False)
        except ValueError as e2:
            if "cannot run this call" not in str(e2):
                raise
            pytest.skip(f"{backend} does not accept this call: {e2}")
    assert torch.isfinite(out).all()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    if grad:
        for gr, ref in zip(grads, ref_grads):
            assert torch.isfinite(gr).all()
            torch.testing.assert_close(gr, ref, atol=1e-10, rtol=1e-10)
        assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty]))


@pytest.mark.parametrize("case", ["bias", "custom", "pattern_and_bias"])
def test_reference_weights_and_lse_of_empty_rows(case):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    pattern, mod, empty = _case(case, g)
    empty = empty.expand(B, H, N)
    out, w, lse = attnzoo.attention(q, k, v, pattern=pattern, score_mod=mod, backend="reference",
                                    return_weights=True, return_lse=True)
    assert torch.equal(w[empty], torch.zeros_like(w[empty]))
    torch.testing.assert_close(w[~empty].sum(-1), torch.ones_like(w[~empty].sum(-1)))
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
