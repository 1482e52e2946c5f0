"""Mixer variants: one registered entry at fixed settings, named by a label, e.g. ``moba[top_k=1]``.

Syntax: ``SLUG`` or ``SLUG[KEY=VALUE,KEY=VALUE,...]``. ``SLUG`` is a registered entry (or alias); each
``KEY`` is an argument its factory accepts (``dim`` excepted: the bench sets the width); each ``VALUE`` is
an integer (``2``, ``-1``), a float (``0.5``, ``1e-3``), ``true``/``false``, ``none``, or a bare word
(``exact``, ``sdpa``: letters, digits, ``_ . -``, starting with a letter). Spaces around the parts are ignored.

The variant's *label* is its canonical spelling (arguments in the order given, no spaces:
``moba[block_size=4,top_k=1]``); it names the variant wherever a mixer name goes (the results store's
``mixer`` column, the leaderboard, the report, the speed sweep), while its slug and arguments are what
gets built (and what the run's configuration records). A plain slug is its own label.

Parsing is strict: an unknown slug, a malformed bracket, an argument the entry does not accept or one
given twice, and a value none of the forms above reads, are a ``ValueError`` naming it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MixerVariant", "format_value", "merge_kwargs", "parse_mixer", "variant_slug"]

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)\Z")
# Arguments a variant cannot set: the bench chooses the model width.
_RESERVED = ("dim",)
# Arguments of the host ``mha`` a hosted entry (a score modifier) also takes through the bench.
_HOST_ARGUMENTS = ("n_heads", "backend", "bias")


@dataclass(frozen=True)
class MixerVariant:
    """A registered entry at fixed arguments: ``label`` (what results are stored under), ``slug`` (the entry,
    as given: an alias stays an alias) and ``kwargs`` (the arguments of the brackets, in order)."""

    label: str
    slug: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_variant(self) -> bool:
        """Whether the label carries arguments (``moba[top_k=1]``), not a plain slug."""
        return bool(self.kwargs)


def format_value(value: Any) -> str:
    """A value as the label spells it: ``true``/``false``/``none``, ``repr`` of a float, else ``str``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _value(text: str, key: str, label: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if _WORD.match(text):
        return text
    raise ValueError(f"mixer {label!r}: value of {key!r} must be an integer, a float, true/false, none or a bare "
                     f"word (letters, digits, _ . -), got {text!r}")


def _spec_of(slug: str, label: str) -> Any:
    import attnzoo

    try:
        return attnzoo.spec(slug)
    except (KeyError, TypeError):
        names = sorted({s.slug for s in attnzoo.list()})
        close = difflib.get_close_matches(slug, names, n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"mixer: unknown mixer {slug!r} in {label!r}{hint}; registered entries: "
                         f"{', '.join(names)}") from None


def parse_mixer(text: str) -> MixerVariant:
    """Parse ``SLUG`` or ``SLUG[KEY=VALUE,...]`` (module docstring) into a :class:`MixerVariant`.

    Raises ``ValueError`` naming the problem: not a string, a malformed bracket, an unknown slug, an argument
    the entry does not accept (listing those it does), ``dim``, an argument given twice, an unreadable value.
    """
    if not isinstance(text, str):
        raise ValueError(f"mixer: expected a slug or SLUG[KEY=VALUE,...] string, got {type(text).__name__} "
                         f"{text!r}")
    raw = text.strip()
    if "[" not in raw and "]" not in raw:
        if not raw:
            raise ValueError("mixer: expected a slug or SLUG[KEY=VALUE,...], got an empty string")
        _spec_of(raw, raw)
        return MixerVariant(raw, raw, {})
    head, sep, rest = raw.partition("[")
    slug = head.strip()
    if not sep or not rest.endswith("]") or "[" in rest or rest.count("]") != 1 or not slug:
        raise ValueError(f"mixer {text!r}: expected SLUG[KEY=VALUE,KEY=VALUE,...] (one pair of brackets at the end, "
                         "e.g. moba[top_k=1,block_size=4])")
    spec = _spec_of(slug, text)
    body = rest[:-1].strip()
    if not body:
        raise ValueError(f"mixer {text!r}: empty brackets; give KEY=VALUE pairs or the plain slug {slug!r}")
    accepted = spec.accepted_arguments()
    from attnzoo.contracts import hosted

    if accepted is not None and hosted(spec):
        accepted = [*accepted, *(a for a in _HOST_ARGUMENTS if a not in accepted)]
    kwargs: dict[str, Any] = {}
    for part in body.split(","):
        key, eq, val = (s.strip() for s in part.partition("="))
        if not eq or not key or not val:
            raise ValueError(f"mixer {text!r}: expected KEY=VALUE between the commas, got {part.strip()!r}")
        if not _KEY.match(key):
            raise ValueError(f"mixer {text!r}: argument name {key!r} is not an identifier")
        if key in _RESERVED:
            raise ValueError(f"mixer {text!r}: argument {key!r} is set by the bench (the model width), not a variant")
        if accepted is not None and key not in accepted:
            allowed = [a for a in accepted if a not in _RESERVED]
            raise ValueError(f"mixer {text!r}: {spec.slug!r} does not accept argument {key!r}; it accepts "
                             f"{', '.join(allowed)}")
        if key in kwargs:
            raise ValueError(f"mixer {text!r}: argument {key!r} given twice")
        kwargs[key] = _value(val, key, text)
    label = f"{slug}[{','.join(f'{k}={format_value(v)}' for k, v in kwargs.items())}]"
    return MixerVariant(label, slug, kwargs)


def variant_slug(name: str) -> str:
    """The slug of a mixer name that may be a variant label (``moba[top_k=1]`` -> ``moba``); a plain name as is."""
    return name.partition("[")[0].strip() if isinstance(name, str) else name


def merge_kwargs(variant: MixerVariant, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``variant.kwargs`` with ``kwargs`` added; an argument in both with different values is a ``ValueError``."""
    out = dict(variant.kwargs)
    for k, v in kwargs.items():
        if k in out and out[k] != v:
            raise ValueError(f"mixer {variant.label!r}: argument {k!r} is {format_value(out[k])} in the label and "
                             f"{v!r} elsewhere; give it once")
        out[k] = v
    return out
