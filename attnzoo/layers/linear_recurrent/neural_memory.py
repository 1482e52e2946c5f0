"""Catalogue section 5.7, ``neural_memory``: test-time-trained associative memory (Titans, Miras).

A memory ``M`` (a linear map or a 2-layer MLP, one per head; its initial weights are learned)
is written online by gradient steps on an attentional-bias loss ``ℓ(M; k_t, v_t)``:

    S_t = η_t S_{t−1} − θ_t ∇ℓ(M; k_t, v_t),      M_t = (1 − α_t) M_{t−1} + S_t,      y_t = M_t(q_t)

(momentum η, learning rate θ, retention / forget gate α; each a constant, data-dependent
``σ(x W)`` per head and token, or off). Training is chunk-parallel as in Titans: inside a chunk
of ``chunk_size`` tokens every gradient is taken at the chunk's initial weights (mini-batch
gradient descent), and the two linear recurrences above run as decay-weighted sums in log
space; chunks run one after another. ``chunk_size = 1`` is the fully sequential update. The
chunk size is a property of the model, not only of the kernel: different chunk sizes give
different (equally valid) memories, so decoding keeps the chunk-start weights and continues
mid-chunk exactly.

Losses: ``l2`` ½‖M(k) − v‖² (so linear M, η = α = 0, chunk 1 is the delta rule with β = θ),
``dot`` −⟨M(k), v⟩ (linear M, θ = 1, no momentum or retention: linear attention), ``lp``
(1/p)Σ|M(k) − v|^p and ``huber``. Presets [recalled, approximate]: ``titans`` (MLP, l2,
momentum, weight-decay retention), ``moneta`` (ℓ_3 loss), ``yaad`` (Huber loss), ``memora``
(l2); the Miras papers' ℓ_q / KL retention normalisations are not implemented (plain weight
decay retention stands in). Compositions [recalled]: ``none``; ``mal`` (memory layer, then
causal sliding-window attention); ``mag`` (sliding-window attention gated by σ(memory
output)); ``mac`` (memory as context: each segment of ``chunk_size`` tokens attends causally
over ``[persistent tokens, memory read-outs M_{t−1}(q) of the segment, the segment]``; the
memory is then written with the attention outputs ``y`` and the output is ``y ⊗ σ(M_t(y))``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.layers.base import (
    MultiHeadAttention,
    check_choice,
    check_int,
    check_mixer_input,
    head_dim_for,
    zero_padded,
)
from attnzoo.layers.cache import KVCache
from attnzoo.layers.linear_recurrent._common import FAMILY, rand_x
from attnzoo.layers.recurrent import HeadRMSNorm, cache_state, merge_heads, split_heads
from attnzoo.ops import attention
from attnzoo.ops.linear import delta_rule, linear_attention
from attnzoo.patterns import Custom, KeyPadding, SlidingWindow
from attnzoo.registry import Reduction, register

LOSSES = ("l2", "dot", "lp", "huber")
PRESETS: dict[str, dict[str, Any]] = {
    "titans": {"memory": "mlp", "loss": "l2", "momentum": None, "retention": None},
    "moneta": {"memory": "mlp", "loss": "lp", "p": 3.0, "momentum": None, "retention": None},
    "yaad": {"memory": "mlp", "loss": "huber", "momentum": None, "retention": None},
    "memora": {"memory": "mlp", "loss": "l2", "momentum": None, "retention": None},
}


def _loss_grad(err: torch.Tensor, v: torch.Tensor, loss: str, p: float, delta: float) -> torch.Tensor:
    """dℓ/d(prediction) for ``err = M(k) − v``."""
    if loss == "l2":
        return err
    if loss == "dot":
        return -v
    if loss == "lp":
        return err.sign() * err.abs().pow(p - 1)
    return err.clamp(-delta, delta)  # huber


def _act(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU and its derivative."""
    s = torch.sigmoid(h)
    return h * s, s * (1 + h * (1 - s))


def read(params: list[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """``M(q)`` for per-token weights: ``params[i]`` ``[..., L, out, in]``, ``q`` ``[..., L, D_k]``."""
    if len(params) == 1:
        return (params[0] @ q.unsqueeze(-1)).squeeze(-1)
    h = (params[0] @ q.unsqueeze(-1)).squeeze(-1)
    return (params[1] @ _act(h)[0].unsqueeze(-1)).squeeze(-1)


def grads(params: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, loss: str, p: float, delta: float
          ) -> list[torch.Tensor]:
    """Per-token ``∇ℓ`` ``[B, H, L, out, in]`` at weights ``params[i]`` ``[B, H, out, in]``, keys ``[B, H, L, D]``."""
    if len(params) == 1:
        w = params[0]
        err = k @ w.transpose(-1, -2) - v
        r = _loss_grad(err, v, loss, p, delta)
        return [r.unsqueeze(-1) * k.unsqueeze(-2)]
    w1, w2 = params
    h = k @ w1.transpose(-1, -2)  # [B, H, L, hidden]
    a, da = _act(h)
    err = a @ w2.transpose(-1, -2) - v
    r = _loss_grad(err, v, loss, p, delta)  # [B, H, L, D_v]
    g2 = r.unsqueeze(-1) * a.unsqueeze(-2)
    dh = (r @ w2) * da
    g1 = dh.unsqueeze(-1) * k.unsqueeze(-2)
    return [g1, g2]


def _decay_matrix(log_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, e)``: ``D_ts = exp(c_t − c_s)`` (s <= t, else 0) and ``e_t = exp(c_t)``, ``c`` = cumsum of ``log_a``."""
    c = log_a.cumsum(-1)
    n = c.shape[-1]
    tri = torch.ones(n, n, dtype=torch.bool, device=c.device).tril()
    return torch.where(tri, c.unsqueeze(-1) - c.unsqueeze(-2), -math.inf).exp(), c.exp()


def memory_update(q, k, v, lr, momentum, retention, active, state, *, loss="l2", p=3.0, delta=1.0):
    """One chunk (or the rest of one) of the memory recurrence, all tokens at once.

    ``q, k`` ``[B, H, L, D_k]``, ``v`` ``[B, H, L, D_v]``; ``lr`` θ, ``momentum`` η (or None: no
    momentum), ``retention`` α (or None), ``active`` (1 = a real token, 0 = an identity step)
    ``[B, H, L]``. ``state``: ``{"M0": chunk-start weights, "M": current, "S": momentum}`` (lists
    of ``[B, H, out, in]``). Returns ``(y [B, H, L, D_v], new state)``.
    """
    g = grads(state["M0"], k, v, loss, p, delta)
    upd = [-(lr * active)[..., None, None] * gi for gi in g]  # u_t = −θ_t ∇ℓ_t
    tiny = torch.finfo(lr.dtype).tiny
    if momentum is not None:  # S_t = η'_t S_{t−1} + u_t, η' = 1 on identity steps
        eta = momentum * active + (1 - active)
        d, e = _decay_matrix(eta.clamp(min=tiny).log())
        s_all = [torch.einsum("bhts,bhs...->bht...", d, u) + e[..., None, None] * s0.unsqueeze(2)
                 for u, s0 in zip(upd, state["S"])]
    else:
        s_all = upd
    # M_t = (1 − α_t a_t) M_{t−1} + a_t S_t  (a_t: active; the write is skipped on identity steps)
    writes = [s * active[..., None, None] for s in s_all]
    if retention is not None:
        keep = (1 - retention * active).clamp(min=tiny)
        d, e = _decay_matrix(keep.log())
        m_all = [torch.einsum("bhts,bhs...->bht...", d, w) + e[..., None, None] * m0.unsqueeze(2)
                 for w, m0 in zip(writes, state["M"])]
    else:
        m_all = [w.cumsum(2) + m0.unsqueeze(2) for w, m0 in zip(writes, state["M"])]
    y = read(m_all, q)
    new = {"M0": state["M0"], "M": [m[:, :, -1] for m in m_all],
           "S": [s[:, :, -1] for s in s_all] if momentum is not None else state["S"]}
    return y, new


class NeuralMemory(nn.Module):
    """Titans / Miras neural memory as a token mixer (see the module docstring).

    Args:
        memory: ``"linear"`` (``M(k) = W k``) or ``"mlp"`` (``W₂ silu(W₁ k)``, width ``hidden``).
        loss: ``l2``, ``dot``, ``lp`` (exponent ``p``) or ``huber`` (``delta``).
        lr, momentum, retention: θ, η, α: ``None`` data-dependent (``σ(x W)`` per head, θ
            times ``lr_scale``), a float constant, or ``False`` (off; θ cannot be off).
        chunk_size: tokens whose gradients share the chunk-start weights (1: sequential); the
            segment length of ``mac``.
        composition: ``none``, ``mal`` or ``mag`` (with causal sliding-window attention of
            ``window`` keys) or ``mac`` (with ``n_persistent`` learned persistent tokens).
        preset: ``titans``, ``moneta``, ``yaad``, ``memora`` (override the arguments above).
        init_zero: start the memory from zero weights (default: learned random weights).
    """

    def __init__(self, dim: int, n_heads: int = 4, *, head_dim: int | None = None, memory: str = "linear",
                 hidden: int | None = None, loss: str = "l2", p: float = 3.0, delta: float = 1.0, lr: Any = None,
                 lr_scale: float = 1.0, momentum: Any = None, retention: Any = None, chunk_size: int = 16,
                 composition: str = "none", window: int = 16, n_persistent: int = 4, preset: str | None = None,
                 qk_norm: bool = True, init_zero: bool = False, bias: bool = False) -> None:
        super().__init__()
        if preset is not None:
            cfg = PRESETS[check_choice("preset", preset, tuple(PRESETS))]
            memory, loss = cfg["memory"], cfg["loss"]
            p, momentum, retention = cfg.get("p", p), cfg["momentum"], cfg["retention"]
        self.preset = preset
        self.dim, self.n_heads = check_int("dim", dim), check_int("n_heads", n_heads)
        self.head_dim = hd = head_dim_for(dim, n_heads, head_dim)
        self.memory = check_choice("memory", memory, ("linear", "mlp"))
        self.loss = check_choice("loss", loss, LOSSES)
        self.p, self.delta, self.lr_scale = float(p), float(delta), float(lr_scale)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.composition = check_choice("composition", composition, ("none", "mal", "mag", "mac"))
        if lr is False:
            raise ValueError("lr: the learning rate θ cannot be off (pass a float or None)")
        self.qk_norm = bool(qk_norm)
        width = n_heads * hd
        self.q_proj = nn.Linear(dim, width, bias=bias)
        self.k_proj = nn.Linear(dim, width, bias=bias)
        self.v_proj = nn.Linear(dim, width, bias=bias)
        self.gates = nn.ModuleDict()
        self.constants: dict[str, float | None] = {}
        for name, value in (("lr", lr), ("momentum", momentum), ("retention", retention)):
            if value is None:
                self.gates[name] = nn.Linear(dim, n_heads, bias=True)
                self.constants[name] = None
            elif value is False:
                self.constants[name] = False
            else:
                if not 0.0 <= float(value) <= (1.0 if name != "lr" else math.inf):
                    raise ValueError(f"{name}: expected None, False or a float in [0, 1], got {value!r}")
                self.constants[name] = float(value)
        hid = hidden if hidden is not None else 2 * hd
        shapes = [(hd, hd)] if self.memory == "linear" else [(check_int("hidden", hid), hd), (hd, hid)]
        self.init = nn.ParameterList(
            nn.Parameter(torch.zeros(n_heads, o, i) if init_zero else torch.randn(n_heads, o, i) / math.sqrt(i))
            for o, i in shapes)
        self.norm = HeadRMSNorm(hd)
        self.o_proj = nn.Linear(width, dim, bias=bias)
        if self.composition in ("mal", "mag"):
            self.window = check_int("window", window)
            self.swa = MultiHeadAttention(dim, n_heads, head_dim=hd, pattern=SlidingWindow(self.window, causal=True),
                                          bias=bias)
        elif self.composition == "mac":
            self.persistent = nn.Parameter(torch.randn(check_int("n_persistent", n_persistent), dim) * dim ** -0.5)
            self.attn = MultiHeadAttention(dim, n_heads, head_dim=hd, bias=bias)

    def _gate(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        c = self.constants[name]
        if c is False:
            return None
        b, n, _ = x.shape
        if c is None:
            g = torch.sigmoid(self.gates[name](x)).transpose(1, 2)  # [B, H, N]
            return g * self.lr_scale if name == "lr" else g
        return torch.full((b, self.n_heads, n), c, dtype=x.dtype, device=x.device)

    def initial_state(self, b: int, dtype: torch.dtype) -> dict[str, Any]:
        w = [p.to(dtype).unsqueeze(0).expand(b, *p.shape) for p in self.init]
        return {"M0": w, "M": w, "S": [torch.zeros_like(t) for t in w], "pos": 0}

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The memory's queries, keys and values ``[B, H, N, D]`` (SiLU, L2-normalised q and k)."""
        h = self.n_heads
        q, k = split_heads(F.silu(self.q_proj(x)), h), split_heads(F.silu(self.k_proj(x)), h)
        v = split_heads(F.silu(self.v_proj(x)), h)
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v

    def _active(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        if mask is None:
            return torch.ones(b, self.n_heads, n, dtype=x.dtype, device=x.device)
        return mask[:, None, :].to(x.dtype).expand(b, self.n_heads, n)

    def memory_read(self, x: torch.Tensor, mask: torch.Tensor | None, state: dict[str, Any] | None
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The memory outputs ``[B, N, H * D]`` for ``x`` (and the state after it)."""
        b, n, _ = x.shape
        h = self.n_heads
        q, k, v = self.qkv(x)
        lr, mom, ret = self._gate("lr", x), self._gate("momentum", x), self._gate("retention", x)
        active = self._active(x, mask)
        st = self.initial_state(b, x.dtype) if state is None else state
        outs, start = [], 0
        while start < n:
            pos = st["pos"]
            if pos % self.chunk_size == 0:
                st = {**st, "M0": st["M"]}  # a new chunk: gradients at the current weights
            size = min(self.chunk_size - pos % self.chunk_size, n - start)
            sl = slice(start, start + size)
            y, new = memory_update(q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl],
                                   None if mom is None else mom[:, :, sl], None if ret is None else ret[:, :, sl],
                                   active[:, :, sl], st, loss=self.loss, p=self.p, delta=self.delta)
            st = {**new, "pos": pos + size}
            outs.append(y)
            start += size
        y = torch.cat(outs, 2) if outs else v.new_zeros(b, h, 0, self.head_dim)
        return merge_heads(self.norm(y)), st

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (always causal).

        ``mask``: bool ``[B, N]``, True = keep (a real token), False = padding.
        """
        check_mixer_input(x, mask, context, self.dim)
        if context is not None:
            raise ValueError("context: neural_memory is a causal self-attention mixer")
        cst = cache_state(cache, "neural_memory", x.shape[0])
        xm = zero_padded(x, mask) if mask is not None else x
        if self.composition == "mac":
            y = self._memory_as_context(xm, mask, cst)
            if cache is not None:
                cache.advance(x.shape[1])
            return zero_padded(y, mask)
        mem, st = self.memory_read(xm, mask, None if cst is None else cst.get("memory"))
        swa_cache = None
        if cst is not None:
            cst["memory"] = st
            swa_cache = cst.setdefault("swa", KVCache())
        mem = self.o_proj(mem)
        if self.composition == "mal":
            y = self.swa(mem, mask=mask, causal=True, cache=swa_cache)
        elif self.composition == "mag":
            y = self.swa(x, mask=mask, causal=True, cache=swa_cache) * torch.sigmoid(mem)
        else:
            y = mem
        if cache is not None:
            cache.advance(x.shape[1])
        return zero_padded(y, mask)

    def _memory_as_context(self, x: torch.Tensor, mask: torch.Tensor | None, cst: dict[str, Any] | None
                           ) -> torch.Tensor:
        """MAC: per segment, causal attention over [persistent, memory read-outs, segment]; then write y."""
        b, n, _ = x.shape
        size_c = self.chunk_size
        st = cst.get("memory") if cst is not None else None
        st = self.initial_state(b, x.dtype) if st is None else st
        seg = cst.get("segment") if cst is not None else None
        outs, start = [], 0
        while start < n:
            pos = st["pos"]
            off = pos % size_c
            if off == 0 or seg is None:  # a new segment: fresh context, reads from the memory as it is now
                st = {**st, "M0": st["M"]}
                pers = self.persistent.to(x.dtype).unsqueeze(0).expand(b, -1, -1)
                seg = KVCache()
                seg.append(*self._mac_kv(pers), None)
                seg.state["kv_pos"] = torch.full((pers.shape[1],), -1, device=x.device)
            size = min(size_c - off, n - start)
            xp = x[:, start:start + size]
            mp = None if mask is None else mask[:, start:start + size]
            # read-outs of the memory at the segment start (no write): h_t = M_{s-1}(q_t)
            q_mem, _, _ = self.qkv(xp)
            m0 = [w.unsqueeze(2).expand(*w.shape[:2], size, *w.shape[2:]) for w in st["M0"]]
            h_tok = self.o_proj(merge_heads(self.norm(read(m0, q_mem))))
            q = self.attn.split(self.attn.q_proj(xp), self.attn.n_heads)
            seg.append(*self._mac_kv(h_tok), mp)
            seg.append(*self._mac_kv(xp), mp)
            here = torch.arange(off, off + size, device=x.device)
            seg.state["kv_pos"] = kv_pos = torch.cat([seg.state["kv_pos"], here, here])
            pattern = Custom(lambda _b, _h, qi, ki, kv_pos=kv_pos, here=here: kv_pos[ki] <= here[qi],
                             per_batch=False, per_head=False, name="mac_causal")
            if seg.keep is not None and not bool(seg.keep.all()):
                pattern = pattern & KeyPadding(seg.keep)
            y = self.attn.output(attention(q, seg.k, seg.v, pattern=pattern, backend=self.attn.backend), xp)
            # write the attention outputs to the memory, read M_t(y) back as the gate
            qy, ky, vy = self.qkv(y)
            lr, mom, ret = self._gate("lr", y), self._gate("momentum", y), self._gate("retention", y)
            read_y, new = memory_update(qy, ky, vy, lr, mom, ret, self._active(y, mp), st, loss=self.loss, p=self.p,
                                        delta=self.delta)
            st = {**new, "pos": pos + size}
            outs.append(y * torch.sigmoid(self.o_proj(merge_heads(self.norm(read_y)))))
            start += size
        if cst is not None:
            cst["memory"], cst["segment"] = st, seg
        return torch.cat(outs, 1) if outs else x.new_zeros(b, 0, self.dim)

    def _mac_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn
        return a.split(a.k_proj(src), a.n_kv_heads), a.split(a.v_proj(src), a.n_kv_heads)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_heads={self.n_heads}, memory={self.memory}, loss={self.loss}, "
                f"chunk_size={self.chunk_size}, composition={self.composition}, preset={self.preset}")


def _qkv(m: NeuralMemory, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = m.n_heads
    q, k = split_heads(F.silu(m.q_proj(x)), h), split_heads(F.silu(m.k_proj(x)), h)
    v = split_heads(F.silu(m.v_proj(x)), h)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v


def _mem(seed: int = 0, **kw: Any) -> NeuralMemory:
    torch.manual_seed(seed)
    return NeuralMemory(**{"dim": 32, "n_heads": 4, **kw}).double()


def _raw_read(m: NeuralMemory, x: torch.Tensor) -> torch.Tensor:
    """The memory outputs before the norm, ``[B, H, N, D]``."""
    norm = m.norm
    m.norm = nn.Identity()
    try:
        y, _ = m.memory_read(x, None, None)
    finally:
        m.norm = norm
    return split_heads(y, m.n_heads)


def _nm_dot_is_linear_attention() -> tuple[torch.Tensor, torch.Tensor]:
    x = rand_x()
    got, want = [], []
    for chunk in (1, 4):
        m = _mem(memory="linear", loss="dot", lr=1.0, momentum=False, retention=False, chunk_size=chunk,
                 init_zero=True)
        q, k, v = _qkv(m, x)
        got.append(_raw_read(m, x))
        want.append(linear_attention(q, k, v, causal=True))
    return torch.stack(got), torch.stack(want)


def _nm_l2_is_delta_rule() -> tuple[torch.Tensor, torch.Tensor]:
    m = _mem(memory="linear", loss="l2", lr=None, momentum=False, retention=False, chunk_size=1)
    x = rand_x()
    q, k, v = _qkv(m, x)
    beta = m._gate("lr", x)
    s0 = m.init[0].detach().transpose(-1, -2).unsqueeze(0).expand(2, -1, -1, -1)  # state = Wᵀ
    return _raw_read(m, x), delta_rule(q, k, v, beta, initial_state=s0, form="recurrent")


def _sequential_reference(m: NeuralMemory, x: torch.Tensor) -> torch.Tensor:
    """Token by token with autograd gradients of the loss (independent of the closed-form gradients)."""
    q, k, v = _qkv(m, x)
    lr, mom, ret = m._gate("lr", x), m._gate("momentum", x), m._gate("retention", x)
    b = x.shape[0]
    w = [p.detach().unsqueeze(0).expand(b, *p.shape).clone() for p in m.init]
    s = [torch.zeros_like(t) for t in w]
    outs = []
    for t in range(x.shape[1]):
        wt = [t_.detach().requires_grad_() for t_ in w]
        pred = read([t_.unsqueeze(2) for t_ in wt], k[:, :, t:t + 1].detach())[:, :, 0]
        err = pred - v[:, :, t].detach()
        if m.loss == "l2":
            loss = 0.5 * err.pow(2).sum()
        elif m.loss == "dot":
            loss = -(pred * v[:, :, t].detach()).sum()
        elif m.loss == "lp":
            loss = err.abs().pow(m.p).sum() / m.p
        else:
            loss = F.huber_loss(pred, v[:, :, t].detach(), reduction="sum", delta=m.delta)
        g = torch.autograd.grad(loss, wt)
        eta = 0.0 if mom is None else mom[:, :, t, None, None].detach()
        alpha = 0.0 if ret is None else ret[:, :, t, None, None].detach()
        s = [eta * si - lr[:, :, t, None, None].detach() * gi for si, gi in zip(s, g)]
        w = [(1 - alpha) * wi + si for wi, si in zip(w, s)]
        outs.append(read([t_.unsqueeze(2) for t_ in w], q[:, :, t:t + 1].detach())[:, :, 0])
    return torch.stack(outs, 2)


def _nm_chunk1_sequential() -> tuple[torch.Tensor, torch.Tensor]:
    x = rand_x(n=7)
    got, want = [], []
    for loss in LOSSES:
        m = _mem(memory="mlp", loss=loss, chunk_size=1)
        got.append(_raw_read(m, x).detach())
        want.append(_sequential_reference(m, x))
    return torch.stack(got), torch.stack(want)


register(
    "neural_memory", family=FAMILY, type="memory", priority=2, papers=("Titans", "Miras (Moneta/Yaad/Memora)"),
    supports={"self", "causal", "padding", "decoding"}, complexity="O(N)", backends=(),
    reference="the same module in float64", reference_kwargs={},
    test_kwargs={"dim": 32, "n_heads": 4, "memory": "mlp", "chunk_size": 4},
    aliases={"titans": {"preset": "titans"}},
    summary="Titans / Miras neural memory: a linear or MLP memory written by chunked test-time gradient "
            "steps with momentum and retention (compositions none, mal, mag, mac).",
    reductions=(
        Reduction("dot_is_linear_attention", "linear M, dot loss, θ = 1, no momentum or retention = linear attention "
                  "(any chunk size)", _nm_dot_is_linear_attention),
        Reduction("l2_is_delta_rule", "linear M, L2 loss, η = α = 0, chunk 1 = the delta rule with β = θ",
                  _nm_l2_is_delta_rule),
        Reduction("chunk1_is_sequential", "chunk size 1 = the sequential update with autograd gradients (MLP memory, "
                  "every loss, momentum and retention)", _nm_chunk1_sequential),
    ),
)(NeuralMemory)
