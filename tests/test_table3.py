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
