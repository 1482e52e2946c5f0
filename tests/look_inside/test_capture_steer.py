"""Capture and steering on attnzoo models: shapes, restoration, errors, memory budget."""

import pytest
import torch

from attnzoo.inspect import Cache, CaptureMemoryError, capture, steer
from attnzoo.inspect.steer import redistribute, reweight
from attnzoo.layers import MultiHeadAttention
from attnzoo.layers.lm import TinyLM


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    return TinyLM(vocab=32, dim=32, n_heads=4, n_layers=2).double().eval()


def _toks(b=2, n=10, seed=0):
    return torch.randint(0, 32, (b, n), generator=torch.Generator().manual_seed(seed))


def _clean(model):
    for m in model.modules():
        assert not (m.__dict__.keys() & {"attend", "output", "attention_scale"})
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_capture_shapes_and_no_trace(lm):
    x = _toks()
    y0 = lm(x)
    c = capture(lm, x)
    assert isinstance(c, Cache) and c.layers == [0, 1]
    assert c["weights", 0].shape == (2, 4, 10, 10)
    assert c["head_outputs", 1].shape == (2, 4, 10, 8)
    assert c["residual", 1].shape == (2, 10, 32)
    assert torch.allclose(c["weights", 1].sum(-1), torch.ones(2, 4, 10, dtype=torch.float64))
    assert torch.equal(c.output, y0) or torch.allclose(c.output, y0)
    assert c.stack("weights").shape == (2, 2, 4, 10, 10)
    _clean(lm)
    assert torch.equal(lm(x), y0)


def test_capture_matches_return_weights():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y, w = m(x, causal=True, return_weights=True)
    c = capture(m, x, causal=True)
    assert torch.allclose(c["weights", 0], w)
    # head outputs before W_O reproduce the layer output
    assert torch.allclose(m.o_proj(MultiHeadAttention.merge(c["head_outputs", 0])), y)


def test_capture_layer_filter_and_errors(lm):
    c = capture(lm, _toks(), what="weights", layers=[-1])
    assert c.layers == [1] and ("weights", 0) not in c
    with pytest.raises(KeyError, match=r"captured layers: \[1\]"):
        c["weights", 0]
    with pytest.raises(KeyError, match="was not captured"):
        c["head_outputs", 1]
    with pytest.raises(IndexError, match=r"valid layers are 0\.\.1"):
        capture(lm, _toks(), layers=[5])
    with pytest.raises(ValueError, match="what"):
        capture(lm, _toks(), what=("pattern",))
    with pytest.raises(TypeError, match="module types found: .*Linear"):
        capture(torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.randn(1, 3))


def test_memory_budget_and_summaries(lm):
    with pytest.raises(CaptureMemoryError, match="summaries"):
        capture(lm, _toks(n=64), max_bytes=1000)
    _clean(lm)
    c = capture(lm, _toks(n=64), what=("summaries",), max_bytes=1000)
    s = c["summaries", 0]
    assert set(s) >= {"entropy", "sink", "distance"} and s["sink"].shape == (2, 4)
    assert ("weights", 0) not in c


def test_head_scale_semantics(lm):
    x = _toks()
    y0 = lm(x)
    with steer(lm, head_scale={(0, h): 1.0 for h in range(4)}):
        assert torch.allclose(lm(x), y0)
    # xi_h = 0 equals zeroing head h's context before W_O (the layer's own head_mask)
    att = lm.blocks[0]["attn"]
    xin = torch.randn(2, 6, 32, dtype=torch.float64)
    ref = att(xin, head_mask=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    with steer(lm, head_scale={(0, 1): 0.0}):
        assert torch.allclose(att(xin), ref)
        assert not torch.allclose(lm(x), y0)
    # masking every head leaves only the output-projection bias
    with steer(lm, head_scale={(0, h): 0.0 for h in range(4)}):
        assert torch.allclose(att(xin), att.o_proj.bias.expand(2, 6, 32))
    _clean(lm)
    assert torch.equal(lm(x), y0)
    sd = {k: v.clone() for k, v in lm.state_dict().items()}
    with steer(lm, head_scale={(1, 2): 3.0}, attention_reweight={"keys": [0], "alpha": 2.0, "tau": 2.0}):
        lm(x)
    assert all(torch.equal(sd[k], v) for k, v in lm.state_dict().items())
    assert torch.equal(lm(x), y0)
    with pytest.raises(IndexError, match=r"valid heads are 0\.\.3"):
        with steer(lm, head_scale={(0, 9): 0.0}):
            pass
    with pytest.raises(IndexError, match=r"valid layers are 0\.\.1"):
        with steer(lm, head_scale={(4, 0): 0.0}):
            pass
    _clean(lm)


def test_model_restored_after_exception(lm):
    x = _toks()
    y0 = lm(x)
    with pytest.raises(RuntimeError, match="boom"), steer(lm, head_scale={(0, 0): 0.0}):
        raise RuntimeError("boom")
    _clean(lm)
    assert torch.equal(lm(x), y0)


def test_reweight_properties():
    w = torch.softmax(torch.randn(2, 3, 5, 7, dtype=torch.float64), -1)
    assert torch.allclose(reweight(w, [], 3.0), w)
    assert torch.allclose(reweight(w, [1, 2], 1.0), w)
    r = reweight(w, [1, 2], 2.5)
    assert torch.allclose(r.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (r[..., [1, 2]].sum(-1) > w[..., [1, 2]].sum(-1)).all()
    # equals adding log(alpha) to the selected logits
    s = torch.randn(1, 2, 4, 6, dtype=torch.float64)
    bias = torch.zeros(6, dtype=torch.float64)
    bias[[0, 3]] = torch.log(torch.tensor(2.5, dtype=torch.float64))
    assert torch.allclose(reweight(torch.softmax(s, -1), [0, 3], 2.5), torch.softmax(s + bias, -1))


def test_reweight_and_temperature_in_model(lm):
    x = _toks()
    base = capture(lm, x, what="weights")
    with steer(lm, attention_reweight={"keys": [0], "alpha": 1.0, "tau": 1.0}):
        same = capture(lm, x, what="weights")
    assert torch.allclose(same["weights", 0], base["weights", 0])
    with steer(lm, attention_reweight={"keys": [0], "alpha": 4.0, "layers": [0], "heads": [1]}):
        c = capture(lm, x, what="weights")
    assert torch.allclose(c["weights", 0][:, 1], reweight(base["weights", 0], [0], 4.0)[:, 1])
    assert torch.allclose(c["weights", 0][:, 0], base["weights", 0][:, 0])


def test_sinks_outside_visual_are_visual_tokens():
    """A sink not listed in ``visual`` is still drained (the sinks are visual tokens), never fed."""
    w = torch.tensor([[[[0.5, 0.3, 0.2]]]], dtype=torch.float64)
    r = redistribute(w, sinks=[0], p=1.0, visual=[1])
    torch.testing.assert_close(r, torch.tensor([[[[0.0, 0.8, 0.2]]]], dtype=torch.float64))
    torch.testing.assert_close(r, redistribute(w, sinks=[0], p=1.0, visual=[0, 1]))


def test_capture_inside_steer_records_the_steered_head_outputs():
    """Head outputs captured inside a steer block include its edits (as the weights do), so they add up
    to what the model outputs."""
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, backend="reference").double().eval()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad(), steer(m, head_scale={(0, 1): 0.0}):
        c = capture(m, x)
        y = m(x)
    assert (c["head_outputs", 0][:, 1] == 0).all()
    torch.testing.assert_close(m.o_proj(MultiHeadAttention.merge(c["head_outputs", 0])), y)
    with torch.no_grad():
        plain = capture(m, x)
    assert plain["head_outputs", 0][:, 1].abs().max() > 0 and "_attnzoo_z_recorders" not in m.__dict__


def test_sink_redistribution_properties():
    w = torch.softmax(torch.randn(2, 3, 6, 8, dtype=torch.float64) * 2, -1)
    visual = [0, 1, 2, 3, 4]
    assert torch.allclose(redistribute(w, [0], 0.0, visual), w)
    r = redistribute(w, [0], 0.6, visual)
    assert torch.allclose(r.sum(-1), w.sum(-1))
    assert torch.allclose(r[..., 5:], w[..., 5:])  # text mass unchanged
    ratio_before = w[..., 1:5] / w[..., 1:2]
    assert torch.allclose(r[..., 1:5] / r[..., 1:2], ratio_before)
    assert torch.allclose(r[..., 0], 0.4 * w[..., 0])
    # heads below the visual-share threshold are untouched
    assert torch.allclose(redistribute(w, [0], 0.6, visual, threshold=1.01), w)
