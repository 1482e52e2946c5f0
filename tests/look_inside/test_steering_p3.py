"""Properties of the multi-pass and diffusion steering entries (attnzoo/inspect/steering) beyond the conformance
suite: the TinyDiT host, exact edits, composition with capture, bad targets, Hugging Face causal LMs."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.bench.models import TinyDiT, ddim_sample
from attnzoo.inspect import capture
from attnzoo.inspect.steering._common import recorded, tiny_dit, tiny_lm
from attnzoo.inspect.steering.attention_guidance_loss import concept_maps, excite_loss, segregation_loss
from attnzoo.inspect.steering.perturbed_attention_guidance import headhunter, soften


def _no_instance_attributes(model):
    return {(n, k) for n, m in model.named_modules() for k in vars(m) if k in ("attend", "output", "attention_scale")}


def test_dit_host_shapes_determinism_and_bad_latents():
    host, (x, t, text) = tiny_dit()
    y = host(x, t, text)
    assert y.shape == x.shape
    torch.testing.assert_close(ddim_sample(host, x, text, steps=3), ddim_sample(host, x, text, steps=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="latents"):
        host(torch.randn(2, 5, 4, 4, dtype=torch.float64), t, text)
    with pytest.raises(ValueError, match="text"):
        host(x, t, text.float())
    assert host.self_layers == [0, 2] and host.cross_layers == [1, 3]
    with pytest.raises(ValueError, match="grid"):
        TinyDiT(grid=(4,))


def test_hard_region_mask_gives_exactly_zero_weight_outside_and_rows_sum_to_one():
    host, (x, t, text) = tiny_dit()
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True
    steered = attnzoo.create("region_mask_attention", host, regions={2: region})
    with steered, recorded(host, host.cross_layers) as maps:
        host(x, t, text)
    for i in host.cross_layers:
        w = maps[i]
        assert (w[:, :, ~region.reshape(-1), 2] == 0).all() and (w[:, :, region.reshape(-1), 2] > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert not _no_instance_attributes(host)
    boost = attnzoo.create("region_mask_attention", host, regions={2: region}, mode="boost", strength=2.0)
    assert not torch.allclose(boost(x, t, text), host(x, t, text))


def test_key_masking_keeps_outputs_outside_the_hole():
    host, (x, t, text) = tiny_dit()
    hole = torch.zeros(4, 4, dtype=torch.bool)
    hole[1:3, 1:3] = True
    steered = attnzoo.create("region_mask_attention", host, hole=hole)
    x2 = x.clone()
    x2[:, hole] = torch.randn_like(x2[:, hole]) * 3
    y, y2 = steered(x, t, text), steered(x2, t, text)
    torch.testing.assert_close(y2[:, ~hole], y[:, ~hole], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(host(x2, t, text)[:, ~hole], host(x, t, text)[:, ~hole])


def test_region_masks_of_the_wrong_grid_and_missing_targets_are_refused():
    host, _ = tiny_dit()
    with pytest.raises(ValueError, match=r"regions\[1\].*grid \[4, 4\]"):
        attnzoo.create("region_mask_attention", host, regions={1: torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="hole"):
        attnzoo.create("region_mask_attention", host, hole=torch.ones(5, dtype=torch.bool))
    lm, tokens = tiny_lm()
    with pytest.raises(ValueError, match=r"regions\[1\]"):
        attnzoo.create("region_mask_attention", lm, regions={1: torch.ones(5, dtype=torch.bool)})(tokens)
    with pytest.raises(ValueError, match="head 7 does not exist in layer 1"):
        attnzoo.create("perturbed_attention_guidance", lm, heads=[(1, 7)])
    with pytest.raises(ValueError, match="layers"):
        attnzoo.create("perturbed_attention_guidance", lm, heads=[(4, 0)])
    with pytest.raises(ValueError, match="layers"):
        attnzoo.create("attention_injection", lm, tokens, layers=[9])
    with pytest.raises(ValueError, match="head"):
        attnzoo.create("activation_steering", lm, torch.zeros(8), head=(0, 2))  # TinyLM(16, 16, 2, 2): 2 heads
    with pytest.raises(ValueError, match="module"):
        attnzoo.create("activation_steering", lm, torch.zeros(16), site="module", module="blocks.7")


def test_pag_identity_map_and_guidance():
    host, (x, t, text) = tiny_dit()
    w = torch.softmax(torch.randn(2, 4, 5, 5, dtype=torch.float64), -1)
    s = soften(w, 0.3, [1])
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(s[:, 0], w[:, 0])
    from attnzoo.inspect._edits import installed

    pag = attnzoo.create("perturbed_attention_guidance", host, heads=[(0, 1)], u=1.0, scale=0.0)

    with installed(host, pag.perturbed()), recorded(host, [0], "head_outputs") as z:
        host(x, t, text)
    # u = 1: head 1 of layer 0 outputs its own values
    layer = host.blocks[0]["self_attn"]
    h = host.patch_in(x.reshape(2, 16, 4)) + host.pos + host._t_embed(t, 2, x.dtype)[:, None]
    v = layer.split(layer.v_proj(host.blocks[0]["norm1"](h)), layer.n_kv_heads)
    torch.testing.assert_close(z[0][:, 1], v[:, 1], rtol=1e-12, atol=1e-12)
    guided = attnzoo.create("perturbed_attention_guidance", host, heads=[(0, 1)], u=1.0, scale=2.0)
    eps = host(x, t, text)
    with installed(host, guided.perturbed()):
        eps_pert = host(x, t, text)
    torch.testing.assert_close(guided(x, t, text), eps + 2.0 * (eps - eps_pert))
    with pytest.raises(ValueError, match="identity map needs self-attention"):
        attnzoo.create("perturbed_attention_guidance", host, heads=[(1, 0)], scale=1.0)(x, t, text)


def test_headhunter_greedy_selection():
    gains = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 0.5}
    assert headhunter(lambda sel: sum(gains[c] for c in sel), list(gains), 2) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="k"):
        headhunter(lambda sel: 0.0, list(gains), 5)


def test_injection_features_lambda_one_and_schedule():
    host, (x, t, text) = tiny_dit()
    src = (x[1:], t[1:], text[1:])
    inj = attnzoo.create("attention_injection", host, src, lam=1.0, what="features", layers=[0])
    with recorded(host, [0], "head_outputs") as zs:
        host(*src)
    got = {}
    with inj.inject(inj.record(), 1.0), recorded(host, [0], "head_outputs") as zt:
        host(x[:1], t[:1], text[:1])
        got = zt[0]
    torch.testing.assert_close(got, zs[0])
    sched = attnzoo.create("attention_injection", host, src, lam=lambda x, t, text: float(t[0] < 100))
    torch.testing.assert_close(sched(x[:1], t[:1], text[:1]), host(x[:1], t[:1], text[:1]))  # t = 500: λ = 0
    with pytest.raises(ValueError, match="source"):
        attnzoo.create("attention_injection", host, (x, t, text[:, :3]))(x, t, text)  # 3 vs 5 text keys


def test_reference_attention_masks_and_frames():
    host, tokens = tiny_lm()
    ref = torch.tensor([[3, 4, 5, 6]])
    steered = attnzoo.create("reference_attention", host, ref, reference_mask=[True, True, True, False])
    y = steered(tokens)
    other = ref.clone()
    other[0, 3] = 9  # the masked reference token's content does not matter (the reference pass is causal)
    torch.testing.assert_close(attnzoo.create("reference_attention", host, other,
                                              reference_mask=[True, True, True, False])(tokens), y)
    assert not torch.allclose(y, host(tokens))
    assert not _no_instance_attributes(host)
    cache = capture(steered, tokens, what=("head_outputs",))  # composes with capture: the last pass is the target
    torch.testing.assert_close(cache.output, y)
    with recorded(host, [0], "head_outputs") as plain:
        host(tokens)
    assert cache["head_outputs", 0].shape == plain[0].shape and not torch.allclose(cache["head_outputs", 0], plain[0])


def test_activation_steering_changes_exactly_the_selected_dimensions_by_alpha_v():
    host, tokens = tiny_lm()
    v = torch.arange(8, dtype=torch.float64) - 3
    m = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float64)
    steer = attnzoo.create("activation_steering", host, v, head=(1, 1), mask=m, alpha=0.5)
    with recorded(host, [1], "head_outputs") as base:
        host(tokens)
    with steer, recorded(host, [1], "head_outputs") as got:
        host(tokens)
    diff = got[1] - base[1]
    torch.testing.assert_close(diff[:, 1], (0.5 * m * v).expand_as(diff[:, 1]), rtol=0, atol=1e-12)
    assert (diff[:, 0] == 0).all()
    adaptive = attnzoo.create("activation_steering", host, v, head=(1, 1), alpha=lambda h: h.norm(dim=-1,
                                                                                                keepdim=True))
    assert not torch.allclose(adaptive(tokens), host(tokens))


def test_activation_steering_sets_the_greedy_token_on_tinylm():
    host, tokens = tiny_lm()
    target = 11
    v = host.head.weight[target].detach() * 50
    y = attnzoo.create("activation_steering", host, v, site="module", module="blocks.1.mlp")(tokens)
    assert (y.argmax(-1) == target).all() and not (host(tokens).argmax(-1) == target).all()
    with pytest.raises(RuntimeError, match="never called"):
        attnzoo.create("activation_steering", host, v, site="module", module="blocks.1")(tokens)


def test_guidance_loss_maps_and_update():
    w = torch.softmax(torch.randn(2, 3, 16, 5, dtype=torch.float64), -1)
    maps = concept_maps(w, [1, 3], grid=(4, 4))
    assert maps.shape == (2, 16, 2) and (maps >= 0).all() and (maps <= 1).all()
    loss = excite_loss(maps)
    assert ((loss >= 0) & (loss <= 1)).all()
    assert (segregation_loss(maps) > 0).all()
    with pytest.raises(ValueError, match="tokens"):
        concept_maps(w, [0, 1])  # <sot> is not a concept token
    host, (x, t, text) = tiny_dit()
    steered = attnzoo.create("attention_guidance_loss", host, [1, 3], alpha=5.0, steps=3)
    with recorded(host, host.cross_layers) as before:
        host(x, t, text)
    l0 = steered.objective([before[i] for i in host.cross_layers]).sum()
    z = x.clone().requires_grad_()
    with recorded(host, host.cross_layers) as got:
        host(z, t, text)
    (g,) = torch.autograd.grad(steered.objective([got[i] for i in host.cross_layers]).sum(), z)
    with recorded(host, host.cross_layers) as after:
        host(x - 1e-3 * g, t, text)
    assert steered.objective([after[i] for i in host.cross_layers]).sum() < l0  # the update lowers the loss
    assert not torch.allclose(steered(x, t, text), host(x, t, text))
    with pytest.raises(ValueError, match="masks"):
        attnzoo.create("attention_guidance_loss", host, [1], loss="retention", masks=torch.ones(1, 3, 3,
                                                                                              dtype=torch.bool))


def test_contrastive_decoding_uses_the_blind_tokens():
    from attnzoo.inspect.steering.attention_contrastive_decoding import blind_tokens

    a = torch.tensor([[[0.1, 0.6, 0.1, 0.1, 0.1]]], dtype=torch.float64)
    vis = torch.tensor([False, True, True, True, False])
    assert blind_tokens(a, vis, 1.0).tolist() == [[[False, True, False, False, False]]]
    host, tokens = tiny_lm()
    avc = attnzoo.create("attention_contrastive_decoding", host, [1, 2, 3, 4], lam=0.5, alpha=1.0, beta=0.1)
    y = avc(tokens)
    assert y.shape == (2, 9, 16) and not torch.allclose(y, host(tokens))


def _hf_lm():
    transformers = pytest.importorskip("transformers")
    from attnzoo.inspect._edits import attention_layers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    try:
        attention_layers(model)
    except TypeError as e:
        pytest.skip(f"this branch's Hugging Face layer discovery does not find {type(model).__name__}'s layers: {e}")
    return model


def test_activation_steering_and_avc_on_a_hugging_face_causal_lm():
    model = _hf_lm()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    base = model(ids).logits
    zero = attnzoo.create("activation_steering", model, torch.zeros(8), head=(1, 2))
    torch.testing.assert_close(zero(ids).logits, base, rtol=0, atol=0)
    target = 17
    v = model.lm_head.weight[target].detach() * 100
    y = attnzoo.create("activation_steering", model, v, site="module", module="model.layers.1")(ids).logits
    assert (y.argmax(-1) == target).all()
    avc0 = attnzoo.create("attention_contrastive_decoding", model, [0, 1, 2], alpha=0.0)
    torch.testing.assert_close(avc0(ids), base, rtol=0, atol=0)
    assert model.config._attn_implementation != "attnzoo"  # switched back on exit
