"""attnzoo: every attention mechanism under one API, checked against a float64 reference.

The names below are loaded on first use (PEP 562), so ``import attnzoo`` (and the command
line's ``attnzoo --help`` / ``attnzoo list``) does not import torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Spec", "attention", "create", "explain", "list", "merge_partials", "patterns", "spec", "__version__"]

# public name -> the module that defines it
_LAZY = {"attention": "attnzoo.ops", "explain": "attnzoo.ops", "merge_partials": "attnzoo.ops",
         "Spec": "attnzoo.registry", "create": "attnzoo.registry", "list": "attnzoo.registry",
         "spec": "attnzoo.registry"}
_SUBMODULES = ("bench", "catalog", "cli", "inspect", "layers", "ops", "patterns", "registry")

if TYPE_CHECKING:
    from attnzoo import patterns
    from attnzoo.ops import attention, explain, merge_partials
    from attnzoo.registry import Spec, create, list, spec  # noqa: A004


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"attnzoo.{name}")
    else:
        raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:  # noqa: A001
    return sorted({*globals(), *__all__, *_SUBMODULES})
