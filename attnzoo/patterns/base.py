"""The pattern protocol: a mask written once as ``allow(b, h, q, kv)``, served to every backend."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable
from typing import Any

import torch

from attnzoo.ops.layout import EMPTY, FULL, PARTIAL, BlockLayout, Shape

# Elements evaluated at once when a pattern must be evaluated tile by tile.
_TILE_BUDGET = 1 << 24


class Pattern:
    """A boolean attention pattern.

    Subclasses implement :meth:`allow`, a FlexAttention-style rule over index tensors that
    broadcast against each other (scalars under FlexAttention, grids elsewhere), and may
    implement :meth:`bounds` to classify whole blocks without evaluating them.
    """

    per_batch: bool = False
    per_head: bool = False

    def allow(self, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, shape: Shape) -> torch.Tensor:
        """Bool tensor, True where query ``q`` may attend key ``kv`` (broadcast of the inputs)."""
        raise NotImplementedError

    def bounds(
        self, q_lo: torch.Tensor, q_hi: torch.Tensor, k_lo: torch.Tensor, k_hi: torch.Tensor, shape: Shape
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Block bounds: ``(any, all)`` over query range ``[q_lo, q_hi]`` x key range ``[k_lo, k_hi]``.

        Ranges are inclusive. ``any`` may over-approximate and ``all`` under-approximate; the
        chunked backend evaluates :meth:`allow` inside every block not proven full. ``None``
        means "no cheap bound": the layout is then found by evaluating tiles.
        """
        return None

    def check(self, shape: Shape) -> None:
        """Raise ``ValueError`` if the pattern cannot apply to ``shape``."""

    def tile_plan(self, shape: Shape, block: int = 64) -> Any:
        """A :class:`~attnzoo.patterns.tiles.TilePlan` (query tiles, each with a fixed key list
        holding every key its queries may see) when the pattern has a regular structure the
        chunked backend can exploit, else None. ``block`` is the backend's block size (a hint).
        """
        return None

    def key_table(self, shape: Shape) -> torch.Tensor | None:
        """``[n_q, K]`` int64: the keys of each query, -1 for none (same for every batch and head),
        when every query sees at most ``K`` keys and ``K`` is small; else None. The ``gather``
        backend runs such patterns one query at a time."""
        return None

    def value_key(self) -> tuple | None:
        """A hashable key equal for patterns that allow the same pairs (None: unknown). Lets
        compositions built anew on every call reuse what was derived for an equal one."""
        return None

    def key_padding(self) -> tuple[Pattern | None, torch.Tensor] | None:
        """``(rest, mask)`` when this pattern is ``rest & KeyPadding(mask)`` with ``rest`` the same for
        every batch element (``rest`` None: the padding alone), else None."""
        return None

    def sdpa_hint(self, shape: Shape) -> str | None:
        """``"full"`` or ``"causal"`` (top-left aligned) when SDPA can run without a mask tensor."""
        return None

    # Composition -------------------------------------------------------------------------
    def __and__(self, other: Pattern) -> Pattern:
        from attnzoo.patterns.compose import And

        return And(self, _as_pattern(other, "other"))

    def __or__(self, other: Pattern) -> Pattern:
        from attnzoo.patterns.compose import Or

        return Or(self, _as_pattern(other, "other"))

    def __invert__(self) -> Pattern:
        from attnzoo.patterns.compose import Not

        return Not(self)

    # Views for each backend ---------------------------------------------------------------
    def mask_mod(self, shape: Shape) -> Callable[..., torch.Tensor]:
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` bound to ``shape``."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.allow(b, h, q_idx, kv_idx, shape)

        return mask_mod

    def dense_mask(self, shape: Shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool mask ``[B', H', N, M]`` with ``B'`` in ``{1, B}`` and ``H'`` in ``{1, H}``."""
        self.check(shape)
        b, h, q, kv = _index_grid(shape, device)
        out = torch.as_tensor(self.allow(b, h, q, kv, shape), device=device)
        dims = [shape.batch if out.shape[0] != 1 else 1, shape.heads if out.shape[1] != 1 else 1]
        return out.expand(*dims, shape.n_q, shape.n_kv)

    def flex_block_mask(self, shape: Shape, device: torch.device | str = "cpu") -> Any:
        """FlexAttention ``BlockMask`` of this pattern (cached per shape and device)."""
        from attnzoo.ops.backends.flex import pattern_block_mask

        self.check(shape)
        return pattern_block_mask(self, shape, device)

    def block_layout(
        self, shape: Shape, block_q: int = 64, block_kv: int = 64, device: torch.device | str = "cpu"
    ) -> BlockLayout:
        """Which key blocks each query block visits, and which of those are full (cached)."""
        key = ("layout", shape, block_q, block_kv, str(device))
        cached = self._cache_get(key)
        if cached is None:
            self.check(shape)
            state = _block_state(self, shape, block_q, block_kv, torch.device(device))
            cached = self._cache_put(key, BlockLayout.from_state(state, block_q, block_kv, shape.n_q, shape.n_kv))
        return cached

    def density(self, shape: Shape) -> float:
        """Exact fraction of allowed (query, key) pairs, averaged over batch and heads (cached)."""
        key = ("density", shape)
        cached = self._cache_get(key)
        if cached is None:
            cached = self._cache_put(key, _exact_density(self, shape))
        return cached

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this pattern reads: held in its attributes, in the patterns it is built from, and (for a
        callable it holds, e.g. :class:`~attnzoo.patterns.Custom`'s ``mask_mod``) in its closure, defaults and
        the module globals it names. What is derived from the pattern and cached is rebuilt when one of them
        changes in place (its version counter moves) or is replaced."""
        return held_tensors(self)

    def data_version(self) -> tuple[tuple[int, int], ...] | None:
        """``(id, version)`` of every tensor the pattern reads: changes when one is modified in place or
        replaced. None when one cannot be tracked (an inference-mode tensor): nothing is then cached."""
        return _versions(self.tensors())

    def _cache_get(self, key: Any) -> Any:
        cache = self.__dict__.get(_CACHE)
        if not cache:
            return None
        if not _same_data(cache.get(_DATA), self.tensors()):
            cache.clear()  # a tensor the pattern reads changed: everything derived from it is stale
            return None
        return cache.get(key)

    def _cache_put(self, key: Any, value: Any) -> Any:
        held = self.tensors()
        stamp = _stamp(held)
        if stamp is None:  # untrackable tensors: never cache what is derived from them
            return value
        cache = self.__dict__.setdefault(_CACHE, {})
        if not _same_data(cache.get(_DATA), held):
            cache.clear()
            cache[_DATA] = stamp
        cache[key] = value
        return value

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        inner = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return f"{type(self).__name__}({inner})"


_CACHE = "_attnzoo_cache"
_DATA = ("data version",)  # cache entry: the tensors read and their versions when the entries were derived
_SCAN_DEPTH = 4


def held_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors reachable from ``obj``: its attributes, items of lists, tuples and dicts, nested patterns, and for
    callables their closure cells, defaults, bound instance, ``functools.partial`` arguments and the tensors and
    patterns among the module globals their code names (a few levels deep; the pattern caches are skipped)."""
    found: dict[int, torch.Tensor] = {}
    _scan(obj, found, set(), _SCAN_DEPTH)
    return list(found.values())


_PLAIN = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)


def _scan(obj: Any, found: dict[int, torch.Tensor], seen: set[int], depth: int) -> None:
    if isinstance(obj, torch.Tensor):
        found.setdefault(id(obj), obj)
        return
    if depth < 0 or isinstance(obj, _PLAIN) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Pattern):
        items = [v for k, v in obj.__dict__.items() if k != _CACHE]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, torch.nn.Module):
        for t in (*obj.parameters(), *obj.buffers()):
            found.setdefault(id(t), t)
        return
    elif isinstance(obj, types.FunctionType):
        items = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
        items += [obj.__defaults__, obj.__kwdefaults__]
        glob = obj.__globals__
        items += [g for g in (glob.get(n) for n in obj.__code__.co_names)
                  if isinstance(g, (torch.Tensor, Pattern))]
    elif isinstance(obj, functools.partial):
        items = (obj.func, obj.args, obj.keywords)
    elif isinstance(obj, types.MethodType):
        items = (obj.__func__, obj.__self__)
    elif callable(obj) and hasattr(obj, "__dict__"):
        items = [v for k, v in vars(obj).items() if k != "_flex_fns"]
    else:
        return
    for item in items:
        if isinstance(item, torch.Tensor):
            found.setdefault(id(item), item)
        elif not isinstance(item, _PLAIN):
            _scan(item, found, seen, depth - 1)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a name not assigned yet)
        return False
    return True


def _versions(tensors: list[torch.Tensor]) -> tuple[tuple[int, int], ...] | None:
    out = []
    for t in tensors:
        try:
            out.append((id(t), t._version))
        except RuntimeError:  # inference tensors keep no version counter
            return None
    return tuple(out)


def _stamp(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[tuple[int, int], ...]] | None:
    """The tensors (kept alive, so their ids are not reused while the stamp lives) and their versions."""
    versions = _versions(tensors)
    return None if versions is None else (tensors, versions)


def _same_data(stamp: Any, tensors: list[torch.Tensor]) -> bool:
    if stamp is None:
        return False
    held, versions = stamp
    return len(held) == len(tensors) and all(a is b for a, b in zip(held, tensors)) and \
        _versions(tensors) == versions


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


def _as_pattern(value: Any, name: str) -> Pattern:
    if not isinstance(value, Pattern):
        raise TypeError(f"{name}: expected an attnzoo Pattern, got {type(value).__name__}")
    return value


def _index_grid(shape: Shape, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    b = torch.arange(shape.batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(shape.heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(shape.n_q, device=device).view(1, 1, -1, 1)
    kv = torch.arange(shape.n_kv, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


def _block_state(pattern: Pattern, shape: Shape, block_q: int, block_kv: int, device: torch.device) -> torch.Tensor:
    nqb, nkb = math.ceil(shape.n_q / block_q), math.ceil(shape.n_kv / block_kv)
    q_lo = torch.arange(nqb, device=device).view(-1, 1) * block_q
    k_lo = torch.arange(nkb, device=device).view(1, -1) * block_kv
    q_hi = (q_lo + block_q - 1).clamp(max=shape.n_q - 1)
    k_hi = (k_lo + block_kv - 1).clamp(max=shape.n_kv - 1)
    bounds = pattern.bounds(q_lo, q_hi, k_lo, k_hi, shape)
    if bounds is None:
        check_evaluations(pattern, shape, nqb * block_q * nkb * block_kv)
        any_, all_ = _tile_bounds(pattern, shape, block_q, block_kv, device)
    else:
        any_, all_ = (torch.as_tensor(t, device=device) for t in bounds)
    any_, all_ = torch.broadcast_tensors(any_, all_)
    while any_.dim() < 4:
        any_, all_ = any_.unsqueeze(0), all_.unsqueeze(0)
    any_, all_ = any_.expand(*any_.shape[:2], nqb, nkb), all_.expand(*all_.shape[:2], nqb, nkb)
    state = torch.full(any_.shape, PARTIAL, dtype=torch.int8, device=device)
    state[~any_] = EMPTY
    state[all_ & any_] = FULL
    return state


def check_evaluations(pattern: Pattern, shape: Shape, pairs: int) -> None:
    """Refuse (``ValueError``, with the figures) evaluating ``pattern``'s rule on ``pairs`` (query, key) pairs per
    batch element and head when that is over ``attnzoo.ops.config.limits.max_layout_elements``."""
    from attnzoo.ops.config import limits

    bsz = shape.batch if pattern.per_batch else 1
    hsz = shape.heads if pattern.per_head else 1
    need = bsz * hsz * pairs
    if need > limits.max_layout_elements:
        hint = " (declare per_batch=False / per_head=False if its rule ignores b / h)" if bsz * hsz > 1 else ""
        raise ValueError(
            f"pattern: {pattern!r} gives no block bounds, so its block layout needs its rule evaluated on every "
            f"(batch, head, query, key) of [{bsz}, {hsz}, {shape.n_q}, {shape.n_kv}]{hint}: {need:.3g} evaluations, "
            f"over attnzoo.ops.config.limits.max_layout_elements = {limits.max_layout_elements:.3g}; refused "
            "before starting (give the pattern bounds(), or raise the limit)"
        )


def _tile_bounds(
    pattern: Pattern, shape: Shape, block_q: int, block_kv: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate the pattern over every tile, a chunk of query blocks at a time."""
    nqb, nkb = math.ceil(shape.n_q / block_q), math.ceil(shape.n_kv / block_kv)
    bsz = shape.batch if pattern.per_batch else 1
    hsz = shape.heads if pattern.per_head else 1
    b = torch.arange(bsz, device=device).view(-1, 1, 1, 1, 1, 1)
    h = torch.arange(hsz, device=device).view(1, -1, 1, 1, 1, 1)
    kv = torch.arange(nkb * block_kv, device=device).view(1, 1, 1, 1, nkb, block_kv)
    kv_ok = kv < shape.n_kv
    per_block = bsz * hsz * block_q * nkb * block_kv
    step = max(1, _TILE_BUDGET // max(per_block, 1))
    anys, alls = [], []
    for start in range(0, nqb, step):
        stop = min(nqb, start + step)
        q = torch.arange(start * block_q, stop * block_q, device=device).view(1, 1, -1, block_q, 1, 1)
        ok = kv_ok & (q < shape.n_q)
        allowed = torch.as_tensor(pattern.allow(b, h, q.clamp(max=shape.n_q - 1), kv.clamp(max=shape.n_kv - 1), shape))
        allowed = torch.broadcast_to(allowed, torch.broadcast_shapes(allowed.shape, ok.shape))
        anys.append((allowed & ok).any(dim=(3, 5)))
        alls.append((allowed | ~ok).all(dim=(3, 5)))
    return torch.cat(anys, dim=2), torch.cat(alls, dim=2)


def _exact_density(pattern: Pattern, shape: Shape) -> float:
    """Count allowed pairs: full tiles by size, partial tiles by evaluating them."""
    block = 64
    layout = pattern.block_layout(shape, block, block)
    state = layout.state
    nqb, nkb = state.shape[-2:]
    q_sizes = torch.full((nqb,), block, dtype=torch.float64)
    q_sizes[-1] = shape.n_q - block * (nqb - 1)
    k_sizes = torch.full((nkb,), block, dtype=torch.float64)
    k_sizes[-1] = shape.n_kv - block * (nkb - 1)
    tile_sizes = q_sizes.view(-1, 1) * k_sizes.view(1, -1)
    allowed = float((tile_sizes * (state == FULL)).sum())
    partial = torch.nonzero(state == PARTIAL)
    if len(partial):
        b_idx, h_idx, qb, kb = partial.unbind(-1)
        offs = torch.arange(block)
        for start in range(0, len(partial), 4096):
            sl = slice(start, start + 4096)
            q = (qb[sl].view(-1, 1, 1) * block + offs.view(1, -1, 1))
            kv = (kb[sl].view(-1, 1, 1) * block + offs.view(1, 1, -1))
            ok = (q < shape.n_q) & (kv < shape.n_kv)
            res = pattern.allow(
                b_idx[sl].view(-1, 1, 1), h_idx[sl].view(-1, 1, 1),
                q.clamp(max=shape.n_q - 1), kv.clamp(max=shape.n_kv - 1), shape,
            )
            allowed += float((torch.as_tensor(res) & ok).sum())
    bh = state.shape[0] * state.shape[1]
    return allowed / (bh * shape.n_q * shape.n_kv)
