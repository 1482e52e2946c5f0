"""The linear / recurrent attention ops: parallel = chunked = recurrent, states, packing, numerics.

Every comparison is in float64 on fresh random inputs (seeded from the test id). The
parallel form is the materialised reference; the recurrent form is an independent loop;
the chunked form is the training path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.ops.linear import delta_rule, linear_attention, selective_scan

TOL = {"atol": 1e-10, "rtol": 1e-10}
B, H, N, DK, DV = 2, 3, 29, 6, 5


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------- problems
def _problem(kind: str, randn, n: int = N):
    """(fn(form, chunk_size, tensors...) -> (out, state), leaf tensors) for one op configuration."""
    leaves = {"q": randn(B, H, n, DK), "k": randn(B, H, n, DK), "v": randn(B, H, n, DV)}
    if kind == "scan":
        ch, s = 4, 3
        leaves = {"x": randn(B, n, ch), "dt_raw": randn(B, n, ch), "A_log": randn(ch, s) * 0.5,
                  "Bm": randn(B, n, s), "Cm": randn(B, n, s), "D": randn(ch), "h0": randn(B, ch, s)}

        def fn(form, c, x, dt_raw, A_log, Bm, Cm, D, h0):
            return selective_scan(x, F.softplus(dt_raw), -A_log.exp(), Bm, Cm, D, initial_state=h0,
                                  output_final_state=True, form=form, chunk_size=c)

        return fn, leaves
    normalize = kind.endswith("_norm")
    if kind.startswith("delta") or kind.startswith("gated_delta"):
        leaves["beta_raw"] = randn(B, H, n)
        leaves["s0"] = randn(B, H, DK, DV)
        if kind.startswith("gated_delta"):
            leaves["g_raw"] = randn(B, H, n)

        def fn(form, c, q, k, v, beta_raw, s0, g_raw=None):
            g = None if g_raw is None else F.logsigmoid(g_raw + 2.0)
            return delta_rule(q, F.normalize(k, dim=-1), v, torch.sigmoid(beta_raw), log_decay=g, scale=0.7,
                              initial_state=s0, output_final_state=True, form=form, chunk_size=c)

        return fn, leaves
    leaves["s0"] = randn(B, H, DK, DV + normalize)
    if normalize:  # a positive normaliser column z
        leaves["s0"][..., -1].abs_()
    if kind.startswith("lightning"):
        leaves["g_raw"] = randn(H)  # one decay per head, learnable
    elif kind.startswith("gla"):
        leaves["g_raw"] = randn(B, H, n)  # data-dependent decay per head and token

    def fn(form, c, q, k, v, s0, g_raw=None):
        g = None if g_raw is None else -F.softplus(g_raw)
        if normalize:  # positive features and state, so the normaliser is positive
            q, k = F.elu(q) + 1, F.elu(k) + 1
        return linear_attention(q, k, v, log_decay=g, scale=0.5, normalize=normalize, initial_state=s0,
                                output_final_state=True, form=form, chunk_size=c)

    return fn, leaves


KINDS = ["linear", "linear_norm", "lightning", "lightning_norm", "gla", "delta", "gated_delta", "scan"]


def _run(fn, leaves, form, chunk_size, dout, dstate):
    xs = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
    out, state = fn(form, chunk_size, **xs)
    grads = torch.autograd.grad((out * dout).sum() + (state * dstate).sum(), list(xs.values()))
    return out, state, dict(zip(xs, grads))


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_chunked_recurrent_agree(kind, randn):
    fn, leaves = _problem(kind, randn)
    out0, state0 = fn("parallel", 1, **leaves)
    dout, dstate = randn(*out0.shape), randn(*state0.shape)
    ref = _run(fn, leaves, "parallel", 1, dout, dstate)
    for form, chunk in [("recurrent", 1), ("chunked", 1), ("chunked", 4), ("chunked", 7), ("chunked", 16),
                        ("chunked", 64)]:
        out, state, grads = _run(fn, leaves, form, chunk, dout, dstate)
        torch.testing.assert_close(out, ref[0], **TOL, msg=lambda m, f=form, c=chunk: f"{kind} {f}/{c} out: {m}")
        torch.testing.assert_close(state, ref[1], **TOL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[2][name], **TOL,
                                       msg=lambda m, f=form, c=chunk, name=name: f"{kind} {f}/{c} d{name}: {m}")


@pytest.mark.parametrize("kind", ["linear", "linear_norm", "lightning", "gla"])
@pytest.mark.parametrize("use", ["out", "state"])
def test_chunked_gradients_when_one_output_is_unused(kind, use, randn):
    """A loss on the output alone or on the final state alone (the chunked backward then gets no gradient for
    the other) gives the parallel form's gradients; also with ``N`` not a multiple of the chunk."""
    fn, leaves = _problem(kind, randn, n=37)
    grads = {}
    for form in ("parallel", "chunked"):
        xs = {k: t.detach().clone().requires_grad_() for k, t in leaves.items()}
        out, state = fn(form, 8, **xs)
        torch.manual_seed(3)
        loss = (out * torch.randn(out.shape, dtype=out.dtype)).sum() if use == "out" else \
            (state * torch.randn(state.shape, dtype=state.dtype)).sum()
        got = torch.autograd.grad(loss, list(xs.values()), allow_unused=True)  # the state does not depend on q
        grads[form] = [torch.zeros_like(x) if g is None else g for g, x in zip(got, xs.values())]
    for name, got, want in zip(leaves, grads["chunked"], grads["parallel"]):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, name=name: f"{kind} d{name}: {m}")


def test_chunked_constant_decay_without_gradient(randn):
    """A float log decay (no gradient to take) and inputs of which only ``v`` requires a gradient."""
    q, k = randn(B, H, N, DK), randn(B, H, N, DK)
    v = randn(B, H, N, DV).requires_grad_()
    dout = randn(B, H, N, DV)
    outs = {form: linear_attention(q, k, v, log_decay=-0.3, form=form, chunk_size=5)
            for form in ("parallel", "chunked")}
    torch.testing.assert_close(outs["chunked"], outs["parallel"], **TOL)
    grads = [torch.autograd.grad((o * dout).sum(), v)[0] for o in outs.values()]
    torch.testing.assert_close(grads[1], grads[0], **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_segments_with_carried_state_equal_one_pass(kind, randn):
    fn, leaves = _problem(kind, randn, n=41)
    full_out, full_state = fn("chunked", 8, **leaves)
    time_dim = 1 if kind == "scan" else 2
    state_key = "h0" if kind == "scan" else "s0"
    per_token = {k for k, t in leaves.items() if t.dim() > time_dim and t.shape[time_dim] == 41 and k != state_key}
    outs, state, start = [], leaves[state_key], 0
    for i, length in enumerate([13, 1, 0, 20, 7]):
        seg = {k: (t.narrow(time_dim, start, length) if k in per_token else t) for k, t in leaves.items()}
        seg[state_key] = state
        form = ("chunked", "recurrent", "parallel")[i % 3]
        o, state = fn(form, 5, **seg)
        outs.append(o)
        start += length
    torch.testing.assert_close(torch.cat(outs, time_dim), full_out, **TOL)
    torch.testing.assert_close(state, full_state, **TOL)


@pytest.mark.parametrize("op", ["linear", "linear_norm", "gla", "gated_delta"])
@pytest.mark.parametrize("form", ["chunked", "recurrent", "parallel"])
def test_varlen_packed_equals_separate_runs(op, form, randn):
    lengths = [5, 0, 17, 1, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    t = sum(lengths)
    q, k, v = randn(1, H, t, DK), randn(1, H, t, DK), randn(1, H, t, DV)
    g = -F.softplus(randn(1, H, t))
    beta = torch.sigmoid(randn(1, H, t))
    normalize = op == "linear_norm"
    if normalize:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    s0 = randn(len(lengths), H, DK, DV + normalize).abs()

    def call(q_, k_, v_, g_, beta_, s0_, cu_=None):
        kw = {"initial_state": s0_, "output_final_state": True, "cu_seqlens": cu_, "form": form, "chunk_size": 4}
        if op == "gated_delta":
            return delta_rule(q_, F.normalize(k_, dim=-1), v_, beta_, log_decay=g_, **kw)
        return linear_attention(q_, k_, v_, log_decay=g_ if op == "gla" else None, normalize=normalize, **kw)

    packed, packed_state = call(q, k, v, g, beta, s0, cu)
    for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(a, e)
        o, s = call(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl], s0[i:i + 1])
        torch.testing.assert_close(packed[:, :, sl], o, **TOL)
        torch.testing.assert_close(packed_state[i:i + 1], s, **TOL)


def test_varlen_gradients_match_separate_runs(randn):
    lengths = [7, 12]
    cu = torch.tensor([0, 7, 19])
    q, k, v = (randn(1, H, 19, DK, requires_grad=True) for _ in range(3))
    g_raw = randn(1, H, 19, requires_grad=True)
    dout = randn(1, H, 19, DK)
    packed = linear_attention(q, k, v, log_decay=-F.softplus(g_raw), cu_seqlens=cu, chunk_size=4)
    grads = torch.autograd.grad((packed * dout).sum(), [q, k, v, g_raw])
    sep = torch.cat([linear_attention(q[:, :, a:a + n], k[:, :, a:a + n], v[:, :, a:a + n],
                                      log_decay=-F.softplus(g_raw[:, :, a:a + n]), form="recurrent")
                     for a, n in zip([0, 7], lengths)], 2)
    for got, want in zip(grads, torch.autograd.grad((sep * dout).sum(), [q, k, v, g_raw])):
        torch.testing.assert_close(got, want, **TOL)


# ------------------------------------------------------------------------------ properties
def test_decay_one_is_causal_linear_attention(randn):
    q, k, v = randn(B, H, N, DK), randn(B, H, N, DK), randn(B, H, N, DV)
    plain = linear_attention(q, k, v, form="parallel")
    naive = ((q @ k.transpose(-1, -2)).tril()) @ v
    torch.testing.assert_close(plain, naive, **TOL)
    for form in ("parallel", "chunked", "recurrent"):
        for g in (0.0, torch.zeros(H, dtype=torch.float64)):
            torch.testing.assert_close(linear_attention(q, k, v, log_decay=g, form=form, chunk_size=8), naive, **TOL)


def test_lightning_blocked_equals_naive_decay_matrix(randn):
    """The catalogue's statement: tiled output = naive [(QKᵀ) ⊙ D] V with D_st = λ^(s−t)."""
    q, k, v = randn(B, H, N, DK), randn(B, H, N, DK), randn(B, H, N, DV)
    lam = torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64)
    i = torch.arange(N, dtype=torch.float64)
    d = (lam.view(H, 1, 1) ** (i.view(-1, 1) - i.view(1, -1)).clamp(min=0)) * torch.ones(N, N).tril()
    naive = ((q @ k.transpose(-1, -2)) * d) @ v
    for chunk in (1, 3, 8, 32):
        torch.testing.assert_close(linear_attention(q, k, v, log_decay=lam.log(), chunk_size=chunk), naive, **TOL)


def test_noncausal_and_normalised(randn):
    q, k, v = F.elu(randn(B, H, N, DK)) + 1, F.elu(randn(B, H, 13, DK)) + 1, randn(B, H, 13, DV)
    for form in ("parallel", "chunked", "recurrent"):
        out = linear_attention(q, k, v, causal=False, form=form)
        torch.testing.assert_close(out, q @ (k.transpose(-1, -2) @ v), **TOL)
        normed = linear_attention(q, k, v, causal=False, normalize=True, eps=0.0, form=form)
        w = q @ k.transpose(-1, -2)
        torch.testing.assert_close(normed, (w / w.sum(-1, keepdim=True)) @ v, **TOL)
    causal = linear_attention(q, k[:, :, :1].expand(B, H, N, DK), v[:, :, :1].expand(B, H, N, DV), normalize=True,
                              eps=0.0)
    torch.testing.assert_close(causal, v[:, :, :1].expand(B, H, N, DV), **TOL)  # one repeated key: its value


def test_pavlovian_capacity(randn):
    """Unnormalised: n <= d_k orthonormal keys are recalled exactly; n > d_k random keys are not."""
    d = 8
    keys = torch.linalg.qr(randn(d, d))[0].T[:6].reshape(1, 1, 6, d)
    vals = randn(1, 1, 6, 4)
    recall = linear_attention(keys, keys, vals, causal=False)
    torch.testing.assert_close(recall, vals, **TOL)
    keys = F.normalize(randn(1, 1, 3 * d, d), dim=-1)
    vals = randn(1, 1, 3 * d, 4)
    assert (linear_attention(keys, keys, vals, causal=False) - vals).abs().max() > 1e-2


@pytest.mark.parametrize("form", ["parallel", "chunked", "recurrent"])
def test_delta_rule_overwrites_exactly(form, randn):
    """β = 1, orthonormal keys: after writing (k_i, v_i) the state returns v_i for k_i, whatever S_0."""
    d, n = 8, 6
    keys = torch.linalg.qr(randn(d, d))[0].T[:n].reshape(1, 1, n, d).expand(B, H, n, d)
    vals = randn(B, H, n, DV)
    s0 = randn(B, H, d, DV)
    _, state = delta_rule(keys, keys, vals, 1.0, initial_state=s0, output_final_state=True, form=form, chunk_size=4)
    torch.testing.assert_close(keys @ state, vals, **TOL)
    # and the part of S_0 orthogonal to the written keys is untouched
    other = torch.linalg.qr(randn(d, d))[0]
    proj = torch.eye(d, dtype=torch.float64) - keys[0, 0].T @ keys[0, 0]
    torch.testing.assert_close(other @ proj @ state, other @ proj @ s0, **TOL)


def test_delta_rule_beta_zero_is_identity_and_gate_decays(randn):
    q, k, v = randn(B, H, N, DK), F.normalize(randn(B, H, N, DK), dim=-1), randn(B, H, N, DV)
    s0 = randn(B, H, DK, DV)
    out, state = delta_rule(q, k, v, 0.0, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(state, s0, **TOL)
    torch.testing.assert_close(out, q @ s0, **TOL)
    _, state = delta_rule(q, k, v, 0.0, log_decay=-0.1, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(state, s0 * math.exp(-0.1 * N), **TOL)


def test_scan_reduces_to_decayed_linear_attention(randn):
    """One channel with A = a·1: the selective scan is decayed linear attention with q = C, k = B, v = Δx."""
    n, s = 23, 4
    x, dt = randn(1, n, 1), F.softplus(randn(1, n, 1))
    bm, cm = randn(1, n, s), randn(1, n, s)
    a = torch.full((1, s), -0.7, dtype=torch.float64)
    y = selective_scan(x, dt, a, bm, cm, form="chunked", chunk_size=5)
    want = linear_attention(cm.unsqueeze(1), bm.unsqueeze(1), (dt * x).unsqueeze(1),
                            log_decay=(dt * -0.7).view(1, 1, n), form="parallel")
    torch.testing.assert_close(y, want.squeeze(1), **TOL)


# ------------------------------------------------------------------------------ numerics
def _decays(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """Per-token log decays ``[1, H=4, n]``: near 0 (λ ~ 1e-30 ... 1e-3) or near 1 (1 - λ ~ 1e-6 ... 1e-3)."""
    u = torch.rand(1, 4, n, generator=gen, dtype=torch.float64)
    if kind == "near0":
        return math.log(1e-30) + u * (math.log(1e-3) - math.log(1e-30))
    return torch.log1p(-(10 ** (-6 + 3 * u)))


def _bf16_vs_reference(n: int, kind: str, op: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, n, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    g = _decays(kind, n, gen)
    if op == "delta":
        k = F.normalize(k, dim=-1)
        beta = torch.rand(1, 4, n, generator=gen, dtype=torch.float64)
        call = lambda *a, **kw: delta_rule(*a[:3], beta.to(a[0].dtype), **kw)  # noqa: E731
    else:
        call = linear_attention
    lo = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = call(*lo, log_decay=g.float(), scale=32 ** -0.5, form="chunked", chunk_size=64)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # The float64 references are the independent token-by-token loop, on the bf16-rounded
    # inputs (isolates the kernel's own error) and on the exact inputs.
    ref_rounded = call(*(t.detach().double() for t in lo), log_decay=g.float().double(), scale=32 ** -0.5,
                       form="recurrent")
    ref = call(q, k, v, log_decay=g, scale=32 ** -0.5, form="recurrent")
    # Kernel error: fp32 accumulation plus the final bf16 rounding (2^-9 relative per element).
    row_err = (out.double() - ref_rounded).norm(dim=-1) / ref_rounded.norm(dim=-1).clamp(min=1e-3)
    assert row_err.max() < 1e-2, f"{op} {kind}: max relative row error {row_err.max():.3g} vs rounded inputs"
    # End to end against the exact float64 reference: input quantisation dominates.
    rel = float(((out.double() - ref).norm() / ref.norm()).detach())
    assert rel < 2e-2, f"{op} {kind}: relative error {rel:.3g} vs float64"
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in lo)


@pytest.mark.parametrize("op", ["lightning", "delta"])
@pytest.mark.parametrize("kind", ["near0", "near1"])
def test_bf16_chunked_stable_against_float64(op, kind):
    _bf16_vs_reference(2048, kind, op, seed=hash((op, kind)) % 1000)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["lightning", "delta"])
@pytest.mark.parametrize("kind", ["near0", "near1"])
def test_bf16_chunked_stable_at_65536(op, kind):
    _bf16_vs_reference(65536, kind, op, seed=7)


@pytest.mark.parametrize("log_decay", [-30.0, -50.0])
def test_parallel_form_keeps_the_gradient_of_strong_decays(log_decay, randn):
    """The float64 oracle's decay gradient is O(e^g): the exactly-zero exponents of each token's own pair must
    not add cancelling O(1) terms to it (they did: 0.0 at -50, 1.5% off at -30)."""
    q, k, v = randn(1, 1, 6, 2), randn(1, 1, 6, 2), randn(1, 1, 6, 2)
    x, dt, b_in, c_in = randn(1, 6, 2), randn(1, 6, 2).abs() + 1, randn(1, 6, 3), randn(1, 6, 3)
    grads = {}
    for form in ("parallel", "recurrent"):
        g = torch.tensor([log_decay], dtype=torch.float64, requires_grad=True)
        a = torch.full((2, 3), log_decay, dtype=torch.float64, requires_grad=True)
        linear_attention(q, k, v, log_decay=g, form=form).sum().backward()
        selective_scan(x, dt, a, b_in, c_in, form=form).sum().backward()
        grads[form] = (g.grad, a.grad)
    for got, want in zip(grads["parallel"], grads["recurrent"]):
        assert (want != 0).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0.0)


def test_extreme_decays_are_finite_in_float32(randn):
    q, k, v = (randn(1, 2, 300, 8).float().requires_grad_() for _ in range(3))
    for g in (-math.inf, -1e6, -80.0, 0.0):
        out = linear_attention(q, k, v, log_decay=g, chunk_size=64)
        out.sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # λ = 0: only the current token is seen
    torch.testing.assert_close(linear_attention(q, k, v, log_decay=-math.inf),
                               (q * k).sum(-1, keepdim=True) * v, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ errors
def test_errors(randn):
    q, k, v = randn(B, H, N, DK), randn(B, H, N, DK), randn(B, H, N, DV)
    with pytest.raises(ValueError, match="form"):
        linear_attention(q, k, v, form="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="log_decay.*<= 0"):
        linear_attention(q, k, v, log_decay=0.1)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=torch.zeros(H + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, k, v, log_decay=-0.1, causal=False)
    with pytest.raises(ValueError, match=r"k: expected shape \[2, 3, 29, 6\]"):
        linear_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, initial_state=randn(B, H, DK, DV + 1))
    with pytest.raises(ValueError, match="cu_seqlens.*batch size 1"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0, N]))
    with pytest.raises(ValueError, match="cu_seqlens.*offsets"):
        linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 3, 2, N]))
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, torch.ones(B, H))
    with pytest.raises(ValueError, match="A:"):
        selective_scan(randn(1, 5, 3), randn(1, 5, 3), randn(4, 2), randn(1, 5, 2), randn(1, 5, 2))
    with pytest.raises(ValueError, match=r"^log_decay: expected values <= 0 .*got NaN"):
        linear_attention(q, k, v, log_decay=float("nan"))
    x, dt, a, bm, cm = randn(1, 5, 3), randn(1, 5, 3).abs(), -randn(3, 2).abs(), randn(1, 5, 2), randn(1, 5, 2)
    with pytest.raises(ValueError, match=r"^A: expected values <= 0 .*got a maximum of 5"):
        selective_scan(x, dt, a.clone().fill_(5.0), bm, cm)
    with pytest.raises(ValueError, match=r"^dt: expected values >= 0 .*got a minimum of -\d"):
        selective_scan(x, dt - dt.max() - 1.0, a, bm, cm)
    assert selective_scan(x, dt, a, bm, cm).shape == x.shape
