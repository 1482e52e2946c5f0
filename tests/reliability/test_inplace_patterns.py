"""Patterns and score modifiers that hold tensors, changed in place between calls: every backend sees the change.

Each case builds a pattern over tensors the test keeps, runs it once on a backend (filling the pattern's caches,
the dispatcher memo, the layouts and tile plans), changes the tensors in place and runs again: the result must
equal the float64 reference of a fresh copy of the changed pattern (forward, and gradients on blocksparse).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import attnzoo
from attnzoo import patterns as P

N = 192
BACKENDS = ["reference", "sdpa", "blocksparse", "gather", "auto"]
TOL = {"atol": 1e-10, "rtol": 1e-10}


def _key_padding() -> tuple[P.Pattern, Callable[[], None]]:
    keep = torch.ones(2, N, dtype=torch.bool)

    def change() -> None:
        keep[0, 100:] = False
        keep[1, :30] = False

    return P.KeyPadding(keep), change


def _window_and_padding() -> tuple[P.Pattern, Callable[[], None]]:
    keep = torch.ones(2, N, dtype=torch.bool)

    def change() -> None:
        keep[:, 70:90] = False

    return P.SlidingWindow(12) & P.KeyPadding(keep), change


def _document() -> tuple[P.Pattern, Callable[[], None]]:
    ids = torch.zeros(N, dtype=torch.long)

    def change() -> None:
        ids[64:] = 1
        ids[150:] = 2

    return P.Document.from_ids(ids), change


def _adjacency() -> tuple[P.Pattern, Callable[[], None]]:
    adj = torch.ones(N, N, dtype=torch.bool).tril()

    def change() -> None:
        adj[:, :80] = False
        adj[5, 5] = True

    return P.Adjacency(adj), change


def _segments() -> tuple[P.Pattern, Callable[[], None]]:
    ids = torch.arange(N) // 32
    glob = torch.zeros(N, dtype=torch.bool)

    def change() -> None:
        ids.copy_(torch.arange(N) // 48)
        glob[:3] = True

    return P.SegmentMask(ids, global_keys=glob, causal=True), change


def _prefix() -> tuple[P.Pattern, Callable[[], None]]:
    prefix = torch.tensor([10, 40])

    def change() -> None:
        prefix.copy_(torch.tensor([120, 0]))

    return P.PrefixLM(prefix), change


def _custom_closure() -> tuple[P.Pattern, Callable[[], None]]:
    allowed = torch.ones(N, N, dtype=torch.bool).triu()

    def change() -> None:
        allowed.logical_not_()

    return P.Custom(lambda b, h, q, kv: allowed[q, kv], per_batch=False, per_head=False), change


def _per_head() -> tuple[P.Pattern, Callable[[], None]]:
    keep = torch.ones(2, N, dtype=torch.bool)

    def change() -> None:
        keep[1, 40:] = False

    return P.PerHead([P.KeyPadding(keep), P.Causal()]), change


def _or_padding() -> tuple[P.Pattern, Callable[[], None]]:
    keep = torch.zeros(2, N, dtype=torch.bool)

    def change() -> None:
        keep[:, :16] = True

    return P.Causal() | P.KeyPadding(keep), change


def _replaced_tensor() -> tuple[P.Pattern, Callable[[], None]]:
    pat = P.KeyPadding(torch.ones(2, N, dtype=torch.bool))

    def change() -> None:  # a new tensor bound to the pattern (the old one freed): its id may come back
        new = torch.ones(2, N, dtype=torch.bool)
        new[:, 60:] = False
        pat._tensor = new

    return pat, change


CASES = {
    "KeyPadding": _key_padding, "SlidingWindow&KeyPadding": _window_and_padding, "Document": _document,
    "Adjacency": _adjacency, "SegmentMask": _segments, "PrefixLM": _prefix, "Custom": _custom_closure,
    "PerHead": _per_head, "Causal|KeyPadding": _or_padding, "replaced tensor": _replaced_tensor,
}


def _qkv(seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, N, 16, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
                 for _ in range(3))


def _run(q, k, v, pattern, backend, **kw):
    try:
        return attnzoo.attention(q, k, v, pattern=pattern, backend=backend, **kw)
    except ValueError as e:
        if "cannot run this call" in str(e):
            return None
        raise


@pytest.mark.parametrize("case", list(CASES))
def test_pattern_changed_in_place_is_seen_by_every_backend(case):
    ran = []
    for backend in BACKENDS:
        pattern, change = CASES[case]()
        q, k, v = _qkv(len(backend))
        first = _run(q, k, v, pattern, backend)
        if first is None:
            continue
        _run(q, k, v, pattern, backend)  # a repeated call: the dispatcher memo now holds it
        before = attnzoo.attention(q, k, v, pattern=copy.deepcopy(pattern), backend="reference")
        change()
        got = _run(q, k, v, pattern, backend)
        want = attnzoo.attention(q, k, v, pattern=copy.deepcopy(pattern), backend="reference")
        assert not torch.allclose(before, want), "the change must matter for the test to mean anything"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, b=backend: f"{case} on {b}: {m}")
        ran.append(backend)
    assert {"reference", "sdpa", "blocksparse"} <= set(ran), ran


@pytest.mark.parametrize("case", ["KeyPadding", "Document", "Custom", "SlidingWindow&KeyPadding"])
def test_gradients_after_an_in_place_change(case, no_tile_kernel):
    """The backward of blocksparse (its cached tile masks) follows the changed pattern too."""
    pattern, change = CASES[case]()
    q, k, v = _qkv(1, requires_grad=True)
    do = torch.randn_like(q)
    attnzoo.attention(q, k, v, pattern=pattern, backend="blocksparse").backward(do)
    change()
    grads = []
    for pat, backend in ((pattern, "blocksparse"), (copy.deepcopy(pattern), "reference")):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attnzoo.attention(*leaves, pattern=pat, backend=backend)
        grads.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL)


def test_change_between_forward_and_backward_is_refused():
    """blocksparse's backward re-evaluates the pattern: a change after the forward would give gradients of another
    pattern, so it raises (the reference backend keeps what its forward used)."""
    pattern, change = CASES["KeyPadding"]()
    q, k, v = _qkv(2, requires_grad=True)
    out = attnzoo.attention(q, k, v, pattern=pattern, backend="blocksparse")
    change()
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_modifiers_changed_in_place(backend):
    """A bias tensor or ALiBi slopes changed in place are read anew on every call."""
    q, k, v = _qkv(3)
    bias = torch.zeros(1, 2, N, N, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    for mod, change in ((P.Bias(bias), lambda: bias.normal_(generator=torch.Generator().manual_seed(0))),
                        (P.ALiBi(slopes), lambda: slopes.mul_(4))):
        pat = P.SlidingWindow(20)
        if _run(q, k, v, pat, backend, score_mod=mod) is None:
            continue
        _run(q, k, v, pat, backend, score_mod=mod)
        change()
        got = _run(q, k, v, pat, backend, score_mod=mod)
        want = attnzoo.attention(q, k, v, pattern=P.SlidingWindow(20), score_mod=copy.deepcopy(mod),
                                 backend="reference")
        torch.testing.assert_close(got, want, **TOL)


def test_cache_is_kept_while_nothing_changes():
    """The version check does not throw the caches away on every call: an unchanged pattern keeps its layout."""
    keep = torch.ones(2, N, dtype=torch.bool)
    pat = P.KeyPadding(keep)
    shape = P.Shape(2, 2, N, N)
    first = pat.block_layout(shape)
    assert pat.block_layout(shape) is first
    keep[0, 0] = True  # an in-place write, even of the same value, moves the version counter
    assert pat.block_layout(shape) is not first


def test_untrackable_tensors_are_never_cached():
    """Inference-mode tensors keep no version counter: nothing derived from them is cached (always exact)."""
    with torch.inference_mode():
        keep = torch.ones(1, N, dtype=torch.bool)
        pat = P.KeyPadding(keep)
        q = torch.randn(1, 1, N, 8, dtype=torch.float64)
        attnzoo.attention(q, q, q, pattern=pat, backend="blocksparse")
        keep[0, 50:] = False
        got = attnzoo.attention(q, q, q, pattern=pat, backend="blocksparse")
        want = attnzoo.attention(q, q, q, pattern=P.KeyPadding(keep.clone()), backend="reference")
    assert pat.data_version() is None
    torch.testing.assert_close(got, want, **TOL)


def test_custom_watches_declared_and_global_tensors():
    holder = type("Holder", (), {})()
    holder.allowed = torch.ones(N, N, dtype=torch.bool)
    pat = P.Custom(lambda b, h, q, kv: holder.allowed[q, kv], per_batch=False, per_head=False,
                   tensors=[holder.allowed])
    assert any(t is holder.allowed for t in pat.tensors())
    version = pat.data_version()
    holder.allowed[:, 100:] = False
    assert pat.data_version() != version
    with pytest.raises(TypeError, match="tensors"):
        P.Custom(lambda b, h, q, kv: q >= kv, tensors=[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_flex_sees_in_place_changes(case):
    """FlexAttention (compiled on CPU, seconds per shape): the block mask is rebuilt after a change."""
    pattern, change = CASES[case]()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, N, 32, generator=g) for _ in range(3))  # flex on CPU: float32, head dim > 16
    if _run(q, k, v, pattern, "flex") is None:
        pytest.skip("flex cannot run this call here")
    change()
    got = _run(q, k, v, pattern, "flex")
    want = attnzoo.attention(q.double(), k.double(), v.double(), pattern=copy.deepcopy(pattern), backend="reference")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
