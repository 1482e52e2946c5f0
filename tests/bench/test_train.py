"""Tiny models and training: shapes, errors before training, determinism, early stop, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from attnzoo.bench.models import EncoderClassifier, TinyLM, build_model, check_mixer, mixer_kwargs_for
from attnzoo.bench.tasks import MQAR, ICLLinearRegression, ListOps, SelectiveCopy
from attnzoo.bench.train import TrainConfig, evaluate, train

TINY = MQAR(seq_len=16, num_kv_pairs=2, vocab_size=64)


def _cfg(**kw):
    base = dict(mixer="mha", mixer_kwargs={"n_heads": 2}, dim=32, lr=3e-3, batch_size=32, max_steps=30,
                n_train=256, n_test=64, eval_every=15, early_stop=None)
    base.update(kw)
    return TrainConfig(**base)


def test_models_shapes():
    lm = TinyLM("mha", vocab_size=50, dim=16, n_layers=2, max_len=12, mixer_kwargs={"n_heads": 2})
    x = torch.randint(0, 50, (3, 12))
    assert lm(x).shape == (3, 12, 50)
    sel = torch.zeros(3, 12, dtype=torch.bool)
    sel[:, [2, 5]] = True
    assert torch.allclose(lm(x, select=sel), lm(x)[sel], atol=1e-6)
    reg = TinyLM("mha", n_features=5, n_outputs=1, dim=16, max_len=8, positional="sinusoidal",
                 mixer_kwargs={"n_heads": 2})
    assert reg(torch.randn(2, 8, 5)).shape == (2, 8, 1)
    enc = EncoderClassifier("mha", vocab_size=20, n_classes=10, dim=16, max_len=9, positional="none",
                            pooling="mean", mixer_kwargs={"n_heads": 2})
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    assert enc(torch.randint(0, 20, (2, 9)), mask=mask).shape == (2, 10)


def test_lm_is_causal():
    lm = TinyLM("mha", vocab_size=30, dim=16, max_len=10, mixer_kwargs={"n_heads": 2}).eval()
    x = torch.randint(0, 30, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 30
    torch.testing.assert_close(lm(x)[:, :6], lm(y)[:, :6])


def test_mixer_errors_come_before_training(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data must not be generated")

    monkeypatch.setattr(MQAR, "splits", boom)
    with pytest.raises(ValueError, match=r"cannot run task 'mqar'.*missing \['causal'\]"):
        train(TINY, _cfg(mixer="reversed_attention", mixer_kwargs={}))
    with pytest.raises(ValueError, match="unknown mixer 'mhaa'.*did you mean 'mha'.*registered mixers:"):
        train(TINY, _cfg(mixer="mhaa"))
    with pytest.raises(ValueError, match="'mqar' is a task, not a token mixer"):
        check_mixer("mqar")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['heads'\]"):
        build_model(TINY, "mha", mixer_kwargs={"heads": 2})
    with pytest.raises(ValueError, match="positional"):
        build_model(TINY, "mha", positional="rotary")


def test_mixer_kwargs_for():
    assert mixer_kwargs_for("mha", n_heads=4) == {"n_heads": 4}
    assert mixer_kwargs_for("mha", n_heads=4, extra={"n_heads": 1}) == {"n_heads": 1}
    assert "n_heads" not in mixer_kwargs_for("context_broadcast", n_heads=4)


def test_training_is_seeded_and_learns():
    data = TINY.splits(256, 64, seed=0)
    a = train(TINY, _cfg(), data=data, progress=False)
    b = train(TINY, _cfg(), data=data, progress=False)
    assert a.curves == b.curves and a.metrics["accuracy"] == b.metrics["accuracy"]
    losses = [v for s, n, v in a.curves if n == "train/loss"]
    assert losses[-1] < losses[0]
    assert a.metrics["steps"] == 30 and a.metrics["params"] > 0 and not a.metrics["stopped_early"]
    assert [s for s, n, _ in a.curves if n == "test/accuracy"] == [15, 30]
    assert a.task["task"] == "mqar" and a.config["lr"] == 3e-3 and a.device == "cpu"


def test_early_stop():
    r = train(TINY, _cfg(early_stop=-1.0, eval_every=5), progress=False)
    assert r.metrics["stopped_early"] and r.metrics["steps"] == 5


def test_time_budget_stops_and_evaluates():
    r = train(TINY, _cfg(time_budget_s=0.0, max_steps=50), progress=False)
    assert r.metrics["stopped_by_time"] and r.metrics["steps"] == 1 and r.metrics["accuracy"] is not None


def test_evaluate_matches_oracle_rule():
    # An untrained model scores about chance; the metric is the Zoology per-example mean.
    model = build_model(TINY, "mha", dim=16, mixer_kwargs={"n_heads": 2})
    data = TINY.generate(40, seed=1)
    ev = evaluate(model, TINY, data)
    assert 0.0 <= ev["accuracy"] <= 0.3 and ev["loss"] > 0


def test_other_task_kinds_train():
    listops = ListOps(max_depth=3, max_args=4, min_length=4, max_length=24)
    r = train(listops, _cfg(max_steps=4, n_train=64, n_test=32, eval_every=4), progress=False)
    assert 0.0 <= r.metrics["accuracy"] <= 1.0
    icl = ICLLinearRegression(n_dims=4, n_points=10)
    r = train(icl, _cfg(max_steps=4, n_train=64, n_test=32, eval_every=4), progress=False)
    assert r.metrics["mse"] > 0 and r.metrics["ridge_mse"] < 1e-6
    sc = SelectiveCopy(seq_len=24, n_tokens=4, n_symbols=8)
    r = train(sc, _cfg(max_steps=4, n_train=64, n_test=32, eval_every=4), progress=False)
    assert 0.0 <= r.metrics["accuracy"] <= 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"grad_clip": -1.0}, "grad_clip"),  # clip_grad_norm_ would flip the gradients' sign
    ({"lr": float("inf")}, "lr"), ({"eval_every": -1}, "eval_every"), ({"warmup_steps": -5}, "warmup_steps"),
    ({"time_budget_s": -1.0}, "time_budget_s"), ({"mlp_ratio": -1.0}, "mlp_ratio"), ({"dropout": 1.0}, "dropout"),
    ({"device": "bogus"}, "device"),
])
def test_config_rejects_bad_settings_up_front(kwargs, needle):
    with pytest.raises(ValueError, match=f"^{needle}: expected"):
        TrainConfig(**kwargs)


DDP_SCRIPT = """
import json, sys
from attnzoo.bench.tasks import MQAR
from attnzoo.bench.train import TrainConfig, train
task = MQAR(seq_len=16, num_kv_pairs=2, vocab_size=64)
cfg = TrainConfig(mixer="mha", mixer_kwargs={"n_heads": 2}, dim=32, lr=3e-3, batch_size=32, max_steps=12,
                  n_train=256, n_test=64, eval_every=6, early_stop=None)
r = train(task, cfg, progress=False)
import torch.distributed as dist
rank = dist.get_rank() if dist.is_initialized() else 0
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump({"world": r.world_size, "curves": r.curves, "metrics": r.metrics}, f)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    import json

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29531", str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"out.{i}").read_text()) for i in (0, 1))
    one = json.loads((tmp_path / "single.0").read_text())
    assert r0["world"] == r1["world"] == 2 and one["world"] == 1
    assert r0["metrics"]["accuracy"] == r1["metrics"]["accuracy"], "ranks agree"
    # Same global batches and schedule: the loss curves agree with the single-process run.
    ddp_loss = [v for s, n, v in r0["curves"] if n == "train/loss"]
    one_loss = [v for s, n, v in one["curves"] if n == "train/loss"]
    assert len(ddp_loss) == len(one_loss)
    for a, b in zip(ddp_loss, one_loss):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
