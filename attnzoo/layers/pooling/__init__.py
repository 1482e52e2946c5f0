"""Poolers (catalogue section 6): a set or sequence to a fixed size, padded or packed (``cu_seqlens``).

Importing this package registers every entry in it.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
