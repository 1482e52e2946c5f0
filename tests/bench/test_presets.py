"""The presets' promises (checked without training) and the errors raised before any work."""

from __future__ import annotations

import pytest

from attnzoo.bench import compare
from attnzoo.bench.compare import get_preset, run_compare, run_steps
from attnzoo.bench.train import TrainConfig


def test_quick_preset_trains_to_its_step_budget_with_two_seeds_and_an_attention_free_model():
    p = get_preset("quick")
    assert all(s.time_budget_s is None and s.max_steps for s in p.settings)  # no run is cut by time
    assert len(p.seeds) >= 2
    assert "mha" in p.candidates and "base_conv" in p.candidates


def test_zoology_cpu_preset_is_figure_2_small_settings_with_the_papers_baselines():
    p = get_preset("zoology-cpu")
    assert sorted(s.task.seq_len for s in p.settings) == [64, 128]
    assert sorted(s.task.num_kv_pairs for s in p.settings) == [4, 8]
    assert p.dims == [64, 128] and set(p.candidates) == {"mha", "base_conv", "hyena", "based"}
    assert compare.resolve_mixers(p, None)[0] == ["mha", "base_conv", "hyena", "based"]
    assert [run_steps(s) for s in p.settings] == [1500, 2000]


def test_batch_larger_than_training_set_is_an_error_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size: 256 .*n_train=128"):
        run_compare("quick", store=tmp_path / "r.sqlite", overrides={"batch_size": 256, "n_train": 128},
                    progress=False, estimate=False)
    with pytest.raises(ValueError, match=r"batch_size: 64 .*n_train=32"):
        TrainConfig(batch_size=64, n_train=32)


def test_warmup_longer_than_the_step_budget_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"warmup_steps: 50 .*max_steps=10"):
        TrainConfig(warmup_steps=50, max_steps=10)


def test_time_budget_shorter_than_warmup_is_an_error_naming_both(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "probe_step_seconds", lambda *a, **k: 0.5)
    p = get_preset("quick")
    p.warmup_steps = 100
    p.settings[0].time_budget_s = 10.0  # 20 steps fit
    with pytest.raises(ValueError, match=r"time_budget_s: 10 s leaves about 20 steps.*warmup_steps=100"):
        compare.estimate_wall_s(p, ["mha"], {"mha": {}})


def test_long_cpu_run_needs_yes_and_the_estimate_is_printed(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "probe_step_seconds", lambda *a, **k: 10.0)
    lines: list[str] = []
    with pytest.raises(ValueError, match=r"pass --yes"):
        run_compare("zoology", mixers=["mha"], store=tmp_path / "r.sqlite", overrides={"seq_lens": [64], "dims": [64]},
                    progress=False, device="cpu", log=lines.append)
    assert any(line.startswith("estimate: 4 training runs, 50176 steps") for line in lines), lines
    runs, steps, wall = compare.estimate_wall_s(get_preset("quick"), ["mha", "base_conv"], {"mha": {}, "base_conv": {}})
    assert (runs, steps, wall) == (4, 4000, 40000.0)


def test_compare_cli_has_yes():
    from attnzoo.cli import build_parser

    args = build_parser().parse_args(["compare", "--preset", "zoology-cpu", "--yes", "--no-estimate"])
    assert args.yes and args.no_estimate and args.preset == "zoology-cpu"
