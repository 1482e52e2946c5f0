"""attnzoo: every attention mechanism under one API, checked against a float64 reference."""

from attnzoo import patterns
from attnzoo.ops import attention, explain, merge_partials
from attnzoo.registry import Spec, create, list, spec  # noqa: A004  (``list`` shadows the builtin here only)

__version__ = "0.1.0"

__all__ = ["Spec", "attention", "create", "explain", "list", "merge_partials", "patterns", "spec", "__version__"]
