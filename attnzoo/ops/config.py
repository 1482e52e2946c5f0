"""Process-wide limits that guard against accidental huge allocations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """``max_weights_bytes``: largest attention-probability tensor ``return_weights`` may build.
    ``max_mask_bytes``: largest dense mask the SDPA backend may materialise for a pattern."""

    max_weights_bytes: int = 2 << 30
    max_mask_bytes: int = 256 << 20


limits = Limits()
