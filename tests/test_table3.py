"""
bench/table3.py: one run's record, from train.main's result, checked on a hand-worked case
(the Hit@1 split by binding and non-binding tasks, every view type's matching mean kept).
Run: pytest tests/test_table3.py
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import table3  # noqa: E402

KINDS = ("raw→raw", "raw→feat", "feat→raw", "feat→feat")


def test_run_record_hand_worked():
    res = {"overall": 0.7, "overall_chance": 0.1,
           "hit_at_1": {"A": 1.0, "B": 0.5, "C": None, "ShapesT2I": 0.25, "ShapesI2T": 0.75},
           "matching": {"A": {}},                              # present: the head was trained
           "matching_mean": dict(zip(KINDS, (0.8, 0.6, 0.7, 0.9))),
           "matching_mean_apart": dict(zip(KINDS, (0.5, 0.4, 0.45, 0.55)))}
    r = table3.run_record(res)
    assert r["hit@1"] == 0.7 and r["chance"] == 0.1
    assert r["hit@1 non-binding"] == pytest.approx((1.0 + 0.5) / 2)      # C has no score
    assert r["hit@1 binding"] == pytest.approx((0.25 + 0.75) / 2)
    assert [r[f"match {k}"] for k in KINDS] == [0.8, 0.6, 0.7, 0.9]
    assert [r[f"binding {k}"] for k in KINDS] == [0.5, 0.4, 0.45, 0.55]
    assert r["per_task"] == {"A": 1.0, "B": 0.5, "ShapesT2I": 0.25, "ShapesI2T": 0.75}


def test_run_record_without_matching_or_binding_tasks():
    res = {"overall": 0.5, "overall_chance": 0.2, "hit_at_1": {"A": 0.5}, "matching": None}
    r = table3.run_record(res)
    assert r == {"hit@1": 0.5, "chance": 0.2, "hit@1 non-binding": 0.5, "per_task": {"A": 0.5}}


def test_the_speaking_backbone_keeps_its_benchmark(tmp_path, capsys):
    """tiny-qwen2-vl-chat saw the TRAIN split of the seed-0 benchmark: every seed's run
    scores on that benchmark (its held-out pairs are the ones it never saw); a random
    backbone's run gets its own seed's. train.py refuses another benchmark seed by name."""
    import train
    from demo.pretrain import PRETRAIN
    assert [table3.data_seed_of("tiny-qwen2-vl-chat", s) for s in (0, 1, 2)] == [PRETRAIN["data_seed"]] * 3
    assert [table3.data_seed_of(m, 2) for m in (None, "tiny-qwen2-vl")] == [2, 2]
    with pytest.raises(SystemExit):                                # refused when parsed: nothing written
        train.main(["--model", "tiny-qwen2-vl-chat", "--seed", "1", "--out_dir", str(tmp_path / "run")])
    assert capsys.readouterr().err.strip().endswith("pass --data_seed 0") and not (tmp_path / "run").exists()


def test_caption_record_flattens_overall_and_per_kind():
    m = {"exact": 0.5, "token_f1": 0.75, "distinct_2": 0.25, "repetition": 0.0, "mean_len": 8.0, "n": 4,
         "object": {"exact": 1.0, "token_f1": 1.0, "distinct_2": 0.5, "repetition": 0.0, "mean_len": 3.0, "n": 2}}
    r = table3.caption_record(m)
    assert r["caption token_f1"] == 0.75 and r["caption object mean_len"] == 3.0
    assert "caption n" not in r and not any(k.startswith("caption pair") for k in r)
    assert len(r) == 10


def test_gme_row_is_row_5_without_matching():
    """Row 5a (GME's recipe, App. S9): the last token of the chat template, no Eq. 4."""
    assert table3.ROWS["5a"][1] == table3.ROWS["5"][1] + ["--w_qdm", "0"]
    for bad in (["--lora_r", "0"], ["--captions", "-1"]):
        with pytest.raises(SystemExit):
            table3.parse_args(bad)


def test_a_rerun_keeps_runs_only_of_the_same_build(tmp_path, monkeypatch):
    """--json keeps the runs of a rerun with the same settings, the backbone's build
    included: runs on another build of tiny-qwen2-vl-chat are measured again, not reused."""
    import json

    from util.backbone import pretrained_build
    calls = []
    monkeypatch.setattr(table3, "one_run", lambda *a, **k: calls.append(1) or {"hit@1": 0.5})
    out = tmp_path / "t3.json"
    argv = ["--table", "3", "--model", "tiny-qwen2-vl-chat", "--rows", "7", "--seeds", "0", "--json", str(out),
            "--out_dir", str(tmp_path / "w")]
    table3.main(argv)
    assert calls == [1] and json.load(open(out))["build"] == pretrained_build("tiny-qwen2-vl-chat")
    table3.main(argv)
    assert calls == [1]                                                   # same build: kept
    saved = json.load(open(out))
    json.dump(dict(saved, build="v0"), open(out, "w"))
    table3.main(argv)
    assert calls == [1, 1]                                                # another build: run again
