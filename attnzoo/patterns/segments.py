"""Patterns given by per-token data: packed documents and key padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnzoo.patterns.base import Pattern, Shape


class _Stored(Pattern):
    """A pattern holding a tensor, kept once per device."""

    def _data(self, device: torch.device) -> torch.Tensor:
        key = ("data", str(device))
        t = self._cache_get(key)
        if t is None:
            t = self._cache_put(key, self._tensor.to(device))
        return t


class Document(_Stored):
    """Block-diagonal attention over packed documents: query and key must share a document id.

    Give ``lengths`` (one packing for the whole batch) or use :meth:`from_ids` with ids
    ``[N]`` or ``[B, N]``; ids must be non-decreasing along the sequence. Self-attention
    only (``n_q == n_kv``); combine with ``Causal()`` for causal packing.
    """

    def __init__(self, lengths: Sequence[int] | torch.Tensor) -> None:
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() == 0 or lengths.dtype.is_floating_point or (lengths < 0).any():
            raise ValueError(f"lengths: expected a non-empty 1-D list of non-negative ints, got {lengths.tolist()}")
        self._tensor = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        self.lengths = tuple(lengths.tolist())

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> Document:
        """Document pattern from ids ``[N]`` (shared) or ``[B, N]`` (per batch element)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.dtype.is_floating_point:
            raise ValueError(f"ids: expected an integer tensor [N] or [B, N], got {getattr(ids, 'shape', ids)}")
        if ids.shape[-1] > 1 and (ids[..., 1:] < ids[..., :-1]).any():
            raise ValueError("ids: document ids must be non-decreasing along the sequence")
        self = cls.__new__(cls)
        self._tensor = ids.long()
        self.lengths = None
        self.per_batch = ids.dim() == 2
        return self

    def check(self, shape: Shape) -> None:
        n = self._tensor.shape[-1]
        if shape.n_q != n or shape.n_kv != n:
            raise ValueError(
                f"Document: ids cover {n} tokens but the problem has n_q={shape.n_q}, n_kv={shape.n_kv}"
            )
        if self.per_batch and self._tensor.shape[0] != shape.batch:
            raise ValueError(f"Document: ids have batch {self._tensor.shape[0]}, expected {shape.batch}")

    def _ids(self, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ids = self._data(pos.device)
        return ids[b, pos] if self.per_batch else ids[pos]

    def allow(self, b, h, q, kv, shape):
        return self._ids(b, q) == self._ids(b, kv)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        b = torch.arange(shape.batch if self.per_batch else 1, device=q_lo.device).view(-1, 1, 1, 1)
        qa, qb = self._ids(b, q_lo), self._ids(b, q_hi)
        ka, kb = self._ids(b, k_lo), self._ids(b, k_hi)
        return (qa <= kb) & (ka <= qb), (qa == qb) & (ka == kb) & (qa == ka)


class KeyPadding(_Stored):
    """Keys where ``mask[b, kv]`` is True are visible (``mask``: bool ``[B, n_kv]``, True = keep)."""

    per_batch = True

    def __init__(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor [B, n_kv], got {got}")
        self._tensor = mask

    @property
    def mask(self) -> torch.Tensor:
        return self._tensor

    def key_padding(self) -> tuple[Pattern | None, torch.Tensor]:
        return None, self._tensor

    def check(self, shape: Shape) -> None:
        if tuple(self._tensor.shape) != (shape.batch, shape.n_kv):
            raise ValueError(f"mask: expected shape [{shape.batch}, {shape.n_kv}], got {list(self._tensor.shape)}")

    def allow(self, b, h, q, kv, shape):
        return self._data(kv.device)[b, kv] & (q >= 0)

    def bounds(self, q_lo, q_hi, k_lo, k_hi, shape):
        m = self._data(q_lo.device)
        n_kv, block = m.shape[1], int(k_hi[0, 0] - k_lo[0, 0] + 1)
        pad = (-n_kv) % block
        blocks = torch.nn.functional.pad(m, (0, pad), value=True).view(m.shape[0], -1, block)
        valid = torch.nn.functional.pad(torch.ones_like(m), (0, pad), value=False).view(m.shape[0], -1, block)
        any_ = (blocks & valid).any(-1).view(-1, 1, 1, blocks.shape[1])
        all_ = blocks.all(-1).view(-1, 1, 1, blocks.shape[1])
        return any_.expand(-1, 1, q_lo.shape[0], -1), all_.expand(-1, 1, q_lo.shape[0], -1)
