"""Hard negatives mined by the model itself (tools/mine.py, issue 47).

Run:  OMP_NUM_THREADS=1 python -m pytest -q tests/test_mine.py --full

- the rules against a hand-worked example (rank window, absolute and relative margin,
  max and min score, each drop counted under the first rule); random sampling is seeded
  per row and keeps score order;
- on a small synthetic benchmark and a hand-made subset (a positive spelled "./images/..",
  a query repeated with two positives): mined negatives never equal the row's positive
  (text and image after normalising paths) nor any positive of the same query, never
  repeat within a row, and train.py trains on the output for two steps;
- the judge's drop count equals a naive loop over tools/rerank.py's rerank p(Yes);
- --measure_veto's table equals a count by hand over the window it recorded;
- mining over 2 gloo ranks writes what 1 process writes; a run interrupted after its
  first block and rerun writes what an uninterrupted run writes, reusing what was done;
- bad rows and images stop with util/inputs.py's named errors.
"""
import json
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("faiss")

import evaluate as ev  # noqa: E402
from conftest import gloo_worker, run_processes, shape_image  # noqa: E402
from tools import mine  # noqa: E402
from tools.rerank import rerank  # noqa: E402
from util.inputs import BadImageError, TrainRows  # noqa: E402

SUBSETS = ["ShapesT2I", "ShapesVG", "Mine"]        # images, crops, a hand-made subset


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small synthetic benchmark (24 rows a subset) plus a hand-made subset "Mine", and a
    random tiny checkpoint 'trained with matching' (w_qdm > 0: its head may judge)."""
    from demo import make_synthetic
    from model import ReMatch
    from util.backbone import load_backbone, save_rematch
    root = tmp_path_factory.mktemp("mine")
    paths = make_synthetic(str(root / "data"), seed=0, train_rows=24, eval_queries=4)
    data = pathlib.Path(paths["image_dir"])
    (data / "images" / "mine").mkdir()
    for c in ("red", "blue", "green", "purple", "orange"):
        shape_image(c).save(data / "images" / "mine" / f"{c}.png")
    doc = "<|image_1|>\nRepresent the given image."
    rows = [("a red thing", "./images/mine/red.png", "images/mine/blue.png"),          # pos spelled with ./
            ("a blue thing", "images/mine/blue.png", "images/mine//red.png"),         # neg == row 0's pos
            ("a red thing", "images/mine/purple.png", ""),                           # same query, other pos
            ("a green thing", "images/mine/green.png", ""),
            ("an orange thing", "images/mine/orange.png", "images/mine/green.png")]
    mine_dir = pathlib.Path(paths["train"]) / "Mine"
    mine_dir.mkdir()
    pq.write_table(pa.Table.from_pylist([{"qry": q, "qry_image_path": "", "pos_text": doc, "pos_image_path": p,
                                          "neg_text": doc if n else None, "neg_image_path": n or None}
                                         for q, p, n in rows]), mine_dir / "original-00000-of-00001.parquet")
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    ckpt = str(root / "ckpt")
    save_rematch(ReMatch(backbone, num_tokens=2, embed_template="chat"), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat", "w_qdm": 0.1,
                  "target_instructions": True, "match_prompt": "header"})
    return paths, ckpt


@pytest.fixture(scope="module")
def enc(bench):
    return ev.Encoder(bench[1], device="cpu")


def rows_of(bench, subsets=SUBSETS):
    paths, _ = bench
    return TrainRows(paths["train"], paths["image_dir"], subsets)


def run(enc, bench, out, **kw):
    kw.setdefault("progress", False)
    return mine.mine(enc, rows_of(bench, kw.pop("subsets", SUBSETS)), str(out), **kw)


def read_out(out, subset):
    return pq.read_table(os.path.join(out, subset, "original-00000-of-00001.parquet")).to_pylist()


# ----------------------------------------------------------------------------------
# The rules, by hand


def test_rules_against_a_hand_worked_example():
    ranked = list(zip("abcdefgh", [0.95, 0.90, 0.79, 0.77, 0.70, 0.50, 0.10, 0.05]))
    # s⁺ = 0.8; window ranks [1, 7): b..g. absolute 0.02: drop s > 0.78 → b, c; relative 0.05:
    # drop s > 0.8 − 0.04 = 0.76 → d; max 0.6 → e; min 0.2 → g; f survives. a: range_min, h: past range_max
    kept, drops = mine.apply_rules(ranked, 0.8, range_min=1, range_max=7, absolute_margin=0.02,
                                   relative_margin=0.05, max_score=0.6, min_score=0.2)
    assert kept == [("f", 0.50)]
    assert drops == {"range_min": 1, "absolute_margin": 2, "relative_margin": 1, "max_score": 1, "min_score": 1}
    # the relative margin alone, on a negative positive score: s⁺ = −0.2 → drop s > −0.2 − 0.2·0.5 = −0.3
    kept, drops = mine.apply_rules([("x", -0.25), ("y", -0.35), ("z", -0.5)], -0.2, relative_margin=0.5)
    assert kept == [("y", -0.35), ("z", -0.5)] and drops["relative_margin"] == 1
    # no rule: the window only
    assert mine.apply_rules(ranked, 0.8, range_max=3)[0] == ranked[:3]


def test_random_sampling_is_seeded_and_keeps_score_order():
    import random
    surv = [(c, 1 - i / 10) for i, c in enumerate("abcdefg")]
    a = mine.sample(surv, 3, "random", random.Random("0-S-4"))
    assert a == mine.sample(surv, 3, "random", random.Random("0-S-4")) and len(set(a)) == 3
    assert [s for _, s in a] == sorted((s for _, s in a), reverse=True)
    assert mine.sample(surv, 3, "top") == surv[:3] and mine.sample(surv[:2], 3, "random", random.Random(0)) == surv[:2]
    assert mine.default_range_max(3) == 3 and mine.default_range_max(3, 2, filtering=True) == 32


def test_flags_are_checked_by_name(bench, capsys):
    paths, ckpt = bench
    base = ["--model", ckpt, "--train_data", paths["train"], "--image_dir", paths["image_dir"], "--out", "x"]
    for flags, msg in ((["--num_negatives", "0"], "--num_negatives must be >= 1"),
                       (["--range_min", "5", "--range_max", "5"], "--range_max 5 must be > --range_min 5"),
                       (["--num_negatives", "4", "--range_max", "3"], "only 3 candidates in the window"),
                       (["--judge", "--judge_threshold", "1.5"], "--judge_threshold must be in (0, 1)")):
        with pytest.raises(SystemExit):
            mine.main(base + flags)
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# Mining: the output's invariants, train.py on it


def test_mined_negatives_are_never_positives_nor_repeated_and_train_reads_them(bench, enc, tmp_path):
    import train
    paths, ckpt = bench
    out = tmp_path / "out"
    report = mine.main(["--model", ckpt, "--train_data", paths["train"], "--image_dir", paths["image_dir"],
                        "--out", str(out), "--subsets", *SUBSETS, "--num_negatives", "3", "--range_max", "6",
                        "--output_scores", "--no-progress"])
    assert report == json.loads((out / "mining_report.json").read_text())
    norm = mine.doc_key
    for subset in SUBSETS:
        rows = read_out(out, subset)
        positives = {}                                                     # query → every positive
        for r in rows:
            positives.setdefault(norm(r["qry"], r["qry_image_path"]), set()).add(norm(r["pos_text"], r["pos_image_path"]))
        assert len(rows) == report["subsets"][subset]["rows"]
        for r in rows:
            negs = [norm(t, im) for t, im in zip(r["neg_text"] or [], r["neg_image_path"] or [])]
            assert norm(r["pos_text"], r["pos_image_path"]) not in negs
            assert not set(negs) & positives[norm(r["qry"], r["qry_image_path"])]
            assert len(set(negs)) == len(negs) and len(negs) <= 3
            assert r["neg_scores"] == sorted(r["neg_scores"], reverse=True)
        assert report["subsets"][subset]["negatives"] == sum(len(r["neg_text"] or []) for r in rows)
    mined = {r["qry"] + r["pos_image_path"]: r for r in read_out(out, "Mine")}
    # row 0 ("./images/mine/red.png"): row 1's negative "images/mine//red.png" is the same document,
    # row 2 ("a red thing" again) brings purple as a positive: neither is ever its negative
    assert {os.path.normpath(p) for p in mined["a red thing./images/mine/red.png"]["neg_image_path"]} \
        == {"images/mine/blue.png", "images/mine/green.png", "images/mine/orange.png"}
    assert report["subsets"]["Mine"]["documents"] == 5 and report["subsets"]["Mine"]["queries"] == 4
    train.main(["--train_data", str(out), "--image_dir", paths["image_dir"], "--subsets", "ShapesT2I", "ShapesVG",
                "--model", "tiny-qwen2-vl", "--steps", "2", "--batch_size", "4", "--num_tokens", "2",
                "--num_workers", "0", "--out_dir", str(tmp_path / "run"), "--log_every", "1"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "step" in e][-1] == 2


def test_triplets_and_the_given_negative(bench, enc, tmp_path):
    run(enc, bench, tmp_path / "t", subsets=["Mine"], num_negatives=2, output_format="triplet", keep_given=True)
    rows = read_out(tmp_path / "t", "Mine")
    by_query = {}
    for r in rows:
        assert isinstance(r["neg_text"], str)
        by_query.setdefault((r["qry"], r["pos_image_path"]), []).append(os.path.normpath(r["neg_image_path"]))
    assert by_query[("a blue thing", "images/mine/blue.png")][0] == "images/mine/red.png"     # its own first
    assert all(len(v) == 2 and len(set(v)) == 2 for v in by_query.values())
    tr = TrainRows(str(tmp_path / "t"), bench[0]["image_dir"])                                  # reads as MMEB-train
    assert len(tr.rows) == len(rows) and tr.no_negative["Mine"] == 0


# ----------------------------------------------------------------------------------
# The judge


def test_judge_drops_equal_a_naive_loop_over_rerank(bench, enc, tmp_path):
    """A --measure_veto run records each row's window; rerank() one row at a time gives the
    same p(Yes); a --judge run at their median drops exactly those above it."""
    paths, _ = bench
    subsets = ["ShapesVG", "Mine"]
    measured = run(enc, bench, tmp_path / "m", subsets=subsets, num_negatives=2, range_max=5, measure_veto=True)
    assert measured["settings"]["judge"] is False
    plans = {s: mine.SubsetPlan(s, [r for r in rows_of(bench, subsets).rows if r[0] == s]) for s in subsets}
    text = mine.target_text_fn(enc.config)
    p_all, naive = [], {}
    for s, plan in plans.items():
        records = [r for f in sorted((tmp_path / "m" / ".mining" / s / "mined").glob("*.json"))
                   for r in json.loads(f.read_text())["records"]]
        naive[s] = []
        for rec in records:
            _, (qt, qim), _, _ = plan.rows[rec["row"]]
            query = (pathlib.Path(paths["image_dir"], qim), qt) if qim else qt
            cands = [(pathlib.Path(paths["image_dir"], plan.docs[j][1]), text(s, *plan.docs[j]))
                     if plan.docs[j][1] else text(s, *plan.docs[j]) for j, _, _ in rec["window"]]
            p = rerank(enc, query, cands).tolist()                         # one row at a time
            assert p == pytest.approx([w[2] for w in rec["window"]], abs=1e-5)
            naive[s].append(p)
            p_all += p
    t = sorted(p_all)[len(p_all) // 2]                                     # the median: some drop, some stay
    judged = run(enc, bench, tmp_path / "j", subsets=subsets, num_negatives=2, range_max=5, judge=True,
                 judge_threshold=t, output_scores=True)
    for s in subsets:
        want = sum(x > t for p in naive[s] for x in p)
        assert judged["subsets"][s]["dropped"]["judge"] == want
        assert all(x <= t for r in read_out(tmp_path / "j", s) for x in r["neg_p_yes"] or [])
    assert 0 < sum(judged["subsets"][s]["dropped"]["judge"] for s in subsets) < len(p_all)


def test_measure_veto_table_equals_a_count_by_hand(bench, enc, tmp_path):
    report = run(enc, bench, tmp_path / "m", subsets=["ShapesVG"], num_negatives=2, range_max=8,
                 measure_veto=True, judge_threshold=0.5)
    plan = mine.SubsetPlan("ShapesVG", [r for r in rows_of(bench, ["ShapesVG"]).rows])
    records = [r for f in sorted((tmp_path / "m" / ".mining" / "ShapesVG" / "mined").glob("*.json"))
               for r in json.loads(f.read_text())["records"]]
    truth = [[mine.synthetic_same(plan.rows[r["row"]][2], plan.docs[j]) for j, _, _ in r["window"]] for r in records]
    assert sum(map(sum, truth)) > 0                                        # other renders of the named object
    assert report["veto"]["all"] == report["veto"]["ShapesVG"]              # one subset
    none = report["veto"]["ShapesVG"]["none"]
    assert none["false_negatives"] == sum(sum(t[:2]) for t in truth) and none["dropped"] == 0
    judge = report["veto"]["ShapesVG"]["judge p(Yes) > 0.5"]
    dropped = [(x, w[2] > 0.5) for r, t in zip(records, truth) for x, w in zip(t, r["window"])]
    assert judge["dropped"] == sum(d for _, d in dropped)
    assert judge["recall"] == pytest.approx(sum(x and d for x, d in dropped) / sum(x for x, _ in dropped))
    assert mine.synthetic_same(("t", "images/object/red-circle-j03.png"), ("t", "images/object/red-circle-j11.png"))
    assert not mine.synthetic_same(("t", "images/object/red-circle-j03.png"), ("t", "images/object/red-cross-j03.png"))


# ----------------------------------------------------------------------------------
# Ranks, resume


def _rank_worker(rank, world, rendezvous, train_dir, image_dir, ckpt, out, err_dir):
    with gloo_worker(rank, world, rendezvous, err_dir, timeout_s=120):
        mine.mine(ev.Encoder(ckpt, device="cpu"), TrainRows(train_dir, image_dir, ["ShapesVG", "Mine"]), out,
                  num_negatives=2, range_max=6, judge=True, judge_threshold=0.5, shard_size=3,
                  sampling_strategy="random", progress=False)


def test_two_ranks_write_what_one_process_writes(bench, enc, tmp_path):
    paths, ckpt = bench
    one = run(enc, bench, tmp_path / "one", subsets=["ShapesVG", "Mine"], num_negatives=2, range_max=6, judge=True,
              judge_threshold=0.5, shard_size=3, sampling_strategy="random")
    err = tmp_path / "err"
    err.mkdir()
    run_processes(_rank_worker, [(r, 2, str(tmp_path / "rdv"), paths["train"], paths["image_dir"], ckpt,
                                  str(tmp_path / "two"), str(err)) for r in range(2)], str(err), timeout=300)
    assert json.loads((tmp_path / "two" / "mining_report.json").read_text()) == json.loads(json.dumps(one))
    for s in ("ShapesVG", "Mine"):
        assert read_out(tmp_path / "two", s) == read_out(tmp_path / "one", s)


def test_a_resumed_run_writes_what_an_uninterrupted_one_writes(bench, enc, tmp_path, monkeypatch):
    kw = dict(subsets=["ShapesVG"], num_negatives=2, range_max=6, relative_margin=0.01, shard_size=5)
    want = run(enc, bench, tmp_path / "fresh", **kw)
    calls, real = [], mine.mine_block

    def dies_after_one(*a, **k):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mine, "mine_block", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(enc, bench, tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed" / "mining_report.json").exists()
    blocks, encodes = [], []
    monkeypatch.setattr(mine, "mine_block", lambda *a, **k: blocks.append(1) or real(*a, **k))
    real_embed = ev.embed_inputs
    monkeypatch.setattr(ev, "embed_inputs", lambda *a, **k: encodes.append(1) or real_embed(*a, **k))
    got = run(enc, bench, tmp_path / "resumed", **kw)
    assert len(blocks) == 4 and encodes == []                              # 24 rows = 5 blocks, 1 kept; shards kept
    assert got == want and read_out(tmp_path / "resumed", "ShapesVG") == read_out(tmp_path / "fresh", "ShapesVG")
    blocks.clear()
    assert run(enc, bench, tmp_path / "resumed", **{**kw, "relative_margin": 0.02}) != want and len(blocks) == 5


# ----------------------------------------------------------------------------------
# Bad input: the one door's named errors


def test_bad_rows_and_images_stop_by_name(bench, enc, tmp_path):
    paths, ckpt = bench
    root, images = tmp_path / "train", tmp_path / "img"
    (root / "Bad").mkdir(parents=True)
    images.mkdir()
    shape_image("red").save(images / "ok.png")
    (images / "broken.png").write_bytes(b"not a png")
    doc = "<|image_1|>\nRepresent the given image."

    def write(rows):
        pq.write_table(pa.Table.from_pylist([{"qry": q, "qry_image_path": "", "pos_text": doc, "pos_image_path": p}
                                             for q, p in rows]), root / "Bad" / "original-00000-of-00001.parquet")
    args = ["--model", ckpt, "--train_data", str(root), "--image_dir", str(images), "--out", str(tmp_path / "o"),
            "--no-progress", "--num_negatives", "1"]
    write([("a", "ok.png"), ("b", "missing.png")])
    with pytest.raises(ValueError, match=r"Bad row 1 pos_image_path: missing image .*missing.png"):
        mine.main(args)
    write([("a", "ok.png"), ("b", "broken.png")])
    with pytest.raises(BadImageError, match=r"broken.png"):
        mine.main(args)
    with pytest.raises(BadImageError, match=r"Bad row 1 pos_image_path: cannot read image .*broken.png"):
        mine.main(args + ["--check_images"])
    report = mine.main(args + ["--check_images", "--skip_bad_rows"])          # dropped, and said so
    assert report["subsets"]["Bad"]["rows"] == 1 and report["subsets"]["Bad"]["skipped_rows"] == 1
    with pytest.raises(SystemExit):
        mine.main(args[:2] + ["--train_data", str(root / "Bad" / "original-00000-of-00001.parquet")] + args[4:])
