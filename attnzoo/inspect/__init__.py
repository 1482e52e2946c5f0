"""Look inside attention: capture, analysis metrics (catalogue section 11), head-level steering
(section 10) and an HTML viewer, for attnzoo models and Hugging Face ``transformers`` models.

Importing this package registers the metrics (type ``metric``) and steering entries (type
``steering``) with :mod:`attnzoo.registry`.
"""

from attnzoo.inspect import (
    metrics,
    steering,  # noqa: F401  (registers the multi-pass steering entries)
)
from attnzoo.inspect.capture import Cache, CaptureMemoryError, capture
from attnzoo.inspect.steer import steer

__all__ = ["Cache", "CaptureMemoryError", "capture", "metrics", "steer"]
