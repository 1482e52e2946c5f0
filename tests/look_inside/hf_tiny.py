"""Tiny random-weight Hugging Face models built from configs (nothing downloaded), for the model matrix.

``build(name, dtype)`` returns ``(model, kind)`` with the model in eval mode on ``"eager"``
attention, or calls ``pytest.skip`` when the installed transformers lacks the architecture.
``kind`` is ``"encoder"``, ``"decoder"`` (left padding, ``generate``) or ``"vision"``.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 61
MODELS = ("bert", "gpt2", "llama", "qwen2", "gemma2", "gpt_oss", "vit")


def _cfg(name: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  max_position_embeddings=32)
    if name == "bert":
        return tf.BertConfig(num_attention_heads=2, **common), "BertModel", "encoder"
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, attn_pdrop=0.0,
                             resid_pdrop=0.0, embd_pdrop=0.0), "GPT2LMHeadModel", "decoder"
    if name == "llama":
        return tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common), "LlamaForCausalLM", "decoder"
    if name == "qwen2":
        return tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common), "Qwen2ForCausalLM", "decoder"
    if name == "gemma2":
        return tf.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=1.5,
                               final_logit_softcapping=None, sliding_window=4, query_pre_attn_scalar=8,
                               **common), "Gemma2ForCausalLM", "decoder"
    if name == "gpt_oss":
        common = {**common, "intermediate_size": 16}
        return tf.GptOssConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                               num_experts_per_tok=1, sliding_window=4, **common), "GptOssForCausalLM", "decoder"
    if name == "vit":
        return tf.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=24), "ViTModel", "vision"
    raise KeyError(name)


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """``(model, kind)``: a tiny random ``name`` model in ``dtype``, eval mode, ``"eager"`` attention;
    ``overrides`` set config fields (e.g. ``attn_pdrop=0.1``)."""
    import transformers as tf

    try:
        cfg, cls_name, kind = _cfg(name)
    except AttributeError as e:
        pytest.skip(f"transformers {tf.__version__} has no {name}: {e}")
    cls = getattr(tf, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {tf.__version__} has no {cls_name}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    if name == "gpt_oss":
        try:  # the grouped-GEMM experts have no float64 kernel; the loop runs any dtype
            cfg._experts_implementation = "eager"
        except (AttributeError, ValueError):
            pass
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for mod in model.modules():  # gpt-oss sinks start at zero: make them matter
            sinks = getattr(mod, "sinks", None)
            if isinstance(sinks, torch.nn.Parameter):
                sinks.normal_(0.0, 1.0)
    return model.to(dtype).eval(), kind


def inputs(kind: str, dtype: torch.dtype = torch.float32, seed: int = 1, *, n: int = 7,
           pad: str | None = None) -> dict[str, torch.Tensor]:
    """Two sequences of ``n`` tokens, the second padded by 3, or images.

    ``pad``: ``"left"``, ``"right"`` or ``"none"``; by default left for decoders, right for encoders.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g).to(dtype)}
    ids = torch.randint(1, VOCAB, (2, n), generator=g)
    mask = torch.ones(2, n, dtype=torch.long)
    pad = pad or ("left" if kind == "decoder" else "right")
    if pad == "left":
        mask[1, :3] = 0
    elif pad == "right":
        mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}
