"""Per-layer interventions shared by capture, steering and patching.

An :class:`LayerEdit` says what to record and what to change in one attention layer during
one forward pass: the attention weights (``weight_edits``, ``temperature``) and the per-head
outputs before the output projection (``z_edits``). :func:`installed` applies a set of edits
to a model for the duration of a ``with`` block and removes every trace afterwards:

* attnzoo mixers (:class:`~attnzoo.layers.AttentionMixer`): instance-level wrappers of
  ``attend``, ``attention_scale`` and ``output`` (the class methods are untouched; the
  instance attributes are deleted, or restored if the instance had its own, on exit);
* Hugging Face attention modules: a lookup table read by the ``"attnzoo"`` attention function
  (:mod:`attnzoo.inspect.hf`); the model's ``attn_implementation`` is switched to ``"attnzoo"``
  for the block and switched back on exit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerEdit", "attention_layers", "installed", "ACTIVE"]

# id(module) -> LayerEdit, only while an ``installed`` block runs (read by the HF attention function)
ACTIVE: dict[int, LayerEdit] = {}


@dataclass
class LayerEdit:
    """What to record and change in one attention layer (``layer`` is its index in the model)."""

    layer: int
    n_heads: int | None = None
    record: Callable[[str, torch.Tensor], None] | None = None
    record_weights: bool = False
    record_z: bool = False
    weight_edits: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    z_edits: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    temperature: float | None = None
    before: Callable[[int, int, int], None] | None = None  # (batch, n_q, n_kv) before any attention work

    @property
    def needs_weights(self) -> bool:
        return self.record_weights or bool(self.weight_edits)

    def edit_weights(self, w: torch.Tensor) -> torch.Tensor:
        for fn in self.weight_edits:
            w = fn(w)
        return w

    def edit_z(self, z: torch.Tensor) -> torch.Tensor:
        for fn in self.z_edits:
            z = fn(z)
        return z


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation") and hasattr(
        model, "set_attn_implementation")


def heads_of(m: nn.Module) -> int | None:
    """The query head count of attention layer ``m`` (seen in its calls for Hugging Face modules)."""
    from attnzoo.inspect import hf

    seen = hf.probed_heads(m)
    if seen is not None:
        return seen
    for attr in ("n_heads", "num_attention_heads", "num_heads"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    cfg = getattr(m, "config", None)
    v = getattr(cfg, "num_attention_heads", None)
    return v if isinstance(v, int) else None


def attention_layers(model: nn.Module, example: Any = None) -> list[tuple[str, nn.Module]]:
    """The model's attention layers in module order, as ``(name, module)``.

    attnzoo mixers (outermost only: a mixer inside a mixer counts once) or, for Hugging Face
    models, the modules that call the ``"attnzoo"`` attention function in a probe forward
    (:func:`attnzoo.inspect.hf.hf_attention_layers`; ``example`` inputs serve as the probe when
    none can be built from the config). Raises ``TypeError`` naming the module types found
    when there is none.
    """
    from attnzoo.layers.base import AttentionMixer

    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, AttentionMixer) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    if found:
        return found
    if _is_hf(model):
        from attnzoo.inspect import hf

        return hf.hf_attention_layers(model, example)
    types_found = sorted({type(m).__name__ for m in model.modules()})
    raise TypeError(
        "capture: found no attention layer that attnzoo can capture in "
        f"{type(model).__name__}; module types found: {', '.join(types_found)}. Supported: attnzoo mixers "
        "(attnzoo.layers.AttentionMixer subclasses) and Hugging Face models whose attention uses AttentionInterface."
    )


def check_layers(layers: Any, n: int) -> list[int]:
    """Normalise a layer filter (None, an int or a sequence of ints, negatives allowed) against ``n`` layers."""
    if layers is None:
        return list(range(n))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"layers: {i!r} is not a layer of this model; valid layers are 0..{n - 1} "
                             f"(or -{n}..-1)")
        out.append(i % n)
    return sorted(set(out))


def check_head(layer: int, head: Any, n_heads: int | None) -> int:
    if isinstance(head, bool) or not isinstance(head, int):
        raise IndexError(f"head: expected an integer, got {head!r}")
    if n_heads is not None and not -n_heads <= head < n_heads:
        raise IndexError(f"head {head} does not exist in layer {layer}; valid heads are 0..{n_heads - 1}")
    return head % n_heads if n_heads is not None else head


_Z_RECORDERS = "_attnzoo_z_recorders"


def _install_mixer(m: nn.Module, edit: LayerEdit) -> Callable[[], None]:
    cls = type(m)
    saved = {k: m.__dict__[k] for k in ("attend", "attention_scale", "output") if k in m.__dict__}
    inner_attend = saved.get("attend") or types.MethodType(cls.attend, m)
    inner_scale = saved.get("attention_scale") or types.MethodType(cls.attention_scale, m)
    inner_output = saved.get("output") or types.MethodType(cls.output, m)

    def attend(self, q, k, v, pattern, want_weights, call=None):
        if edit.before is not None:
            edit.before(q.shape[0], q.shape[2], k.shape[2])
        if not edit.needs_weights:
            return inner_attend(q, k, v, pattern, want_weights, call=call)
        z, w = inner_attend(q, k, v, pattern, True, call=call)
        if edit.weight_edits:
            w = edit.edit_weights(w)
            rep = w.shape[1] // v.shape[1]
            z_new = torch.matmul(w.to(v.dtype), v.repeat_interleave(rep, 1) if rep > 1 else v)
            if z_new.shape != z.shape:
                raise TypeError(f"steering: {cls.__name__} does not compute its output as weights @ values, so its "
                                "attention weights cannot be edited")
            z = z_new
        if edit.record_weights and edit.record is not None:
            edit.record("weights", w)
        return z, (w if want_weights else None)

    def attention_scale(self, q):
        s = inner_scale(q)
        if edit.temperature is None:
            return s
        base = (q.shape[-1] ** -0.5) if s is None else s
        return base / edit.temperature

    # Head outputs are recorded by the innermost wrapper (the first installed), which every z edit has
    # reached by then, whatever the order in which captures and steering were installed.
    innermost = "output" not in saved
    recorders = m.__dict__.setdefault(_Z_RECORDERS, [])
    recorder = None
    if edit.record_z and edit.record is not None:
        def recorder(z: torch.Tensor) -> None:
            edit.record("head_outputs", z)
        recorders.append(recorder)

    def output(self, z, x):
        z = edit.edit_z(z)
        if innermost:
            for record in list(recorders):
                record(z)
        return inner_output(z, x)

    m.attend = types.MethodType(attend, m)
    m.attention_scale = types.MethodType(attention_scale, m)
    m.output = types.MethodType(output, m)

    def undo() -> None:
        for k in ("attend", "attention_scale", "output"):
            if k in saved:
                m.__dict__[k] = saved[k]
            else:
                m.__dict__.pop(k, None)
        if recorder is not None:
            recorders.remove(recorder)
        if innermost:
            m.__dict__.pop(_Z_RECORDERS, None)

    return undo


@contextlib.contextmanager
def installed(model: nn.Module, edits: dict[int, LayerEdit]) -> Iterator[list[tuple[str, nn.Module]]]:
    """Apply ``edits`` (layer index -> :class:`LayerEdit`) to ``model`` inside the block."""
    from attnzoo.layers.base import AttentionMixer

    layers = attention_layers(model)
    undo: list[Callable[[], None]] = []
    hf = not isinstance(layers[0][1], AttentionMixer)
    try:
        if hf:
            from attnzoo.inspect import hf as hfmod

            hfmod.check_consistent(model)
            undo.append(hfmod.switch_to_attnzoo(model))
            for i, edit in edits.items():
                mod = layers[i][1]
                if id(mod) in ACTIVE:
                    raise RuntimeError("steer/capture: this model is already being captured or steered; nest the "
                                       "edits in one call instead")
                ACTIVE[id(mod)] = edit
                key = id(mod)
                undo.append(lambda key=key: ACTIVE.pop(key, None))
        else:
            for i, edit in edits.items():
                undo.append(_install_mixer(layers[i][1], edit))
        yield layers
    finally:
        for u in reversed(undo):
            u()
