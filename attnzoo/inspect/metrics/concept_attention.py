"""ConceptAttention (catalogue 11.18 ``concept_attention``): saliency maps from one-way concept
tokens in joint (MM-DiT style) attention.

Concept embeddings ``c`` ``[K, C]`` are appended to the layer's tokens ``x`` ``[N, C]`` and go
through the layer's own q/k/v projections. The joint attention is one-way, set by a
:class:`~attnzoo.patterns.Custom` pattern over the ``N + K`` positions: the original tokens
attend only to each other (so their outputs are exactly those of the layer without concepts),
and the concept tokens attend to the image tokens (``attend``, default all ``N`` tokens) and to
all the concept tokens. Both outputs go through the layer's output projection; the saliency of
concept ``k`` at token ``i`` is ``softmax_k ⟨o_i, o_k⟩`` (``space="output"``, after ``W_O``) or
with the per-head outputs before ``W_O`` concatenated (``space="heads"``).

Works on an attnzoo softmax mixer with ``project`` / ``output`` (e.g. :class:`~attnzoo.layers.
MultiHeadAttention`; rotary embeddings included, concepts taking positions ``N..N+K−1``) whose
layer has no pattern or score modifier of its own. Average the maps over layers (and diffusion
steps) as the paper does by calling it on each layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.inspect.metrics._common import metric
from attnzoo.ops import attention
from attnzoo.patterns import Custom

__all__ = ["concept_attention", "concept_saliency", "one_way_pattern"]

SPACES = ("output", "heads")


def _shape_error(name: str, expected: str, t: Any) -> ValueError:
    got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    return ValueError(f"{name}: expected shape {expected}, got {got}")


def one_way_pattern(n_tokens: int, attend: torch.Tensor | None = None) -> Custom:
    """Pattern over ``n_tokens + K`` positions: tokens ``< n_tokens`` see only tokens ``< n_tokens``;
    concept rows (``>= n_tokens``) see the tokens flagged by ``attend`` (bool ``[n_tokens]``,
    default all) and every concept."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens: expected an integer >= 1, got {n_tokens!r}")
    if attend is not None and (not isinstance(attend, torch.Tensor) or attend.dtype != torch.bool
                               or tuple(attend.shape) != (n_tokens,)):
        raise _shape_error("attend", f"bool [{n_tokens}]", attend)
    n = n_tokens

    def one_way(b, h, q, kv):
        kv = torch.as_tensor(kv)
        seen = kv < n
        if attend is not None:
            seen = seen & attend.to(kv.device)[kv.clamp(0, n - 1)]
        return torch.where(torch.as_tensor(q) < n, kv < n, seen | (kv >= n))

    return Custom(one_way, per_batch=False, per_head=False, name="one_way_concepts")


def concept_saliency(token_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """``softmax_k ⟨token_out[b, i], concept_out[b, k]⟩`` ``[B, N, K]`` (rows sum to 1 over concepts).

    ``token_out`` ``[B, N, E]``, ``concept_out`` ``[B, K, E]`` (or ``[K, E]``, shared by the batch).
    """
    if not isinstance(token_out, torch.Tensor) or token_out.dim() != 3:
        raise _shape_error("token_out", "[B, N, E]", token_out)
    b, _, e = token_out.shape
    given = concept_out
    if isinstance(concept_out, torch.Tensor) and concept_out.dim() == 2:
        concept_out = concept_out.expand(b, *concept_out.shape)
    if not isinstance(concept_out, torch.Tensor) or concept_out.dim() != 3 or concept_out.shape[0] != b \
            or concept_out.shape[2] != e:
        raise _shape_error("concept_out", f"[{b}, K, {e}] or [K, {e}]", given)
    return torch.softmax(token_out @ concept_out.transpose(1, 2).to(token_out.dtype), dim=-1)


@metric("concept_attention", priority=3, papers=("ConceptAttention",),
        summary="ConceptAttention: one-way concept tokens through the layer's q/k/v in joint attention; "
                "saliency = softmax over concepts of ⟨token output, concept output⟩.",
        reference="reference-backend joint attention under a one-way Custom pattern; token outputs equal the layer's",
        supports={"self"})
def concept_attention(layer: nn.Module, x: torch.Tensor, concepts: torch.Tensor, *,
                      attend: torch.Tensor | None = None, space: str = "output") -> dict[str, torch.Tensor]:
    """Concept saliency of one attention layer.

    Args:
        layer: an attnzoo softmax mixer with ``project``/``output`` (e.g. ``MultiHeadAttention``).
        x: the layer's input tokens ``[B, N, C]`` (image tokens, possibly with text tokens).
        concepts: concept embeddings ``[K, C]`` or ``[B, K, C]`` (in the same space as ``x``).
        attend: bool ``[N]``: the tokens concepts attend to (e.g. the image tokens; default all).
        space: ``"output"`` (after W_O) or ``"heads"`` (per-head outputs before W_O, concatenated).

    Returns:
        ``{"saliency": [B, N, K]`` (rows sum to 1), ``"token_out": [B, N, C]`` (equal to
        ``layer(x)``), ``"concept_out": [B, K, C]``, and for ``space="heads"`` the ``[B, N+K, H·D]``
        ``"z"`` the saliency used}.
    """
    from attnzoo.layers.base import AttentionMixer

    if not isinstance(layer, AttentionMixer):
        raise TypeError(f"layer: expected an attnzoo AttentionMixer (e.g. MultiHeadAttention), got "
                        f"{type(layer).__name__}")
    if layer.pattern is not None or layer.score_mod is not None or layer.call_pattern:
        raise ValueError("layer: concept_attention needs a layer without its own pattern or score_mod "
                         f"(got pattern={layer.pattern!r}, score_mod={layer.score_mod!r}"
                         f"{', and a pattern built per call' if layer.call_pattern else ''})")
    if space not in SPACES:
        raise ValueError(f"space: expected one of {SPACES}, got {space!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != layer.dim:
        raise _shape_error("x", f"[B, N, {layer.dim}]", x)
    b, n, c = x.shape
    given = concepts
    if isinstance(concepts, torch.Tensor) and concepts.dim() == 2:
        concepts = concepts.expand(b, *concepts.shape)
    if not isinstance(concepts, torch.Tensor) or concepts.dim() != 3 or concepts.shape[0] != b \
            or concepts.shape[2] != c or concepts.shape[1] < 1:
        raise _shape_error("concepts", f"[K, {c}] or [{b}, K, {c}] with K >= 1", given)
    xc = torch.cat([x, concepts.to(x.dtype)], dim=1)
    q, k, v = layer.project(xc, xc)
    if layer.qk_transform is not None:
        q, k = layer.qk_transform(q, k, q_offset=0, k_offset=0)
    z = attention(q, k, v, pattern=one_way_pattern(n, attend), scale=layer.attention_scale(q), backend="reference")
    z = layer.post_attention(z, xc)
    y = layer.output(z, xc)
    tok, con = y[:, :n], y[:, n:]
    out = {"token_out": tok, "concept_out": con}
    if space == "output":
        out["saliency"] = concept_saliency(tok, con)
    else:
        zc = z.transpose(1, 2).reshape(b, n + concepts.shape[1], -1)
        out["z"] = zc
        out["saliency"] = concept_saliency(zc[:, :n], zc[:, n:])
    return out
