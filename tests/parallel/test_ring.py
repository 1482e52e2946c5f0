"""Context-parallel (ring) attention against the single-process float64 reference, on 2-4 local processes.

Each check starts ``P`` processes (gloo, loopback only) running ``ring_worker.py``, which compares output
shards and shard gradients with the reference for Full, Causal, sliding windows, documents, key padding with
rows that see no key, GQA, score modifiers (one learned), both layouts; checks the refusals and the bytes
sent; and, in the default group, trains with ``attnzoo train --context-parallel 2`` for comparison with one
process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
import attnzoo.patterns as P
from attnzoo.parallel import assemble, positions, ring_attention, shard

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ring_worker.py")
TRAIN = ["train", "--task", "mqar", "--task-arg", "seq_len=64", "--task-arg", "num_kv_pairs=4", "--dim", "32",
         "--batch-size", "8", "--max-steps", "4", "--n-train", "64", "--n-test", "16", "--eval-every", "4",
         "--no-progress", "--device", "cpu", "--seed", "3"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], timeout: float = 600.0) -> None:
    """Run the worker as ranks ``0..world-1``; fail with every rank's reported errors."""
    out = args[args.index("--out") + 1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    problems = []
    for r, p in enumerate(procs):
        report = Path(f"{out}.{r}")
        text = report.read_text() if report.exists() else f"rank {r} wrote no report; log:\n{logs[r][-3000:]}"
        if p.returncode:
            text += f"\nrank {r} exited with {p.returncode}; log:\n{logs[r][-3000:]}"
        if text.strip():
            problems.append(text)
    assert not problems, "\n".join(problems)


def _train_curves(store: Path) -> dict:
    from attnzoo.bench.store import open_store

    db = open_store(store, create=False)
    try:
        (row,) = db.runs(kind="train")
        return db.run(row["id"])
    finally:
        db.close()


def _check_training_matches_one_process(tmp_path: Path, sharded_store: Path, context_parallel: int,
                                        world: int) -> None:
    from attnzoo.cli import main

    single = tmp_path / "one.sqlite"
    assert main([*TRAIN, "--store", str(single)]) == 0
    one, cp = _train_curves(single), _train_curves(sharded_store)
    assert cp["config"]["context_parallel"] == context_parallel and cp["config"]["world_size"] == world
    assert one["config"]["context_parallel"] == 1
    for name in ("train/loss", "test/loss"):
        a = [v for _, n, v in one["curves"] if n == name]
        b = [v for _, n, v in cp["curves"] if n == name]
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), name
    assert len([v for _, n, v in one["curves"] if n == "train/loss"]) == 4
    assert one["metrics"]["accuracy"] == cp["metrics"]["accuracy"]


def test_two_processes_match_reference_and_train_like_one(tmp_path):
    """P = 2, every case, both layouts; then a 2-way context-parallel training run equals the run on one process."""
    store = tmp_path / "cp.sqlite"
    launch(2, ["--out", str(tmp_path / "r"), "--train",
               json.dumps([*TRAIN, "--context-parallel", "2", "--store", str(store)])])
    _check_training_matches_one_process(tmp_path, store, 2, 2)


def test_three_processes_match_reference(tmp_path):
    launch(3, ["--out", str(tmp_path / "r"), "--only", "causal", "document_ids_causal", "gqa_window_dv",
               "relative_bias_learned", "key_padding_causal_empty_rows"])


@pytest.mark.slow
def test_every_case_on_three_processes(tmp_path):
    launch(3, ["--out", str(tmp_path / "r")])


@pytest.mark.slow
def test_every_case_on_four_processes_and_train_two_by_two(tmp_path):
    """P = 4; then training with 2 data-parallel pairs, each splitting its sequences in 2, equals one process."""
    store = tmp_path / "cp.sqlite"
    launch(4, ["--out", str(tmp_path / "r"), "--train",
               json.dumps([*TRAIN, "--context-parallel", "2", "--store", str(store)])])
    _check_training_matches_one_process(tmp_path, store, 2, 4)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_assemble_round_trip(layout):
    x = torch.arange(2 * 24).view(2, 24)
    parts = [shard(x, 1, layout, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(assemble(parts, 1, layout), x)
    for r, part in enumerate(parts):
        assert torch.equal(part[0], positions(24, layout, rank=r, world_size=3))
    if layout == "zigzag":
        assert parts[0][0].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_indivisible_lengths_are_refused():
    x = torch.zeros(1, 25)
    with pytest.raises(ValueError, match="divisible by 2, got 25"):
        shard(x, 1, "contiguous", rank=0, world_size=2)
    with pytest.raises(ValueError, match="divisible by 4, got 26"):
        shard(torch.zeros(26), 0, "zigzag", rank=1, world_size=2)
    with pytest.raises(ValueError, match="layout"):
        shard(x, 1, "striped", rank=0, world_size=1)
    with pytest.raises(ValueError, match="rank"):
        shard(x, 1, rank=2, world_size=2)


def test_one_process_without_distributed_is_plain_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = P.SlidingWindow(3) & P.Causal()
    out = ring_attention(q, k, v, pattern=pattern, layout="zigzag")
    ref = attnzoo.attention(q, k, v, pattern=pattern, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_context_parallel_training_is_refused_where_it_cannot_apply():
    from attnzoo.bench.tasks import get_task
    from attnzoo.bench.train import TrainConfig, train

    task = get_task("mqar", seq_len=16, num_kv_pairs=2)
    with pytest.raises(ValueError, match="context_parallel: 2 must divide the number of processes, got 1"):
        train(task, TrainConfig(context_parallel=2, max_steps=1, n_train=8, n_test=8, batch_size=8, device="cpu"),
              progress=False)
    with pytest.raises(ValueError, match="context_layout"):
        TrainConfig(context_layout="striped")


def test_cli_refuses_a_context_parallel_split_of_the_wrong_length(capsys):
    from attnzoo.cli import main

    assert main(["train", "--no-store", "--no-progress", "--task-arg", "seq_len=66", "--context-parallel", "2"]) == 2
    assert "seq_len: a zigzag split over 2 processes needs a length divisible by 4, got 66" in capsys.readouterr().err


@pytest.mark.parametrize("mixer, why", [("linear_attention", "not an attention mixer"),
                                        ("gated_attention", "changes the attention")])
def test_context_parallel_refuses_mixers_that_mix_tokens_otherwise(mixer, why):
    from attnzoo.bench.models import build_model
    from attnzoo.bench.tasks import get_task
    from attnzoo.bench.train import TrainConfig, _check_context_parallel

    task = get_task("mqar", seq_len=16, num_kv_pairs=2)
    model = build_model(task, mixer, dim=32, n_layers=1)
    with pytest.raises(ValueError, match=why):
        _check_context_parallel(model, task, TrainConfig(mixer=mixer, context_parallel=2), 16, 2)
    _check_context_parallel(build_model(task, "mha", dim=32, n_layers=1), task, TrainConfig(context_parallel=2), 16, 2)
    with pytest.raises(ValueError, match="seq_len: a zigzag split over 2 processes needs a length divisible by 4"):
        _check_context_parallel(build_model(task, "mha", dim=32, n_layers=1), task, TrainConfig(context_parallel=2),
                                18, 2)
