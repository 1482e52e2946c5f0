"""Selective scan (Mamba-style diagonal SSM) in parallel, chunked and recurrent forms.

Per channel ``c`` and state index ``s`` (state ``h`` ``[B, C, S]``):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t x_t) B_tᵀ,        y_t = h_t C_t + D ⊙ x_t

with ``Δ_t >= 0`` (``[B, N, C]``), ``A <= 0`` (``[C, S]``) and input-dependent ``B_t``,
``C_t`` (``[B, N, S]``). The log decays ``Δ_t A`` are ``<= 0``; every exponent taken is a
chunk-local cumulative sum of them or a difference ``b_t - b_s`` with ``s <= t``, so nothing
overflows. The chunked form runs the recurrence inside all chunks at once (``L`` steps,
vectorised over chunks) and then passes the state across chunks (``N / L`` steps): ``O(N)``
work in ``L + N/L`` sequential steps. The parallel form materialises
``h_t = Σ_{s<=t} exp(b_t - b_s) ⊙ u_s`` (``[B, N, N, C, S]``, float64): the reference.
"""

from __future__ import annotations

import torch

from attnzoo.ops.linear._common import LOG_DECAY_FLOOR, check_form, check_sign, compute_dtype
from attnzoo.ops.linear.decay import intra_decay

__all__ = ["selective_scan"]


def _check(name: str, t: torch.Tensor, shape: tuple[int | None, ...], spec: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != len(shape) or any(
        s is not None and t.shape[i] != s for i, s in enumerate(shape)
    ):
        got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a tensor {spec}, got {got}")


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    return_states: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Selective state-space scan.

    Args:
        x: inputs ``[B, N, C]``.
        dt: step sizes Δ ``[B, N, C]`` (``>= 0``; e.g. after softplus).
        A: ``[C, S]`` (``<= 0``).
        B, C: ``[B, N, S]``.
        D: skip ``[C]`` or None.
        initial_state: ``h_0`` ``[B, C, S]``.
        output_final_state: also return ``h_N``.
        return_states: also return every ``h_t`` ``[B, N, C, S]`` (used by ``a2ssm``).
        form: ``"parallel"`` (float64 reference), ``"chunked"`` or ``"recurrent"``.
        chunk_size: tokens per chunk.

    Returns:
        ``y`` ``[B, N, C]``, then ``h_N`` if asked, then the states if asked.
    """
    check_form(form, chunk_size)
    _check("x", x, (None, None, None), "[B, N, C]")
    b, n, ch = x.shape
    _check("dt", dt, (b, n, ch), f"[B, N, C]=[{b}, {n}, {ch}]")
    _check("A", A, (ch, None), f"[C, S]=[{ch}, S]")
    s = A.shape[1]
    _check("B", B, (b, n, s), f"[B, N, S]=[{b}, {n}, {s}]")
    _check("C", C, (b, n, s), f"[B, N, S]=[{b}, {n}, {s}]")
    check_sign("dt", dt, positive=True, what="step sizes, e.g. after softplus")
    check_sign("A", A, positive=False, what="the state decays exp(dt A) must be at most 1")
    if D is not None:
        _check("D", D, (ch,), f"[C]=[{ch}]")
    if initial_state is not None:
        _check("initial_state", initial_state, (b, ch, s), f"[B, C, S]=[{b}, {ch}, {s}]")
    out_dtype, cdtype = x.dtype, compute_dtype(x.dtype)
    if form == "parallel":
        cdtype = torch.float64
    xc, dtc, Bc, Cc = x.to(cdtype), dt.to(cdtype), B.to(cdtype), C.to(cdtype)
    log_a = (dtc.unsqueeze(-1) * A.to(cdtype)).clamp(min=LOG_DECAY_FLOOR)  # [B, N, C, S], <= 0
    u = (dtc * xc).unsqueeze(-1) * Bc.unsqueeze(-2)  # [B, N, C, S]
    h0 = None if initial_state is None else initial_state.to(cdtype)
    if form == "recurrent":
        states = _recurrent(log_a, u, h0)
    elif form == "chunked":
        states = _chunked(log_a, u, h0, chunk_size)
    else:
        states = _parallel(log_a, u, h0)
    y = (states * Cc.unsqueeze(-2)).sum(-1)
    if D is not None:
        y = y + xc * D.to(cdtype)
    out: list[torch.Tensor] = [y.to(out_dtype)]
    if output_final_state:
        last = states[:, -1] if n else (h0 if h0 is not None else log_a.new_zeros(b, ch, s))
        out.append(last.to(compute_dtype(out_dtype)))
    if return_states:
        out.append(states.to(compute_dtype(out_dtype)))
    return out[0] if len(out) == 1 else tuple(out)


def _recurrent(log_a, u, h0):
    b, n, ch, s = u.shape
    h = u.new_zeros(b, ch, s) if h0 is None else h0
    states = []
    for u_t, a_t in zip(u.unbind(1), log_a.exp().unbind(1)):
        h = torch.addcmul(u_t, a_t, h)
        states.append(h)
    return torch.stack(states, 1) if states else u.new_zeros(b, 0, ch, s)


def _chunked(log_a, u, h0, chunk_size):
    b, n, ch, s = u.shape
    if n == 0:
        return u.new_zeros(b, 0, ch, s)
    size = min(chunk_size, n)
    n_pad = -(-n // size) * size
    if n_pad != n:  # identity steps: zero log decay, zero input
        pad = u.new_zeros(b, n_pad - n, ch, s)
        log_a, u = torch.cat([log_a, pad], 1), torch.cat([u, pad], 1)
    n_chunks = n_pad // size
    la = log_a.view(b, n_chunks, size, ch, s)
    uc = u.view(b, n_chunks, size, ch, s)
    decay = la.exp()
    h = u.new_zeros(b, n_chunks, ch, s)
    local = []
    for u_t, a_t in zip(uc.unbind(2), decay.unbind(2)):  # the recurrence inside every chunk at once
        h = torch.addcmul(u_t, a_t, h)
        local.append(h)
    local_states = torch.stack(local, 2)  # [B, n_chunks, L, C, S]
    bc = la.cumsum(2)  # chunk-local cumulative log decay, <= 0
    carry = bc[:, :, -1].exp()  # [B, n_chunks, C, S]
    state = u.new_zeros(b, ch, s) if h0 is None else h0
    prev = []
    for end_c, carry_c in zip(local_states[:, :, -1].unbind(1), carry.unbind(1)):
        prev.append(state)
        state = torch.addcmul(end_c, carry_c, state)
    states = local_states + bc.exp() * torch.stack(prev, 1).unsqueeze(2)
    return states.reshape(b, n_pad, ch, s)[:, :n]


def _parallel(log_a, u, h0):
    bc = log_a.cumsum(1)  # [B, N, C, S]
    w = intra_decay(bc.movedim(1, -1)).permute(0, 3, 4, 1, 2)  # [B, N(t), N(s), C, S]
    states = (w * u.unsqueeze(1)).sum(2)
    if h0 is not None:
        states = states + bc.exp() * h0.unsqueeze(1)
    return states
