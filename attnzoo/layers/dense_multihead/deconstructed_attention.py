"""``deconstructed_attention``: Causal attention ablations: no mixing, static learned weights, sigmoid
score, decoupled Q/K source.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    AttentionMixer,
    MultiHeadAttention,
    check_choice,
    check_int,
    head_dim_for,
    load_shared,
    seeded,
)
from attnzoo.layers.dense_multihead._common import FAMILY, rand_x
from attnzoo.ops import attention
from attnzoo.registry import Reduction, register


class DeconstructedAttention(AttentionMixer):
    """Deconstructing Attention: causal attention with one design principle relaxed (``mode``).

    - ``"none"``: no token mixing, ``y_t = W_O W_V x_t`` (every token attends only to itself).
    - ``"static"``: learned, sequence-independent weights ``y_t = Σ_{s≤t} W_ts V x_s`` with
      ``W = softmax`` over the allowed keys of a learned logit table ``[H, max_len, max_len]``
      (zero-initialised: a running mean); positions are absolute (``max_len`` bounds them).
    - ``"alt_score"``: a score other than dot product + softmax. The abstract does not give
      the form; here it is sigmoid weighting without normalisation,
      ``a_ij = σ(q_i·k_j/√d − log n_i)`` over the ``n_i`` keys row i may see (the
      ``−log n`` bias of sigmoid attention keeps the row mass O(1)).
    - ``"decoupled_qk"``: Q and K come from another hidden state passed as
      ``layer(x, qk_source=h)`` (a fixed other layer's output, ``qk_dim`` wide), V from
      ``x``; without ``qk_source`` it is ``mha`` on ``x``.

    Checked against the abstract (Deconstructing Attention): the four principles (token
    mixing, sequence-dependent activations, "dot-product similarities plus softmax
    weighting", queries and keys coupled to "evolving hidden states") and variants that
    relax them "applied both uniformly across all layers and in hybrid architectures"
    (stack them, or interleave with ``mha``). Every mode is causal with ``causal=True`` and
    decodes through a :class:`KVCache`. Self-attention only.
    """

    cross_ok = False
    MODES = ("none", "static", "alt_score", "decoupled_qk")

    def __init__(self, dim: int, n_heads: int = 8, *, mode: str = "static", max_len: int = 256,
                 head_dim: int | None = None, qk_dim: int | None = None, bias: bool = True, pattern: Any = None,
                 backend: str = "auto") -> None:
        check_int("n_heads", n_heads)
        head_dim = head_dim_for(dim, n_heads, head_dim)
        super().__init__(dim, pattern=pattern, backend=backend)
        self.mode = check_choice("mode", mode, self.MODES)
        self.n_heads, self.head_dim = n_heads, check_int("head_dim", head_dim)
        self.max_len = check_int("max_len", max_len)
        width = n_heads * head_dim
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.o_proj = nn.Linear(width, dim, bias=bias)
        if mode in ("alt_score", "decoupled_qk"):
            qk_in = dim if qk_dim is None else check_int("qk_dim", qk_dim)
            self.q_proj = nn.Linear(qk_in if mode == "decoupled_qk" else dim, width, bias=bias)
            self.k_proj = nn.Linear(qk_in if mode == "decoupled_qk" else dim, width, bias=bias)
        if mode == "static":
            from attnzoo.layers.cache import window_of

            if window_of(pattern) is not None:
                raise ValueError("pattern: mode='static' uses absolute positions, which a windowed (trimmed) "
                                 "cache would break")
            self.static_logits = nn.Parameter(torch.zeros(n_heads, max_len, max_len))

    def forward(self, x, *, qk_source: torch.Tensor | None = None, **kw: Any):
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``; ``qk_source`` ``[B, N, qk_dim]`` for ``mode="decoupled_qk"``.

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        if qk_source is not None:
            if self.mode != "decoupled_qk":
                raise ValueError(f"qk_source: only mode='decoupled_qk' takes it, this layer has mode={self.mode!r}")
            want = (x.shape[0], x.shape[1], self.q_proj.in_features)
            if not isinstance(qk_source, torch.Tensor) or tuple(qk_source.shape) != want:
                got = list(qk_source.shape) if isinstance(qk_source, torch.Tensor) else type(qk_source).__name__
                raise ValueError(f"qk_source: expected a tensor {list(want)}, got {got}")
        elif self.mode == "decoupled_qk" and self.q_proj.in_features != self.dim:
            raise ValueError(f"qk_source: mode='decoupled_qk' with qk_dim={self.q_proj.in_features} != dim={self.dim} "
                             "needs qk_source (without it Q and K come from x, which needs qk_dim == dim)")
        return self.mix(x, extra={"qk_source": qk_source}, **kw)

    def project(self, x, src, call=None):
        split = MultiHeadAttention.split
        v = split(self.v_proj(x), self.n_heads)
        if self.mode in ("none", "static"):
            blank = x.new_zeros(x.shape[0], self.n_heads, x.shape[1], 1)
            return blank, blank, v
        qk_source = None if call is None else call.extra.get("qk_source")
        h = x if qk_source is None else qk_source.to(x.dtype)
        return split(self.q_proj(h), self.n_heads), split(self.k_proj(h), self.n_heads), v

    def attend(self, q, k, v, pattern, want_weights, call=None):
        from attnzoo.ops.layout import Shape
        from attnzoo.patterns import Bias

        b, h, n, _ = q.shape
        m = k.shape[2]
        if self.mode == "none":
            weights = None
            if want_weights:
                weights = torch.eye(m, dtype=v.dtype, device=v.device)[m - n:].expand(b, h, n, m)
            return v[:, :, m - n:], weights
        if self.mode == "static":
            if m > self.max_len:
                raise ValueError(f"x: mode='static' was built for max_len={self.max_len} positions, got {m}")
            bias = self.static_logits[:, m - n:m, :m].unsqueeze(0).to(v.dtype)
            res = attention(q, k, v, pattern=pattern, score_mod=Bias(bias), scale=1.0,
                            backend="reference" if want_weights else self.backend, return_weights=want_weights)
            return (res[0], res[1]) if want_weights else (res, None)
        if self.mode == "decoupled_qk":
            return super().attend(q, k, v, pattern, want_weights, call=call)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        allowed = (torch.ones(1, 1, n, m, dtype=torch.bool, device=q.device) if pattern is None
                   else pattern.dense_mask(Shape(b, h, n, m), q.device))
        count = allowed.sum(-1, keepdim=True).clamp(min=1).to(s.dtype)
        a = torch.sigmoid(s - torch.log(count)) * allowed.to(s.dtype)
        return torch.matmul(a, v), (a if want_weights else None)

    def output(self, z, x):
        return self.o_proj(MultiHeadAttention.merge(z))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, mode={self.mode!r}"


def _deconstructed(mode: str, seed: int = 0) -> DeconstructedAttention:
    m = seeded(DeconstructedAttention, seed, dim=32, n_heads=4, mode=mode, max_len=16)
    if mode == "static":
        with torch.no_grad():
            m.static_logits.normal_(generator=torch.Generator().manual_seed(seed))
    return m


def _dec_causal() -> tuple[torch.Tensor, torch.Tensor]:
    got, want = [], []
    x, h = rand_x(n=12), rand_x(n=12, seed=7)
    for mode in DeconstructedAttention.MODES:
        m = _deconstructed(mode)
        kw = {"qk_source": h} if mode == "decoupled_qk" else {}
        y = m(x, causal=True, **kw)
        for t in (0, 4, 9):
            x2, h2 = x.clone(), h.clone()
            x2[:, t + 1:] += 1.0
            h2[:, t + 1:] -= 1.0
            kw2 = {"qk_source": h2} if mode == "decoupled_qk" else {}
            got.append(m(x2, causal=True, **kw2)[:, : t + 1])
            want.append(y[:, : t + 1])
    return torch.cat(got, 1), torch.cat(want, 1)


def _dec_decoding() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache

    got, want = [], []
    x, h = rand_x(n=11), rand_x(n=11, seed=7)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[1, 3] = False
    for mode in DeconstructedAttention.MODES:
        m = _deconstructed(mode)
        kw = (lambda a, b: {"qk_source": h[:, a:b]}) if mode == "decoupled_qk" else (lambda a, b: {})
        want.append(m(x, causal=True, mask=keep, **kw(0, 11)))
        cache, start, parts = KVCache(), 0, []
        for size in (4, 1, 3, 2, 1):
            parts.append(m(x[:, start:start + size], causal=True, mask=keep[:, start:start + size], cache=cache,
                           **kw(start, start + size)))
            start += size
        got.append(torch.cat(parts, 1))
    return torch.stack(got), torch.stack(want)


def _dec_none_jacobian() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("none")
    x = rand_x(b=1, n=5)
    jac = torch.autograd.functional.jacobian(lambda t: m(t, causal=True), x)  # [1, 5, 32, 1, 5, 32]
    eye = torch.eye(5, dtype=torch.bool).view(1, 5, 1, 1, 5, 1)
    return jac.masked_fill(eye, 0.0), torch.zeros_like(jac)


def _dec_static_content_free() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("static")
    _, w1 = m(rand_x(), causal=True, return_weights=True)
    _, w2 = m(rand_x(seed=3) * 4.0, causal=True, return_weights=True)
    return w2, w1


def _dec_alt_score_form() -> tuple[torch.Tensor, torch.Tensor]:
    m = _deconstructed("alt_score")
    x = rand_x()
    q, k, _ = m.project(x, x)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    n = torch.arange(1, 11, dtype=torch.float64).view(1, 1, -1, 1)
    want = torch.sigmoid(s - n.log()) * torch.ones(10, 10, dtype=torch.bool).tril()
    return m(x, causal=True, return_weights=True)[1], want


def _dec_decoupled_self_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    d = _deconstructed("decoupled_qk")
    ref = MultiHeadAttention(32, 4).double()
    load_shared(d, ref)
    x = rand_x()
    return d(x, causal=True, qk_source=x), ref(x, causal=True)


register(
    "deconstructed_attention", family=FAMILY, type="mixer", priority=3, papers=("Deconstructing Attention",),
    supports={"self", "causal", "padding", "decoding"},
    summary="Causal attention ablations: no mixing, static learned weights, sigmoid score, decoupled Q/K source.",
    test_kwargs={"dim": 32, "n_heads": 4, "mode": "alt_score"},
    reductions=(
        Reduction("every_mode_causal", "every mode is causal (prefix outputs ignore later tokens)", _dec_causal),
        Reduction("every_mode_decodes", "every mode decodes through the KV cache exactly (with padding)",
                  _dec_decoding),
        Reduction("none_block_diagonal", "mode none has a block-diagonal Jacobian", _dec_none_jacobian),
        Reduction("static_content_free", "static weights do not change when token contents change",
                  _dec_static_content_free),
        Reduction("alt_score_form", "alt_score weights are sigmoid(q·k/√d − log n_i) on allowed keys",
                  _dec_alt_score_form),
        Reduction("decoupled_self_is_mha", "decoupled_qk with qk_source = x is mha", _dec_decoupled_self_is_mha),
    ),
)(DeconstructedAttention)


