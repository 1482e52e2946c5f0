"""Token mixers and other layers built on :func:`attnzoo.attention`, one file per catalogue family.

Importing this package registers every entry with :mod:`attnzoo.registry`.
"""

from attnzoo.layers import dense, linear, local, local_graph, local_grid, local_hier, local_pooled, positional
from attnzoo.layers.base import AttentionMixer, MultiHeadAttention
from attnzoo.layers.cache import KVCache
from attnzoo.layers.dense import (
    CascadedGroupAttention,
    ContextBroadcast,
    GatedAttention,
    GINAttention,
    GroupedQueryAttention,
    MixtureOfHeads,
    ProbabilisticAttention,
    ReversedAttention,
    SingleHeadSelfAttention,
    TensorAttention,
)
from attnzoo.layers.positional import ComplexRotation, RotaryEmbedding

__all__ = [
    "AttentionMixer", "CascadedGroupAttention", "ComplexRotation", "ContextBroadcast", "GINAttention",
    "GatedAttention", "GroupedQueryAttention", "KVCache", "MixtureOfHeads", "MultiHeadAttention",
    "ProbabilisticAttention", "ReversedAttention", "RotaryEmbedding", "SingleHeadSelfAttention", "TensorAttention",
    "dense", "linear", "local", "local_graph", "local_grid", "local_hier", "local_pooled", "positional",
]
