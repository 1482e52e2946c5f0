"""Token mixers and other layers built on :func:`attnzoo.attention`.

One catalogue entry per module: ``attnzoo/layers/<family>/<slug>.py`` (the family with ``-``
as ``_``) holds the entry's class, its reductions and, last, its registration. Modules
directly under ``attnzoo/layers`` and ``<family>/_*.py`` hold shared code and register
nothing. Importing this package imports every module under it (:func:`discover`), so an
entry registers with :mod:`attnzoo.registry` by existing; nothing has to import it by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from attnzoo.layers.base import AttentionMixer, MultiHeadAttention
from attnzoo.layers.cache import KVCache
from attnzoo.layers.dense_multihead.attention_adversarial import AttentionAdversarial
from attnzoo.layers.dense_multihead.cascaded_group_attention import CascadedGroupAttention
from attnzoo.layers.dense_multihead.context_broadcast import ContextBroadcast
from attnzoo.layers.dense_multihead.deconstructed_attention import DeconstructedAttention
from attnzoo.layers.dense_multihead.flashblock import FlashBlockAttention
from attnzoo.layers.dense_multihead.gated_attention import GatedAttention
from attnzoo.layers.dense_multihead.gin_attention import GINAttention
from attnzoo.layers.dense_multihead.gqa import GroupedQueryAttention
from attnzoo.layers.dense_multihead.kdgqa import KeyDrivenGQA
from attnzoo.layers.dense_multihead.moh import MixtureOfHeads
from attnzoo.layers.dense_multihead.probabilistic_attention import ProbabilisticAttention
from attnzoo.layers.dense_multihead.reversed_attention import ReversedAttention
from attnzoo.layers.dense_multihead.shsa import SingleHeadSelfAttention
from attnzoo.layers.dense_multihead.soft_moa import SoftMixtureOfAttention
from attnzoo.layers.dense_multihead.tensor_attention import TensorAttention
from attnzoo.layers.lm import TinyLM
from attnzoo.layers.positional.complex_attention import ComplexRotation
from attnzoo.layers.positional.cope import ContextualPosition
from attnzoo.layers.positional.rcmha import RelativeConvMHA
from attnzoo.layers.positional.rope_buckets import AttentionBuckets
from attnzoo.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionAdversarial", "AttentionBuckets", "AttentionMixer", "CascadedGroupAttention", "ComplexRotation",
    "ContextBroadcast", "ContextualPosition", "DeconstructedAttention", "FlashBlockAttention", "GINAttention",
    "GatedAttention", "GroupedQueryAttention", "KVCache", "KeyDrivenGQA", "MixtureOfHeads", "MultiHeadAttention",
    "ProbabilisticAttention", "RelativeConvMHA", "ReversedAttention", "RotaryEmbedding", "SingleHeadSelfAttention",
    "SoftMixtureOfAttention", "TensorAttention", "TinyLM", "discover",
]


def discover() -> list[ModuleType]:
    """Import every module under :mod:`attnzoo.layers` (each entry registers on import); return them."""
    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}.")]


discover()
