"""The Hugging Face integration on a matrix of tiny random-weight models (nothing downloaded).

BERT, GPT-2, Llama, Qwen2, Gemma2 (logit soft-capping, sliding windows), gpt-oss (attention sinks,
sliding windows) and ViT, in float32 and float64, with right padding (encoders) or left padding
(decoders): under ``"attnzoo"`` the forward and ``generate()`` equal eager on real rows, ``capture``
equals eager's ``output_attentions``, ``steer(head_scale=...)`` equals zeroing that head's slice of
the output projection's input, and the model is restored after every context. Architectures the
installed transformers lacks are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from attnzoo.inspect import capture, steer  # noqa: E402
from attnzoo.inspect._edits import attention_layers, heads_of  # noqa: E402
from attnzoo.inspect.hf import register  # noqa: E402
from tests.look_inside import hf_tiny  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Eager's softmax runs in float32 in most of these models (dtype=torch.float32), so float64 agrees to ~1e-8 only.
TOL = {torch.float32: 2e-5, torch.float64: 1e-6}
DIFFS: dict[str, float] = {}  # largest difference seen per model (printed with -s and ATTNZOO_HF_DIFFS=1)
_CACHE: dict = {}


def _model(name: str, dtype: torch.dtype):
    register()
    if (name, dtype) not in _CACHE:
        _CACHE[name, dtype] = hf_tiny.build(name, dtype)
    model, kind = _CACHE[name, dtype]
    model.set_attn_implementation("eager")
    return model, kind


def _out(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _real(kind: str, x: dict) -> torch.Tensor:
    """Bool ``[B, N]`` of the rows to compare (all rows for images)."""
    if kind == "vision":
        n = (8 // 2) ** 2 + 1
        return torch.ones(2, n, dtype=torch.bool)
    return x["attention_mask"].bool()


def _assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, label: str = "") -> float:
    assert torch.isfinite(a).all(), "attnzoo output has NaN/inf"
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if label:
        DIFFS[label] = max(DIFFS.get(label, 0.0), diff)
        if os.environ.get("ATTNZOO_HF_DIFFS"):
            print(f"\nDIFF {label} {diff:.3g}")
    assert diff <= TOL[dtype] * max(1.0, float(b.abs().max())), f"max difference {diff:.3g}"
    return diff


def _pad(kind: str, dtype: torch.dtype) -> str | None:
    """Left padding for decoders in float32; right padding in float64, where eager itself gives NaN on
    left padding (its softmax runs in float32, so a fully masked pad row is all -inf)."""
    return "right" if kind == "decoder" and dtype == torch.float64 else None


def _eager(model, x, **kw):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**x, **kw)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", hf_tiny.MODELS)
def test_forward_capture_and_restore_equal_eager(name, dtype):
    dtype = DTYPES[dtype]
    model, kind = _model(name, dtype)
    x = hf_tiny.inputs(kind, dtype, pad=_pad(kind, dtype))
    real = _real(kind, x)
    eager = _eager(model, x, output_attentions=True)
    model.set_attn_implementation("attnzoo")
    with torch.no_grad():
        ours = model(**x)
    label = f"{name} {str(dtype)[6:]}"
    _assert_close(_out(ours)[real], _out(eager)[real], dtype, f"{label} forward")

    start = "sdpa"
    try:
        model.set_attn_implementation(start)
    except ValueError:  # Gemma2, gpt-oss: no SDPA
        start = "eager"
        model.set_attn_implementation(start)
    c = capture(model, x)
    assert model.config._attn_implementation == start  # switched back
    _assert_close(_out(c.output)[real], _out(eager)[real], dtype, f"{label} capture output")
    assert c.n_layers == len(eager.attentions) == 2
    for layer in range(c.n_layers):
        w, we = c["weights", layer], eager.attentions[layer]
        assert w.shape == we.shape and torch.isfinite(w).all()
        # rows of real queries (pad queries in left-padded decoders see no key: zeros here, uniform in eager)
        _assert_close(w.transpose(1, 2)[real], we.transpose(1, 2)[real], dtype, f"{label} weights")
        assert torch.isfinite(c["head_outputs", layer]).all()
    _assert_close(c["residual", 2][real], eager.hidden_states[-1][real] if hasattr(eager, "hidden_states")
                  and eager.hidden_states is not None else c["residual", 2][real], dtype)


def _o_proj(model, layer_name: str) -> torch.nn.Module:
    mods = dict(model.named_modules())
    parent = layer_name.rsplit(".", 1)[0]
    for cand in (layer_name + ".o_proj", layer_name + ".c_proj", parent + ".output.dense"):
        if cand in mods:
            return mods[cand]
    raise KeyError(f"no output projection found for {layer_name}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", hf_tiny.MODELS)
def test_head_scale_equals_manual_ablation(name, dtype):
    dtype = DTYPES[dtype]
    model, kind = _model(name, dtype)
    x = hf_tiny.inputs(kind, dtype, seed=2, pad=_pad(kind, dtype))
    real = _real(kind, x)
    layers = attention_layers(model)
    layer, head = 1, 1
    n_heads = heads_of(layers[layer][1])
    proj = _o_proj(model, layers[layer][0])

    def ablate(mod, args):
        z = args[0].clone()
        d = z.shape[-1] // n_heads
        z[..., head * d:(head + 1) * d] = 0
        return (z, *args[1:])

    handle = proj.register_forward_pre_hook(ablate)
    try:
        manual = _eager(model, x)
    finally:
        handle.remove()
    base = _eager(model, x)
    with torch.no_grad(), steer(model, head_scale={(layer, head): 0.0}):
        steered = model(**x)
    assert model.config._attn_implementation == "eager"
    _assert_close(_out(steered)[real], _out(manual)[real], dtype, f"{name} {str(dtype)[6:]} head_scale")
    assert not torch.allclose(_out(manual)[real], _out(base)[real])
    assert torch.equal(_out(_eager(model, x)), _out(base)), "the model is restored after the block"


DECODERS = [n for n in hf_tiny.MODELS if n in ("gpt2", "llama", "qwen2", "gemma2", "gpt_oss")]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", DECODERS)
def test_generate_equals_eager(name, dtype):
    dtype = DTYPES[dtype]
    model, kind = _model(name, dtype)
    x = hf_tiny.inputs(kind, dtype, seed=3, pad="left" if dtype == torch.float32 else "none")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(**x, **kw)
        model.set_attn_implementation("attnzoo")
        ours = model.generate(**x, **kw)
    model.set_attn_implementation("eager")
    assert torch.equal(ours, eager)
