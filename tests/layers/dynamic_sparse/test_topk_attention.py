"""topk_attention's predictor scorer (Sparsifiner's connectivity predictor) beyond the conformance contract:
selection, exactness, decoding, the predictor loss and its training, bad input."""

from __future__ import annotations

import pytest
import torch

from attnzoo.layers.base import Call
from attnzoo.layers.cache import KVCache
from attnzoo.layers.dynamic_sparse import topk_attention as topk_module
from attnzoo.layers.testing import mha_from, random_tokens
from attnzoo.registry import create
from tests.helpers import assert_backends_equal_reference


def _topk(**kw):
    torch.manual_seed(0)
    args = {"top_k": 3, "scorer": "predictor", **kw}
    return create("topk_attention", dim=32, n_heads=4, **args).double()


def _routing(m, x, causal, keep=None):
    q, k, _ = m.project(x, x)
    return m.route(q, k, keep, Call(x=x, src=x, causal=causal)).index


@pytest.mark.parametrize("causal", [False, True])
def test_identity_predictor_selects_exactly_what_the_exact_scorer_selects(causal, monkeypatch):
    monkeypatch.setattr(topk_module, "SELECT_CHUNK_ELEMENTS", 300)  # several query chunks
    exact = _topk(scorer="exact", top_k=4)
    pred = _topk(top_k=4, rank=8)
    pred.predictor.set_identity_()
    x = random_tokens(n=19).double()
    keep = torch.ones(2, 19, dtype=torch.bool)
    keep[1, 15:] = False
    for kv_keep in (None, keep):
        assert torch.equal(_routing(pred, x, causal, kv_keep), _routing(exact, x, causal, kv_keep))
    mask = {"mask": keep}
    assert torch.equal(pred(x, causal=causal, **mask), exact(x, causal=causal, **mask))


def test_a_low_rank_predictor_chooses_its_own_keys_among_the_allowed_ones():
    m = _topk(rank=2, top_k=3)
    exact = _topk(scorer="exact", top_k=3)
    x = random_tokens(n=16).double()
    r = _routing(m, x, causal=True)
    assert not torch.equal(r, _routing(exact, x, causal=True))
    q, k, _ = m.project(x, x)
    qs, ks = m.predictor.project(q, k)
    s = (qs @ ks.transpose(-1, -2)).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
    want = s.topk(3, -1).indices
    pos = torch.arange(16).view(-1, 1)
    assert torch.equal(r[..., 2:, :], want[..., 2:, :])  # rows with >= 3 visible keys: the predictor's top 3
    assert ((r == -1) == (torch.arange(3).view(1, -1) > pos)).all()  # the first rows: every visible key, then -1


@pytest.mark.parametrize("causal", [False, True])
def test_k_equals_n_with_the_predictor_is_mha_with_padding(causal):
    m = _topk(top_k=13, rank=3)
    x = random_tokens(n=13).double()
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[0, 10:] = False
    want = mha_from(m)(x, causal=causal, mask=keep)
    assert (m(x, causal=causal, mask=keep) - want).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_every_backend_equals_the_reference_with_the_predictor(causal):
    m = _topk(rank=4)
    ref = _topk(rank=4, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = random_tokens(n=23).double().requires_grad_()
    assert_backends_equal_reference(m, ref, x, causal)


def test_rows_have_at_most_k_nonzeros_summing_to_one_and_zero_outside():
    m = _topk(top_k=4, rank=5)
    x = random_tokens(n=17).double()
    _, w = m(x, causal=True, return_weights=True)
    r = _routing(m, x, causal=True)
    allow = torch.zeros(2, 4, 17, 18, dtype=torch.bool).scatter_(-1, r.masked_fill(r < 0, 17), True)[..., :17]
    assert ((w != 0).sum(-1) <= 4).all()
    assert (w.sum(-1) - 1).abs().max() < 1e-12
    assert (w[~allow] == 0).all()


@pytest.mark.parametrize("rope", [None, True])
def test_decoding_with_the_kv_cache_equals_the_full_forward(rope):
    m = _topk(top_k=4, rank=3, rope=rope)
    x = random_tokens(n=14).double()
    full = m(x, causal=True)
    cache = KVCache()
    steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(14)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-12


def test_decoding_projects_each_key_once_and_notices_a_changed_predictor(monkeypatch):
    m = _topk(top_k=4, rank=3)
    x = random_tokens(n=14).double()
    projected = []
    project_keys = m.predictor.project_keys
    monkeypatch.setattr(m.predictor, "project_keys", lambda k: projected.append(k.shape[2]) or project_keys(k))
    cache = KVCache()
    with torch.no_grad():
        steps = [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(7)]
        assert projected == [1] * 7 and cache.state[topk_module.PREDICTOR_KEYS][1].shape[2] == 7
        m.predictor.k_weight.neg_()  # in place: the ranking of the keys turns around
        steps += [m(x[:, i:i + 1], causal=True, cache=cache) for i in range(7, 14)]
        assert projected[7:] == [8] + [1] * 6  # the change starts the projected keys over
        changed = m(x, causal=True)
    assert (torch.cat(steps[7:], 1) - changed[:, 7:]).abs().max() < 1e-12
    m.predictor.k_weight.data.neg_()
    assert (m(x, causal=True) - changed)[:, 7:].abs().max() > 1e-3  # the change mattered


def test_the_output_gradient_never_reaches_the_predictor():
    m = _topk(rank=4)
    m(random_tokens(n=12).double(), causal=True).square().sum().backward()
    named = dict(m.named_parameters())
    assert all(named[n].grad is None for n in named if n.startswith("predictor."))
    assert named["q_proj.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_predictor_loss_is_the_kl_to_dense_attention_and_trains_only_the_predictor(causal):
    m = _topk(rank=4)
    x = random_tokens(n=12).double()
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 9:] = False
    loss = m.predictor_loss(x, mask=keep, causal=causal)
    loss.backward()
    named = dict(m.named_parameters())
    assert all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in named if n.startswith("predictor."))
    assert all(named[n].grad is None for n in named if not n.startswith("predictor."))
    # by hand: target from mha's weights, prediction from the predictor's scores, mean over kept queries and heads
    _, w = mha_from(m)(x, causal=causal, mask=keep, return_weights=True)
    q, k, _ = m.project(x, x)
    qs, ks = m.predictor.project(q, k)
    allow = torch.ones(12, 12, dtype=torch.bool)
    allow = (allow.tril() if causal else allow) & keep.view(2, 1, 1, 12)
    logp = torch.log_softmax((qs @ ks.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allow, float("-inf")), -1)
    terms = torch.where(w > 0, w * (w.clamp(min=1e-300).log() - logp), torch.zeros_like(w)).sum(-1)
    rows = keep.view(2, 1, 12).expand(2, 4, 12)
    assert abs(loss.item() - terms[rows].mean().item()) < 1e-12


@pytest.mark.parametrize("rope", [None, True])
def test_identity_predictor_has_zero_loss(rope):
    m = _topk(rank=8, rope=rope)
    m.predictor.set_identity_()
    assert m.predictor_loss(random_tokens(n=10).double(), causal=True).abs().item() < 1e-12


def _chosen(m, x, causal):
    r = _routing(m, x, causal)
    n = x.shape[1]
    return torch.zeros(*r.shape[:-1], n + 1, dtype=torch.bool).scatter_(-1, r.masked_fill(r < 0, n), True)[..., :n]


def test_a_short_training_of_the_predictor_lowers_its_loss_and_its_choice_approaches_the_exact_one():
    m = _topk(rank=2, top_k=3)
    exact = _chosen(_topk(scorer="exact", top_k=3), x := random_tokens(n=16).double(), True)
    opt = torch.optim.Adam(m.predictor.parameters(), lr=0.1)
    before = m.predictor_loss(x, causal=True).item()
    overlap_before = (_chosen(m, x, True) & exact).sum().item()
    for _ in range(20):
        opt.zero_grad()
        m.predictor_loss(x, causal=True).backward()
        opt.step()
    after = m.predictor_loss(x, causal=True).item()
    overlap_after = (_chosen(m, x, True) & exact).sum().item()
    assert after < 0.5 * before, (before, after)
    assert overlap_after > overlap_before, (overlap_before, overlap_after)


@pytest.mark.parametrize("kw,name", [
    ({"rank": 0}, "rank"),
    ({"rank": 9}, "rank"),
    ({"rank": 2.0}, "rank"),
    ({"rank": 4, "scorer": "exact"}, "rank"),
    ({"scorer": "sketch"}, "scorer"),
    ({"top_k": 0}, "top_k"),
])
def test_bad_arguments_name_themselves(kw, name, monkeypatch):
    built = []
    monkeypatch.setattr(topk_module.ConnectivityPredictor, "__init__", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=name):
        create("topk_attention", dim=32, n_heads=4, **{"scorer": "predictor", **kw})
    assert not built


def test_predictor_loss_needs_the_predictor():
    with pytest.raises(ValueError, match="scorer"):
        _topk(scorer="exact").predictor_loss(random_tokens(n=6).double())


def test_rank_defaults_to_half_the_head_dim_and_shows_in_the_repr():
    m = _topk()
    assert m.predictor.rank == 4 and tuple(m.predictor.q_weight.shape) == (4, 8, 4)
    assert "rank=4" in repr(m) and "scorer='predictor'" in repr(m)
