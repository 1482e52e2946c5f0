"""Stateless attention operators with a float64 reference and fast backends."""

from attnzoo.ops.dispatch import attention, explain
from attnzoo.ops.lse import merge_partials

__all__ = ["attention", "explain", "merge_partials"]
