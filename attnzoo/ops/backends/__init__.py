"""Attention backends, in the order ``auto`` considers them."""

from attnzoo.ops.backends.base import Backend, Result
from attnzoo.ops.backends.blocksparse import BlockSparse
from attnzoo.ops.backends.flex import Flex
from attnzoo.ops.backends.gather import Gather
from attnzoo.ops.backends.reference import Reference
from attnzoo.ops.backends.sdpa import SDPA
from attnzoo.ops.backends.triton_local import TritonLocal

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (Reference(), SDPA(), Flex(), BlockSparse(), Gather(), TritonLocal())
}

__all__ = ["BACKENDS", "Backend", "BlockSparse", "Flex", "Gather", "Reference", "Result", "SDPA", "TritonLocal"]
