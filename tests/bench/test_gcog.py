"""The gCOG task: its OOD splits, determinism, the exact solver and ``attnzoo train``."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.bench.gcog import GCOG, depth, evaluate, signature
from attnzoo.bench.tasks import get_task
from attnzoo.cli import main


def test_systematic_test_compositions_never_appear_in_training():
    task = GCOG(split="systematic")
    train = {signature(t) for t, _ in task.examples(400, 0, "train")}
    test = {signature(t) for t, _ in task.examples(200, 1, "test")}
    assert test and train and not (train & test)
    assert all(task.held_out(t) for t, _ in task.examples(50, 2, "test"))


def test_productive_test_trees_are_deeper_than_any_training_tree():
    task = GCOG(split="productive", train_depth=1)
    train_depths = [depth(t) for t, _ in task.examples(300, 0, "train")]
    test_depths = [depth(t) for t, _ in task.examples(100, 1, "test")]
    assert max(train_depths) == 1 and min(test_depths) == 2


def test_distractor_split_adds_distractors_at_test_time():
    task = GCOG(split="distractor", distractors_train=1, distractors_test=6)
    train = task.examples(200, 0, "train")
    test = task.examples(200, 1, "test")
    n_ref = lambda t: len({x for leaf in _leaves(t) for x in leaf[1:]})  # noqa: E731 - an upper bound of referenced objects
    assert all(len(scene) <= n_ref(t) + 1 for t, scene in train)
    assert min(len(scene) for _, scene in test) >= 6
    assert max(len(s) for _, s in test) > max(len(s) for _, s in train)


def _leaves(tree):
    return [x for t in tree[1:] for x in _leaves(t)] if tree[0] in ("and", "or", "if") else [tree]


def test_seeded_and_every_answer_is_defined():
    task = GCOG(split="iid", train_depth=2)
    a, b = task.generate(64, 3), task.generate(64, 3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(task.generate(64, 4).inputs, a.inputs)
    for tree, scene in task.examples(100, 5):
        kind, _ = evaluate(tree, scene)
        assert kind in ("bool", "color", "shape")
        assert len({o[0] for o in scene}) == len(scene) and len({o[1] for o in scene}) == len(scene)
    assert task.score(task.oracle(a), a).mean() == 1.0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="split"):
        GCOG(split="compositional")
    with pytest.raises(ValueError, match="distractors_test"):
        GCOG(distractors_train=4, distractors_test=3)
    with pytest.raises(ValueError, match="n_colors"):
        GCOG(n_colors=5)
    with pytest.raises(ValueError, match="valid options"):
        get_task("gcog", depth=3)
    assert isinstance(attnzoo.create("gcog", split="productive"), GCOG)


def test_attnzoo_train_runs_gcog(capsys):
    assert main(["train", "--task", "gcog", "--task-arg", "split=systematic", "--mixer", "mha", "--mixer-arg",
                 "n_heads=2", "--dim", "32", "--max-steps", "3", "--n-train", "64", "--n-test", "16", "--no-store",
                 "--no-progress"]) == 0
    assert "gcog(split=systematic, train_depth=1)" in capsys.readouterr().out
