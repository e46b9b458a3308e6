"""
bench/mining_rounds.py's measure of the built-in negatives against the mined ones
(given_vs_mined): ranks, false negatives and score gaps on a hand-worked case; on a real
tools/mine.py run, the same figures from its saved vectors and rows, the false-negative
share against a count by hand over the written parquet, and a folder mined from other
data refused.
Run: pytest tests/test_mining_rounds.py
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import mining_rounds  # noqa: E402
from tools import mine  # noqa: E402

# Documents: d0 and d5 are the same thing (another render, -jNN), as are d0 and d1.
D = [("a", "x-j01.png"), ("a", "x-j02.png"), ("b", "y.png"), ("c", "z.png"), ("d", "w.png"), ("a", "x-j07.png")]
S1 = [0.9, 0.95, 0.5, 0.7, 0.3, 0.2]          # s(q1, d) per document
Q = [("q1", ""), ("q2", ""), ("q3", "")]


def test_given_vs_mined_hand_worked():
    """Rows (query, positive, built-in negative, mined top-1):
      r0 q1 d0 d2 d1   true negatives of q1/d0: d2, d4 (d1, d5 the same thing as d0; d3 a
                       positive of q1 by r3) → d2 (0.5) is the hardest: rank 0, gap 0.4;
                       mined d1 is in fact a positive, gap 0.9 − 0.95 = −0.05
      r1 q2 d4 d2 d2   s(q2, ·) = −S1: above d2 (−0.5) only d5 (−0.2): rank 1, gap 0.2;
                       mined d2 itself: not a positive, gap 0.2, s(g) ≥ s(mined)
      r2 q1 d0 —  —    no built-in negative: not counted
      r3 q1 d3 d4 d1   true negatives of q1/d3: d1, d2, d4, d5 → above d4 (0.3): d1, d2: rank 2,
                       gap 0.4; mined d1, gap 0.7 − 0.95 = −0.25
      r4 q1 d0 d5 —    the built-in negative is the same thing as the positive; true negatives
                       d2, d4 both above 0.2: rank 2, gap 0.7
      r5 q3 d1 —  —    puts d1 in the subset's corpus; no built-in negative: not counted"""
    rows = [(0, Q[0], D[0], D[2]), (1, Q[1], D[4], D[2]), (2, Q[0], D[0], None), (3, Q[0], D[3], D[4]),
            (4, Q[0], D[0], D[5]), (5, Q[2], D[1], None)]
    plan = mine.SubsetPlan("S", [("S", r, q, p, n) for r, q, p, n in rows])
    E = np.array([[S1[D.index(d)]] for d in plan.docs])                      # (N, 1): s = E·q
    Qv = np.array([{Q[0]: [1.0], Q[1]: [-1.0], Q[2]: [0.5]}[q] for q in plan.queries])   # (3, 1)
    mined = [plan.doc_index[D[1]], plan.doc_index[D[2]], None, plan.doc_index[D[1]], None, None]
    got = mining_rounds.given_vs_mined(plan, Qv, E, mined)
    assert got == pytest.approx({
        "rows": 4, "documents": 6, "hardest": 1 / 4, "median_rank": 1.5, "given_false": 1 / 4,
        "mined_false": 1 / 3, "gap_given": (0.4 + 0.2 + 0.4 + 0.7) / 4, "gap_mined": (-0.05 + 0.2 - 0.25) / 3,
        "given_harder": 1 / 3})


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """tools/mine.py as the bench runs it (no filter, one negative a row) with a random tiny
    checkpoint on a small synthetic benchmark."""
    from demo import make_synthetic
    from model import ReMatch
    from util.backbone import load_backbone, save_rematch
    root = tmp_path_factory.mktemp("rounds")
    paths = make_synthetic(str(root / "data"), seed=0, train_rows=24, eval_queries=4)
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    ckpt = str(root / "ckpt")
    save_rematch(ReMatch(backbone, num_tokens=2, embed_template="chat"), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat"})
    out = str(root / "mined")
    mine.main(["--model", ckpt, "--train_data", paths["train"], "--image_dir", paths["image_dir"], "--out", out,
               "--subsets", "ShapesT2I", "ShapesVG", "ShapesCLS", "--num_negatives", "1", "--no-progress"])
    return paths, out


def test_given_vs_mined_from_a_mining_run(mined, tmp_path):
    import pyarrow.parquet as pq
    from demo import make_synthetic
    paths, out = mined
    got = mining_rounds.given_vs_mined_run(paths["train"], paths["image_dir"], out)
    assert sorted(got) == ["ShapesCLS", "ShapesT2I", "ShapesVG"]
    for subset, g in got.items():
        rows = pq.read_table(os.path.join(out, subset, "original-00000-of-00001.parquet")).to_pylist()
        assert g["rows"] == 24 == len(rows)          # the benchmark's rows all carry a built-in negative
        # the mined negative (written as the output's neg_*) against the positive, by hand
        same = [mine.synthetic_same(mine.doc_key(r["pos_text"], r["pos_image_path"]),
                                    mine.doc_key(r["neg_text"][0], r["neg_image_path"][0])) for r in rows]
        assert g["mined_false"] == pytest.approx(sum(same) / len(same))
        assert g["given_false"] == 0 and 0 <= g["hardest"] <= 1 and g["median_rank"] >= 0
    other = make_synthetic(str(tmp_path / "other"), seed=1, train_rows=24, eval_queries=4)
    with pytest.raises(RuntimeError, match="mined from other documents or queries"):
        mining_rounds.given_vs_mined_run(other["train"], other["image_dir"], out)
