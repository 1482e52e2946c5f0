"""The catalogue properties of the section-11 metrics."""

import math

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.inspect import capture
from attnzoo.inspect import metrics as M
from attnzoo.layers import MultiHeadAttention
from attnzoo.layers.lm import TinyLM

D = torch.float64


def soft(*shape, seed=0, t=1.0):
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D) * t, -1)


def test_registered_as_metrics():
    slugs = {s.slug for s in attnzoo.list(type="metric")}
    assert {"attention_rollout", "attention_mass", "attention_entropy", "attention_distance", "head_importance",
            "sink_score", "induction_head_score", "retrieval_head_score", "direct_logit_attribution",
            "activation_patching", "qk_ov_circuits", "attention_diversity", "head_divergence",
            "cross_attention_map"} <= slugs
    assert {"head_scale", "attention_reweight", "sink_redistribution"} <= {s.slug for s in attnzoo.list(
        type="steering")}


def test_rollout_properties():
    n = 6
    eye = torch.eye(n, dtype=D).expand(1, 2, n, n)
    assert torch.allclose(M.attention_rollout([eye, eye, eye])[0], torch.eye(n, dtype=D))
    ws = [soft(2, 3, n, n, seed=s) for s in range(3)]
    r = M.attention_rollout(ws)
    assert torch.allclose(r.sum(-1), torch.ones(2, n, dtype=D))
    a = ws[0].mean(1)
    assert torch.allclose(M.attention_rollout(ws[:1]), 0.5 * a + 0.5 * torch.eye(n, dtype=D))
    # newer layers on the left
    a1, a2 = (0.5 * w.mean(1) + 0.5 * torch.eye(n, dtype=D) for w in ws[:2])
    assert torch.allclose(M.attention_rollout(ws[:2]), a2 @ a1)
    # rows, not columns, are renormalised even with discarding and max fusion
    r2 = M.attention_rollout(ws, head_fusion="max", discard_ratio=0.5)
    assert torch.allclose(r2.sum(-1), torch.ones(2, n, dtype=D))


def test_max_flow_and_attention_flow():
    cap = np.zeros((4, 4))
    cap[0, 1], cap[0, 2], cap[1, 3], cap[2, 3], cap[1, 2] = 3.0, 2.0, 2.0, 3.0, 1.0
    assert M.max_flow(cap, 0, 3) == pytest.approx(5.0)
    # on a chain the flow equals the bottleneck
    chain = np.zeros((4, 4))
    chain[0, 1], chain[1, 2], chain[2, 3] = 0.7, 0.2, 0.9
    assert M.max_flow(chain, 0, 3) == pytest.approx(0.2)
    ws = [soft(1, 2, 4, 4, seed=s) for s in range(2)]
    raw = M.attention_flow(ws, normalize=False)
    assert (raw >= 0).all() and (raw <= 1 + 1e-12).all()
    nx = pytest.importorskip("networkx")
    from attnzoo.inspect.metrics.rollout import _layered_graph, augment, fuse_heads

    aug = [augment(fuse_heads(w, "mean"))[0].numpy() for w in ws]
    g = nx.DiGraph()
    cap = _layered_graph(aug)
    for i, j in zip(*np.nonzero(cap)):
        g.add_edge(int(i), int(j), capacity=float(cap[i, j]))
    for i in range(4):
        for j in range(4):
            assert raw[0, i, j].item() == pytest.approx(nx.maximum_flow_value(g, 8 + i, j), abs=1e-9)
    assert torch.allclose(M.attention_flow(ws).sum(-1), torch.ones(1, 4, dtype=D))


def test_mass_fai_penalty():
    w = soft(2, 3, 5, 5)
    m = M.attention_mass(w, [0, 2])
    assert ((m >= 0) & (m <= 1)).all()
    assert torch.allclose(m, w[..., [0, 2]].sum(-1))
    n = 6
    uni = torch.tril(torch.ones(n, n, dtype=D))
    uni = (uni / uni.sum(-1, keepdim=True))[None, None]
    fai = M.future_attention_influence(uni)[0, 0]
    for s in range(n - 1):
        assert fai[s].item() == pytest.approx(np.mean([1 / (t + 1) for t in range(s + 1, n)]))
    w2 = uni.clone()
    w2[..., :3, :] = 0.123  # rows t <= 2 do not affect FAI(2)
    assert M.future_attention_influence(w2)[0, 0, 2] == fai[2]
    assert torch.equal(M.deception_penalty(uni, [n - 1])[0, 0, :-1], torch.zeros(n - 1, dtype=D))
    assert M.span_mass(w, [(0, 2), (2, 5)]).sum(-1).allclose(torch.ones(2, 3, 5, dtype=D))


def test_entropy_and_locality():
    one = torch.zeros(1, 1, 1, 8, dtype=D)
    one[..., 3] = 1
    assert M.attention_entropy(one).item() == 0.0
    uni = torch.full((1, 1, 1, 8), 1 / 8, dtype=D)
    assert M.attention_entropy(uni).item() == pytest.approx(math.log(8))
    assert M.attention_entropy(uni, normalize=True).item() == pytest.approx(1.0)
    w = torch.zeros(1, 1, 2, 6, dtype=D)
    w[..., :3] = 1 / 3
    assert torch.equal(M.locality_penalty(w, [[0, 1, 2], [3, 4, 5]], allowed=[0]), torch.zeros(1, 1, 2, dtype=D))
    assert (M.locality_penalty(w, [[0, 1, 2], [3, 4, 5]], allowed=[1]) > 0).all()


def test_distance():
    n = 5
    assert torch.equal(M.attention_distance(torch.eye(n, dtype=D)[None, None]), torch.zeros(1, 1, n, dtype=D))
    pos = M.grid_positions(3, 3)
    uni = torch.full((1, 1, 9, 9), 1 / 9, dtype=D)
    mean_pair = torch.cdist(pos, pos).mean()
    assert M.attention_distance(uni, pos).mean().item() == pytest.approx(mean_pair.item())
    prof, edges = M.distance_profile(soft(2, 2, 9, 9), bins=4, positions=pos)
    assert torch.allclose(prof.sum(-1), torch.ones(2, 2, 9, dtype=D))
    assert (M.waad(soft(1, 1, 6, 6), 2) <= 2 + 1e-12).all()


def test_sink_score():
    n = 8
    w = torch.zeros(1, 2, n, n, dtype=D)
    w[..., 0] = 1.0  # every head attends only to token 0
    assert M.sink_score(w).item() == 1.0
    assert M.sink_score([w, w]).item() == 1.0
    uni = torch.tril(torch.ones(n, n, dtype=D))
    uni = (uni / uni.sum(-1, keepdim=True))[None, None]
    alpha = M.head_sink_alpha(uni)  # causal inferred: mean over the queries that see k
    assert alpha[0, 0, 0].item() == pytest.approx(np.mean([1 / (t + 1) for t in range(n)]))
    r = M.received_attention(soft(2, 3, 6, 6))
    assert torch.allclose(r.sum(-1), torch.ones(2, 3, dtype=D))
    h = torch.randn(2, 5, 16, dtype=D)
    h[0, 2, 3] = 50.0
    flags = M.massive_activations(h, tau=10.0)
    assert flags.sum() == 1 and flags[0, 2]
    cos, norm = M.secondary_sinks(h)
    assert ((cos >= -1) & (cos <= 1)).all() and torch.allclose(cos[:, 0], torch.ones(2, dtype=D))


def test_induction_conventions():
    t_len = 10
    r = torch.stack([torch.randperm(t_len, generator=torch.Generator().manual_seed(s)) + 1 for s in range(3)])
    toks = torch.cat([torch.zeros(3, 1, dtype=torch.long), r, r], 1)  # [BOS] + r + r, no repeat inside r
    assert M.repeated_tokens(3, t_len, 50).shape == toks.shape
    n = toks.shape[1]
    d = M.induction_targets(toks)
    # a hand-built induction head: second-half rows attend to the token after the previous occurrence
    w = torch.zeros(3, 1, n, n, dtype=D)
    w[:, 0, :, 0] = 1.0
    rows = d.sum(-1) > 0
    w[:, 0][rows] = d[rows] / d[rows].sum(-1, keepdim=True)
    w[:, 0][rows, 0] = 0.0
    stripe = M.induction_score_stripe(w, t_len).item()
    mul = M.induction_score_mul(w, toks).item()
    assert stripe == pytest.approx((t_len + 1) / (t_len + 2))  # ≈ 1 (one stripe entry, row T, targets token 1)
    assert mul == pytest.approx(t_len / n)  # TransformerLens "mul": ≈ 0.5 on two repeats
    uni = torch.tril(torch.ones(n, n, dtype=D))
    uni = (uni / uni.sum(-1, keepdim=True)).expand(3, 1, n, n)
    expect = np.mean([1 / (i + 1) for i in range(t_len - 1, n)])
    assert M.induction_score_stripe(uni, t_len).item() == pytest.approx(expect)
    assert M.copying_score(torch.eye(5, dtype=D)).item() == pytest.approx(1.0)
    assert M.copying_score(-torch.eye(5, dtype=D)).item() == pytest.approx(-1.0)
    assert M.icl_score(torch.tensor([3.0, 2.0, 1.0]), early=0, late=500).item() == -2.0


def test_retrieval_head_score():
    prompt = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    needle = (2, 5)  # tokens 7, 8, 9
    gen = torch.tensor([7, 8, 9])
    perfect = torch.zeros(3, 2, 7)
    for s, pos in enumerate([2, 3, 4]):
        perfect[s, 0, pos] = 1.0  # head 0 attends to the source of the emitted token
    perfect[:, 1, 0] = 1.0  # head 1 never attends into the needle
    sc = M.retrieval_head_score(perfect, gen, prompt, needle)
    assert sc.tolist() == [1.0, 0.0]
    assert M.retrieval_heads(sc) == [(0,)]
    assert M.rouge1_recall([7, 8], [7, 8, 9]) == pytest.approx(2 / 3)


def test_dla_sums_to_logit():
    torch.manual_seed(0)
    lm = TinyLM(vocab=20, dim=16, n_heads=2, n_layers=2).double().eval()
    toks = torch.randint(0, 20, (2, 7))
    comps, resid = M.decompose_tinylm(lm, toks)
    assert torch.allclose(sum(comps.values()), resid)
    logits = lm(toks)
    ans = torch.randint(0, 20, (2, 7))
    dla = M.direct_logit_attribution(comps, resid, lm.head.weight.detach(), ans, ln=lm.norm)
    total = sum(dla.values())
    assert torch.allclose(total, logits.gather(-1, ans[..., None])[..., 0].detach())
    # per-source DLA of a head sums to the head's DLA
    att = lm.blocks[1]["attn"]
    c = capture(lm, toks, what=("weights", "head_outputs"))
    x_in = {}
    hook = att.register_forward_pre_hook(lambda m, a: x_in.__setitem__("x", a[0]))
    lm(toks)
    hook.remove()
    v = MultiHeadAttention.split(att.v_proj(x_in["x"]), att.n_heads).detach()
    wo = att.o_proj.weight.detach().view(16, 2, 8).permute(1, 2, 0)
    wo_c = wo - wo.mean(-1, keepdim=True)
    u = lm.norm.weight.detach() * lm.head.weight.detach()[3]
    s = torch.sqrt(resid.var(-1, unbiased=False) + lm.norm.eps)
    ps = M.per_source_dla(c["weights", 1], v, wo_c, u, s)
    dla3 = M.direct_logit_attribution(comps, resid, lm.head.weight.detach(), 3, ln=lm.norm)
    assert torch.allclose(ps[:, 0].sum(-1), dla3["L1H0"])


def test_activation_patching():
    torch.manual_seed(0)
    lm = TinyLM(vocab=20, dim=16, n_heads=2, n_layers=2).double().eval()
    clean = torch.randint(0, 20, (1, 8))
    corrupt = clean.clone()
    corrupt[0, :4] = (corrupt[0, :4] + 7) % 20  # differs only before the measured position

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 5]

    # patching with its own activations changes nothing
    own = M.activation_patching(lm, clean, clean, metric)
    assert torch.allclose(own, torch.zeros_like(own), atol=1e-12)
    # patching every head with clean activations recovers the clean metric
    src = capture(lm, clean, what=("head_outputs",))
    heads = [(li, h) for li in range(2) for h in range(2)]
    with torch.no_grad():
        out = M.patched_run(lm, corrupt, src, heads)
        assert metric(out).item() == pytest.approx(metric(lm(clean)).item(), abs=1e-10)
    assert M.circuit_overlap(heads, heads) == 1.0
    assert 0 <= M.circuit_overlap(heads[:2], heads[1:]) <= 1


def test_head_importance_formula():
    torch.manual_seed(0)
    lm = TinyLM(vocab=20, dim=16, n_heads=2, n_layers=2).double().eval()
    toks = torch.randint(0, 20, (2, 6))

    def loss(logits):
        return logits.pow(2).mean()

    imp = M.head_importance(lm, toks, loss, normalize=False)
    c = capture(lm, toks, what=("head_outputs",), detach=False)
    zs = [c["head_outputs", li] for li in range(2)]
    grads = torch.autograd.grad(loss(c.output), zs)
    formula = torch.stack([(z * g).sum(dim=(0, 2, 3)).abs() for z, g in zip(zs, grads)])
    assert torch.allclose(imp, formula)
    # a head whose output contributes nothing has importance 0
    with torch.no_grad():
        lm.blocks[0]["attn"].o_proj.weight[:, 8:] = 0
    imp = M.head_importance(lm, toks, loss)
    assert imp[0, 1] == 0 and imp[0, 0] > 0
    abl = M.ablation_importance(lm, toks, loss)
    assert abl[0, 1] == 0


def test_circuits_diversity_divergence_cross():
    m = MultiHeadAttention(4, 2, head_dim=4, bias=False).double()
    with torch.no_grad():
        for p in (m.q_proj, m.k_proj):
            p.weight.copy_(torch.cat([torch.eye(4), 2 * torch.eye(4)]).double())
    w_kq, w_ov = M.qk_ov_circuits(m)
    assert torch.allclose(M.diagonality(w_kq), torch.zeros(2, dtype=D))
    assert M.homogeneity(w_kq).item() == pytest.approx(1.0)
    assert M.ov_last_entry(w_ov)[0].shape == (2,)
    same = torch.full((1, 1, 4, 5), 0.2, dtype=D)
    assert M.attention_diversity(same).item() == pytest.approx(1.0)
    assert M.attention_diversity(torch.eye(4, dtype=D)[None, None]).item() == pytest.approx(0.0)
    # VHD: text first, image tokens appended; causal heads ignore the later image tokens
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    text = torch.randn(1, 5, 8, dtype=D)
    img = torch.randn(1, 3, 8, dtype=D)
    both = torch.cat([text, img], 1)
    a = capture(mha, both, what="head_outputs", causal=True)["head_outputs", 0][:, :, :5]
    b = capture(mha, text, what="head_outputs", causal=True)["head_outputs", 0]
    assert torch.allclose(M.head_divergence_from_outputs(a, b), torch.zeros(1, 2, dtype=D))
    vhd = M.head_divergence(mha, both, both, range(8), range(8))
    assert torch.equal(vhd, torch.zeros_like(vhd))
    cross = soft(2, 4, 9, 6)
    maps = M.cross_attention_map([cross, soft(2, 4, 9, 6, seed=1)], [1, 3, 4])
    assert torch.allclose(maps.sum(-1), torch.ones(2, 9, dtype=D))
    masks = M.masks_from_maps(maps)
    assert (masks.sum(1) == 1).all()  # argmax masks are disjoint and cover every pixel
    refined = M.cross_attention_map(cross, [0, 1], self_attention=soft(2, 4, 9, 9))
    assert torch.allclose(refined.sum(-1), torch.ones(2, 9, dtype=D))


def test_agreement_and_long_context():
    a = torch.rand(3, 10, dtype=D)
    assert torch.allclose(M.attention_attribution_agreement(a, a), torch.ones(3, dtype=D))
    assert torch.allclose(M.attention_attribution_agreement(a, 5 * a, "pearson"), torch.ones(3, dtype=D))
    assert ((M.relevance_captured(a, a) >= 0) & (M.relevance_captured(a, a) <= 1)).all()
    g = torch.Generator().manual_seed(0)
    d = 8
    q = torch.randn(d, generator=g, dtype=D) * 0.5
    mean = torch.randn(d, generator=g, dtype=D) * 0.3
    far = mean + 0.4 * torch.randn(200000, d, generator=g, dtype=D)
    exact = torch.exp(far @ q / math.sqrt(d)).sum()
    est = M.far_mass_estimate(q, mean, 0.16 * torch.eye(d, dtype=D), far.shape[0])
    assert est.item() == pytest.approx(exact.item(), rel=0.02)
    flags, share = M.long_context_head_id(torch.randn(1, 2, 3, d, dtype=D), torch.randn(1, 2, 16, d, dtype=D), 100)
    assert flags.shape == (1, 2, 3) and ((share >= 0) & (share <= 1)).all()


def test_long_context_head_id_without_far_keys():
    q, k = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 16, 8, dtype=torch.float64)
    flags, share = M.long_context_head_id(q, k, 0)
    assert (share == 0).all() and not flags.any()
    assert (M.long_context_head_id(q, k, 1)[1] > 0).all()
    with pytest.raises(ValueError, match="n_far"):
        M.long_context_head_id(q, k, -1)
