"""Shared fixtures for the CPU test suite of the core layer (patterns, score modifiers, backends).

Every random input comes from a ``torch.Generator`` seeded from the test's node id, so each
test (and each parametrisation) gets its own fresh but reproducible inputs. Comparisons run
in float64 against ``backend="reference"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import pytest
import torch

import attnzoo
from attnzoo.ops.backends import BACKENDS

# float64 agreement between any backend and the reference (forward, lse and gradients).
TOL = {"atol": 1e-10, "rtol": 1e-10}


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny per-token ops, where OpenMP start-up costs more than the work
    (and a shared CPU does not slow them down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per test, identical across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def randn(rng: torch.Generator) -> Callable[..., torch.Tensor]:
    """``randn(*shape, requires_grad=False, scale=1.0)``: a float64 normal tensor from ``rng``."""

    def make(*shape: int, requires_grad: bool = False, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=rng, dtype=torch.float64) * scale
        return t.requires_grad_(requires_grad)

    return make


@pytest.fixture
def qkv(randn) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``qkv(B, H, H_kv, N, M, D, D_v)``: float64 q, k, v that require grad."""

    def make(b: int, h: int, h_kv: int, n: int, m: int, d: int, d_v: int, requires_grad: bool = True):
        return (
            randn(b, h, n, d, requires_grad=requires_grad),
            randn(b, h_kv, m, d, requires_grad=requires_grad),
            randn(b, h_kv, m, d_v, requires_grad=requires_grad),
        )

    return make


@pytest.fixture
def small_block(monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the blocksparse backend with 16-token blocks, so small problems span many blocks."""
    monkeypatch.setattr(BACKENDS["blocksparse"], "block", 16)
    return 16


@pytest.fixture
def no_tile_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run blocksparse's tiled path on PyTorch ops (the compiled tile kernels switched off)."""
    from attnzoo.ops.backends import tile_native

    monkeypatch.setattr(tile_native, "why_not", lambda *a: "switched off by the test")


def forward_backward(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dout: torch.Tensor,
    extra: Sequence[torch.Tensor] = (),
    return_lse: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """``(out, lse or None, grads)`` with grads of ``<out, dout>`` w.r.t. ``q, k, v, *extra``."""
    res = attnzoo.attention(q, k, v, backend=backend, return_lse=return_lse, **kwargs)
    out, lse = res if return_lse else (res, None)
    inputs = [q, k, v, *extra]
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return out, lse, grads


@pytest.fixture
def fwd_bwd() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]:
    """:func:`forward_backward` as a fixture (test modules do not import conftest)."""
    return forward_backward


@pytest.fixture
def tol() -> dict[str, float]:
    return dict(TOL)
