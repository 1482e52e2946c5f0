"""Helpers shared by the tests (the library's own are in :mod:`attnzoo.layers.testing`)."""

from __future__ import annotations

import zlib

import pytest
import torch

import attnzoo
from attnzoo.layers import MultiHeadAttention

__all__ = ["assert_backends_equal_reference", "build_seeded", "node_tokens", "seeded_mha", "unimplemented_slug"]


def assert_backends_equal_reference(module: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, causal: bool,
                                    backends: tuple[str, ...] = ("gather", "sdpa"), tol: float = 1e-12) -> None:
    """``module`` on each of ``backends`` (set as ``module.backend``) equals ``reference`` (the same weights on the
    float64 reference backend) on ``x`` (requires grad): the output, and the gradient of ``x`` through
    ``out.square().sum()``."""
    want = reference(x, causal=causal)
    gx = torch.autograd.grad(want.square().sum(), x)[0]
    for backend in backends:
        module.backend = backend
        got = module(x, causal=causal)
        assert (got - want).abs().max() < tol, backend
        assert (torch.autograd.grad(got.square().sum(), x)[0] - gx).abs().max() < tol, backend


def build_seeded(slug: str, seed: int = 0, **kw) -> torch.nn.Module:
    """Entry ``slug`` in float64, built after ``torch.manual_seed(seed)`` from its test kwargs updated by ``kw``."""
    torch.manual_seed(seed)
    spec = attnzoo.spec(slug)
    return attnzoo.create(slug, **{**spec.test_kwargs, **kw}).double()


def node_tokens(request: pytest.FixtureRequest, b: int = 2, n: int = 13, c: int = 32) -> torch.Tensor:
    """Float64 tokens ``[b, n, c]`` seeded by the test's node id (fresh inputs per test, reproducible)."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return torch.randn(b, n, c, generator=g, dtype=torch.float64)


def seeded_mha(**kw) -> MultiHeadAttention:
    """A float64 ``MultiHeadAttention(32, 4, **kw)`` built after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, **kw).double()


def unimplemented_slug() -> str:
    """A catalogue slug that no entry registers yet (the test skips once every entry exists)."""
    from attnzoo.catalog import load_rows

    registered = {s.slug for s in attnzoo.list()}
    missing = [row["slug"] for row in load_rows() if row["slug"] not in registered]
    if not missing:
        pytest.skip("every catalogue entry is implemented")
    return missing[0]
