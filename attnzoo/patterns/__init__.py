"""Declarative attention patterns and score modifiers, usable by every backend.

A pattern is a rule ``allow(b, h, q_idx, kv_idx)``; it gives a dense mask (reference), a
FlexAttention ``mask_mod`` and block mask, a block layout for the chunked backend and its
exact density. Compose with ``&``, ``|``, ``~``; vary per head with :class:`PerHead`.
"""

from attnzoo.patterns.base import Pattern, Shape
from attnzoo.patterns.compose import And, Not, Or, PerHead
from attnzoo.patterns.custom import Custom
from attnzoo.patterns.graph import Adjacency
from attnzoo.patterns.grid import Neighborhood
from attnzoo.patterns.grid_bias import GridRelativeBias
from attnzoo.patterns.local import ElasticWindow, HeadSharded, SegmentMask, ShiftedGroups
from attnzoo.patterns.masks import Causal, DilatedWindow, Full, GlobalTokens, PrefixLM, SlidingWindow
from attnzoo.patterns.routed import QueryRouted
from attnzoo.patterns.score_mods import (
    ALiBi,
    Bias,
    Chain,
    CustomScore,
    RelativePositionBias,
    ScoreMod,
    SoftCap,
    alibi_slopes,
    as_score_mod,
)
from attnzoo.patterns.segments import Document, KeyPadding
from attnzoo.patterns.tiles import TilePlan
from attnzoo.patterns.windows import GridPartition, QuerySubset, WindowPartition

__all__ = [
    "ALiBi", "Adjacency", "And", "Bias", "Causal", "Chain", "Custom", "CustomScore", "DilatedWindow", "Document",
    "ElasticWindow", "Full", "GlobalTokens", "GridPartition", "GridRelativeBias", "HeadSharded",
    "KeyPadding", "Neighborhood", "Not", "Or", "Pattern", "PerHead", "PrefixLM", "QueryRouted", "QuerySubset",
    "RelativePositionBias", "ScoreMod", "SegmentMask", "Shape", "ShiftedGroups", "SlidingWindow", "SoftCap",
    "TilePlan", "WindowPartition", "alibi_slopes", "as_score_mod",
]
