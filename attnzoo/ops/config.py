"""Process-wide limits that guard against accidental huge allocations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """``max_weights_bytes``: the most memory (peak, in bytes) a call of the ``reference`` backend may use, the
    returned weights included (``return_weights`` and every call ``auto`` sends there).
    ``max_mask_bytes``: largest dense mask the SDPA backend may materialise for a pattern.
    ``max_layout_elements``: the most ``(batch, head, query, key)`` evaluations of a pattern's rule that
    finding its block layout may take when the pattern gives no block bounds (e.g. ``Custom``): beyond it the
    call is refused before the work starts (2**33 takes about a minute of one CPU)."""

    max_weights_bytes: int = 2 << 30
    max_mask_bytes: int = 256 << 20
    max_layout_elements: int = 1 << 33


limits = Limits()
