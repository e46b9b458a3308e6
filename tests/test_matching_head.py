"""
bench/matching_head.py: the matching head trained alone on a frozen checkpoint's
embeddings (docs/demo.md §3.3). Its threshold ceiling against a brute-force scan, its
step-0 held-out accuracy against tools/rerank.matching_accuracy called directly on a freshly
loaded checkpoint, and its refusal of a data directory without train/ and eval/.

Run: python -m pytest -q tests/test_matching_head.py
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import matching_head  # noqa: E402

import evaluate  # noqa: E402
from demo import make_synthetic  # noqa: E402
from model import ReMatch, load_rematch  # noqa: E402
from tools import rerank  # noqa: E402
from util.backbone import load_backbone, save_rematch  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402


def brute_force_ceiling(pos, neg):
    """Best (TPR + TNR) / 2 over a fine grid of thresholds (the scores are multiples of 0.01)."""
    best = 0.0
    for t in torch.linspace(-1.005, 1.005, 2011).tolist():
        best = max(best, ((pos > t).double().mean() + (neg <= t).double().mean()).item() / 2)
    return best


@pytest.mark.parametrize("pos,neg,want", [
    ([0.9, 0.8, 0.3], [0.5, 0.2, 0.85], 2 / 3),     # t = 0.5: pos 2/3 above, neg 2/3 at or below
    ([0.9, 0.8], [0.1, 0.2], 1.0),                  # separable
    ([0.4, 0.4], [0.4, 0.4], 0.5),                  # nothing to tell apart
    ([0.1, 0.2], [0.8, 0.9], 0.5),                  # reversed: the best is to answer one way
])
def test_threshold_ceiling_against_a_brute_force_scan(pos, neg, want):
    pos, neg = torch.tensor(pos), torch.tensor(neg)
    got = matching_head.threshold_ceiling(pos, neg)
    assert got == pytest.approx(want)
    assert got == pytest.approx(brute_force_ceiling(pos, neg))
    g = torch.Generator().manual_seed(0)
    pos, neg = (torch.randint(-100, 101, (40,), generator=g) / 100 for _ in range(2))
    assert matching_head.threshold_ceiling(pos, neg) == pytest.approx(brute_force_ceiling(pos, neg))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic benchmark and a random tiny checkpoint trained 'with matching'."""
    root = tmp_path_factory.mktemp("mh")
    paths = make_synthetic(str(root / "data"), seed=0, train_rows=40, eval_queries=6)
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    model = ReMatch(backbone, num_tokens=4, embed_template="chat")
    ckpt = str(root / "ckpt")
    save_rematch(model, processor, ckpt, {"model": "tiny-qwen2-vl", "num_tokens": 4,
                                          "embed_template": "chat", "w_qdm": 0.1,
                                          "target_instructions": True})
    return paths["root"], ckpt


def test_held_out_accuracy_at_step_0_equals_evaluate_and_training_runs(small):
    data, ckpt = small
    result = matching_head.main(["--checkpoint", ckpt, "--data", data, "--steps", "4",
                                 "--eval_every", "2", "--eval_queries", "4", "--instances", "4",
                                 "--views", "all", "--device", "cpu"])
    assert sorted(result) == [0, 2, 4]
    for acc in result.values():
        assert set(acc) == set(rerank.MATCH_VIEW_TYPES) and all(0 <= v <= 1 for v in acc.values())
    model, processor, config = load_rematch(ckpt, device="cpu")              # independent path
    root = os.path.join(data, "eval")
    want = {k: [] for k in rerank.MATCH_VIEW_TYPES}
    for task, (meta, _) in evaluate.discovered_task_table(root).items():
        qk, dk, pairs = evaluate.task_items(read_eval_task(root, task), task, config, meta=meta)
        iq = [(t, os.path.join(data, p) if p else None) for t, p in qk]
        idd = [(t, os.path.join(data, p) if p else None) for t, p in dk]
        E = evaluate.embed_inputs(model, processor, [("q", *x) for x in iq] + [("d", *x) for x in idd])
        Q, D = E[:len(qk)], E[len(qk):]
        emb = evaluate.TaskEmbeddings(iq, idd, pairs, Q, D, evaluate.score_rows(Q, D, pairs))
        r = rerank.matching_accuracy(model, processor, emb, 4)
        for k in want:
            want[k].append(r[k])
    assert result[0] == pytest.approx({k: sum(v) / len(v) for k, v in want.items()})


def test_bad_data_directory_and_flags_are_named(small, tmp_path, capsys):
    _, ckpt = small
    with pytest.raises(SystemExit):
        matching_head.parse_args(["--checkpoint", ckpt, "--data", str(tmp_path)])
    assert f"--data {tmp_path}: expected train/ and eval/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        matching_head.parse_args(["--checkpoint", ckpt, "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_positive_and_hardest_skips_rows_without_another_candidate():
    """The ceiling is taken over the rows tools/rerank.matching_accuracy judges: a row whose only
    candidate is its positive (the rest -inf padding) has no hardest other candidate."""
    inf = float("inf")
    scores = torch.tensor([[0.9, 0.2, 0.7], [0.5, -inf, -inf], [0.1, 0.4, -inf]])
    pos, neg = matching_head.positive_and_hardest(scores)
    assert pos.tolist() == pytest.approx([0.9, 0.1]) and neg.tolist() == pytest.approx([0.7, 0.4])
