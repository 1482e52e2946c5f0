"""The linear-recurrent entries' forms agree and decode from a constant-size state."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.recurrent import RecurrentState
from tests.helpers import build_seeded, node_tokens

TOL = {"atol": 1e-10, "rtol": 1e-10}


FAMILY = [s.slug for s in attnzoo.list(family="linear-recurrent")]


FORM_ENTRIES = [s.slug for s in attnzoo.list(family="linear-recurrent") if s.reference_kwargs.get("form") == "parallel"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("slug", FORM_ENTRIES)
def test_forms_agree_forward_and_parameter_gradients(slug, request):
    x = node_tokens(request)
    dout = torch.randn_like(x)
    ref = None
    for form, chunk in [("parallel", 64), ("recurrent", 64), ("chunked", 1), ("chunked", 4), ("chunked", 64)]:
        m = build_seeded(slug, form=form, chunk_size=chunk)
        xi = x.clone().requires_grad_()
        y = m(xi, causal="causal" in attnzoo.spec(slug).supports)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * dout).sum(), [xi, *params])
        if ref is None:
            ref = (y, grads)
            continue
        torch.testing.assert_close(y, ref[0], **TOL, msg=lambda s, f=form, c=chunk: f"{slug} {f}/{c}: {s}")
        for (name, _), g, g_ref in zip([("x", None), *m.named_parameters()], grads, ref[1]):
            torch.testing.assert_close(g, g_ref, **TOL,
                                       msg=lambda s, f=form, c=chunk, n=name: f"{slug} {f}/{c} d{n}: {s}")


@pytest.mark.parametrize("slug", [s for s in FAMILY if "decoding" in attnzoo.spec(s).supports])
def test_state_decoding_segments_equal_one_pass_with_constant_state_size(slug, request):
    m = build_seeded(slug)
    x = node_tokens(request, n=23)
    full = m(x, causal=True)
    state, outs, start, sizes = RecurrentState(), [], 0, []
    for length in (6, 1, 1, 9, 1, 5):
        outs.append(m(x[:, start:start + length], causal=True, cache=state))
        start += length
        sizes.append(state.nbytes())
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    assert state.position == 23
    if attnzoo.spec(slug).complexity == "O(N)":
        assert len(set(sizes)) == 1, f"{slug}: state size changed while decoding: {sizes}"
