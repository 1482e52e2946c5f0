"""Mixer variants (``moba[top_k=1]``): parsing, building, the routing preset end to end and the recall-loss table."""

from __future__ import annotations

import pytest

from attnzoo.bench.compare import get_preset, resolve_mixers, run_compare
from attnzoo.bench.models import build_mixer, check_mixer, mixer_kwargs_for
from attnzoo.bench.report import build_report, recall_loss, recall_table
from attnzoo.bench.store import open_store
from attnzoo.bench.variants import parse_mixer, variant_slug

TINY = {"max_steps": 2, "n_train": 64, "n_test": 32, "batch_size": 32, "eval_every": 2, "seeds": [0]}


def test_parse_plain_and_variant_labels():
    assert parse_mixer("mha").label == "mha" and parse_mixer("mha").kwargs == {}
    v = parse_mixer(" moba[ top_k = 1 , block_size=4 ]")
    assert (v.label, v.slug, v.kwargs) == ("moba[top_k=1,block_size=4]", "moba", {"top_k": 1, "block_size": 4})
    assert v.is_variant and not parse_mixer("moba").is_variant
    v = parse_mixer("topk_attention[scorer=exact,scale=0.5,bias=false]")
    assert v.kwargs == {"scorer": "exact", "scale": 0.5, "bias": False}
    assert v.label == "topk_attention[scorer=exact,scale=0.5,bias=false]"
    assert parse_mixer(v.label) == v  # the label parses back to itself
    assert variant_slug("moba[top_k=1]") == "moba" and variant_slug("mha") == "mha"


@pytest.mark.parametrize("text, match", [
    ("mobba[top_k=1]", r"unknown mixer 'mobba'.*did you mean 'moba'"),
    ("nope", r"unknown mixer 'nope'"),
    ("moba[top_k=1", r"expected SLUG\[KEY=VALUE"),
    ("moba[top_k=1]x", r"expected SLUG\[KEY=VALUE"),
    ("moba[[top_k=1]]", r"expected SLUG\[KEY=VALUE"),
    ("[top_k=1]", r"expected SLUG\[KEY=VALUE"),
    ("moba[]", r"empty brackets"),
    ("moba[top_k]", r"expected KEY=VALUE between the commas, got 'top_k'"),
    ("moba[top_k=1,]", r"expected KEY=VALUE between the commas"),
    ("moba[window=4]", r"'moba' does not accept argument 'window'; it accepts n_heads, block_size, top_k"),
    ("moba[dim=32]", r"argument 'dim' is set by the bench"),
    ("moba[top_k=1,top_k=2]", r"argument 'top_k' given twice"),
    ("moba[top_k=[1]]", r"expected SLUG\[KEY=VALUE"),
    ("moba[top_k=1;2]", r"value of 'top_k' must be an integer"),
    ("moba[2x=1]", r"argument name '2x' is not an identifier"),
    ("", r"empty string"),
])
def test_bad_variants_are_errors_naming_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mixer(text)


def test_variants_build_their_entry_with_their_arguments():
    assert check_mixer("moba[top_k=1]").slug == "moba"
    m = build_mixer("moba[top_k=1,block_size=4]", 32, n_heads=2)
    assert (m.top_k, m.block_size, m.n_heads) == (1, 4, 2)
    assert mixer_kwargs_for("mha[n_heads=2]", n_heads=1) == {"n_heads": 2}  # the label's n_heads wins
    assert build_mixer("moba[top_k=1]", 32, top_k=1, n_heads=2).top_k == 1  # the same value twice is fine
    with pytest.raises(ValueError, match=r"'top_k' is 1 in the label and 2 elsewhere"):
        build_mixer("moba[top_k=1]", 32, top_k=2)
    with pytest.raises(ValueError, match=r"missing \['causal'\]"):
        check_mixer("reversed_attention[n_heads=2]", {"causal"})


def test_compare_refuses_bad_variants_before_any_work(tmp_path):
    store = tmp_path / "r.sqlite"
    with pytest.raises(ValueError, match=r"'moba' does not accept argument 'windw'"):
        run_compare("routing", mixers=["mha", "moba[windw=4]"], store=store, overrides=TINY, progress=False)
    with pytest.raises(ValueError, match=r"'moba\[top_k=0\]' cannot be built at width 64.*top_k: expected an int >= 1"):
        run_compare("routing", mixers=["mha", "moba[top_k=0]"], store=store, overrides=TINY, progress=False)
    # 64 tokens in blocks of 4 are 16 blocks: top_k=17 cannot be honoured on the task's sequences
    with pytest.raises(ValueError, match=r"'moba\[top_k=17\]'.*cannot run mqar.*top_k: expected at most 16"):
        run_compare("routing", mixers=["mha", "moba[top_k=17]"], store=store, overrides=TINY, progress=False)
    assert not store.exists()


def test_routing_preset_makes_the_routing_choose():
    from attnzoo.bench.tasks import MQAR

    p = get_preset("routing")
    task = p.settings[0].task
    assert isinstance(task, MQAR) and (task.seq_len, task.num_kv_pairs) == (64, 4)
    block = p.mixer_defaults["moba"]["block_size"]
    pair_blocks = -(-2 * task.num_kv_pairs // block)
    assert pair_blocks >= 2  # the pairs span several blocks ...
    assert 2 * task.num_kv_pairs % block == 0  # ... and no query shares a block with a pair
    tops = [parse_mixer(m).kwargs["top_k"] for m in p.candidates if variant_slug(m) == "moba"]
    assert min(tops) == 1 and min(tops) - 1 < pair_blocks  # some top_k cannot hold every pair block
    assert "mha" in p.candidates and any(variant_slug(m) == "topk_attention" for m in p.candidates)
    chosen, notes = resolve_mixers(p, None)
    assert chosen == list(p.candidates) and not notes


def test_routing_preset_end_to_end_stores_variants_apart_and_reports_recall_lost(tmp_path):
    store = tmp_path / "r.sqlite"
    res = run_compare("routing", mixers=["mha", "moba[top_k=1]", "moba[ top_k=2 ]", "moba[top_k=2]"], store=store,
                      out=tmp_path / "rep", overrides=TINY, progress=False, log=lambda s: None, estimate=False)
    with open_store(store, create=False) as db:
        runs = db.runs(kind="train", session=res.session)
    assert sorted({r["mixer"] for r in runs}) == ["mha", "moba[top_k=1]", "moba[top_k=2]"]
    assert len(runs) == 3  # the duplicate spelling runs once
    cfg = next(r["config"] for r in runs if r["mixer"] == "moba[top_k=1]")
    assert cfg["mixer"] == "moba" and cfg["label"] == "moba[top_k=1]" and cfg["variant_kwargs"] == {"top_k": 1}
    assert cfg["mixer_kwargs"] == {"block_size": 4, "top_k": 1, "n_heads": 1}  # the preset's block, the label's k
    cols, rows = res.leaderboard
    assert {r[1] for r in rows} == {"mha", "moba[top_k=1]", "moba[top_k=2]"}
    rcols, rrows = res.recall
    assert [r[2] for r in rrows] == ["moba[top_k=1]", "moba[top_k=2]"]
    assert rrows[0][3] == "moba(block_size=4, n_heads=1, top_k=1)"
    html = res.report.read_text()
    assert "Recall lost against mha" in html and "moba[top_k=1]" in html


def _run(mixer: str, acc: float, seed: int, dim: int = 64, lr: float = 1e-3, task: str = "mqar(64)") -> dict:
    return {"task": task, "mixer": mixer, "config": {"dim": dim, "lr": lr, "seed": seed, "mixer": variant_slug(mixer),
                                                    "mixer_kwargs": {"top_k": 1}},
            "metrics": {"metric": "accuracy", "accuracy": acc, "higher_is_better": True}}


def test_recall_loss_is_the_difference_with_its_standard_error_at_the_same_width():
    runs = [_run("mha", 1.0, 0), _run("mha", 0.9, 1), _run("moba[top_k=1]", 0.5, 0), _run("moba[top_k=1]", 0.3, 1),
            _run("moba[top_k=1]", 0.1, 0, lr=3e-3),                      # a worse learning rate: not the one compared
            _run("moba[top_k=2]", 0.8, 0, dim=128),                      # no mha at width 128: no row
            _run("<b>x</b>", 0.2, 0)]
    rows = recall_loss(runs)
    assert [(r["mixer"], r["dim"]) for r in rows] == [("<b>x</b>", 64), ("moba[top_k=1]", 64)]
    r = rows[1]
    assert r["lost"] == pytest.approx(0.55) and r["kept"] == pytest.approx(0.4 / 0.95)
    sd_m, sd_b = (0.2 ** 2 / 2) ** 0.5, (0.1 ** 2 / 2) ** 0.5
    assert r["se"] == pytest.approx((sd_m ** 2 / 2 + sd_b ** 2 / 2) ** 0.5)
    assert r["values"] == [pytest.approx(0.5), pytest.approx(0.3)]  # seed 0, seed 1
    cols, table = recall_table(runs)
    assert table[1][2:] == ["moba[top_k=1]", "moba(top_k=1)", "0.950 ± 0.071", "0.400 ± 0.141", "0.500 / 0.300",
                            "+0.550 ± 0.112", "0.42"]
    assert recall_table([_run("moba[top_k=1]", 0.5, 0)])[1] == []  # no mha: nothing to compare with


def test_report_escapes_the_recall_table(tmp_path):
    with open_store(tmp_path / "r.sqlite") as db:
        for r in [_run("mha", 1.0, 0), _run("<script>alert(1)</script>", 0.5, 0)]:
            db.add_run(kind="train", session="s", task=r["task"], mixer=r["mixer"], config=r["config"],
                       metrics=r["metrics"], env={})
        html = build_report(db, tmp_path / "out", session="s").read_text()
    assert "Recall lost against mha" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_arguments_given_elsewhere_add_to_a_variant_and_may_not_contradict_it():
    from attnzoo.bench.compare import _mixer_kwargs

    assert _mixer_kwargs("moba[top_k=1]", 1, {"moba": {"block_size": 8}}) == {"block_size": 8, "top_k": 1,
                                                                               "n_heads": 1}
    assert _mixer_kwargs("moba[top_k=1]", 1, {"moba[ top_k=1 ]": {"block_size": 2}})["block_size"] == 2
    assert _mixer_kwargs("moba[top_k=1]", 1, None, {"moba": {"block_size": 4}})["block_size"] == 4
    with pytest.raises(ValueError, match=r"'top_k' is 1 in the label and 3 elsewhere"):
        _mixer_kwargs("moba[top_k=1]", 1, {"moba": {"top_k": 3}})


def test_speed_sweep_and_cab_take_variant_labels():
    from attnzoo.bench.cab import check
    from attnzoo.bench.speed import SpeedConfig, run_speed

    points = run_speed(SpeedConfig(mixers=["moba[top_k=1,block_size=4]"], lengths=[16], modes=["fwd"], dim=16,
                                   n_heads=1, repeats=1, warmup=0), progress=False, log=lambda s: None)
    assert {(p["mixer"], p["status"]) for p in points} == {("sdpa_dense", "ok"), ("moba[top_k=1,block_size=4]", "ok")}
    res = check("moba[top_k=2,block_size=4]")
    assert res["NS"]["ok"] and res["CS"]["ok"]
    with pytest.raises(ValueError, match=r"'moba' does not accept argument 'window'"):
        check("moba[window=2]")


def test_a_preset_of_every_mixer_leaves_out_one_whose_defaults_cannot_run_a_task():
    from attnzoo.bench.compare import Preset, Setting, _mixer_kwargs, _preflight
    from attnzoo.bench.tasks import MQAR

    short = MQAR(seq_len=32, num_kv_pairs=4)
    for all_mixers in (True, False):
        p = Preset("t", "t", [Setting(short)], dims=[32], lrs=[1e-3], all_mixers=all_mixers)
        kw = {m: _mixer_kwargs(m, p.n_heads, None) for m in ("mha", "hip")}  # hip: top_k 64 > 32 keys
        if all_mixers:
            kept, notes = _preflight(["mha", "hip"], kw, p)
            assert kept == ["mha"] and len(notes) == 1 and notes[0].startswith("hip: left out (")
            assert "top_k: expected at most 32" in notes[0]
        else:
            with pytest.raises(ValueError, match="mixer 'hip' with .* cannot run mqar"):
                _preflight(["mha", "hip"], kw, p)
