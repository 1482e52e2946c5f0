"""The registry: every attnzoo entry by its catalogue slug, with a :class:`Spec` describing it.

``create(slug, **kwargs)`` builds the module, ``list(family=..., type=..., priority=...)``
lists specs, ``spec(slug)`` returns one. Entries register themselves with :func:`register`
(``register(slug, ...)(TheClass)``, the last statement of ``attnzoo/layers/<family>/<slug>.py``)
when :mod:`attnzoo.layers` imports every module under it.
"""

from __future__ import annotations

import builtins
import difflib
import inspect
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Reduction", "Spec", "create", "list", "register", "spec", "SUPPORTS", "INPUT_KINDS", "TYPES"]

# "training": the entry is a training-time technique whose module provides
# ``training_loss(loss_fn) -> Tensor`` (the objective to backpropagate with the entry active).
SUPPORTS = ("self", "cross", "causal", "padding", "varlen", "decoding", "gqa", "training")
INPUT_KINDS = ("sequence", "grid1d", "grid2d", "grid3d", "set", "feature_map")
TYPES = ("mixer", "pattern", "score_mod", "pooler", "channel", "memory", "metric", "steering", "task")


@dataclass(frozen=True)
class Reduction:
    """An exact-reduction property from the catalogue's "Tests" lines.

    ``check()`` builds its own float64 modules and inputs and returns ``(got, expected)``;
    the conformance suite asserts they agree to float64 precision.
    """

    name: str
    description: str
    check: Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class Spec:
    """What an entry is, what it supports and how it is checked.

    ``reference`` says in words how the float64 oracle is computed; ``reference_kwargs``
    are the constructor arguments that turn the default module into that oracle (the same
    weights are loaded into both). ``test_kwargs`` is a small configuration the
    conformance suite builds (``dim`` 32). For ``score_mod`` entries ``host`` maps the
    built module to :class:`attnzoo.layers.MultiHeadAttention` keyword arguments, so
    the suite checks the entry inside a host mixer. ``steering`` entries are built as
    ``factory(model, **test_kwargs)`` around a small host model and checked as a wrapper of it.

    ``factory`` is usually the entry's class: its accepted arguments are those of its
    ``__init__`` and, through ``**kwargs``, of its base classes, less the class's
    ``refused_arguments`` (base-class arguments it sets itself or cannot honour). ``module``
    is the module that registered the entry.
    """

    slug: str
    family: str
    type: str
    factory: Callable[..., nn.Module]
    papers: tuple[str, ...] = ()
    priority: int = 3
    input_kind: str = "sequence"
    supports: frozenset[str] = frozenset({"self"})
    complexity: str = "O(N^2)"
    backends: tuple[str, ...] = ("reference", "sdpa", "flex", "blocksparse")
    reference: str = "the same module with backend='reference' in float64"
    reference_kwargs: dict[str, Any] = field(default_factory=lambda: {"backend": "reference"})
    reductions: tuple[Reduction, ...] = ()
    test_kwargs: dict[str, Any] = field(default_factory=dict)
    host: Callable[[nn.Module], dict[str, Any]] | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""
    module: str = ""

    def accepted_arguments(self) -> builtins.list[str] | None:
        """Keyword arguments the factory accepts (None when it takes ``**kwargs`` it does not name)."""
        if inspect.isclass(self.factory):
            return class_arguments(self.factory)
        sig = inspect.signature(self.factory)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        return [n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (no callables)."""
        return {
            "slug": self.slug, "family": self.family, "type": self.type, "papers": builtins.list(self.papers),
            "priority": self.priority, "input_kind": self.input_kind, "supports": sorted(self.supports),
            "complexity": self.complexity, "backends": builtins.list(self.backends), "reference": self.reference,
            "reductions": [{"name": r.name, "description": r.description} for r in self.reductions],
            "aliases": builtins.list(self.aliases), "arguments": self.accepted_arguments(), "summary": self.summary,
            "class": f"{self.factory.__module__}.{self.factory.__qualname__}" if inspect.isclass(self.factory) else "",
        }


def class_arguments(cls: type) -> builtins.list[str]:
    """The arguments ``cls(...)`` accepts: its ``__init__``'s, then (while an ``__init__`` passes
    ``**kwargs`` on) its base classes', less ``cls.refused_arguments``."""
    from torch import nn  # not at import time: the CLI lists the registry without importing torch

    names: builtins.list[str] = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for name, p in builtins.list(inspect.signature(init).parameters.items())[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                passes_on = True
            elif p.kind is not inspect.Parameter.VAR_POSITIONAL and name not in names:
                names.append(name)
        if not passes_on:
            break
    refused = set(getattr(cls, "refused_arguments", ()))
    return [n for n in names if n not in refused]


_REGISTRY: dict[str, Spec] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register(
    slug: str,
    *,
    family: str,
    type: str,
    aliases: dict[str, dict[str, Any]] | None = None,
    **fields: Any,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``slug``: ``register(slug, ...)(TheClass)`` (or as a decorator of a class or factory).

    ``fields`` are :class:`Spec` fields.

    ``aliases`` maps an alias slug to preset keyword arguments (``{"mqa": {"n_kv_heads": 1}}``).
    """
    if type not in TYPES:
        raise ValueError(f"type: expected one of {TYPES}, got {type!r}")
    bad = set(fields.get("supports", ())) - set(SUPPORTS)
    if bad:
        raise ValueError(f"supports: unknown capabilities {sorted(bad)}; expected a subset of {SUPPORTS}")
    if fields.get("input_kind", "sequence") not in INPUT_KINDS:
        raise ValueError(f"input_kind: expected one of {INPUT_KINDS}, got {fields['input_kind']!r}")

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if slug in _REGISTRY or slug in _ALIASES:
            raise ValueError(f"slug {slug!r} is already registered")
        extra = dict(fields)
        extra["supports"] = frozenset(extra.get("supports", {"self"}))
        extra["papers"] = tuple(extra.get("papers", ()))
        extra["reductions"] = tuple(extra.get("reductions", ()))
        extra.setdefault("module", sys._getframe(1).f_globals.get("__name__", ""))
        s = Spec(slug=slug, family=family, type=type, factory=factory, aliases=tuple(aliases or {}), **extra)
        _REGISTRY[slug] = s
        for alias, preset in (aliases or {}).items():
            _ALIASES[alias] = (slug, dict(preset))
        return factory

    return deco


def _load() -> None:
    import attnzoo.bench.tasks  # noqa: F401  (registers the benchmark tasks)
    import attnzoo.inspect  # noqa: F401  (registers the analysis metrics and steering entries)
    import attnzoo.layers  # noqa: F401  (registers the built-in entries)


def _resolve(slug: str) -> tuple[Spec, dict[str, Any]]:
    _load()
    if not isinstance(slug, str):
        raise TypeError(f"slug: expected a string, got {type(slug).__name__}")
    if slug in _REGISTRY:
        return _REGISTRY[slug], {}
    if slug in _ALIASES:
        target, preset = _ALIASES[slug]
        return _REGISTRY[target], preset
    raise unknown_slug_error(slug, _REGISTRY, _ALIASES)


def unknown_slug_error(slug: str, entries: Iterable[str], alias_names: Iterable[str]) -> KeyError:
    """The error for a slug that is not registered: a catalogued entry that is not implemented yet
    says so; otherwise the closest names and the number of entries (as ``attnzoo list`` counts them)."""
    from attnzoo.catalog import load_rows  # catalog imports this module

    row = next((r for r in load_rows() if r["slug"] == slug), None)
    if row is not None:
        return KeyError(f"{slug!r} is in the catalogue (family {row['family']}, type {row['type']}, priority "
                        f"{row['priority']}) but not implemented yet; `attnzoo list --status` and "
                        "docs/CATALOG_STATUS.md show what is")
    entries, alias_names = sorted(entries), sorted(alias_names)
    close = difflib.get_close_matches(slug, [*entries, *alias_names], n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    also = f" and {len(alias_names)} aliases" if alias_names else ""
    return KeyError(f"unknown attnzoo slug {slug!r}{hint} (`attnzoo list` and attnzoo.list() show all "
                    f"{len(entries)} entries{also})")


def spec(slug: str) -> Spec:
    """The :class:`Spec` of ``slug`` (or of the entry an alias points to)."""
    return _resolve(slug)[0]


def create(slug: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build entry ``slug`` (e.g. ``create("mha", dim=64, n_heads=4)``)."""
    s, preset = _resolve(slug)
    accepted = s.accepted_arguments()
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"{slug}: unknown argument(s) {unknown}; accepted arguments: {', '.join(accepted)}"
            )
    clash = sorted(set(kwargs) & set(preset))
    if clash:
        raise TypeError(f"{slug}: argument(s) {clash} are fixed by the alias {slug!r} ({preset})")
    built = s.factory(*args, **preset, **kwargs)
    import torch  # imported by the factory already; the registry itself does not import torch

    if s.type in _MODULE_TYPES and isinstance(built, torch.nn.Module):
        built.register_forward_pre_hook(_check_module_input, with_kwargs=True)
    return built


# Entry types whose built module takes its input tensor first: checked before every forward.
_MODULE_TYPES = ("mixer", "pattern", "memory", "pooler", "channel")


def _check_module_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The input contract of every module entry: ``x`` a non-empty floating tensor of the module's dtype
    (a clear error naming ``x`` instead of an error from deep inside the module)."""
    from attnzoo.layers.base import check_input_tensor

    check_input_tensor(args[0] if args else kwargs.get("x"), module=module, decoding=kwargs.get("cache") is not None)


def list(family: str | None = None, type: str | None = None, priority: int | None = None) -> builtins.list[Spec]:  # noqa: A001
    """Registered specs, sorted by slug, optionally filtered by family, type and priority."""
    _load()
    for name, value in (("family", family), ("type", type)):
        known = sorted({getattr(s, name) for s in _REGISTRY.values()})
        if value is not None and value not in known:
            raise ValueError(f"{name}: expected one of {known}, got {value!r}")
    out = [s for s in _REGISTRY.values()
           if (family is None or s.family == family) and (type is None or s.type == type)
           and (priority is None or s.priority == int(priority))]
    return sorted(out, key=lambda s: s.slug)


def aliases() -> dict[str, str]:
    """Alias slug -> the slug it points to."""
    _load()
    return {a: t for a, (t, _) in _ALIASES.items()}
