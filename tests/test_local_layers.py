"""Section 3 mixers beyond the conformance suite: learned grid biases against the reference, shift
schedules, DiNAT alternation, GATv2's dynamic ranking, the MoA profiler, LAIT stacks, 2-D pooling,
and bad input (errors that name the values)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.local_sparse.dilated_neighborhood import dinat_dilations
from attnzoo.layers.local_sparse.segment_mask import lait_stack
from attnzoo.layers.local_sparse.swin_window import msw_shift_schedule


def grid_x(*grid, b=2, seed=0):
    return torch.randn(b, *grid, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _with_table(m):
    for mod in m.modules():
        if isinstance(mod, attnzoo.patterns.GridRelativeBias):
            with torch.no_grad():
                mod.table.normal_()
    return m


@pytest.mark.parametrize("slug, kw, grid", [
    ("neighborhood", {"kernel_size": (3, 5), "dilation": (2, 1), "rpb": True}, (8, 10)),
    ("neighborhood", {"kernel_size": 3, "rpb": True, "ndim": 3}, (3, 4, 5)),
    ("swin_window", {"window": (2, 4), "shift": (1, 2), "rpb": True}, (6, 8)),
    ("swin_window", {"window": 2, "halo": 1, "rpb": True}, (6, 8)),
    ("swin_window", {"window": 2, "halo": 1, "halo_padding": "zeros", "rpb": True}, (6, 8)),
    ("multi_axis", {"block": 2, "grid": (3, 2), "rpb": True}, (6, 8)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_relative_bias_matches_reference_with_gradients(slug, kw, grid):
    torch.manual_seed(0)
    m = _with_table(attnzoo.create(slug, dim=32, n_heads=4, **kw)).double()
    torch.manual_seed(1)
    inner_ref = dict(kw)
    ref = attnzoo.create(slug, dim=32, n_heads=4, backend="reference", **inner_ref).double()
    ref.load_state_dict(m.state_dict())
    x = grid_x(*grid).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = m(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
        if "table" in name:
            assert p.grad.abs().sum() > 0


def test_zero_halo_padding_counts_border_keys():
    """HaloNet's zero padding differs from a clipped halo exactly at the border windows."""
    torch.manual_seed(0)
    zeros = attnzoo.create("swin_window", dim=32, n_heads=4, window=2, halo=1, halo_padding="zeros").double()
    clipped = attnzoo.create("swin_window", dim=32, n_heads=4, window=2, halo=1).double()
    clipped.load_state_dict(zeros.state_dict())
    x = grid_x(6, 8)
    diff = (zeros(x) - clipped(x)).abs().sum(-1)[0]
    assert (diff[0] > 1e-6).all() and (diff[:, 0] > 1e-6).all()
    assert torch.allclose(diff[2:4, 2:6], torch.zeros(2, 4, dtype=torch.float64))


def test_shift_schedule_and_dinat_dilations():
    assert [msw_shift_schedule(8)(t) for t in range(5)] == [(0, 0), (4, 0), (0, 4), (4, 4), (0, 0)]
    sched = msw_shift_schedule(4)
    torch.manual_seed(0)
    m = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift_schedule=sched).double()
    fixed = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=(2, 0)).double()
    fixed.load_state_dict(m.state_dict())
    x = grid_x(8, 8)
    m.step = 2
    assert not torch.allclose(m(x), fixed(x))
    fixed.shift = (0, 2)
    torch.testing.assert_close(m(x), fixed(x), rtol=1e-12, atol=1e-12)
    assert dinat_dilations((56, 56), 7, 4) == [(1, 1), (8, 8), (1, 1), (8, 8)]


def test_gatv2_ranking_can_depend_on_the_query():
    torch.manual_seed(3)
    m = attnzoo.create("graph_attention", dim=32, n_heads=4, scorer="gatv2").double()
    x = grid_x(10, b=2)
    q, k, _ = m.project(x, x)
    best = m.dense_scores(q, k).argmax(-1)
    assert any(len(torch.unique(best[b, h])) > 1 for b in range(2) for h in range(4))


def test_graph_attention_edges_adjacency_and_codebook():
    torch.manual_seed(0)
    m = attnzoo.create("graph_attention", dim=32, n_heads=4, scorer="gat", codebook_size=4).double()
    x = grid_x(7, b=2)
    edges = torch.tensor([[0, 0, 1, 2, 6], [1, 2, 0, 2, 3]])
    adj = torch.zeros(7, 7, dtype=torch.bool)
    adj[edges[0], edges[1]] = True
    torch.testing.assert_close(m(x, edges=edges), m(x, adj=adj), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"adj: expected a bool tensor \[7, 7\] or \[2, 7, 7\], got torch.bool"):
        m(x, adj=torch.ones(6, 6, dtype=torch.bool))


def test_moa_profile_respects_budget_and_prefers_useful_spans():
    torch.manual_seed(0)
    m = attnzoo.create("moa_window", dim=32, n_heads=4).double()
    x = grid_x(24, b=2)
    cands = [(2.0, 0.0), (4.0, 0.0), (2.0, 0.25), (24.0, 0.0)]
    for budget in (0.3, 0.6, 1.0):
        chosen = m.profile(x, lambda y: y.pow(2).mean(), cands, budget)
        kept = m.pattern.density(attnzoo.patterns.Shape(1, 4, 24, 24)) * 24 * 24 / (24 * 25 / 2)
        assert kept <= budget + 1e-12 and len(chosen) == 4 and all(c in cands for c in chosen)
    with pytest.raises(ValueError, match=r"budget: 0.01 is below the sparsest configuration"):
        m.profile(x, lambda y: y.pow(2).mean(), cands, 0.01)


def test_lait_stack_schedule():
    layers = lait_stack(32, 4, 4, 2, segment_size=3)
    assert [layer.segment_local for layer in layers] == [True, True, False, False]


def test_pooled_kv_2d_padding_and_hilo_1d():
    torch.manual_seed(0)
    m = attnzoo.create("pooled_kv", dim=32, n_heads=4, pool=2).double()
    x = grid_x(4, 6)
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[1, 2:, 4:] = False  # a whole 2x2 cell padded
    y = m(x, mask=keep)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 3)
    torch.testing.assert_close(m(x2, mask=keep)[keep], y[keep], rtol=1e-10, atol=1e-12)
    h = attnzoo.create("hilo", dim=32, n_heads=4, alpha=0.5, window=3).double()
    assert h(grid_x(12)).shape == (2, 12, 32)


def test_combiner_and_block_transformer_decode_and_weights():
    torch.manual_seed(0)
    c = attnzoo.create("combiner", dim=32, n_heads=4, block=4).double()
    x = grid_x(10, b=1)
    w = c.effective_weights(x, causal=True)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert (w[..., torch.triu(torch.ones(10, 10, dtype=torch.bool), 1)] == 0).all()
    bt = attnzoo.create("block_transformer", dim=32, n_heads=4, block_size=4).double()
    cache = attnzoo.layers.KVCache()
    outs = [bt(x[:, i:i + 3], cache=cache) for i in range(0, 10, 3)]
    torch.testing.assert_close(torch.cat(outs, 1), bt(x), rtol=1e-10, atol=1e-12)


# Bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("slug, kw, grid, match", [
    ("swin_window", {"window": 5}, (12, 12), r"window: window 5 does not divide the grid extent 12 on axis 0"),
    ("neighborhood", {"kernel_size": 9}, (8, 16), r"kernel_size: 9 is larger than the grid extent 8 on axis 0"),
    ("neighborhood", {"kernel_size": 3, "stride": 5}, (8, 16), r"stride: stride 5 is larger than kernel_size 3"),
    ("dilated_neighborhood", {"kernel_size": 5, "dilation": 3}, (12, 12),
     r"dilation: dilation 3 on axis 0 \(extent 12\) leaves groups of 4 positions, fewer than kernel_size 5"),
    ("multi_axis", {"block": 4, "grid": 5}, (8, 8), r"cells: 5 grid cells do not divide the grid extent 8"),
    ("hilo", {"window": 3}, (8, 9), r"window: window 3 does not divide the grid extent 8 on axis 0"),
    ("pooled_kv", {"pool": 3}, (8, 9), r"pool: pool 3 does not divide the grid extent 8 on axis 0"),
    ("neighborhood", {"kernel_size": (3, 3)}, (4, 4, 4), r"configured for 2 spatial axes, got grid \(4, 4, 4\)"),
    ("swin_window", {"window": (2, 2, 2)}, (4, 4), r"configured for 3 spatial axes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_grid_mixer_bad_input_names_values(slug, kw, grid, match):
    m = attnzoo.create(slug, dim=32, n_heads=4, **kw)
    with pytest.raises(ValueError, match=match):
        m(grid_x(*grid).float())


def test_grid_mixer_input_errors():
    m = attnzoo.create("neighborhood", dim=32, n_heads=4, kernel_size=3)
    with pytest.raises(ValueError, match=r"x: expected a channels-last tensor \[B, \*spatial, 32\] with 1 to 3"):
        m(torch.zeros(2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"mask: expected a bool tensor \[2, 4, 4\], got torch.bool \[2, 16\]"):
        m(torch.zeros(2, 4, 4, 32), mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache: NeighborhoodAttention does not decode"):
        m(torch.zeros(2, 4, 4, 32), cache=attnzoo.layers.KVCache())
    with pytest.raises(ValueError, match=r"stride: expected an int >= 1 or 2 of them"):
        attnzoo.create("neighborhood", dim=32, kernel_size=(3, 3), stride=(1, 1, 1))
    with pytest.raises(ValueError, match=r"shift: shift 4 must be smaller than the window 4"):
        attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=4)(torch.zeros(1, 8, 8, 32))
    with pytest.raises(ValueError, match=r"alpha: expected a fraction in \[0, 1\], got 1.5"):
        attnzoo.create("hilo", dim=32, n_heads=4, alpha=1.5)
    with pytest.raises(ValueError, match=r"even head count, got heads=3"):
        attnzoo.create("shifted_group_attention", dim=30, n_heads=3)
    with pytest.raises(ValueError, match=r"segment_ids: expected int \[2, 5\] or \[5\], got \[4\]"):
        attnzoo.create("segment_mask", dim=32, n_heads=4)(torch.zeros(2, 5, 32), segment_ids=torch.zeros(4))


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [
    lambda: attnzoo.patterns.WindowPartition((4, 4), grid=(8, 8), shift=(2, 2)),
    lambda: attnzoo.patterns.GridPartition((2, 4), grid=(8, 8)),
    lambda: attnzoo.patterns.Neighborhood((3, 5), dilation=(2, 1), grid=(8, 8)),
    lambda: attnzoo.patterns.SegmentMask(torch.arange(64) // 10, global_keys=2, causal=True),
    lambda: attnzoo.patterns.ShiftedGroups(8, n_sink=2),
    lambda: attnzoo.patterns.HeadSharded(4, causal=True),
], ids=["swin", "grid", "nbhd", "segments", "shifted", "sharded"])
def test_flex_cpu_forward_matches_reference(pattern):
    """FlexAttention (compiled, CPU inference) runs every new pattern's mask_mod."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(3))
    pat = pattern()
    got = attnzoo.attention(q, k, v, pattern=pat, backend="flex")
    want = attnzoo.attention(q.double(), k.double(), v.double(), pattern=pat, backend="reference")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cosine", [True, False])
def test_swin_global_queries_with_an_empty_pooled_cell_have_finite_gradients(cosine):
    """A shifted window reads the global query of a pooled cell whose tokens are all padded: its pooled mean
    is 0, and its gradient must stay finite (dividing by a tiny clamp gave inf, then NaN at the padded
    tokens)."""
    torch.manual_seed(0)
    m = attnzoo.create("swin_window", dim=32, n_heads=4, window=4, shift=2, query="global", cosine=cosine).double()
    x = torch.randn(2, 4, 4, 32, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[0, 0, 0] = False
    keep[1, :2, :2] = False
    (m(x, mask=keep) * 1000).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~keep] == 0).all()
