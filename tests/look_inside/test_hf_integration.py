"""The ``"attnzoo"`` attention implementation: left padding without NaN, every keyword honoured or
refused by name, ``configure`` applied alike to the forward and to capture, the supported range,
and bad input refused before any work. Tiny random-weight models from configs (nothing downloaded).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from attnzoo import patterns as P  # noqa: E402
from attnzoo.inspect import capture, hf, steer  # noqa: E402
from tests.look_inside import hf_tiny  # noqa: E402

TOL = 2e-5


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _eager(model, x):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return _logits(model(**x))


def _check(y: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> None:
    assert torch.isfinite(y).all(), "NaN/inf in the output (pad rows included)"
    torch.testing.assert_close(y[real], ref[real], atol=TOL, rtol=0)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def left_padded(request):
    hf.register()
    model, kind = hf_tiny.build(request.param)
    x = hf_tiny.inputs(kind, seed=4)
    return model, x, x["attention_mask"].bool()


@pytest.mark.parametrize("what", [("weights",), ("head_outputs",), ("residual",), ("summaries",),
                                  ("weights", "head_outputs", "residual", "summaries")])
def test_left_padded_capture_has_no_nan(left_padded, what):
    model, x, real = left_padded
    ref = _eager(model, x)
    c = capture(model, x, what=what)
    _check(_logits(c.output), ref, real)
    assert c.keys(), "something was captured"
    for key in c.keys():
        val = c[key]
        for t in (val.values() if isinstance(val, dict) else [val]):
            assert torch.isfinite(t).all(), f"NaN in {key}"


@pytest.mark.parametrize("edit", [
    {"head_scale": {(0, 0): 1.0, (1, 1): 1.0}},
    {"attention_reweight": {"keys": [0, 4], "alpha": 1.0, "tau": 1.0}},
    {"sink_redistribution": {"sinks": [0], "p": 0.0}},
])
def test_left_padded_neutral_steering_equals_eager(left_padded, edit):
    model, x, real = left_padded
    ref = _eager(model, x)
    with torch.no_grad(), steer(model, **edit):
        y = _logits(model(**x))
    _check(y, ref, real)
    assert model.config._attn_implementation == "eager"


def test_left_padded_real_steering_has_no_nan(left_padded):
    model, x, real = left_padded
    ref = _eager(model, x)
    with torch.no_grad(), steer(model, attention_reweight={"keys": [4], "alpha": 3.0, "tau": 0.7},
                                sink_redistribution={"sinks": [3], "p": 0.5}):
        y = _logits(model(**x))
    assert torch.isfinite(y).all() and not torch.allclose(y[real], ref[real])


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa", "blocksparse"])
def test_left_padded_configure_backend_equals_eager(left_padded, backend):
    model, x, real = left_padded
    ref = _eager(model, x)
    try:
        hf.configure(model, backend=backend)
        assert model.config._attn_implementation == "attnzoo"
        with torch.no_grad():
            _check(_logits(model(**x)), ref, real)
        _check(_logits(capture(model, x, what=("weights",)).output), ref, real)
    finally:
        hf.configure(model)
        model.set_attn_implementation("eager")


@pytest.mark.parametrize("name,drop", [("gpt2", {"attn_pdrop": 0.1}), ("llama", {"attention_dropout": 0.1})])
def test_training_with_attention_dropout_on_left_padding(name, drop):
    hf.register()
    model, kind = hf_tiny.build(name, **drop)
    model.train()
    x = hf_tiny.inputs(kind, seed=5)
    # next-token loss between real tokens (a pad row's prediction of the first real token is left out: pad
    # rows see no key, so they are zeros here and a uniform average over pads in eager)
    keep = x["attention_mask"][:, :-1].bool() & x["attention_mask"][:, 1:].bool()
    targets = x["input_ids"][:, 1:][keep]
    results = {}
    for impl in ("eager", "attnzoo"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        torch.manual_seed(0)
        logits = model(**x).logits[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        results[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    loss, grads = results["attnzoo"]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # the same dropout masks are drawn (same shapes, same order), so the losses agree
    torch.testing.assert_close(loss, results["eager"][0], atol=1e-5, rtol=0)
    for g, ge in zip(grads, results["eager"][1]):
        torch.testing.assert_close(g, ge, atol=1e-4, rtol=1e-4)


def test_configure_applies_to_forward_and_capture_alike():
    hf.register()
    model, kind = hf_tiny.build("llama")
    x = hf_tiny.inputs(kind, seed=6, pad="none")
    ref = _eager(model, x)
    model.set_attn_implementation("sdpa")
    hf.configure(model, pattern=P.SlidingWindow(2, causal=True))
    assert model.config._attn_implementation == "attnzoo"
    with torch.no_grad():
        y = _logits(model(**x))
    c = capture(model, x)
    torch.testing.assert_close(_logits(c.output), y, atol=1e-6, rtol=0)
    assert not torch.allclose(y, ref, atol=1e-3), "the window changes the output"
    w = c["weights", 0]
    i, j = torch.arange(7).view(-1, 1), torch.arange(7).view(1, -1)
    assert torch.all(w[..., ~((i - j >= 0) & (i - j < 2))] == 0)
    # a model switched back to an implementation that ignores the pattern is refused, not silently different
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="configure"):
        capture(model, x)
    with pytest.raises(RuntimeError, match="configure"):
        with steer(model, head_scale={(0, 0): 0.0}):
            pass
    hf.configure(model)  # cleared: capture on sdpa gives eager's output again
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_logits(capture(model, x).output), ref, atol=TOL, rtol=0)


class _Module(torch.nn.Module):
    pass


def _qkvm(h=4, h_kv=2, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, h_kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, h_kv, n, d, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 1, n, n, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False  # left padding: rows 0, 1 of batch 1 see no key
    return q, k, v, mask


def _manual(q, k, v, mask, scaling, softcap=None, sinks=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)], -1)
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)
    e = torch.exp(s - m)
    w = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    if sinks is not None:
        w = w[..., :-1]
    return (w @ v).transpose(1, 2), w


def test_softcap_and_sinks_equal_the_formula():
    hf.register()
    q, k, v, mask = _qkvm()
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out, w = hf.attnzoo_attention_forward(_Module(), q, k, v, mask, scaling=0.5, softcap=1.5, s_aux=sinks,
                                          output_attentions=True, position_ids=None, use_cache=True)
    want, want_w = _manual(q, k, v, mask, 0.5, softcap=1.5, sinks=sinks)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(w, want_w, atol=1e-12, rtol=0)
    g, = torch.autograd.grad(out.sum(), sinks)
    g_want, = torch.autograd.grad(want.sum(), sinks)
    torch.testing.assert_close(g, g_want, atol=1e-12, rtol=0)
    fast, none = hf.attnzoo_attention_forward(_Module(), q, k, v, mask, scaling=0.5, s_aux=sinks.detach())
    assert none is None
    torch.testing.assert_close(fast, _manual(q, k, v, mask, 0.5, sinks=sinks.detach())[0], atol=1e-12, rtol=0)
    assert torch.equal(fast[1, :2], torch.zeros_like(fast[1, :2]))  # rows without keys: zeros


def test_is_causal_sliding_window_and_position_bias_without_a_mask():
    q, k, v, _ = _qkvm()
    n = q.shape[2]
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    out, _ = hf.attnzoo_attention_forward(_Module(), q, k, v, None, scaling=0.5, is_causal=True)
    torch.testing.assert_close(out, _manual(q, k, v, j <= i, 0.5)[0], atol=1e-12, rtol=0)
    out, _ = hf.attnzoo_attention_forward(_Module(), q, k, v, None, scaling=0.5, sliding_window=2)
    torch.testing.assert_close(out, _manual(q, k, v, (i - j >= 0) & (i - j < 2), 0.5)[0], atol=1e-12, rtol=0)
    out, _ = hf.attnzoo_attention_forward(_Module(), q, k, v, None, scaling=0.5, is_causal=False)
    torch.testing.assert_close(out, _manual(q, k, v, torch.ones(n, n, dtype=torch.bool), 0.5)[0], atol=1e-12,
                               rtol=0)
    bias = torch.randn(1, 4, n, n, dtype=torch.float64)
    out, _ = hf.attnzoo_attention_forward(_Module(), q, k, v, None, scaling=0.5, position_bias=bias)
    rep = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = torch.softmax(q @ rep[0].transpose(-1, -2) * 0.5 + bias, -1) @ rep[1]
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kw,name", [({"foo": 1}, "foo"), ({"cu_seq_lens_q": torch.tensor([0, 5])}, "cu_seq_lens_q"),
                                     ({"max_length_k": 5}, "max_length_k")])
def test_unknown_or_unsupported_keyword_is_refused_by_name(kw, name):
    q, k, v, mask = _qkvm()
    with pytest.raises(TypeError, match=name):
        hf.attnzoo_attention_forward(_Module(), q, k, v, mask, scaling=0.5, **kw)


def test_supported_range():
    with pytest.raises(RuntimeError, match=r">=5\.0\.0,<6.*4\.57\.6"):
        hf.check_version("4.57.6")
    with pytest.raises(RuntimeError, match="supports transformers"):
        hf.check_version("6.0.0")
    assert hf.check_version("5.0.0") == "5.0.0" and hf.check_version("5.25.0") == "5.25.0"


def test_model_without_visible_attention_names_types_and_version():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MambaModel"):
        pytest.skip("no MambaModel in this transformers")
    model = transformers.MambaModel(transformers.MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                             state_size=4)).eval()
    with pytest.raises(TypeError, match=rf"MambaMixer.*transformers {transformers.__version__}"):
        capture(model, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert model.config._attn_implementation != "attnzoo"  # switched back after the probe


def test_too_long_input_refused_before_any_work():
    hf.register()
    model, kind = hf_tiny.build("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.ones(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="maximum length of 32"):
        capture(model, {"input_ids": ids})
    assert not calls and model not in hf._FOUND


def test_pyproject_floor_is_the_supported_floor():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text()
    pins = re.findall(r'"transformers([^"]*)"', text)
    assert len(pins) == 2 and set(pins) == {f">={hf.SUPPORTED[0]},<{hf.SUPPORTED[1]}"}, pins


def test_configure_refuses_a_non_hf_model():
    with pytest.raises(TypeError, match="configure: expected a Hugging Face"):
        hf.configure(torch.nn.Linear(2, 2))
