"""Capture attention weights, per-head outputs and the residual stream of a model in one forward pass.

``cache = capture(model, inputs)`` runs ``model`` once and returns a :class:`Cache`:
``cache["weights", l]`` ``[B, H, N, M]``, ``cache["head_outputs", l]`` ``[B, H, N, D]`` (each
head's output before the output projection, after gates and head masks) and
``cache["residual", l]`` ``[B, N, C]`` (the residual stream entering block ``l``; for Hugging
Face models also ``l = L``, the final hidden state). ``what=("summaries",)`` keeps per-head
summaries instead of N x N maps (``cache["summaries", l]`` is a dict of ``[B, H]`` tensors).

Works on attnzoo mixers and models built from them, and on Hugging Face ``transformers`` models
(any ``attn_implementation``: the model is switched to ``"attnzoo"`` for the pass and back).
Nothing is left on the model afterwards: no hooks, no instance attributes, the same
``attn_implementation``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, _is_hf, attention_layers, check_layers, heads_of, installed

__all__ = ["CAPTURABLE", "Cache", "CaptureMemoryError", "capture", "head_summaries", "run_model"]

CAPTURABLE = ("weights", "head_outputs", "residual", "summaries")
DEFAULT_BUDGET = 2 * 1024**3


class CaptureMemoryError(MemoryError):
    """A full N x N capture would exceed the memory budget (raised before any attention work)."""


class Cache:
    """What :func:`capture` recorded, keyed by ``(name, layer)``.

    ``cache["weights", 0]``; ``cache.stack("weights")`` ``[L, B, H, N, M]`` (selected layers);
    ``cache.layers`` the captured layer indices; ``cache.n_layers`` the model's layer count;
    ``cache.layer_names`` the module names; ``cache.output`` the model's output.
    """

    def __init__(self, n_layers: int, layers: list[int], layer_names: list[str], n_heads: list[int | None]) -> None:
        self.n_layers, self.layers, self.layer_names, self.n_heads = n_layers, layers, layer_names, n_heads
        self.data: dict[tuple[str, int], Any] = {}
        self.output: Any = None

    def __getitem__(self, key: tuple[str, int]) -> Any:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(f"cache: index with (name, layer), e.g. cache['weights', 0]; got {key!r}")
        name, layer = key
        if isinstance(layer, int) and -self.n_layers <= layer < 0:
            layer %= self.n_layers
        if (name, layer) not in self.data:
            names = sorted({n for n, _ in self.data})
            if name not in names:
                raise KeyError(f"cache: {name!r} was not captured; captured: {names} (ask with what=...)")
            have = sorted(li for n, li in self.data if n == name)
            raise KeyError(f"cache: layer {layer!r} has no {name!r}; captured layers: {have} "
                           f"(the model has layers 0..{self.n_layers - 1})")
        return self.data[name, layer]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def keys(self) -> list[tuple[str, int]]:
        return sorted(self.data)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.keys())

    def stack(self, name: str) -> torch.Tensor:
        """``[L_captured, ...]`` stack of ``name`` over the captured layers, in layer order."""
        return torch.stack([self[name, li] for li in sorted(li for n, li in self.data if n == name)])

    def weights(self) -> list[torch.Tensor]:
        """The captured attention weights, in layer order."""
        return [self["weights", li] for li in sorted(li for n, li in self.data if n == "weights")]

    def __repr__(self) -> str:
        names = sorted({n for n, _ in self.data})
        return f"Cache(layers={self.layers} of {self.n_layers}, captured={names})"


def head_summaries(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head summaries ``[B, H]`` of weights ``[B, H, N, M]``: mean entropy, mean attention to key 0
    (``sink``), mean attended distance |i - j| (queries aligned to the last keys), mean max weight."""
    from attnzoo.inspect.metrics.distance import attention_distance
    from attnzoo.inspect.metrics.entropy import attention_entropy

    w = w.detach().float()
    return {"entropy": attention_entropy(w).mean(-1), "sink": w[..., 0].mean(-1),
            "distance": attention_distance(w).mean(-1), "max_weight": w.amax(-1).mean(-1)}


def run_model(model: nn.Module, inputs: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """Call ``model`` with ``inputs``: a tensor (positional), a tuple/list (positional) or a mapping (keywords)."""
    kwargs = dict(kwargs or {})
    if isinstance(inputs, dict) or (hasattr(inputs, "keys") and hasattr(inputs, "__getitem__")
                                    and not isinstance(inputs, torch.Tensor)):
        return model(**dict(inputs), **kwargs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **kwargs)
    return model(inputs, **kwargs)


def _check_length(model: nn.Module, inputs: Any) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None:
        limit = getattr(getattr(model, "trunk", None), "max_len", None)
    if limit is None:
        return
    if hasattr(inputs, "keys") and hasattr(inputs, "get") and not isinstance(inputs, torch.Tensor):
        t = inputs.get("input_ids")
        t = inputs.get("inputs_embeds") if t is None else t
    else:
        t = inputs
    if isinstance(t, (tuple, list)) and t:
        t = t[0]
    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] > limit:
        raise ValueError(f"inputs: {t.shape[1]} tokens exceed the model's maximum length of {limit}")


def _blocks_for(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[nn.Module | None]:
    """For each attention layer, the module whose forward-pre input is the residual stream of its block."""
    mods = dict(model.named_modules())
    out: list[nn.Module | None] = []
    for name, _ in layers:
        parts = name.split(".")
        block = None
        for i in range(len(parts) - 1, 0, -1):
            parent = mods.get(".".join(parts[:i - 1])) if i > 1 else model
            if isinstance(parent, nn.ModuleList) and parts[i - 1].isdigit():
                block = mods[".".join(parts[:i])]
                break
        if block is None:
            out.append(None)
        elif isinstance(block, nn.ModuleDict):  # not called: its first submodule sees the stream
            out.append(next(iter(block.children()), None))
        else:
            out.append(block)
    return out


def capture(model: nn.Module, inputs: Any, what: Sequence[str] | str = ("weights", "head_outputs", "residual"),
            layers: int | Sequence[int] | None = None, *, max_bytes: int = DEFAULT_BUDGET, detach: bool = True,
            **forward_kwargs: Any) -> Cache:
    """Run ``model(inputs)`` once and record ``what`` in the attention layers ``layers`` (default all).

    ``what``: any of ``"weights"``, ``"head_outputs"``, ``"residual"``, ``"summaries"``.
    ``max_bytes``: budget for the N x N weights of all selected layers (default 2 GiB); over it
    the call raises :class:`CaptureMemoryError` before any attention work (capture fewer
    ``layers``, or ``what=("summaries",)`` for per-head summaries without keeping the maps).
    ``detach=False`` keeps the autograd graph (for gradients through the captured tensors).
    Extra keyword arguments go to the model's forward.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected an integer number of bytes >= 0, got {max_bytes!r}")
    what = (what,) if isinstance(what, str) else tuple(what)
    bad = [w for w in what if w not in CAPTURABLE]
    if bad:
        raise ValueError(f"what: unknown {bad}; expected some of {CAPTURABLE}")
    _check_length(model, inputs)
    found = attention_layers(model, inputs)
    sel = check_layers(layers, len(found))
    cache = Cache(len(found), sel, [found[i][0] for i in sel], [heads_of(found[i][1]) for i in sel])
    hf = _is_hf(model) and not hasattr(found[0][1], "captured")
    keep_weights = "weights" in what
    checked = {"done": False}

    def before(b: int, n: int, m: int, h: int | None) -> None:
        if checked["done"] or not keep_weights:
            return
        checked["done"] = True
        need = b * (h or 1) * n * m * 4 * len(sel)
        if need > max_bytes:
            raise CaptureMemoryError(
                f"capture: the attention weights of {len(sel)} layer(s) need about {need / 2**20:.0f} MiB "
                f"([{b}, {h}, {n}, {m}] float32 per layer), over max_bytes={max_bytes / 2**20:.0f} MiB. "
                "Capture fewer layers (layers=[...]), raise max_bytes, or use what=('summaries',) for per-head "
                "summaries (entropy, sink, distance) without keeping the N x N maps."
            )

    edits: dict[int, LayerEdit] = {}
    for i in sel:
        h = heads_of(found[i][1])

        def record(kind: str, t: torch.Tensor, i: int = i) -> None:
            t = t.detach() if detach else t
            if kind == "weights":
                if "summaries" in what:
                    cache.data["summaries", i] = head_summaries(t)
                if keep_weights:
                    cache.data["weights", i] = t
            else:
                cache.data[kind, i] = t

        edits[i] = LayerEdit(layer=i, n_heads=h, record=record,
                             record_weights=keep_weights or "summaries" in what, record_z="head_outputs" in what,
                             before=lambda b, n, m, h=h: before(b, n, m, h))
    handles = []
    if "residual" in what and not hf:
        for i, blk in zip(sel, _blocks_for(model, [found[i] for i in sel])):
            if blk is None:
                continue

            def pre(mod, args, kwargs, i=i):
                x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
                if isinstance(x, torch.Tensor):
                    cache.data["residual", i] = x.detach() if detach else x
            handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with installed(model, edits):
            kw = dict(forward_kwargs)
            if hf and "residual" in what:
                kw["output_hidden_states"] = True
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
                out = run_model(model, inputs, kw)
    finally:
        for hd in handles:
            hd.remove()
    if hf and "residual" in what:
        hs = getattr(out, "hidden_states", None)
        if hs is not None:
            for i in sel:
                cache.data["residual", i] = hs[i]
            cache.data["residual", len(found)] = hs[-1]
    cache.output = out
    return cache
