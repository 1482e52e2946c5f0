"""``moh``: Mixture-of-heads: a per-token router gates head outputs (router moh or drop_one)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnzoo.layers.base import (
    MultiHeadAttention,
    build_pattern,
    check_choice,
    check_int,
    load_shared,
    seeded,
    zero_padded,
)
from attnzoo.layers.dense_multihead._common import FAMILY, MIXER_SUPPORT, rand_x
from attnzoo.ops import attention
from attnzoo.ops.routed import GATHER_CHUNK, Routing, gather_pays, gather_routes
from attnzoo.patterns.routed import routed_attention
from attnzoo.registry import Reduction, register


class MixtureOfHeads(MultiHeadAttention):
    """Mixture-of-heads: per-token router gates on head outputs, ``O = Σ_h g_h(x) H_h W_O^h``.

    ``router="moh"`` (MoH, [code: MoH-ViT attention_native.py @66bb340] per the catalogue,
    not re-read here): the first ``n_shared`` heads are always on with gates
    ``softmax(W_s x)·n_shared`` (the constant 1 when ``n_shared = 1``); of the other heads
    the top ``top_k`` of ``softmax(W_r x)`` are kept, renormalised and multiplied by
    ``top_k``; two-stage weights ``w = 2·softmax(W_0 x)`` scale the shared and routed groups.
    ``aux_loss`` (set by each forward) is ``mean_e(me_e·ce_e)·E²·aux_loss_weight`` with
    ``me`` the mean routing probability and ``ce`` the fraction of tokens choosing expert e.
    Checked against the MoH abstract: "each token [selects] the appropriate attention heads"
    and "a weighted summation" replaces the sum over heads; the router details are the
    catalogue's code reading.

    ``router="drop_one"`` (MAE, "A Mixture of h-1 Heads is Better than h Heads": the abstract
    confirms "mixture of attentive experts"): expert i is MHA without head i and
    ``g = softmax(W_d x)`` over experts, so head h gets ``1 − g_h`` (every head is used).

    ``dispatch``: ``"dense"`` computes every head and multiplies the unselected ones by 0
    (what the reference code does). ``"gather"`` skips them: each routed head gathers the
    tokens that picked it (``C ≈ N·top_k/(n_heads − n_shared)`` of them), projects only
    their queries, attends them to all keys as a ``"queries"`` routing of the routed-attention op
    (:func:`attnzoo.patterns.routed.routed_attention`: causality through their true positions, the
    op's backends and float64 reference) and scatters ``g·O_h W_O^h`` back; shared heads stay
    dense. ``"auto"`` (default) gathers when ``top_k/(n_heads − n_shared) <= 0.4`` and the
    call has at least 256 query tokens, which is where ``benchmarks/bench_moh.py`` measured it
    paying off on CPU (1.0-2.2x less CPU time at fraction <= 1/3; mixed at 1/2, slower at 2/3;
    see benchmarks/RESULTS.md). The gather path needs ``router="moh"``, no
    ``pattern``/``score_mod``, ``rope`` or no q/k transform, and no weights capture; otherwise
    the dense path runs. Both give the same output.
    """

    last_call_outputs = ("captured", "aux_loss")  # the router's load-balancing loss of the last call

    def __init__(self, dim: int, n_heads: int = 8, *, n_shared: int = 2, top_k: int = 2, router: str = "moh",
                 aux_loss_weight: float = 0.01, dispatch: str = "auto", **kw: Any) -> None:
        super().__init__(dim, n_heads, **kw)
        self.router = check_choice("router", router, ("moh", "drop_one"))
        self.dispatch = check_choice("dispatch", dispatch, ("auto", "dense", "gather"))
        self.gather_chunk = GATHER_CHUNK
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_loss = torch.zeros(())
        if router == "moh":
            self.n_shared = check_int("n_shared", n_shared, minimum=0)
            routed = n_heads - n_shared
            if routed < 1:
                raise ValueError(f"n_shared: must be < n_heads={n_heads}, got {n_shared}")
            self.top_k = check_int("top_k", top_k)
            if top_k > routed:
                raise ValueError(f"top_k: must be <= n_heads - n_shared = {routed}, got {top_k}")
            self.w_shared = nn.Linear(dim, n_shared, bias=False) if n_shared > 1 else None
            self.w_routed = nn.Linear(dim, routed, bias=False)
            self.w_stage = nn.Linear(dim, 2, bias=False)
        else:
            self.n_shared, self.top_k = 0, n_heads - 1
            self.w_drop = nn.Linear(dim, n_heads, bias=False)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[B, N, H]`` for tokens ``x`` ``[B, N, C]``; sets ``self.aux_loss``."""
        if self.router == "drop_one":
            return 1.0 - torch.softmax(self.w_drop(x), dim=-1)
        probs = torch.softmax(self.w_routed(x), dim=-1)
        vals, idx = probs.topk(self.top_k, dim=-1)
        vals = vals / vals.sum(-1, keepdim=True) * self.top_k
        routed = torch.zeros_like(probs).scatter(-1, idx, vals)
        if self.n_shared > 1:
            shared = torch.softmax(self.w_shared(x), dim=-1) * self.n_shared
        else:
            shared = x.new_ones(*x.shape[:2], self.n_shared)
        stage = 2.0 * torch.softmax(self.w_stage(x), dim=-1)
        e = probs.shape[-1]
        me = probs.reshape(-1, e).mean(0)
        ce = torch.zeros_like(probs).scatter(-1, idx, 1.0).reshape(-1, e).mean(0)
        self.aux_loss = (me * ce).mean() * e * e * self.aux_loss_weight
        return torch.cat([shared * stage[..., :1], routed * stage[..., 1:]], dim=-1)

    def post_attention(self, z, x, call=None):
        return z * self.route(x).transpose(1, 2).unsqueeze(-1)

    # Gather dispatch ------------------------------------------------------------------------
    def gathers(self, n_tokens: int, *, return_weights: bool = False) -> bool:
        """Whether a call with ``n_tokens`` query tokens runs the gather path."""
        from attnzoo.layers.rotary import RotaryEmbedding

        if self.dispatch == "dense" or self.router != "moh" or return_weights or self.capture:
            return False
        if self.pattern is not None or self.score_mod is not None:
            return False
        if self.qk_transform is not None and not isinstance(self.qk_transform, RotaryEmbedding):
            return False
        if self.dispatch == "gather":
            return True
        return gather_pays(self.top_k / (self.n_heads - self.n_shared), n_tokens)

    def forward(self, x, *, mask=None, causal=False, context=None, context_mask=None, cache=None, head_mask=None,
                return_weights=False):
        if not self.gathers(x.shape[1], return_weights=return_weights):
            return super().forward(x, mask=mask, causal=causal, context=context, context_mask=context_mask,
                                   cache=cache, head_mask=head_mask, return_weights=return_weights)
        self.check_call(x, mask, causal, context, cache)
        return self._gather_forward(x, mask, causal, context, context_mask, cache, head_mask)

    def _kv_for(self, t: torch.Tensor, heads: range) -> torch.Tensor:
        """Key/value heads ``[B, len(heads), M, D]`` read by the query heads ``heads``."""
        g = self.n_heads // self.n_kv_heads
        if g == 1:
            return t[:, heads.start:heads.stop]
        idx = torch.arange(heads.start, heads.stop, device=t.device) // g
        return t.index_select(1, idx)

    def _gather_forward(self, x, mask, causal, context, context_mask, cache, head_mask):
        b, n, _ = x.shape
        h, s, d = self.n_heads, self.n_shared, self.head_dim
        r = h - s
        src = x if context is None else context
        k, v = self.split(self.k_proj(src), self.n_kv_heads), self.split(self.v_proj(src), self.n_kv_heads)
        wq = self.q_proj.weight.view(h, d, -1)
        bq = self.q_proj.bias.view(h, d) if self.q_proj.bias is not None else None
        q_s = self.split(nn.functional.linear(x, wq[:s].reshape(s * d, -1),
                                              None if bq is None else bq[:s].reshape(-1)), s) if s else None
        pos = cache.position if cache is not None else 0
        rope = self.qk_transform if context is None else None
        if rope is not None:
            k = rope.rotate(k, torch.arange(pos, pos + k.shape[2], device=x.device))
            if q_s is not None:
                q_s = rope.rotate(q_s, torch.arange(pos, pos + n, device=x.device))
        keep = mask if context is None else context_mask
        if cache is not None:
            k, v, keep = cache.append(k, v, keep)
            cache.advance(n)
        gates = self.route(x)  # [B, N, H]
        if head_mask is not None:
            xi = head_mask.to(gates.dtype)
            gates = gates * (xi.view(1, 1, -1) if xi.dim() == 1 else xi.view(xi.shape[0], 1, -1))
        wo = self.o_proj.weight  # [C, H*D]
        y = x.new_zeros(b, n, wo.shape[0])
        if s:
            pattern = build_pattern(None, causal, keep)
            z_s = attention(q_s, self._kv_for(k, range(0, s)), self._kv_for(v, range(0, s)), pattern=pattern,
                            scale=self.scale, backend=self.backend)
            z_s = z_s * gates[..., :s].transpose(1, 2).unsqueeze(-1)
            y = y + nn.functional.linear(self.merge(z_s), wo[:, : s * d])
        sel = gates[..., s:] != 0  # [B, N, R]
        if mask is not None:
            sel = sel & mask.unsqueeze(-1)
        idx, valid, _ = gather_routes(sel)  # [B, R, C] token ids of each routed head
        c = idx.shape[-1]
        if c:
            flat = idx.reshape(b, r * c)
            x_g = x.gather(1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1])).view(b, r, c, -1)
            q_g = torch.einsum("brcx,rdx->brcd", x_g, wq[s:])
            if bq is not None:
                q_g = q_g + bq[s:].view(1, r, 1, d)
            if rope is not None:
                q_g = rope.rotate(q_g, idx + pos)
            routing = Routing("queries", torch.where(valid, idx, torch.full_like(idx, -1)), n_queries=n)
            z_g = routed_attention(q_g, self._kv_for(k, range(s, h)), self._kv_for(v, range(s, h)), routing,
                                   causal=causal, keep=keep, scale=self.scale, backend=self.backend,
                                   chunk=self.gather_chunk)
            w_g = gates[..., s:].gather(1, idx.transpose(1, 2)).transpose(1, 2) * valid  # [B, R, C]
            wo_r = wo[:, s * d:].reshape(-1, r, d).permute(1, 2, 0)  # [R, D, C_out]
            contrib = torch.einsum("brcd,rde->brce", z_g * w_g.unsqueeze(-1).to(z_g.dtype), wo_r)
            y = y.scatter_add(1, flat.unsqueeze(-1).expand(-1, -1, wo.shape[0]), contrib.reshape(b, r * c, -1))
        if self.o_proj.bias is not None:
            y = y + self.o_proj.bias
        return zero_padded(y, mask)


def _moh_ones_is_mha() -> tuple[torch.Tensor, torch.Tensor]:
    x = rand_x()
    got, want = [], []
    for router in ("moh", "drop_one"):
        m = seeded(MixtureOfHeads, dim=32, n_heads=4, n_shared=1, top_k=2, router=router)
        m.route = lambda t: t.new_ones(*t.shape[:2], 4)
        ref = MultiHeadAttention(32, 4).double()
        load_shared(m, ref)
        got.append(m(x, causal=True))
        want.append(ref(x, causal=True))
    return torch.stack(got), torch.stack(want)


def _moh_nonzero_count() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3)
    gates = m.route(rand_x())
    return (gates != 0).sum(-1).to(torch.float64), torch.full(gates.shape[:2], 5.0, dtype=torch.float64)


def _moh_uniform_aux() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=3, aux_loss_weight=1.0)
    nn.init.zeros_(m.w_routed.weight)
    m.route(rand_x())
    return m.aux_loss, torch.tensor(3.0, dtype=torch.float64)


def _moh_gather_equals_dense() -> tuple[torch.Tensor, torch.Tensor]:
    from attnzoo.layers.cache import KVCache
    from attnzoo.layers.rotary import RotaryEmbedding

    got, want = [], []
    x = rand_x(n=14)
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[0, 10:] = False
    for kv_heads, rope in ((None, None), (2, RotaryEmbedding(8))):
        m = seeded(MixtureOfHeads, dim=32, n_heads=6, head_dim=8, n_shared=2, top_k=2, n_kv_heads=kv_heads,
                   rope=rope)
        for kw in ({}, {"causal": True}, {"mask": keep}, {"causal": True, "mask": keep},
                   {"context": rand_x(n=9, seed=4)}):
            if rope is not None and "context" in kw:
                continue
            m.dispatch, m.gather_chunk = "gather", 3
            got.append(m(x, **kw))
            m.dispatch = "dense"
            want.append(m(x, **kw))
        for dispatch, out in (("gather", got), ("dense", want)):  # chunked KV-cache decoding
            m.dispatch, m.gather_chunk, cache, start, parts = dispatch, 2, KVCache(), 0, []
            for size in (5, 1, 8):
                parts.append(m(x[:, start:start + size], causal=True, cache=cache))
                start += size
            out.append(torch.cat(parts, 1))
    return torch.cat(got, 1), torch.cat(want, 1)


def _moh_drop_one_uniform() -> tuple[torch.Tensor, torch.Tensor]:
    m = seeded(MixtureOfHeads, dim=32, n_heads=4, router="drop_one", bias=False)
    nn.init.zeros_(m.w_drop.weight)
    ref = MultiHeadAttention(32, 4, bias=False).double()
    load_shared(m, ref)
    x = rand_x()
    return m(x), ref(x) * (3.0 / 4.0)


register(
    "moh", family=FAMILY, type="mixer", priority=2, papers=("MoH", "MAE (mixture of h-1 heads)"),
    supports=MIXER_SUPPORT,
    summary="Mixture-of-heads: a per-token router gates head outputs (router moh or drop_one).",
    test_kwargs={"dim": 32, "n_heads": 4, "n_shared": 1, "top_k": 2},
    reductions=(
        Reduction("gates_one_is_mha", "all gates ≡ 1 gives mha (both routers)", _moh_ones_is_mha),
        Reduction("n_nonzero", "each token has exactly n_shared + top_k nonzero gates", _moh_nonzero_count),
        Reduction("uniform_aux", "under perfectly uniform routing the aux loss equals top_k", _moh_uniform_aux),
        Reduction("drop_one_uniform", "drop_one with a uniform gate gives ((h-1)/h)·mha", _moh_drop_one_uniform),
        Reduction("gather_equals_dense", "the gather dispatch (skipping unselected heads) equals the dense one "
                  "(causal, padding, cross, GQA, rope, KV-cache decoding)", _moh_gather_equals_dense),
    ),
)(MixtureOfHeads)
