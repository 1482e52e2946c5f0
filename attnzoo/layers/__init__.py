"""Token mixers and other layers built on :func:`attnzoo.attention`, one file per catalogue family.

Importing this package registers every entry with :mod:`attnzoo.registry`.
"""

from attnzoo.layers import dense, linear, local, local_graph, local_grid, local_hier, local_pooled, positional
from attnzoo.layers.base import AttentionMixer, MultiHeadAttention
from attnzoo.layers.cache import KVCache
from attnzoo.layers.dense import (
    AttentionAdversarial,
    CascadedGroupAttention,
    ContextBroadcast,
    DeconstructedAttention,
    FlashBlockAttention,
    GatedAttention,
    GINAttention,
    GroupedQueryAttention,
    KeyDrivenGQA,
    MixtureOfHeads,
    ProbabilisticAttention,
    ReversedAttention,
    SingleHeadSelfAttention,
    SoftMixtureOfAttention,
    TensorAttention,
)
from attnzoo.layers.lm import TinyLM
from attnzoo.layers.positional import (
    AttentionBuckets,
    ComplexRotation,
    ContextualPosition,
    RelativeConvMHA,
    RotaryEmbedding,
)

__all__ = [
    "AttentionAdversarial", "AttentionBuckets", "AttentionMixer", "CascadedGroupAttention", "ComplexRotation",
    "ContextBroadcast", "ContextualPosition", "DeconstructedAttention", "FlashBlockAttention", "GINAttention",
    "GatedAttention", "GroupedQueryAttention", "KVCache", "KeyDrivenGQA", "MixtureOfHeads", "MultiHeadAttention",
    "ProbabilisticAttention", "RelativeConvMHA", "ReversedAttention", "RotaryEmbedding", "SingleHeadSelfAttention",
    "SoftMixtureOfAttention", "TensorAttention", "TinyLM", "dense", "linear", "local", "local_graph", "local_grid",
    "local_hier", "local_pooled", "positional",
]

from attnzoo.layers import channel, pooling  # noqa: E402,F401  (registers the pooling and channel entries)
