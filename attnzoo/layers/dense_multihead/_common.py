"""Shared by the dense-multihead entries: the family name, the supported capabilities, small test sizes and helpers."""

from __future__ import annotations

from functools import partial

from attnzoo.layers.testing import random_tokens

FAMILY = "dense-multihead"
MIXER_SUPPORT = {"self", "cross", "causal", "padding", "decoding", "gqa"}
SMALL = {"dim": 32, "n_heads": 4}


rand_x = partial(random_tokens, n=10)  # the family's reduction inputs [2, 10, 32]
