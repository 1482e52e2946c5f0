"""The pooling tasks, the bag / CNN hosts and the pooling runner (tiny, seeded)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.bench.models import BagClassifier, SmallCNN
from attnzoo.bench.pooling_bench import run_pooling
from attnzoo.bench.pooling_tasks import MILBags, SetMaximum, auc


def test_auc():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5


def test_mil_bags_witnesses_and_equal_bag_means():
    task = MILBags(n_features=4, min_bag=10, max_bag=20)
    d = task.generate(400, seed=0)
    assert torch.equal(d.labels.bool(), (d.instance_labels & d.mask).any(1))
    u = task.direction()
    means = (d.inputs.sum(1) / d.mask.sum(1, keepdim=True)) @ u
    pos, neg = means[d.labels == 1], means[d.labels == 0]
    # the shift along u of a bag mean is the same in both classes: only the noise differs
    assert abs(pos.mean() - neg.mean()) < 0.1
    assert torch.equal(task.generate(5, seed=3).inputs, task.generate(5, seed=3).inputs)
    with pytest.raises(ValueError, match="max_bag: expected >= min_bag"):
        MILBags(min_bag=5, max_bag=4)


def test_set_maximum_labels():
    d = SetMaximum(n_values=6, min_set=3, max_set=5, noise=0.0).generate(50, seed=1)
    vals = d.inputs.argmax(-1).masked_fill(~d.mask, -1)
    assert torch.equal(vals.amax(1), d.labels)


def test_hosts():
    m = BagClassifier("attentive_stats_pool", n_features=4, n_classes=3, dim=8)
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    logits, w = m(x, mask, return_weights=True)
    assert logits.shape == (2, 3) and w.shape == (2, 5)
    assert BagClassifier("set_transformer_pma", n_features=4, n_classes=3, dim=8,
                         pooler_kwargs={"n_heads": 2, "n_seeds": 3})(x, mask).shape == (2, 3)
    with pytest.raises(ValueError, match="pooler: expected a registered pooler"):
        BagClassifier("mha", n_features=4, n_classes=3)
    for channel in [None, *(s.slug for s in attnzoo.list(type="channel"))]:
        assert SmallCNN(channel, n_classes=5, width=8)(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_run_pooling_tiny():
    rows = run_pooling(("mean_pool", "abmil"), tasks=(MILBags(n_features=4, min_bag=4, max_bag=8),), n_train=64,
                       n_test=32, steps=3, dim=8, log=lambda s: None)
    assert [r["pooler"] for r in rows] == ["mean_pool", "abmil"]
    assert rows[0]["localisation_auc"] is None and 0 <= rows[1]["localisation_auc"] <= 1
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["bag_auc"] <= 1 for r in rows)


def test_compare_preset_pooling(tmp_path):
    from attnzoo.bench.compare import run_compare

    res = run_compare("pooling", mixers=["mean_pool", "abmil"], store=tmp_path / "r.sqlite", out=tmp_path / "report",
                      overrides={"max_steps": 2}, log=lambda s: None)
    cols, rows = res.leaderboard
    assert {r[1] for r in rows} == {"mean_pool", "abmil"} and any("mil_bags" in c for c in cols)
    assert res.report is not None and res.report.exists()
    with pytest.raises(ValueError, match="preset: 'pooling' takes --mixers"):
        run_compare("pooling", store=tmp_path / "r.sqlite", overrides={"dims": [64]}, log=lambda s: None)
