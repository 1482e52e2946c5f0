"""``reference_attention``: extended self-attention: queries also attend to the keys and values of a reference
pass (FreeCustom, IR-Diffusion, DiffUHaul, BLD video editing)."""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from attnzoo.inspect._edits import attention_layers
from attnzoo.inspect.steering._common import COMMON, SteeringWrapper, check_targets, tiny_dit, tiny_lm
from attnzoo.inspect.steering.attention_injection import as_args
from attnzoo.ops import attention
from attnzoo.patterns import KeyPadding
from attnzoo.registry import Reduction, register


@contextlib.contextmanager
def _wrapped_attend(model: nn.Module, layers: list[int], make: Any) -> Iterator[None]:
    """Wrap ``attend`` of the given attnzoo mixers (instance attributes, removed or restored on exit)."""
    found = attention_layers(model)
    undo = []
    try:
        for i in layers:
            m = found[i][1]
            saved = m.__dict__.get("attend")
            inner = saved or types.MethodType(type(m).attend, m)
            m.attend = types.MethodType(make(i, m, inner), m)
            undo.append((m, saved))
        yield
    finally:
        for m, saved in reversed(undo):
            if saved is None:
                m.__dict__.pop("attend", None)
            else:
                m.__dict__["attend"] = saved


class ReferenceAttention(SteeringWrapper):
    """``out = softmax(Q [K_ref; K]ᵀ/√d + B) [V_ref; V]`` on ``layers`` (default: the host's
    ``self_layers`` if it has them, else all).

    ``reference``: the host's arguments for the reference pass (a tuple, or one tensor/list as the
    first argument; batch 1 or the target's); its keys and values (after rotary) are recorded at
    every call. The reference keys are visible to every query (causal hosts included).
    ``reference_mask`` bool ``[M]`` drops reference tokens (FreeCustom: tokens outside the concept
    masks), ``weight`` scales the kept ones' attention (adds ``log w`` to their logits). The two
    key sets are merged exactly by their log-sum-exp. With the reference equal to the input it is
    self-attention (duplicated keys); with every reference key masked it is the original layer.
    attnzoo hosts only. Captured weights are those of the host's own keys.
    """

    single_pass = False

    def __init__(self, host: nn.Module, reference: Any, *, reference_mask: Any = None, weight: float = 1.0,
                 layers: Any = None) -> None:
        super().__init__(host)
        from attnzoo.layers.base import AttentionMixer

        if not all(isinstance(m, AttentionMixer) for _, m in attention_layers(host)):
            raise TypeError("reference_attention: the host's attention layers must be attnzoo mixers")
        if not (float(weight) > 0 and math.isfinite(float(weight))):
            raise ValueError(f"weight: expected a finite number > 0, got {weight!r}")
        self.reference = as_args(reference)
        self.weight = float(weight)
        self.reference_mask = None if reference_mask is None else torch.as_tensor(reference_mask)
        if self.reference_mask is not None and (self.reference_mask.dtype != torch.bool or
                                                self.reference_mask.dim() != 1):
            raise ValueError(f"reference_mask: expected a bool mask [M] over the reference tokens, got "
                             f"{self.reference_mask.dtype} {list(self.reference_mask.shape)}")
        default = getattr(host, "self_layers", None) if layers is None else layers
        self.layers = list(check_targets(host, default))

    def record(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[B_ref, H_kv, M, D]`` per layer from the reference pass."""
        got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def make(i, m, inner):
            def attend(self, q, k, v, pattern, want_weights, call=None):
                got[i] = (k.detach(), v.detach())
                return inner(q, k, v, pattern, want_weights, call=call)
            return attend

        with _wrapped_attend(self.host, self.layers, make):
            self.host(*self.reference)
        return got

    def _extended(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
        def make(i, m, inner):
            k_ref, v_ref = kv[i]

            def attend(self, q, k, v, pattern, want_weights, call=None):
                b, m_ref = q.shape[0], k_ref.shape[2]
                if k_ref.shape[0] not in (1, b) or k_ref.shape[1] != k.shape[1] or k_ref.shape[3] != k.shape[3]:
                    raise ValueError(f"reference: recorded keys {list(k_ref.shape)} do not fit this layer's keys "
                                     f"{list(k.shape)} (batch 1 or {b}, same heads and width)")
                kr, vr = k_ref.expand(b, -1, -1, -1).to(k.dtype), v_ref.expand(b, -1, -1, -1).to(v.dtype)
                scale = self.attention_scale(q)
                keep = None
                if outer.reference_mask is not None:
                    if outer.reference_mask.numel() != m_ref:
                        raise ValueError(f"reference_mask: {outer.reference_mask.numel()} entries, the reference "
                                         f"has {m_ref} tokens")
                    keep = outer.reference_mask.to(q.device).expand(b, -1)
                res = attention(q, k, v, pattern=pattern, score_mod=self.score_mod_for(q, k, call=call), scale=scale,
                                backend="reference" if want_weights else self.backend, return_weights=want_weights,
                                return_lse=True)
                z1, lse1 = res[0], res[-1]
                z2, lse2 = attention(q, kr, vr, pattern=None if keep is None or bool(keep.all()) else KeyPadding(keep),
                                     scale=scale, backend=self.backend, return_lse=True)
                lse2 = lse2 + math.log(outer.weight)
                tot = torch.logaddexp(lse1, lse2)
                ok = torch.isfinite(tot)
                a1 = torch.where(ok, torch.exp(lse1 - tot.where(ok, 0)), 0).unsqueeze(-1)
                a2 = torch.where(ok, torch.exp(lse2 - tot.where(ok, 0)), 0).unsqueeze(-1)
                z = z1 * a1.to(z1.dtype) + z2 * a2.to(z2.dtype)
                return z, (res[1] * a1.to(res[1].dtype) if want_weights else None)
            return attend

        outer = self
        return make

    def run(self, *args: Any, **kwargs: Any) -> Any:
        kv = self.record()
        with _wrapped_attend(self.host, self.layers, self._extended(kv)):
            return self.host(*args, **kwargs)


def _reference_is_input() -> tuple[torch.Tensor, torch.Tensor]:
    host, (x, t, text) = tiny_dit()
    return ReferenceAttention(host, (x, t, text))(x, t, text), host(x, t, text)


def _all_reference_masked() -> tuple[torch.Tensor, torch.Tensor]:
    host, tokens = tiny_lm()
    ref = ReferenceAttention(host, tokens[1:], reference_mask=torch.zeros(9, dtype=torch.bool))
    return ref(tokens), host(tokens)


register(
    "reference_attention", priority=2, papers=("FreeCustom", "IR-Diffusion", "DiffUHaul", "BLD video editing"),
    supports={"self", "causal", "padding"},
    reference="softmax(Q[K_ref; K]ᵀ/√d)[V_ref; V] by an exact log-sum-exp merge of the two key sets",
    summary="Extended self-attention: queries also attend to a reference pass's keys and values (masked, weighted).",
    test_kwargs={"reference": [[7, 7, 1, 2, 3]], "weight": 2.0, "reference_mask": [True, False, True, True, True]},
    reductions=(Reduction("reference_is_input", "reference = input gives self-attention", _reference_is_input),
                Reduction("all_masked", "every reference key masked reproduces the original", _all_reference_masked)),
    **COMMON,
)(ReferenceAttention)
