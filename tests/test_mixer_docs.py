"""Every mixer that takes a padding mask says its polarity (True = keep) in its ``forward`` docstring."""

from __future__ import annotations

import inspect

from tests.conformance._build import build, mixer_specs


def test_forward_docstrings_say_true_means_keep():
    missing = []
    for spec in mixer_specs():
        if "padding" not in spec.supports:
            continue
        doc = inspect.getdoc(type(build(spec)).forward) or ""
        if "True = keep" not in doc:
            missing.append(spec.slug)
    assert not missing, f"forward docstrings without the mask polarity: {missing}"
