"""attnzoo: every attention mechanism under one API, checked against a float64 reference."""

from attnzoo import patterns
from attnzoo.ops import attention, explain, merge_partials

__version__ = "0.1.0"

__all__ = ["attention", "explain", "merge_partials", "patterns", "__version__"]
