"""KV cache for incremental (token-by-token or chunked) decoding of causal token mixers."""

from __future__ import annotations

from typing import Any

import torch

from attnzoo.patterns import And, SlidingWindow

__all__ = ["KVCache", "window_of"]


def window_of(pattern: Any) -> tuple[int, int] | None:
    """``(window, n_sink)`` when ``pattern`` only ever needs the last ``window`` keys (+ sinks), else None.

    Recognises :class:`~attnzoo.patterns.SlidingWindow` (per-head windows: their maximum),
    also inside an ``And``.
    """
    if isinstance(pattern, SlidingWindow):
        w = pattern.window if isinstance(pattern.window, int) else max(pattern.window)
        return w, pattern.n_sink
    if isinstance(pattern, And):
        found = [x for x in (window_of(pattern.a), window_of(pattern.b)) if x is not None]
        if found:
            return min(found, key=lambda t: t[0] + t[1])
    return None


class KVCache:
    """Keys and values seen so far by one attention layer (one cache per layer).

    Use: ``cache = KVCache()``, then ``layer(x_t, causal=True, cache=cache)`` for each new
    chunk ``x_t`` ``[B, n_t, C]``; the concatenated outputs equal ``layer(x, causal=True)``.
    ``position`` counts the tokens seen (rotary embeddings use it as the offset of the new
    chunk). When the layer's pattern is a sliding window the layer calls :meth:`trim`
    after each step, so at most ``window + n_sink`` entries are stored (bounded memory);
    position-dependent score modifiers then see compressed indices: exact for relative
    ones (ALiBi, relative bias) on the window part, not on the sink tokens.

    Pass ``causal=True`` with the cache: that is what decoding equals. Without it, attention layers
    let the tokens of each new chunk see one another both ways (and every cached token), which is
    neither the causal nor the bidirectional full forward; recurrent layers are causal either way.
    A cache holds one batch: a call with another batch size raises (:meth:`reset` to start over).

    ``k``: ``[B, H_kv, M, D]``, ``v``: ``[B, H_kv, M, D_v]``, ``keep``: bool ``[B, M]`` or None.
    ``state`` is a free dict for layers that need other per-step state.

    Without autograd, appending writes into buffers that grow by doubling (a decoding step copies only its new
    entries); ``k``, ``v`` and ``keep`` are views of the stored entries, never of spare room, so a view taken
    earlier keeps its values. With autograd recording (a tensor requires grad), appending concatenates.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None  # buffers: the first ``_len`` entries along the sequence are stored
        self._v: torch.Tensor | None = None
        self._keep: torch.Tensor | None = None
        self._len = 0
        self.position = 0
        self.state: dict[str, Any] = {}

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self._len]

    @k.setter
    def k(self, t: torch.Tensor | None) -> None:
        self._k, self._len = t, 0 if t is None else t.shape[2]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self._len]

    @v.setter
    def v(self, t: torch.Tensor | None) -> None:
        self._v = t

    @property
    def keep(self) -> torch.Tensor | None:
        return None if self._keep is None else self._keep[:, :self._len]

    @keep.setter
    def keep(self, t: torch.Tensor | None) -> None:
        self._keep = t

    def __len__(self) -> int:
        return 0 if self._k is None else self._len

    def reset(self) -> None:
        """Forget everything."""
        self.__init__()

    def claim_batch(self, batch: int) -> None:
        """Record the batch size of the first call that keeps state here; a later call with another raises
        (a recurrent state of batch B would silently broadcast over a smaller batch)."""
        held = self.state.setdefault("batch", batch)
        if held != batch:
            raise ValueError(f"cache: holds the state of batch {held}, got a batch of {batch} (call reset() to "
                             "decode another batch)")

    def append(
        self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append new ``k``, ``v`` (``keep``: bool ``[B, n_new]``); return everything stored."""
        if self.k is not None and (self.k.shape[0] != k.shape[0] or self.k.shape[1] != k.shape[1]):
            raise ValueError(
                f"cache: holds batch {self.k.shape[0]} x {self.k.shape[1]} kv heads, got {k.shape[0]} x {k.shape[1]}"
            )
        old_len = len(self)
        if keep is None and self._keep is not None:
            keep = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        if keep is not None and self._keep is None and old_len:  # as long as the key buffer (stored + spare room)
            self._keep = torch.ones(k.shape[0], self._k.shape[2], dtype=torch.bool, device=k.device)
        if self._k is None:
            self._k, self._v, self._keep, self._len = k, v, keep, k.shape[2]
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, self._k, self._v)):
            self._k, self._v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            if keep is not None:
                self._keep = torch.cat([self.keep, keep], dim=1)
            self._len = old_len + k.shape[2]
        else:
            new_len = old_len + k.shape[2]
            if new_len > self._k.shape[2]:
                room = max(new_len, 2 * old_len)
                self._k = _grown(self._k, old_len, room, 2)
                self._v = _grown(self._v, old_len, room, 2)
                if self._keep is not None:
                    self._keep = _grown(self._keep, old_len, room, 1)
            self._k[:, :, old_len:new_len] = k
            self._v[:, :, old_len:new_len] = v
            if keep is not None:
                self._keep[:, old_len:new_len] = keep
            self._len = new_len
        return self.k, self.v, self.keep

    def advance(self, n: int) -> None:
        """Count ``n`` more tokens as seen."""
        self.position += n

    def trim(self, window: int, n_sink: int = 0) -> None:
        """Keep the first ``n_sink`` entries and the last ``window`` entries."""
        m = len(self)
        if m <= window + n_sink:
            return
        idx = torch.cat([torch.arange(n_sink), torch.arange(m - window, m)]).to(self._k.device)
        keep = None if self._keep is None else self.keep.index_select(1, idx)
        self.k, self.v = self.k.index_select(2, idx), self.v.index_select(2, idx)
        self.keep = keep

    def nbytes(self) -> int:
        """Bytes held for the keys and values (stored entries and the buffers' spare room)."""
        return sum(t.numel() * t.element_size() for t in (self._k, self._v) if t is not None)


def _grown(t: torch.Tensor, length: int, room: int, dim: int) -> torch.Tensor:
    """A new buffer with ``room`` entries along ``dim`` holding the first ``length`` entries of ``t``."""
    shape = list(t.shape)
    shape[dim] = room
    out = t.new_empty(shape)
    out.narrow(dim, 0, length).copy_(t.narrow(dim, 0, length))
    return out
