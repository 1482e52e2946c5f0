"""Benchmark task generators: the properties their papers specify."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnzoo
from attnzoo.bench.tasks import (
    IGNORE,
    MQAR,
    MQAR_PAPER_CONFIGS,
    ICLLinearRegression,
    Induction,
    ListOps,
    SelectiveCopy,
    get_task,
    listops_tokens,
    lm_accuracy,
    ridge_predict,
)


# MQAR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len,pairs", MQAR_PAPER_CONFIGS)
def test_mqar_structure(seq_len, pairs):
    task = MQAR.paper(seq_len)
    assert (task.num_kv_pairs, task.vocab_size, task.power_a, task.random_non_queries) == (pairs, 8192, 0.01, False)
    data = task.generate(40, seed=0)
    x, y = data.inputs, data.labels
    assert x.shape == y.shape == (40, seq_len) and x.dtype == y.dtype == torch.int64
    ctx = 2 * pairs
    keys, values = x[:, 0:ctx:2], x[:, 1:ctx:2]
    half = 8192 // 2
    assert ((keys >= 1) & (keys < half)).all(), "keys come from the first half of the vocabulary (never 0)"
    assert ((values >= half) & (values < 8192)).all(), "values come from the second half"
    for e in range(40):
        assert len(set(keys[e].tolist())) == pairs and len(set(values[e].tolist())) == pairs
        pos = (y[e] != IGNORE).nonzero().flatten()
        assert len(pos) == pairs, "one label per key"
        assert (pos >= ctx).all() and ((pos - ctx) % 2 == 0).all(), "queries at even offsets after the context"
        queried = x[e, pos]
        assert sorted(queried.tolist()) == sorted(keys[e].tolist()), "each key is queried exactly once"
        lookup = dict(zip(keys[e].tolist(), values[e].tolist()))
        assert y[e, pos].tolist() == [lookup[k] for k in queried.tolist()], "the label is the key's value"
        filler = torch.ones(seq_len, dtype=torch.bool)
        filler[:ctx] = False
        filler[pos] = False
        assert (x[e, filler] == 0).all(), "filler is token 0 without random_non_queries"


def test_mqar_matches_reference_stream():
    # The first examples of zoology's multiquery_ar(vocab_size=8192, num_examples=3, input_seq_len=64,
    # seed=0, num_kv_pairs=4, random_non_queries=False): non-zero inputs and labels as (position, token).
    golden = [
        ([(0, 583), (1, 6687), (2, 1962), (3, 6896), (4, 1958), (5, 5844), (6, 3194), (7, 6657), (8, 1958),
          (10, 583), (22, 1962), (26, 3194)], [(8, 5844), (10, 6687), (22, 6896), (26, 6657)]),
        ([(0, 1053), (1, 6866), (2, 2171), (3, 5814), (4, 1102), (5, 6786), (6, 2544), (7, 6347), (16, 2171),
          (18, 1102), (26, 2544), (46, 1053)], [(16, 5814), (18, 6786), (26, 6347), (46, 6866)]),
        ([(0, 155), (1, 6510), (2, 73), (3, 4508), (4, 3940), (5, 5587), (6, 241), (7, 6935), (8, 3940),
          (12, 73), (14, 155), (44, 241)], [(8, 5587), (12, 4508), (14, 6510), (44, 6935)]),
    ]
    data = MQAR.paper(64).generate(3, seed=0)
    for e, (inp, lab) in enumerate(golden):
        assert [(j, v) for j, v in enumerate(data.inputs[e].tolist()) if v] == inp
        assert [(j, v) for j, v in enumerate(data.labels[e].tolist()) if v != IGNORE] == lab


def test_mqar_gaps_follow_the_power_law():
    task = MQAR.paper(64)  # space = (64 - 8) / 2 = 28
    p = task.gap_probabilities()
    assert len(p) == 28
    np.testing.assert_allclose(p[:2], [0.251, 0.126], atol=5e-4)
    assert 0.575 < p[:5].sum() < 0.59
    ratio = p[1:] / p[:-1]
    np.testing.assert_allclose(ratio, (np.arange(2, 29) / np.arange(1, 28)) ** (0.01 - 1))
    data = task.generate(2000, seed=1)
    pos = (data.labels != IGNORE).nonzero()[:, 1]
    counts = torch.bincount((pos - 8) // 2, minlength=28).double() / 2000
    # gaps are drawn without replacement, so each example uses 4 distinct gaps; small gaps dominate
    assert counts[0] > 0.65 and counts[0] > counts[5] > counts[27]
    assert counts.sum() == 4


def test_mqar_random_non_queries_and_seeds():
    task = MQAR(seq_len=128, num_kv_pairs=8, random_non_queries=True)
    a, b, c = task.generate(50, 7), task.generate(50, 7), task.generate(50, 8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    assert (a.inputs == 0).double().mean() < 0.01, "filler drawn from the whole vocabulary"
    plain = MQAR(seq_len=128, num_kv_pairs=8, random_non_queries=False).generate(50, 7)
    assert torch.equal(plain.labels, a.labels)
    keep = plain.inputs != 0
    assert torch.equal(plain.inputs[keep], a.inputs[keep]), "only filler changes"


def test_mqar_oracle_and_metric():
    task = MQAR.paper(128)
    data = task.generate(30, seed=2)
    assert lm_accuracy(task.oracle(data), data.labels).mean() == 1.0
    preds = task.oracle(data)
    first = (data.labels[0] != IGNORE).nonzero()[0, 0]
    preds[0, first] = 0  # one of 8 wrong in example 0
    per_example = lm_accuracy(preds, data.labels)
    assert per_example[0] == pytest.approx(7 / 8) and (per_example[1:] == 1).all()
    logits = torch.nn.functional.one_hot(task.oracle(data), 8192).float()
    assert lm_accuracy(logits, data.labels).mean() == 1.0


def test_mqar_bad_configs():
    with pytest.raises(ValueError, match="even"):
        MQAR(seq_len=63)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        MQAR(seq_len=64, num_kv_pairs=17)
    with pytest.raises(ValueError, match="vocab_size"):
        MQAR(seq_len=64, vocab_size=64)
    with pytest.raises(ValueError, match="Figure 2"):
        MQAR.paper(100)
    with pytest.raises(ValueError, match="seed"):
        MQAR().generate(4, seed=-1)


# Other tasks ----------------------------------------------------------------------------------
def test_induction():
    task = Induction(seq_len=40, vocab_size=64)
    data = task.generate(20, seed=0)
    x, y = data.inputs, data.labels
    assert x.shape == (20, 40) and (x[:, 0] == 0).all()
    r = x[:, 1:21]
    assert torch.equal(x[:, 21:40], r[:, :19]), "the second copy repeats the first"
    for e in range(20):
        assert len(set(r[e].tolist())) == 20
    has = y != IGNORE
    assert has[:, :21].sum() == 0 and has[:, 21:].all()
    # each label is the token after the first occurrence of the current token
    for e in range(3):
        for t in range(21, 40):
            first = int((x[e, :t] == x[e, t]).nonzero()[0, 0])
            assert y[e, t] == x[e, first + 1]
    with pytest.raises(ValueError, match="vocab_size"):
        Induction(seq_len=64, vocab_size=16)


def test_selective_copy():
    task = SelectiveCopy(seq_len=48, n_tokens=6, n_symbols=10)
    data = task.generate(25, seed=3)
    x, y = data.inputs, data.labels
    assert task.vocab_size == 12 and int(x.max()) < 12
    assert (x[:, 42:] == 1).all() and (y[:, :42] == IGNORE).all()
    for e in range(25):
        ctx = x[e, :42]
        data_tokens = ctx[ctx >= 2]
        assert len(data_tokens) == 6 and (ctx[ctx < 2] == 0).all()
        assert torch.equal(y[e, 42:], data_tokens), "recall the data tokens in order"


def test_icl_linear_regression():
    task = ICLLinearRegression(n_dims=5, n_points=20)
    data = task.generate(64, seed=0)
    assert data.inputs.shape == (64, 21, 6) and data.labels.shape == (64,)
    assert (data.inputs[:, -1, -1] == 0).all(), "the query token carries y = 0"
    assert task.ridge_error(data) < 1e-8, "least squares is exact without noise when n >= d"
    zero = task.score(torch.zeros(64), data).mean()
    assert 0.5 < zero < 2.0, "predicting 0 scores about 1 (E[y^2]/d = 1)"
    noisy = ICLLinearRegression(n_dims=5, n_points=20, noise_std=0.5, covariance="skewed")
    nd = noisy.generate(4000, seed=1)
    ridge = noisy.ridge_error(nd)
    ls = float(noisy.score(ridge_predict(nd.inputs, 0.0), nd).mean())
    assert ridge < ls, "ridge with lambda = sigma^2 beats least squares under noise"
    root = noisy.covariance_root(1)
    eig = torch.linalg.eigvalsh(root @ root.T)
    assert eig.sum() == pytest.approx(5.0) and eig.max() / eig.min() == pytest.approx(5.0)


def _evaluate(tokens: list[str]) -> int:
    stack: list[list] = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            val = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                   "[MED": int(sorted(args)[(len(args) - 1) // 2] + sorted(args)[len(args) // 2]) // 2}[op]
            if not stack:
                return val
            stack[-1].append(val)
        else:
            if not stack:
                return int(t)
            stack[-1].append(int(t))
    raise AssertionError("unbalanced")


def test_listops():
    task = ListOps(max_depth=5, max_args=5, min_length=20, max_length=80)
    trees = task.trees(200, seed=0)
    assert len(set(trees)) == 200, "de-duplicated"
    data = task.encode(trees)
    assert data.inputs.shape == (200, 80) and data.mask is not None
    lengths = data.mask.sum(1) - 1
    assert ((lengths > 20) & (lengths < 80)).all()
    assert (data.inputs[:, 0] == 1).all() and (data.inputs[~data.mask] == 0).all()
    for tree, label in zip(trees, data.labels.tolist()):
        toks = listops_tokens(tree)
        assert _evaluate(toks) == label
        n_ops = sum(t.startswith("[") for t in toks)
        assert toks.count("]") == n_ops
    assert set(data.labels.tolist()) <= set(range(10)) and len(set(data.labels.tolist())) > 3
    train, test = task.splits(100, 50, seed=1)
    a = {tuple(r[m].tolist()) for r, m in zip(train.inputs, train.mask)}
    b = {tuple(r[m].tolist()) for r, m in zip(test.inputs, test.mask)}
    assert not (a & b), "train and test are disjoint"
    assert torch.equal(task.generate(10, 4).inputs, task.generate(10, 4).inputs)


def test_listops_lra_defaults():
    task = ListOps()
    assert (task.max_depth, task.max_args, task.min_length, task.max_length) == (10, 10, 500, 2000)
    data = task.generate(3, seed=0)
    lengths = data.mask.sum(1) - 1
    assert ((lengths > 500) & (lengths < 2000)).all()


def test_get_task_errors_list_valid_names():
    assert isinstance(get_task("mqar", seq_len=128, num_kv_pairs=8), MQAR)
    with pytest.raises(ValueError, match="valid tasks: .*icl_linear_regression.*mqar"):
        get_task("mqr")
    with pytest.raises(ValueError, match="valid options: seq_len, num_kv_pairs"):
        get_task("mqar", pairs=3)


def test_registry_entries():
    specs = {s.slug: s for s in attnzoo.list(type="task")}
    assert {"mqar", "icl_linear_regression"} <= set(specs)
    t = attnzoo.create("mqar", seq_len=128, num_kv_pairs=8)
    assert isinstance(t, MQAR) and t.seq_len == 128
    for s in specs.values():
        for r in s.reductions:
            got, want = r.check()
            got, want = torch.as_tensor(got), torch.as_tensor(want)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-12, atol=1e-12)
