"""Head-level steering (catalogue section 10) as context managers on attnzoo and Hugging Face models.

    with attnzoo.inspect.steer(model, head_scale={(layer, head): 0.0}):
        y = model(x)          # head `head` of layer `layer` ablated
    # the model is exactly as before here

* ``head_scale``: ``{(layer, head): ξ}`` (ξ a number, or a tensor ``[N]`` for per-token
  scales) or a tensor ``[L, H]`` (which may require grad: :func:`head_importance` differentiates
  it). ``y = Σ_h ξ_h O_h W_O^h``.
* ``attention_reweight``: a dict (or a list of dicts) ``{"keys": ..., "alpha": ..., "layers": ...,
  "heads": ..., "tau": ...}``: ``a'_ij ∝ a_ij (1 + (α_h − 1)[j ∈ K])`` renormalised per row,
  with an optional softmax temperature ``tau`` on the selected layers.
* ``sink_redistribution`` (VAR): a dict ``{"p": ..., "sinks": ..., "visual": ..., "threshold": ...,
  "layers": ..., "heads": ...}``: in heads whose attention share on the visual tokens is at least
  ``threshold``, a fraction ``p`` of the mass on the sink tokens moves to the non-sink visual
  tokens in proportion to their weights.

The pure weight transforms are :func:`reweight` and :func:`redistribute`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, attention_layers, check_head, check_layers, heads_of, installed
from attnzoo.registry import Reduction, register

__all__ = ["Steered", "head_scale_edit", "redistribute", "reweight", "steer", "key_mask"]


def key_mask(keys: Any, m: int, device: Any = None) -> torch.Tensor:
    """A bool mask ``[M]`` (or ``[B, M]``) from indices, a slice, or a bool mask."""
    if isinstance(keys, slice):
        out = torch.zeros(m, dtype=torch.bool, device=device)
        out[keys] = True
        return out
    t = torch.as_tensor(keys, device=device)
    if t.dtype == torch.bool:
        if t.shape[-1] != m:
            raise ValueError(f"keys: a bool mask needs {m} entries (one per key), got shape {list(t.shape)}")
        return t
    out = torch.zeros(m, dtype=torch.bool, device=device)
    if t.numel():
        if int(t.max()) >= m or int(t.min()) < -m:
            raise IndexError(f"keys: index out of range for {m} keys (valid 0..{m - 1})")
        out[t.long()] = True
    return out


def _head_vec(value: Any, h: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(h) if t.dim() == 0 else t


def reweight(w: torch.Tensor, keys: Any, alpha: Any = 1.0, heads: Sequence[int] | None = None) -> torch.Tensor:
    """``a'_ij ∝ a_ij (1 + (α_h − 1)[j ∈ K])``, renormalised per row; ``w`` ``[B, H, N, M]``.

    ``alpha``: a number or ``[H]`` per head; ``heads`` restricts the edit (others unchanged).
    Rows with no mass stay zero. Equivalent to adding ``log α_h`` to the logits of ``K``.
    """
    b, h, n, m = w.shape
    k = key_mask(keys, m, w.device).to(w.dtype)
    k = k.view(1, 1, 1, m) if k.dim() == 1 else k.view(b, 1, 1, m)
    a = _head_vec(alpha, h, w).view(1, h, 1, 1)
    if heads is not None:
        sel = torch.zeros(h, dtype=torch.bool, device=w.device)
        sel[list(heads)] = True
        a = torch.where(sel.view(1, h, 1, 1), a, torch.ones_like(a))
    out = w * (1 + (a - 1) * k)
    s = out.sum(-1, keepdim=True)
    return torch.where(s > 0, out / s.clamp_min(torch.finfo(w.dtype).tiny), out)


def redistribute(w: torch.Tensor, sinks: Any, p: float, visual: Any = None, threshold: float = 0.0,
                 heads: Sequence[int] | None = None) -> torch.Tensor:
    """VAR: move a fraction ``p`` of each row's mass on ``sinks`` to the non-sink ``visual`` keys.

    Applies to heads (``heads``, default all) whose mean attention share on the visual tokens
    (sinks included) is at least ``threshold``. ``visual`` defaults to every key. The mass is
    given in proportion to the non-sink visual weights; rows with no such weight are unchanged.
    Row sums, the mass on non-visual (text) keys and the ratios among non-sink visual keys are kept.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p: expected a fraction in [0, 1], got {p}")
    b, h, n, m = w.shape
    s = key_mask(sinks, m, w.device)
    v = torch.ones(m, dtype=torch.bool, device=w.device) if visual is None else key_mask(visual, m, w.device)
    v = v | s  # the sinks are visual tokens, listed in visual or not
    recv = v & ~s
    sink_mass = (w * s.to(w.dtype)).sum(-1, keepdim=True)
    recv_w = w * recv.to(w.dtype)
    recv_mass = recv_w.sum(-1, keepdim=True)
    share = (w * v.to(w.dtype)).sum(-1).mean(-1)  # [B, H]
    use = share >= threshold
    if heads is not None:
        sel = torch.zeros(h, dtype=torch.bool, device=w.device)
        sel[list(heads)] = True
        use = use & sel.view(1, h)
    use = use.view(b, h, 1, 1) & (recv_mass > 0)
    moved = p * sink_mass
    new = w * torch.where(s, 1 - p, 1.0).to(w.dtype) + moved * recv_w / recv_mass.clamp_min(torch.finfo(w.dtype).tiny)
    return torch.where(use, new, w)


def head_scale_edit(scales: dict[int, torch.Tensor]) -> Any:
    """A z edit multiplying head ``h`` by ``scales[h]`` (a scalar or a per-token tensor ``[N]``)."""
    def fn(z: torch.Tensor) -> torch.Tensor:
        h = z.shape[1]
        rows = []
        for i in range(h):
            s = scales.get(i)
            if s is None:
                rows.append(torch.ones(1, 1, 1, 1, dtype=z.dtype, device=z.device).expand(1, 1, z.shape[2], 1))
            else:
                s = torch.as_tensor(s, dtype=z.dtype, device=z.device)
                rows.append(s.reshape(1, 1, -1, 1).expand(1, 1, z.shape[2], 1) if s.dim() else
                            s.reshape(1, 1, 1, 1).expand(1, 1, z.shape[2], 1))
        return z * torch.cat(rows, dim=1)
    return fn


def _as_list(spec: Any) -> list[dict[str, Any]]:
    if spec is None:
        return []
    items = [spec] if isinstance(spec, dict) else list(spec)
    for it in items:
        if not isinstance(it, dict):
            raise TypeError(f"expected a dict of options (or a list of them), got {type(it).__name__}")
    return items


@contextlib.contextmanager
def steer(model: nn.Module, *, head_scale: Any = None, attention_reweight: Any = None,
          sink_redistribution: Any = None) -> Iterator[nn.Module]:
    """Apply head-level edits to ``model`` inside the ``with`` block (see the module docstring)."""
    layers = attention_layers(model)
    n = len(layers)
    heads = [heads_of(m) for _, m in layers]
    edits: dict[int, LayerEdit] = {}

    def edit(i: int) -> LayerEdit:
        if i not in edits:
            edits[i] = LayerEdit(layer=i, n_heads=heads[i])
        return edits[i]

    if isinstance(head_scale, torch.Tensor):
        if head_scale.dim() != 2 or head_scale.shape[0] != n:
            raise ValueError(f"head_scale: a tensor must be [n_layers={n}, n_heads], got {list(head_scale.shape)}")
        for i in range(n):
            if heads[i] is not None and head_scale.shape[1] != heads[i]:
                raise ValueError(f"head_scale: layer {i} has {heads[i]} heads, got {head_scale.shape[1]} columns")
            edit(i).z_edits.append(lambda z, xi=head_scale[i]: z * xi.to(z.dtype).view(1, -1, 1, 1))
    elif head_scale is not None:
        per: dict[int, dict[int, Any]] = {}
        for key, val in dict(head_scale).items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"head_scale: keys are (layer, head) pairs, got {key!r}")
            (layer,) = check_layers(key[0], n)
            per.setdefault(layer, {})[check_head(layer, key[1], heads[layer])] = val
        for layer, sc in per.items():
            edit(layer).z_edits.append(head_scale_edit(sc))
    for spec in _as_list(attention_reweight):
        unknown = set(spec) - {"keys", "alpha", "layers", "heads", "tau"}
        if unknown:
            raise ValueError(f"attention_reweight: unknown option(s) {sorted(unknown)}; "
                             "expected keys, alpha, layers, heads, tau")
        for i in check_layers(spec.get("layers"), n):
            hs = None if spec.get("heads") is None else [check_head(i, x, heads[i]) for x in spec["heads"]]
            if "keys" in spec:
                edit(i).weight_edits.append(lambda w, s=spec, hs=hs: reweight(w, s["keys"], s.get("alpha", 1.0), hs))
            if spec.get("tau") is not None:
                if float(spec["tau"]) <= 0:
                    raise ValueError(f"attention_reweight: tau must be > 0, got {spec['tau']}")
                edit(i).temperature = float(spec["tau"])
    for spec in _as_list(sink_redistribution):
        unknown = set(spec) - {"p", "sinks", "visual", "threshold", "layers", "heads"}
        if unknown:
            raise ValueError(f"sink_redistribution: unknown option(s) {sorted(unknown)}; "
                             "expected p, sinks, visual, threshold, layers, heads")
        for i in check_layers(spec.get("layers"), n):
            hs = None if spec.get("heads") is None else [check_head(i, x, heads[i]) for x in spec["heads"]]
            edit(i).weight_edits.append(
                lambda w, s=spec, hs=hs: redistribute(w, s.get("sinks", [0]), float(s.get("p", 0.0)),
                                                      s.get("visual"), float(s.get("threshold", 0.0)), hs))
    with installed(model, edits):
        yield model


class Steered(nn.Module):
    """A host model with steering edits: calling it runs the host inside :func:`steer`.

    Also a context manager applying the same edits to the host itself:
    ``with attnzoo.create("head_scale", model, scales={(0, 1): 0.0}): model(x)``.
    """

    def __init__(self, host: nn.Module, **edits: Any) -> None:
        super().__init__()
        self.host = host
        self.edits = edits
        attention_layers(host)  # fail early on a host without capturable attention
        self._active: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with steer(self.host, **self.edits):
            return self.host(*args, **kwargs)

    def __enter__(self) -> nn.Module:
        self._active = steer(self.host, **self.edits)
        return self._active.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        active, self._active = self._active, None
        return active.__exit__(*exc)


_COMMON = dict(family="steering", type="steering", supports={"self", "causal", "padding"},
               backends=("reference",), complexity="O(N^2) (weights edits materialise the map)")


def _neutral_head_scale() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(0)
    host = TinyLM(16, 16, 2, 2).double()
    t = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    return Steered(host, head_scale={(li, h): 1.0 for li in range(2) for h in range(2)})(t), host(t)


def _neutral_reweight() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(0)
    host = TinyLM(16, 16, 2, 2, backend="reference").double()
    t = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    return Steered(host, attention_reweight={"keys": [0, 3], "alpha": 1.0, "tau": 1.0})(t), host(t)


def _neutral_sinks() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(0)
    host = TinyLM(16, 16, 2, 2, backend="reference").double()
    t = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    return Steered(host, sink_redistribution={"sinks": [0], "p": 0.0})(t), host(t)


@register("head_scale", priority=1, papers=("Are Sixteen Heads", "VHD/VHR", "Head Pursuit",
                                            "Circuit component reuse (IOI)"),
          reference="y = Σ_h ξ_h O_h W_O^h via a wrapper of the mixer's output (or the HF attention function)",
          summary="Per-(layer, head) output multipliers ξ: mask, ablate, amplify heads (context manager).",
          test_kwargs={"scales": {(0, 1): 0.0, (1, 0): 2.0}},
          reductions=(Reduction("xi_one", "ξ ≡ 1 leaves the host's outputs identical", _neutral_head_scale),),
          **_COMMON)
def head_scale(host: nn.Module, scales: Any) -> Steered:
    """``host`` with head multipliers ``{(layer, head): ξ}`` (or a ``[L, H]`` tensor); see :func:`steer`."""
    return Steered(host, head_scale=scales)


@register("attention_reweight", priority=2,
          papers=("Imbalanced-attention fix (LVLM)", "GIFT (gaze-shift guidance)", "Conscious Gaze",
                  "Attention modulation for T2I alignment"),
          reference="a'_ij ∝ a_ij (1 + (α_h − 1)[j ∈ K]) renormalised, on the reference weights; temperature τ",
          summary="Multiply attention to a key set per head and renormalise; softmax temperature.",
          test_kwargs={"keys": [0, 1], "alpha": 3.0, "tau": 0.8},
          reductions=(Reduction("neutral", "α ≡ 1 and τ = 1 give the base model", _neutral_reweight),),
          **_COMMON)
def attention_reweight(host: nn.Module, keys: Any = None, alpha: Any = 1.0, *, layers: Any = None,
                       heads: Any = None, tau: float | None = None) -> Steered:
    """``host`` with attention to ``keys`` multiplied by ``alpha`` (renormalised) and temperature ``tau``."""
    spec: dict[str, Any] = {"layers": layers, "heads": heads, "tau": tau, "alpha": alpha}
    if keys is not None:
        spec["keys"] = keys
    return Steered(host, attention_reweight=spec)


@register("sink_redistribution", priority=3, papers=("VAR (visual attention sink)",),
          reference="VAR redistribution of sink mass to the non-sink visual tokens on the reference weights",
          summary="VAR: move a fraction p of the sink mass to non-sink visual tokens in image-centric heads.",
          test_kwargs={"sinks": [0], "p": 0.6, "threshold": 0.0},
          reductions=(Reduction("p_zero", "p = 0 reproduces the original", _neutral_sinks),),
          **_COMMON)
def sink_redistribution(host: nn.Module, sinks: Any = (0,), p: float = 0.6, *, visual: Any = None,
                        threshold: float = 0.5, layers: Any = None, heads: Any = None) -> Steered:
    """``host`` with VAR sink redistribution (see :func:`redistribute`)."""
    return Steered(host, sink_redistribution={"sinks": sinks, "p": p, "visual": visual, "threshold": threshold,
                                              "layers": layers, "heads": heads})
