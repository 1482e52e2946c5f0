"""Shared by the steering entries: the wrapper base, target checks, recording passes and small hosts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import LayerEdit, attention_layers, check_head, check_layers, heads_of, installed

COMMON = dict(family="steering", type="steering", backends=("reference",),
              complexity="O(N^2) (weight edits materialise the map)")


class SteeringTargetError(ValueError, IndexError):
    """A steering target (layer, head) that the host does not have."""


def layer_heads(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[int | None]]:
    layers = attention_layers(model)
    return layers, [heads_of(m) for _, m in layers]


def check_targets(model: nn.Module, layers: Any = None, heads: Any = None, *, what: str = "layers"
                  ) -> dict[int, list[int] | None]:
    """``{layer: heads or None (all)}`` for a layer filter and a head list, checked against ``model``.

    Raises :class:`SteeringTargetError` (a ``ValueError``) naming the layer or head that does not exist.
    """
    found, n_heads = layer_heads(model)
    try:
        idx = check_layers(layers, len(found))
    except IndexError as e:
        raise SteeringTargetError(f"{what}: {e}") from None
    out: dict[int, list[int] | None] = {}
    for i in idx:
        if heads is None:
            out[i] = None
            continue
        items = [heads] if isinstance(heads, int) else list(heads)
        try:
            out[i] = sorted({check_head(i, h, n_heads[i]) for h in items})
        except IndexError as e:
            raise SteeringTargetError(f"heads: {e}") from None
    return out


def check_pairs(model: nn.Module, pairs: Any) -> dict[int, list[int]]:
    """``{layer: [heads]}`` from ``(layer, head)`` pairs, each checked against ``model``."""
    out: dict[int, list[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise SteeringTargetError(f"heads: expected (layer, head) pairs, got {pair!r}")
        for layer, hs in check_targets(model, pair[0], [pair[1]]).items():
            out.setdefault(layer, []).extend(hs or [])
    return out


def head_select(h: int, heads: list[int] | None, like: torch.Tensor) -> torch.Tensor:
    """``[1, H, 1, 1]`` bool: the selected heads (all when ``heads`` is None)."""
    sel = torch.zeros(h, dtype=torch.bool, device=like.device)
    sel[heads if heads is not None else slice(None)] = True
    return sel.view(1, h, 1, 1)


@contextlib.contextmanager
def recorded(model: nn.Module, layers: list[int], what: str = "weights") -> Iterator[dict[int, torch.Tensor]]:
    """Record ``what`` (``"weights"`` or ``"head_outputs"``) of ``layers`` during the block: ``{layer: tensor}``."""
    out: dict[int, torch.Tensor] = {}
    edits = {}
    for i in layers:
        def rec(name: str, t: torch.Tensor, i: int = i) -> None:
            if name == what:
                out[i] = t
        edits[i] = LayerEdit(layer=i, record=rec, record_weights=what == "weights", record_z=what == "head_outputs")
    with installed(model, edits):
        yield out


class SteeringWrapper(nn.Module):
    """A host model with an edit: ``forward(*args, **kwargs)`` runs the host with it (see :meth:`run`).

    Single-pass entries implement :meth:`edits` (a ``{layer: LayerEdit}`` for one pass) and are also
    context managers applying them to the host. Multi-pass entries override :meth:`run`.
    """

    single_pass = True

    def __init__(self, host: nn.Module) -> None:
        super().__init__()
        self.host = host
        attention_layers(host)  # fail early on a host without capturable attention
        self._active: Any = None

    def edits(self) -> dict[int, LayerEdit]:
        raise NotImplementedError

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        with installed(self.host, self.edits()):
            yield self.host

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with self.applied():
            return self.host(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(*args, **kwargs)

    def __enter__(self) -> nn.Module:
        if not self.single_pass:
            raise TypeError(f"{type(self).__name__} runs several passes of the host: call it like the host instead "
                            "of using it as a context manager")
        self._active = self.applied()
        return self._active.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        active, self._active = self._active, None
        return active.__exit__(*exc)


def tiny_lm(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 :class:`~attnzoo.layers.lm.TinyLM` on the reference backend and tokens ``[2, 9]``."""
    from attnzoo.layers.lm import TinyLM

    torch.manual_seed(seed)
    host = TinyLM(16, 16, 2, 2, backend="reference").double()
    return host, torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(seed + 1))


def tiny_dit(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A float64 :class:`~attnzoo.bench.models.TinyDiT` (4 x 4 latents) and its inputs ``(latents, t, text)``."""
    from attnzoo.bench.models import TinyDiT

    torch.manual_seed(seed)
    host = TinyDiT(backend="reference").double()
    g = torch.Generator().manual_seed(seed + 1)
    return host, (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.tensor([500.0, 500.0]),
                  torch.randint(0, 32, (2, 5), generator=g))


def weight_edit(fn: Callable[[torch.Tensor], torch.Tensor], layer: int, n_heads: int | None) -> LayerEdit:
    return LayerEdit(layer=layer, n_heads=n_heads, weight_edits=[fn])
