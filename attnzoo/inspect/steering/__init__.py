"""Steering entries that edit a host model's attention for a pass or wrap several passes (catalogue
section 10): one module per entry, ``attnzoo/inspect/steering/<slug>.py`` (class, reductions,
registration last); shared code in ``_common.py``. Importing this package imports every module
under it, so an entry registers by existing.

Each entry is built as ``create(slug, host, **options)``: calling it runs the host with the edit
(``steered(*host_args)``), and the host is exactly as before afterwards (no hooks, no instance
attributes). Single-pass entries are also context managers (``with create(...): host(x)``).
Hosts: attnzoo models (``TinyLM``, :class:`~attnzoo.bench.models.TinyDiT`, any model of
:class:`~attnzoo.layers.AttentionMixer` layers) and, where an entry says so, Hugging Face models.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> list[ModuleType]:
    """Import every module under this package (each entry registers on import); return them."""
    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}.")]


discover()
