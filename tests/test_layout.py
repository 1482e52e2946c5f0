"""The layout of the entries: one module per entry at ``attnzoo/layers/<family>/<slug>.py``.

File name == slug, folder == family (``-`` as ``_``), each entry module registers exactly one
entry, shared modules (``layers/*.py``, ``<family>/_*.py``) register none, every entry of a
layer type lives under ``attnzoo/layers`` and every registered catalogue slug is in the
conformance suite.
"""

from __future__ import annotations

import pkgutil
from collections import Counter

import attnzoo
import attnzoo.layers
from attnzoo import registry
from attnzoo.catalog import load_rows
from tests.conformance._build import suite_slugs

LAYER_TYPES = ("mixer", "pattern", "score_mod", "pooler", "channel", "memory")


def _modules() -> list[pkgutil.ModuleInfo]:
    return list(pkgutil.walk_packages(attnzoo.layers.__path__, prefix="attnzoo.layers."))


def test_every_layer_entry_lives_in_its_family_folder_under_its_slug():
    wrong = []
    for s in attnzoo.list():
        if s.type not in LAYER_TYPES and not s.module.startswith("attnzoo.layers."):
            continue  # metrics, tasks and steering hooks of attnzoo.inspect live with their tools
        want = f"attnzoo.layers.{s.family.replace('-', '_')}.{s.slug}"
        if s.module != want:
            wrong.append(f"{s.slug}: registered by {s.module}, expected {want}")
    assert not wrong, "\n".join(wrong)


def test_each_entry_module_registers_exactly_once_and_shared_modules_never():
    counts = Counter(s.module for s in attnzoo.list())
    bad = []
    for info in _modules():
        parts = info.name.split(".")
        shared = info.ispkg or len(parts) == 3 or parts[-1].startswith("_")
        want = 0 if shared else 1
        if counts.get(info.name, 0) != want:
            bad.append(f"{info.name}: registers {counts.get(info.name, 0)} entries, expected {want}")
    assert not bad, "\n".join(bad)


def test_family_folders_are_catalogue_families():
    families = {row["family"].replace("-", "_") for row in load_rows()}
    folders = {info.name.split(".")[2] for info in _modules() if info.ispkg}
    assert folders <= families, f"folders that are no catalogue family: {sorted(folders - families)}"


def test_every_registered_catalogue_slug_is_in_the_conformance_suite():
    catalogue = {row["slug"] for row in load_rows()}
    layer_specs = [s for s in attnzoo.list() if s.slug in catalogue
                   and (s.type in LAYER_TYPES or s.module.startswith("attnzoo.layers."))]
    missing = sorted(s.slug for s in layer_specs if s.slug not in suite_slugs())
    assert not missing, f"registered but not checked by tests/conformance: {missing}"


def test_registration_takes_a_class_or_a_factory():
    from torch import nn

    class Probe(nn.Module):
        def __init__(self, dim: int, *, width: int = 2, **kw) -> None:
            super().__init__()

    class Child(Probe):
        refused_arguments = ("width",)

        def __init__(self, dim: int, *, depth: int = 1, **kw) -> None:
            super().__init__(dim, **kw)

    assert registry.class_arguments(Probe) == ["dim", "width"]
    assert registry.class_arguments(Child) == ["dim", "depth"]
    try:
        registry.register("layout_probe_factory", family="dense-multihead", type="mixer")(lambda dim: Probe(dim))
        registry.register("layout_probe_class", family="dense-multihead", type="mixer")(Child)
        assert attnzoo.spec("layout_probe_factory").accepted_arguments() == ["dim"]
        assert attnzoo.spec("layout_probe_class").accepted_arguments() == ["dim", "depth"]
        assert attnzoo.spec("layout_probe_class").module == __name__
        assert isinstance(attnzoo.create("layout_probe_class", dim=4, depth=2), Child)
    finally:
        registry._REGISTRY.pop("layout_probe_factory", None)
        registry._REGISTRY.pop("layout_probe_class", None)
