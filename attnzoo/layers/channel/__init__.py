"""Channel and spatial gating modules (catalogue section 9) on feature maps ``[B, C, H, W]``.

Importing this package registers every entry in it.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
