"""The bag tasks (registry entries of type task), the bag / CNN hosts, and training and comparing poolers on
them through ``attnzoo train`` and ``attnzoo compare`` (tiny, seeded)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.bench.models import BagClassifier, SmallCNN, build_model
from attnzoo.bench.pooling_tasks import MILBags, SetMaximum, auc
from attnzoo.bench.store import open_store
from attnzoo.bench.tasks import TASKS, get_task
from attnzoo.bench.train import TrainConfig, train
from attnzoo.cli import main

TINY_MIL = MILBags(n_features=4, min_bag=4, max_bag=8)
TINY_RUN = {"max_steps": 3, "n_train": 64, "n_test": 32, "batch_size": 16, "eval_every": 3}


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
    with pytest.raises(ValueError, match="pooler: a bag classifier .* takes a pooler, not a mixer"):
        BagClassifier("mha", n_features=4, n_classes=3)
    for channel in [None, *(s.slug for s in attnzoo.list(type="channel"))]:
        assert SmallCNN(channel, n_classes=5, width=8)(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_bag_tasks_are_registered_task_entries():
    for slug, cls in (("mil_bags", MILBags), ("set_maximum", SetMaximum)):
        spec = attnzoo.spec(slug)
        assert (spec.family, spec.type) == ("benchmark", "task") and TASKS[slug] is cls
        built = attnzoo.create(slug)
        assert isinstance(built, cls) and built == get_task(slug)
    assert attnzoo.create("mil_bags", max_bag=20).max_bag == 20
    with pytest.raises(ValueError, match="noise: expected a finite number >= 0"):
        attnzoo.create("set_maximum", noise=-1.0)
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        MILBags().generate(0, seed=0)


def test_train_a_pooler_on_the_mil_task():
    cfg = TrainConfig(mixer="abmil", mixer_kwargs={"attn_dim": 8}, dim=8, lr=3e-3, **TINY_RUN)
    res = train(TINY_MIL, cfg, progress=False)
    m = res.metrics
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["bag_auc"] <= 1 and 0 <= m["localisation_auc"] <= 1
    assert m["secondary_metrics"] == ["bag_auc", "localisation_auc"] and m["steps"] == 3
    assert res.config["positional"] == "none" and res.config["mlp_ratio"] is None
    again = train(TINY_MIL, cfg, progress=False).metrics
    assert (again["accuracy"], again["localisation_auc"]) == (m["accuracy"], m["localisation_auc"])  # seeded
    mean = train(SetMaximum(n_values=4, min_set=2, max_set=6), TrainConfig(mixer="mean_pool", dim=8, **TINY_RUN),
                 progress=False).metrics
    assert mean["secondary_metrics"] == ["localisation_auc"] and mean["localisation_auc"] is None  # no weights
    assert "bag_auc" not in mean


def test_a_mechanism_that_does_not_fit_the_task_is_refused_before_any_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data must not be generated")

    monkeypatch.setattr(MILBags, "splits", boom)
    with pytest.raises(ValueError, match=r"pooler: task 'mil_bags' .* takes a pooler, not a mixer \('mha'\); "
                                         "registered poolers: abmil"):
        train(TINY_MIL, TrainConfig(mixer="mha", **TINY_RUN), progress=False)
    with pytest.raises(ValueError, match=r"'abmil' is a pooler, not a token mixer \(poolers run on the bag tasks: "
                                         r"mil_bags, set_maximum\)"):
        build_model(get_task("mqar"), "abmil")
    with pytest.raises(ValueError, match="positional: the instances of a bag task"):
        build_model(TINY_MIL, "abmil", positional="learned")
    with pytest.raises(ValueError, match="mlp_ratio: the bag classifier"):
        build_model(TINY_MIL, "abmil", mlp_ratio=2.0)
    with pytest.raises(ValueError, match=r"pooler 'abmil': abmil: unknown argument\(s\) \['heads'\]"):
        build_model(TINY_MIL, "abmil", mixer_kwargs={"heads": 2})


def test_bag_classifier_layers_and_dropout():
    m = BagClassifier("mean_pool", n_features=3, n_classes=2, dim=8, n_layers=3, dropout=0.1, embed_dropout=0.2)
    assert sum(isinstance(x, torch.nn.Linear) for x in m.encoder) == 3
    assert sum(isinstance(x, torch.nn.Dropout) for x in m.modules()) == 3
    with pytest.raises(ValueError, match="n_layers: expected an integer >= 1, got 0"):
        BagClassifier("mean_pool", n_features=3, n_classes=2, n_layers=0)


def test_cli_train_with_a_pooler(tmp_path, capsys):
    store = tmp_path / "r.sqlite"
    args = ["train", "--task", "mil_bags", "--task-arg", "n_features=4", "--task-arg", "max_bag=8",
            "--task-arg", "min_bag=4", "--pooler", "attention_pool", "--dim", "8", "--n-train", "64", "--n-test",
            "32", "--batch-size", "16", "--max-steps", "2", "--store", str(store), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attention_pool: accuracy" in out and "bag_auc" in out and "localisation_auc" in out
    with open_store(store, create=False) as db:
        (run,) = db.runs(kind="train")
    assert run["mixer"] == "attention_pool" and run["task"].startswith("mil_bags(")
    assert 0 <= run["metrics"]["localisation_auc"] <= 1
    assert main(["train", "--task", "mil_bags", "--pooler", "mha", "--no-store"]) == 2
    assert "takes a pooler, not a mixer ('mha')" in capsys.readouterr().err
    assert main(["train", "--task", "mil_bags", "--positional", "learned", "--no-store"]) == 2
    assert "positional: the instances of a bag task" in capsys.readouterr().err


def test_compare_a_bag_task(tmp_path):
    from attnzoo.bench.compare import run_compare

    store = tmp_path / "r.sqlite"
    res = run_compare(None, task=TINY_MIL, mixers=["mean_pool", "abmil"], store=store, out=tmp_path / "report",
                      overrides=TINY_RUN, progress=False, log=lambda s: None, estimate=False)
    cols, rows = res.leaderboard
    label = TINY_MIL.label()
    assert cols[2:5] == [label, f"{label} bag_auc", f"{label} localisation_auc"]
    by = {r[1]: r for r in rows}
    assert set(by) == {"mean_pool", "abmil"} and by["mean_pool"][4] == "n/a" and 0 <= float(by["abmil"][4]) <= 1
    assert cols[-1] == "train time per run (s)" and float(by["abmil"][-1]) >= 0  # a tiny run may round to 0.0
    assert "localisation_auc" in res.report.read_text()
    with open_store(store, create=False) as db:
        assert {r["config"]["preset"] for r in db.runs(kind="train")} == {"task-mil_bags"}
        assert all(r["metrics"]["train_time_s"] > 0 for r in db.runs(kind="train"))
    with pytest.raises(ValueError, match="takes a pooler, not a mixer"):
        run_compare(None, task=TINY_MIL, mixers=["mha"], store=store, log=lambda s: None)
    with pytest.raises(ValueError, match="preset: give a preset or a task, not both"):
        run_compare("quick", task=TINY_MIL, store=store, log=lambda s: None)


def test_compare_preset_pooling(tmp_path):
    from attnzoo.bench.compare import run_compare

    res = run_compare("pooling", mixers=["mean_pool", "abmil"], store=tmp_path / "r.sqlite", out=tmp_path / "report",
                      overrides={**TINY_RUN, "dims": [8]}, progress=False, log=lambda s: None, estimate=False)
    cols, rows = res.leaderboard
    assert {r[1] for r in rows} == {"mean_pool", "abmil"}
    assert any(c.startswith("mil_bags") and c.endswith("localisation_auc") for c in cols)
    assert any(c.startswith("set_maximum") for c in cols)
    assert res.report is not None and res.report.exists()


def test_cli_compare_with_a_task(tmp_path, capsys):
    base = ["compare", "--store", str(tmp_path / "r.sqlite"), "--no-progress", "--no-estimate", "--no-report",
            "--max-steps", "2", "--n-train", "64", "--n-test", "32", "--batch-size", "16", "--dims", "8"]
    assert main([*base, "--task", "set_maximum", "--task-arg", "n_values=4", "--task-arg", "min_set=2",
                 "--task-arg", "max_set=6", "--poolers", "set_transformer_pma", "mean_pool"]) == 0
    out = capsys.readouterr().out
    assert "leaderboard (set_maximum(n_values=4, max_set=6)" in out and "localisation_auc" in out
    assert main([*base, "--task", "mil_bags", "--preset", "pooling"]) == 2
    assert "--task: runs one task instead of a preset" in capsys.readouterr().err
    assert main([*base, "--task-arg", "max_bag=4"]) == 2
    assert "--task-arg: options of a task given with --task" in capsys.readouterr().err
