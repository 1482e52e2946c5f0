"""The CAB contract: which of CAB's four attention patterns a mixer declares, checked by running them.

CAB (Zhang et al., ICML 2023) classifies attention use into noncausal self (NS), causal self
(CS), noncausal cross (NC) and causal cross (CC). A mixer's declared support comes from its
registry ``supports``: NS needs ``self``; CS ``self`` + ``causal``; NC ``cross``; CC ``cross`` +
``causal``. :func:`check` runs every declared pattern in float64:

- NS: the output has the input's shape and is finite.
- CS: prefix consistency, CAB's test: the output at position ``i`` equals the output of the
  prefix ``x[:, :i+1]`` at ``i`` (tolerance 1e-4; over the prefixes the mixer takes: a windowed grid
  mixer takes the extents its windows divide); with ``decoding`` also incremental decoding
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
from attnzoo.bench.variants import merge_kwargs, parse_mixer
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


def _build_for(spec: Any, dim: int, x: torch.Tensor, extra: dict[str, Any] | None) -> tuple[torch.nn.Module, str]:
    """The mixer in float64 with its default configuration, or, when that refuses CAB's input (a window
    that does not divide N, segment ids it needs) or cannot be built without arguments (gist_pool's
    context length), with its registry ``test_kwargs`` (the conformance configuration); the second item
    says which."""
    def build(kwargs: dict[str, Any]) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_mixer(spec.slug, dim, **mixer_kwargs_for(spec.slug, n_heads=4, extra=kwargs)).double().eval()

    try:
        module = build(dict(extra or {}))
        with torch.no_grad():
            module(x)
            if "causal" in spec.supports:
                module(x, causal=True)
        return module, ""
    except ValueError as e:
        if spec.type == "score_mod" or not spec.test_kwargs:
            raise
        kwargs = {**{k: v for k, v in spec.test_kwargs.items() if k != "dim"}, **(extra or {})}
        return build(kwargs), (f"built with its test configuration {kwargs} (the default cannot run on "
                               f"N={x.shape[1]}: {e})")


def _accepted_prefixes(module: torch.nn.Module, x: torch.Tensor, **kw: Any) -> tuple[list[int], str]:
    """Prefix lengths ``p < N`` the module takes (a windowed grid mixer takes only the extents its windows
    divide or cover), and the reason it gave for the first one it refused."""
    ok, reason = [], ""
    for p in range(1, x.shape[1]):
        try:
            module(x[:, :p], **kw)
            ok.append(p)
        except ValueError as e:
            reason = reason or f"length {p}: {e}"
    return ok, reason


def _causal_row(module: torch.nn.Module, x: torch.Tensor, kw: dict[str, Any], tol: float, decoding: bool,
                g: torch.Generator) -> dict[str, Any]:
    """CS / CC: no output reads a later token (later tokens redrawn at the same N); then CAB's prefix
    consistency; with ``decoding`` also incremental decoding through a KV cache."""
    n = x.shape[1]
    y = module(x, **kw)
    future = 0.0
    for t in sorted({0, n // 2, n - 2}):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(x2[:, t + 1:].shape, generator=g, dtype=x.dtype)
        future = max(future, _err(module(x2, **kw)[:, :t + 1], y[:, :t + 1]))
    if future > tol:
        return {"ok": False, "error": future,
                "detail": f"an output reads later tokens (changes by {future:.1e} when they are redrawn)"}
    prefixes, reason = _accepted_prefixes(module, x, **kw)
    prefix = max((_err(module(x[:, :p], **kw)[:, p - 1], y[:, p - 1]) for p in prefixes), default=None)
    taken = "" if len(prefixes) == n - 1 else f" over the prefixes it takes ({', '.join(map(str, prefixes))} of {n})"
    if prefix is None or prefix > tol:
        why = (f"it takes no prefix of the {n} tokens ({reason})" if prefix is None else
               f"the output at i depends on the length N by design (prefix consistency{taken}: {prefix:.1e})")
        if not decoding:
            return {"ok": None, "applicable": False, "error": prefix,
                    "detail": f"no output reads a later token ({future:.1e}), but {why}: CAB's prefix test does "
                              "not apply (nor incremental decoding, which the mixer does not declare)"}
        return {"ok": False, "error": prefix, "detail": f"declares decoding, but {why}"}
    row = {"ok": True, "error": max(future, prefix),
           "detail": f"no output reads a later token ({future:.1e}); prefix consistency{taken} ({prefix:.1e})"}
    if decoding:
        from attnzoo.layers import KVCache

        cache = KVCache()
        steps = torch.cat([module(x[:, t:t + 1], cache=cache, **kw) for t in range(n)], dim=1)
        dec = _err(steps, y)
        row["error"] = max(row["error"], dec)
        row["detail"] += f" + incremental decoding ({dec:.1e})"
        row["ok"] = dec <= tol
    return row


def check(slug: str, *, dim: int = 32, n: int = 12, m: int = 7, batch: int = 2, seed: int = 0, tol: float = 1e-4,
          mixer_kwargs: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run each declared pattern; returns ``{pattern: {"declared", "applicable", "ok", "error", "detail"}}``
    (``ok`` None for a pattern that is not declared, or not applicable: then ``detail`` says why).

    The mixer runs in its default configuration, or in its registry ``test_kwargs`` (windows that divide
    ``n``, segment sizes) when the default refuses CAB's inputs. A causal pattern fails when an output reads
    a later token; it is not applicable when no output does but the output depends on the length (grid
    windows placed by the extent) and the mixer does not declare decoding. A mixer class lists the patterns
    whose CAB inputs do not fit its contract, with the reason, in ``cab_not_applicable`` (a class attribute, or a
    property when it depends on the module's configuration)."""
    spec = check_mixer(slug)
    if "[" in slug:  # a variant label (moba[top_k=1]): its entry with its arguments
        mixer_kwargs = merge_kwargs(parse_mixer(slug), mixer_kwargs or {})
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    ctx = torch.randn(batch, m, dim, generator=g, dtype=torch.float64)
    module, note = _build_for(spec, dim, x, mixer_kwargs)
    declared = set(declared_patterns(slug))
    exempt: dict[str, str] = getattr(module, "cab_not_applicable", {})
    out: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for pat, (name, _) in CAB_PATTERNS.items():
            row: dict[str, Any] = {"name": name, "declared": pat in declared, "applicable": pat in declared,
                                   "ok": None, "error": None, "detail": ""}
            out[pat] = row
            if pat not in declared:
                continue
            if pat in exempt:
                row.update(applicable=False, detail=exempt[pat])
                continue
            try:
                if pat in ("NS", "NC"):
                    y = module(x) if pat == "NS" else module(x, context=ctx)
                    row["ok"] = tuple(y.shape) == tuple(x.shape) and bool(torch.isfinite(y).all())
                    row["detail"] = "shape and finite" if pat == "NS" else f"context length {m} != {n}"
                else:
                    kw = {"causal": True} if pat == "CS" else {"context": ctx}
                    row.update(_causal_row(module, x, kw, tol, pat == "CS" and "decoding" in spec.supports, g))
            except Exception as e:  # a declared pattern that does not run is a failed check
                row["ok"], row["detail"] = False, f"{type(e).__name__}: {e}"
            if note:
                row["detail"] += f"; {note}"
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
