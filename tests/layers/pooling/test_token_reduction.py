"""token_reduction: exactly K tokens, order kept, padding ignored, SpAtten's cascade, bad K."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.layers.pooling.token_reduction import CumulativeImportance
from tests.layers.pooling._bags import bags


def test_prune_keeps_top_k_in_order():
    x, mask, _, _ = bags()
    imp = torch.randn(4, 9, dtype=torch.float64)
    out, (idx, _) = attnzoo.create("token_reduction", dim=16, k=3)(x, mask=mask, importance=imp, return_info=True)
    assert out.shape == (4, 3, 16)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    for b in (0, 1, 3):  # bags with >= 3 real tokens: the three most important real ones
        want = imp[b].masked_fill(~mask[b], -float("inf")).topk(3).indices.sort().values
        assert idx[b].tolist() == want.tolist()
        torch.testing.assert_close(out[b], x[b, want])
    assert (out[2, 1:] == 0).all()  # a bag of one token: the other rows hold no real token


def test_padding_changes_nothing_and_fused_token():
    x, mask, _, _ = bags()
    m = attnzoo.create("token_reduction", dim=16, k=4, fuse_pruned=True)
    y = m(x, mask=mask)
    x2 = torch.where(mask[..., None], x, 50 * torch.randn_like(x))
    torch.testing.assert_close(m(x2, mask=mask), y)
    assert y.shape == (4, 5, 16)
    assert (m(x, mask=torch.zeros_like(mask)) == 0).all()


def test_merge_gives_k_tokens_and_conserves_size():
    x, _, _, _ = bags()
    size = torch.rand(4, 9, dtype=torch.float64) + 0.5
    out, (idx, sizes) = attnzoo.create("token_reduction", dim=16, mode="merge", k=6)(x, size=size, return_info=True)
    assert out.shape == (4, 6, 16)
    torch.testing.assert_close(sizes.sum(1), size.sum(1))
    torch.testing.assert_close((out * sizes[..., None]).sum(1), (x * size[..., None]).sum(1))


def test_spatten_cumulative_importance_cascade():
    torch.manual_seed(0)
    ci = CumulativeImportance(2, 10)
    history = []
    for k in (8, 5, 3):
        n = ci.alive.shape[1]
        before = ci.score.clone()
        after = ci.update(torch.softmax(torch.randn(2, 2, n, n), -1))
        assert (after >= before).all()
        pruned = set(range(10)) - set(ci.prune(k)[0].tolist())
        history.append(pruned)
        assert not (pruned & set(ci.alive[0].tolist()))
    assert history[0] <= history[1] <= history[2]


def test_bad_k():
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="k: expected k <= N = 5 \\(the number of tokens\\), got k=6"):
        attnzoo.create("token_reduction", dim=16, k=6)(x)
    with pytest.raises(ValueError, match="k: bipartite merging removes at most N // 2 tokens"):
        attnzoo.create("token_reduction", dim=16, mode="merge", k=2)(x)
    with pytest.raises(ValueError, match="importance: expected a tensor \\[2, 5\\], got \\[2, 4\\]"):
        attnzoo.create("token_reduction", dim=16, k=2)(x, importance=torch.randn(2, 4))
