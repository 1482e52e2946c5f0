"""Random calls of ``attnzoo.attention`` on every backend against the float64 reference (tests/differential.py).

The default selection runs seeds [0, 300) (about 20 s); ``-m slow`` runs [300, 3000). A failure prints
each failing seed's call; ``python -m tests.differential SEED SEED+1`` reproduces one.
"""

from __future__ import annotations

import pytest

from tests.differential import check

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(start: int, stop: int) -> None:
    failures = [line for seed in range(start, stop) for line in check(seed)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("start", range(0, 300, 50))
def test_random_calls_match_reference(start: int) -> None:
    _run(start, start + 50)


@pytest.mark.slow
@pytest.mark.parametrize("start", range(300, 3000, 300))
def test_more_random_calls_match_reference(start: int) -> None:
    _run(start, start + 300)
