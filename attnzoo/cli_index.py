"""A JSON snapshot of the registry for the command line: ``attnzoo list`` and ``attnzoo info`` answer
without importing torch (tenths of a second instead of seconds).

The snapshot is built by importing the registry once and cached under ``$ATTNZOO_CACHE`` (default
``~/.cache/attnzoo``) in ``cli/registry-<fingerprint>.json``; the fingerprint covers the path, size and
modification time of every source file of the package, so any edit rebuilds it. Where no cache folder is
writable the snapshot is rebuilt on every call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["load_index", "plain_doc", "fingerprint", "build_index"]

_PACKAGE = Path(__file__).resolve().parent
_FORMAT = 1


def fingerprint(root: Path = _PACKAGE) -> str:
    """A hash of (relative path, size, mtime) of every ``.py`` / ``.tsv`` file under ``root``."""
    h = hashlib.sha256(f"{_FORMAT} {sys.version_info[:2]} {root}".encode())
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".tsv")):
                path = os.path.join(folder, name)
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, root)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def build_index() -> dict[str, Any]:
    """Import the registry (and torch) and describe every entry: its ``Spec.to_dict()``, its conformance
    checks and its docstring; plus the aliases."""
    from attnzoo import registry
    from attnzoo.catalog import checks_for

    entries = {s.slug: {"spec": s.to_dict(), "checks": checks_for(s), "doc": s.factory.__doc__ or ""}
               for s in registry.list()}
    return {"format": _FORMAT, "entries": entries, "aliases": registry.aliases()}


def _cache_file(fp: str) -> Path | None:
    root = Path(os.environ.get("ATTNZOO_CACHE") or Path.home() / ".cache" / "attnzoo") / "cli"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root / f"registry-{fp}.json"


def load_index() -> dict[str, Any]:
    """The registry snapshot (from the cache when it is current, else built and cached)."""
    path = _cache_file(fingerprint())
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == _FORMAT:
                return data
        except (OSError, ValueError):
            pass
    data = build_index()
    if path is not None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)  # readers never see a partial file
            week_ago = time.time() - 7 * 86400  # other checkouts share the folder: keep their recent snapshots
            for old in path.parent.glob("registry-*.json"):
                if old != path and old.stat().st_mtime < week_ago:
                    old.unlink(missing_ok=True)
        except OSError:
            pass
    return data


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(?:~?([^`<]*?)\s*<[^`>]*>|~([\w.]+)|([^`]*))`")


def _role(m: re.Match[str]) -> str:
    label, short, plain = m.groups()
    if label:
        return label
    if short:
        return short.rsplit(".", 1)[-1]
    return plain


def plain_doc(text: str) -> str:
    """A docstring without Sphinx / reST markup: ``:class:`~a.B``` -> ``B``, ``:func:`f``` -> ``f``,
    double backquotes -> nothing."""
    text = _ROLE.sub(_role, text)
    return text.replace("``", "")
