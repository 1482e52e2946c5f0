"""The CAB contract: which of CAB's four attention patterns a mixer declares, checked by running them.

CAB (Zhang et al., ICML 2023) classifies attention use into noncausal self (NS), causal self
(CS), noncausal cross (NC) and causal cross (CC). A mixer's declared support comes from its
registry ``supports``: NS needs ``self``; CS ``self`` + ``causal``; NC ``cross``; CC ``cross`` +
``causal``. :func:`check` runs every declared pattern in float64:

- NS: the output has the input's shape and is finite.
- CS: prefix consistency, CAB's test: the output at position ``i`` equals the output of the
  prefix ``x[:, :i+1]`` at ``i`` (tolerance 1e-4); with ``decoding`` also incremental decoding
  (one token at a time through a :class:`~attnzoo.layers.KVCache`) equals the full output.
- NC: a context with a different length (``M != N``) gives a finite ``[B, N, C]`` output.
- CC: query-prefix consistency against a fixed context: the output for query ``i`` does not
  depend on later queries, so cross-attention can run while the queries are decoded.

``attnzoo.create("cab")`` returns :class:`CABContract`; ``contract.check("mha")`` the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnzoo.bench.models import build_mixer, check_mixer, mixer_kwargs_for
from attnzoo.registry import Reduction, register

__all__ = ["CAB_PATTERNS", "CABContract", "declared_patterns", "check"]

CAB_PATTERNS = {"NS": ("noncausal self", {"self"}), "CS": ("causal self", {"self", "causal"}),
                "NC": ("noncausal cross", {"cross"}), "CC": ("causal cross", {"cross", "causal"})}


def declared_patterns(slug: str) -> list[str]:
    """The CAB patterns ``slug`` declares through its registry ``supports``."""
    spec = check_mixer(slug)
    return [p for p, (_, need) in CAB_PATTERNS.items() if need <= set(spec.supports)]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def check(slug: str, *, dim: int = 32, n: int = 12, m: int = 7, batch: int = 2, seed: int = 0, tol: float = 1e-4,
          mixer_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run each declared pattern; returns ``{pattern: {"declared", "ok", "error", "detail"}}``
    (``ok`` None for a pattern that is not declared)."""
    spec = check_mixer(slug)
    torch.manual_seed(seed)
    kwargs = mixer_kwargs_for(slug, n_heads=4, extra=mixer_kwargs)
    module = build_mixer(slug, dim, **kwargs).double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    ctx = torch.randn(batch, m, dim, generator=g, dtype=torch.float64)
    declared = set(declared_patterns(slug))
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for pat, (name, _) in CAB_PATTERNS.items():
            row: dict[str, Any] = {"name": name, "declared": pat in declared, "ok": None, "error": None, "detail": ""}
            out[pat] = row
            if pat not in declared:
                continue
            try:
                if pat == "NS":
                    y = module(x)
                    row["ok"] = tuple(y.shape) == tuple(x.shape) and bool(torch.isfinite(y).all())
                    row["detail"] = "shape and finite"
                elif pat == "CS":
                    y = module(x, causal=True)
                    err = max(_err(module(x[:, :i + 1], causal=True)[:, i], y[:, i]) for i in range(n))
                    row["error"], row["detail"] = err, "prefix consistency"
                    ok = err <= tol
                    if "decoding" in spec.supports:
                        from attnzoo.layers import KVCache

                        cache = KVCache()
                        steps = torch.cat([module(x[:, t:t + 1], causal=True, cache=cache) for t in range(n)], dim=1)
                        dec = _err(steps, y)
                        row["error"] = max(err, dec)
                        row["detail"] += f" ({err:.1e}) + incremental decoding ({dec:.1e})"
                        ok = ok and dec <= tol
                    row["ok"] = ok
                elif pat == "NC":
                    y = module(x, context=ctx)
                    row["ok"] = tuple(y.shape) == tuple(x.shape) and bool(torch.isfinite(y).all())
                    row["detail"] = f"context length {m} != {n}"
                else:  # CC
                    y = module(x, context=ctx)
                    err = max(_err(module(x[:, :i + 1], context=ctx)[:, i], y[:, i]) for i in range(n))
                    row["error"], row["ok"] = err, err <= tol
                    row["detail"] = "query-prefix consistency against a fixed context"
            except Exception as e:  # a declared pattern that does not run is a failed check
                row["ok"], row["detail"] = False, f"{type(e).__name__}: {e}"
    return out


@dataclass(frozen=True)
class CABContract:
    """The CAB contract as a task entry: ``check(slug)`` and ``check_all()``."""

    dim: int = 32
    n: int = 12
    tol: float = 1e-4

    def check(self, slug: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
        return check(slug, dim=self.dim, n=self.n, tol=self.tol, **kwargs)

    def check_all(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every registered token mixer; mixers that cannot be built at the default size report the error."""
        import attnzoo
        from attnzoo.bench.models import mixer_slugs

        out = {}
        for slug in mixer_slugs():
            if attnzoo.spec(slug).slug != slug:
                continue  # aliases
            try:
                out[slug] = self.check(slug)
            except Exception as e:
                out[slug] = {"build": {"declared": True, "ok": False, "error": None, "detail": f"{e}"}}
        return out


def _cab_mha_passes() -> tuple[torch.Tensor, torch.Tensor]:
    res = check("mha")
    return (torch.tensor([float(bool(r["ok"])) for r in res.values()], dtype=torch.float64),
            torch.ones(4, dtype=torch.float64))


@register(
    "cab", family="benchmark", type="task", priority=2, papers=("CAB",), supports=(), complexity="n/a", backends=(),
    reference="CAB's causality test: the output at i equals the output of the prefix [:i+1] (1e-4) and incremental "
              "decoding matches",
    reference_kwargs={}, reductions=(
        Reduction("mha_all_patterns", "mha declares and passes all four patterns (NS, CS, NC, CC)", _cab_mha_passes),
    ),
    summary="CAB contract: declared {causal, noncausal} x {self, cross} support, checked by running each pattern",
)
def cab(dim: int = 32, n: int = 12, tol: float = 1e-4) -> CABContract:
    """The CAB conformance contract (see :mod:`attnzoo.bench.cab`)."""
    return CABContract(dim=dim, n=n, tol=tol)
