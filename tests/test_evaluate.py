"""evaluate.py against independent oracles.

Run:  python -m pytest -q tests/test_evaluate.py

- Hit@1 / R@k against naive Python loops (random scores, hand-built ties);
- MMEB end to end on a tiny MMEB-format set written here (two tasks in the two file layouts,
  a 10×6 image, candidates shared across queries, a candidate equal to a query, a copy of the
  positive inside its own list): per-task Hit@1 == a naive loop over embeddings of each item
  computed one at a time, and every distinct item is embedded exactly once per side —
  in one process and in 2 gloo processes (same table); resume; missing data; the CLI;
- each zero-shot reader on a fixture in the dataset's own layout, metrics == naive loops;
- Encoder: unit-norm fp32, batch-independent.
"""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as ev
from tools import rerank
from conftest import gloo_worker, run_processes, shape_image
from data import collate_embed, encode_item
from model import ReMatch
from util import benchmarks
from util.backbone import load_backbone, save_rematch
from util.benchmarks import read_eval_task
from util.inputs import find_parquet, load_image

TABLE = {"TaskA": ("Classification", True), "TaskB": ("Retrieval", False)}
TIMEOUT_S = 120


# ----------------------------------------------------------------------------------
# Metrics

def naive_hit_at_1(scores):
    hits = 0
    for row in scores.tolist():
        hits += all(s < row[0] for s in row[1:])
    return hits / len(scores)


def naive_recall(scores, is_pos, k):
    hits = 0
    for row, pos in zip(scores.tolist(), is_pos.tolist()):
        ranks = [sum(1 for s, p in zip(row, pos) if not p and s >= row[j])   # negatives before j
                 + sum(1 for s, p in zip(row, pos) if p and s > row[j])      # better positives
                 for j in range(len(row)) if pos[j]]
        hits += min(ranks) < k
    return hits / len(scores)


@pytest.mark.proof
@pytest.mark.parametrize("seed,nq,nc", [(0, 7, 5), (1, 30, 12), (2, 1, 3), (3, 50, 2)])
def test_metrics_match_naive_loops(seed, nq, nc):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(nq, nc, generator=g)
    scores[:, 1] = torch.where(torch.rand(nq, generator=g) < 0.3, scores[:, 0], scores[:, 1])  # ties
    scores = (scores * 4).round() / 4                                        # more ties
    assert ev.hit_at_1(scores) == pytest.approx(naive_hit_at_1(scores))
    is_pos = torch.rand(nq, nc, generator=g) < 0.3
    is_pos[torch.arange(nq), torch.randint(nc, (nq,), generator=g)] = True   # ≥ 1 positive per row
    for k in (1, 2, 5):
        assert ev.recall_at_k(scores, is_pos, k) == pytest.approx(naive_recall(scores, is_pos, k))


@pytest.mark.proof
def test_metric_ties_and_hand_cases():
    assert ev.hit_at_1(torch.zeros(5, 4)) == 0.0                             # constant model: 0, not 1
    assert ev.hit_at_1(torch.tensor([[0.5, 0.5, 0.1], [0.5, 0.4, 0.1]])) == 0.5   # tie with a negative
    assert ev.hit_at_1(torch.tensor([[0.2, float("nan")]])) == 0.0
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.5, 0.5, 0.2]])
    p = torch.tensor([[False, False, True, True], [False, True, True, False]])
    assert ev.recall_at_k(s, p, 1) == 0.5      # row 1: positives 0.5 on top (tie between positives)
    assert ev.recall_at_k(s, p, 2) == 0.5      # row 0: best positive 0.7 after two negatives
    assert ev.recall_at_k(s, p, 3) == 1.0
    tie = torch.tensor([[0.5, 0.5]])
    assert ev.recall_at_k(tie, torch.tensor([[True, False]]), 1) == 0.0      # negative tied → before
    with pytest.raises(ValueError):
        ev.recall_at_k(tie, torch.tensor([[False, False]]), 1)
    c = ev.cosine_scores(torch.tensor([[3.0, 0.0]], dtype=torch.bfloat16), torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    assert c.dtype == torch.float32 and torch.allclose(c, torch.tensor([[2 ** -0.5, 0.0]]))


def test_task_table_and_summary():
    assert len(data.MMEB_EVAL_TASKS) == 36
    assert sum(ind for _, ind in data.MMEB_EVAL_TASKS.values()) == 20
    assert [sum(m == g for m, _ in data.MMEB_EVAL_TASKS.values()) for g in ev.META_TASKS] == [10, 10, 12, 4]
    assert list(ev.task_table(["VOC2007", "GQA"])) == ["VOC2007", "GQA"]
    with pytest.raises(KeyError, match="CIFAR-100"):
        ev.task_table(["CIFAR-100"])
    assert ev.task_table(["ShapesCLS"], ev.benchmarks()["synthetic"]) == {"ShapesCLS": ("Classification", True)}
    table = {"a": ("Classification", True), "b": ("Classification", False), "c": ("VQA", True)}
    s = ev.summarize({"a": 0.5, "b": 0.2, "c": 0.8}, table)
    assert s["Classification"]["mean"] == pytest.approx(0.35) and s["VQA"]["mean"] == pytest.approx(0.8)
    assert s["IND"]["mean"] == pytest.approx(0.65) and s["OOD"]["mean"] == pytest.approx(0.2)
    assert s["Overall"]["mean"] == pytest.approx(0.5) and s["Grounding"]["tasks"] == 0
    s = ev.summarize({"a": 0.5, "b": None, "c": 0.8}, table)
    assert s["Classification"] == {"mean": None, "tasks": 2, "missing": 1}
    assert s["VQA"]["mean"] == pytest.approx(0.8) and s["Overall"]["mean"] is None


# ----------------------------------------------------------------------------------
# Tiny MMEB-format benchmark

I_CLS = "<|image_1|>\nRepresent the given image for classification"
I_IMG = "<|image_1|>\nRepresent the given image."


def write_mmeb(root):
    """root/mmeb/TaskA/test-00000-of-00001.parquet, root/mmeb/TaskB/test/data.parquet,
    images under root/images/. Returns (mmeb_dir, image_dir)."""
    mmeb, img = os.path.join(root, "mmeb"), os.path.join(root, "images")
    for d in ("TaskA", "TaskB"):
        os.makedirs(os.path.join(img, d), exist_ok=True)
    for i, (colour, shape, size) in enumerate([("red", "circle", 56), ("green", "square", 64),
                                               ("blue", "circle", (84, 56)), ("yellow", "square", (10, 6))]):
        shape_image(colour, size, shape).save(os.path.join(img, "TaskA", f"q{i}.png"))
    for i, colour in enumerate(("red", "green", "blue")):
        shape_image(colour, 56, "square").save(os.path.join(img, "TaskB", f"c{i}.png"))
    labels = ["a red circle", "a green square", "a blue circle", "a yellow square"]
    rows_a = [dict(qry_text=I_CLS, qry_img_path=f"TaskA/q{i}.png",
                   tgt_text=labels[i:] + labels[:i], tgt_img_path=[""] * 4) for i in range(4)]
    rows_a.append(dict(rows_a[0]))                                   # a repeated query
    c = [f"TaskB/c{i}.png" for i in range(3)]
    rows_b = [
        dict(qry_text="a red circle", qry_img_path="",               # query text == a candidate text
             tgt_text=[I_IMG, I_IMG, "a red circle"], tgt_img_path=[c[0], c[1], ""]),
        dict(qry_text=I_IMG, qry_img_path=c[1],                      # query item == a candidate item
             tgt_text=["a green square", "a red circle", I_IMG], tgt_img_path=["", "", c[0]]),
        dict(qry_text="a blue square", qry_img_path="",              # a copy of the positive at index 2
             tgt_text=[I_IMG, I_IMG, I_IMG, "a blue square"], tgt_img_path=[c[2], c[0], c[2], ""]),
        dict(qry_text="<|image_1|>\nWhat colour is the square?", qry_img_path="TaskA/q3.png",
             tgt_text=["yellow", "red", "green"], tgt_img_path=["", "", ""]),
    ]
    os.makedirs(os.path.join(mmeb, "TaskA"))
    os.makedirs(os.path.join(mmeb, "TaskB", "test"))
    pq.write_table(pa.Table.from_pylist(rows_a), os.path.join(mmeb, "TaskA", "test-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist(rows_b), os.path.join(mmeb, "TaskB", "test", "data.parquet"))
    return mmeb, img


def tiny_rematch():
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    return ReMatch(backbone, num_tokens=4).eval(), processor


def min28(im):
    """Independent statement of the small-image rule: shortest side → 28, aspect kept."""
    w, h = im.size
    if min(w, h) >= 28:
        return im.convert("RGB")
    return im.convert("RGB").resize((round(w * 28 / min(w, h)), round(h * 28 / min(w, h))))


class Oracle:
    """Embeds one item at a time (batch of 1), cached per (side, text, image)."""

    def __init__(self, model, processor):
        self.model, self.processor, self.cache = model, processor, {}

    def __call__(self, side, text, image=None):
        key = (side, text, image)
        if key not in self.cache:
            from PIL import Image
            im = min28(Image.open(image)) if image else None
            batch = collate_embed([encode_item(self.processor, text, im)], self.processor.tokenizer,
                                  self.model.num_tokens, self.model.embed_template)
            with torch.no_grad():
                self.cache[key] = self.model.embed(batch, side)[0][0].float()
        return self.cache[key]


def cos(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def direct_mmeb(oracle, mmeb_dir, image_dir, task):
    """Hit@1 by a naive loop; asserts no score lies within 1e-5 of the positive's."""
    rows = pq.read_table(find_parquet(mmeb_dir, task, "test")[0]).to_pylist()
    path = lambda p: os.path.join(image_dir, p) if p else None  # noqa: E731
    hits = 0
    for r in rows:
        q = oracle("q", r["qry_text"], path(r["qry_img_path"]))
        keys = list(zip(r["tgt_text"], r["tgt_img_path"]))
        s = [cos(q, oracle("d", t, path(p))) for t, p in keys]
        others = [s[j] for j in range(1, len(keys)) if keys[j] != keys[0]]
        assert all(abs(x - s[0]) > 1e-5 for x in others), "near-tie: the comparison would be fragile"
        hits += all(x < s[0] for x in others)
    return hits / len(rows)


def distinct_counts(mmeb_dir, task):
    rows = pq.read_table(find_parquet(mmeb_dir, task, "test")[0]).to_pylist()
    q = {(r["qry_text"], r["qry_img_path"]) for r in rows}
    d = {k for r in rows for k in zip(r["tgt_text"], r["tgt_img_path"])}
    return len(q), len(d)


def fingerprints(batch, image_token_id):
    """One hashable per row: its real token ids and the pixel sum of its image."""
    ids = [r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    pix = []
    if batch["pixel_values"] is not None:
        sizes = batch["image_grid_thw"].prod(dim=1).tolist()
        pix = [round(p.sum().item(), 3) for p in batch["pixel_values"].split(sizes)]
    pix = iter(pix)
    return [(tuple(r), next(pix) if image_token_id in r else None) for r in ids]


class Recorder:
    """Wraps model.embed: records (side, fingerprints) per call; optional hook before each."""

    def __init__(self, model, before=None):
        self.model, self.orig, self.before, self.calls = model, model.embed, before, []
        self.image_token_id = model.backbone.config.image_token_id
        model.embed = self

    def __call__(self, batch, side):
        if self.before:
            self.before()
        self.calls.append((side, fingerprints(batch, self.image_token_id)))
        return self.orig(batch, side)

    def items(self, side):
        return [f for s, fs in self.calls if s == side for f in fs]

    def restore(self):
        del self.model.embed


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_mmeb(str(tmp_path_factory.mktemp("bench")))


@pytest.fixture(scope="module")
def tiny():
    return tiny_rematch()


@pytest.fixture(scope="module")
def reference(bench, tiny):
    """mmeb_report in this process, with the embedding calls recorded."""
    model, processor = tiny
    rec = Recorder(model)
    try:
        results = ev.mmeb_report(model, processor, *bench, TABLE, batch_size=3, progress=False)["hit@1"]
    finally:
        rec.restore()
    return results, rec


@pytest.mark.proof
def test_mmeb_end_to_end_matches_direct_computation(bench, tiny, reference):
    model, processor = tiny
    results, rec = reference
    oracle = Oracle(model, processor)
    for task in TABLE:
        assert results[task] == pytest.approx(direct_mmeb(oracle, *bench, task), abs=1e-12), task
    # every distinct item embedded exactly once per side (across both tasks)
    nq = sum(distinct_counts(bench[0], t)[0] for t in TABLE)
    nd = sum(distinct_counts(bench[0], t)[1] for t in TABLE)
    assert len(rec.items("q")) == nq and len(rec.items("d")) == nd
    assert distinct_counts(bench[0], "TaskA") == (4, 4) and distinct_counts(bench[0], "TaskB") == (4, 9)
    assert load_image(os.path.join(bench[1], "TaskA", "q3.png")).size == (47, 28)   # 10×6 upscaled
    # finer: every (query, candidate) score of the batched path == the one-at-a-time cosine
    for task in TABLE:
        rows = read_eval_task(bench[0], task)
        q_keys, d_keys, pairs = ev.task_items(rows, task)
        path = lambda p: os.path.join(bench[1], p) if p else None  # noqa: E731
        items = [("q", t, path(p)) for t, p in q_keys] + [("d", t, path(p)) for t, p in d_keys]
        E = ev.embed_inputs(model, processor, items, batch_size=3)
        scores = ev.score_rows(E[:len(q_keys)], E[len(q_keys):], pairs)
        for i, r in enumerate(rows):
            keys = list(zip(r["tgt_text"], r["tgt_img_path"]))
            keys = keys[:1] + [k for k in keys[1:] if k != keys[0]]
            q = oracle("q", r["qry_text"], path(r["qry_img_path"]))
            expect = torch.tensor([cos(q, oracle("d", t, path(p))) for t, p in keys])
            assert torch.allclose(scores[i, :len(keys)], expect, atol=1e-5), (task, i)
            assert torch.isinf(scores[i, len(keys):]).all()


def test_matching_accuracy_matches_a_naive_loop(bench, tiny):
    """Held-out matching accuracy: for each query, the positive and the hardest other
    candidate (highest cosine by the Oracle's one-at-a-time embeddings), one instance per
    forward, d+'s slot from the same seed; per view type the fraction of right Yes/No, and
    its two halves: Yes on the positives, No on the hardest candidates."""
    import random

    from data import collate_match
    from masks import VIEW_SETS
    from util.backbone import answer_token_ids
    model, processor = tiny
    mmeb_dir, image_dir = bench
    config = {"w_qdm": 0.1, "model": "tiny"}
    report = ev.mmeb_report(model, processor, mmeb_dir, image_dir, TABLE, config, batch_size=3,
                            progress=False, extras=[rerank.MatchingAccuracy(config, 5, batch_size=3)])
    with pytest.raises(ValueError, match="trained with the matching loss"):
        ev.mmeb_report(model, processor, mmeb_dir, image_dir, TABLE, {"w_qdm": 0},
                       extras=[rerank.MatchingAccuracy({"w_qdm": 0}, 5)])
    oracle, (yes, no) = Oracle(model, processor), answer_token_ids(processor.tokenizer)
    path = lambda p: os.path.join(image_dir, p) if p else None  # noqa: E731
    groups = {"raw→raw": (0, 2), "raw→feat": (1, 3), "feat→raw": (4, 6), "feat→feat": (5, 7)}
    for task in TABLE:
        rows = pq.read_table(find_parquet(mmeb_dir, task, "test")[0]).to_pylist()[:5]
        right, n = [0] * 8, 0
        right_on = {True: [0] * 8, False: [0] * 8}              # per view, on d+ / on d-
        for i, r in enumerate(rows):
            keys = list(dict.fromkeys(zip(r["tgt_text"], r["tgt_img_path"])))   # distinct, positive first
            if len(keys) < 2:
                continue
            q = oracle("q", r["qry_text"], path(r["qry_img_path"]))
            E = [oracle("d", t, path(p)) for t, p in keys]
            j = max(range(1, len(keys)), key=lambda k: cos(q, E[k]))
            enc = [encode_item(processor, t, load_image(path(p)) if p else None)
                   for t, p in [(r["qry_text"], r["qry_img_path"]), keys[0], keys[j]]]
            slot = 1 if random.Random(f"{task}-{i}").random() < 0.5 else 2
            mb = collate_match([enc[0]], [enc[1]], [enc[2]], processor.tokenizer, VIEW_SETS["all"], [slot])
            with torch.no_grad():
                logits, labels = model.match(mb, q[None], E[0][None], E[j][None])
            for v in range(8):
                ok = int(bool(logits[v, yes] > logits[v, no]) == bool(labels[v] == yes))
                right[v] += ok
                right_on[bool(labels[v] == yes)][v] += ok
            n += 1
        got = report["matching"][task]
        assert got["instances"] == n
        for name, (a, b) in groups.items():
            assert got[name] == pytest.approx((right[a] + right[b]) / (2 * n), abs=1e-12), (task, name)
            # each view type holds one d+ view and one d- view per instance (slot 1 or 2)
            assert got["yes"][name] == pytest.approx((right_on[True][a] + right_on[True][b]) / n, abs=1e-12)
            assert got["no"][name] == pytest.approx((right_on[False][a] + right_on[False][b]) / n, abs=1e-12)


def test_format_table_layout(reference):
    text = ev.format_table(reference[0], TABLE, name="tiny")
    assert "Classification" in text and "Overall" in text and "TaskB" in text and "OOD" in text
    assert "n/a" not in text
    md = ev.format_table(reference[0], TABLE, name="tiny", markdown=True)
    assert md.count("|---") >= 2


def test_format_table_with_chance(tmp_path):
    # chance of a task = mean over queries of 1 / candidates: 2 queries with 4 and 2 candidates
    rows = [{"qry_text": "q", "qry_img_path": "", "tgt_text": list("abcd"), "tgt_img_path": [""] * 4},
            {"qry_text": "r", "qry_img_path": "", "tgt_text": list("ab"), "tgt_img_path": [""] * 2}]
    for task in TABLE:
        (tmp_path / task).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / task / "test-00000-of-00001.parquet"))
    chance = ev.chance_table(str(tmp_path), TABLE)
    assert chance == {t: (1 / 4 + 1 / 2) / 2 for t in TABLE}
    text = ev.format_table({"TaskA": 0.75, "TaskB": None}, TABLE, chance=chance)
    lines = text.splitlines()
    chance_row = next(l for l in lines if l.startswith("chance"))
    assert chance_row.split()[1] == "37.5"                      # Classification: TaskA's chance
    task_a = next(l for l in lines if l.startswith("TaskA")).split()
    assert task_a[3:] == ["75.0", "37.5", "2.0"]                # Hit@1, chance, 0.75 / 0.375
    task_b = next(l for l in lines if l.startswith("TaskB")).split()
    assert task_b[3:] == ["missing", "37.5", "-"]


def fmt_matching(results, table, matching, match_apart=(), **kw):
    """format_table with the matching head's columns (tools/rerank.py's MatchingAccuracy extra)."""
    x = rerank.MatchingAccuracy({"w_qdm": 1}, 10, apart=match_apart)
    return ev.format_table(results, table, extras=[(x, matching)], **kw)


def test_format_table_matching_means_apart():
    """The matching rows: per task and view type, one mean over all tasks, or (match_apart)
    one over the others and one over the apart tasks; hand-worked means."""
    views = list(rerank.MATCH_VIEW_TYPES)
    matching = {"TaskA": dict(zip(views, (0.9, 0.8, 0.7, 0.6)), instances=10),
                "TaskB": dict(zip(views, (0.5, 0.4, 0.5, 0.6)), instances=10)}
    results = {"TaskA": 0.75, "TaskB": 0.5}

    def rows(text, label):
        return next(l for l in text.splitlines() if l.startswith(label)).split()[-4:]
    text = fmt_matching(results, TABLE, matching=matching)
    assert rows(text, "mean") == ["70.0", "60.0", "60.0", "60.0"]            # (A + B) / 2
    text = fmt_matching(results, TABLE, matching=matching, match_apart=("TaskB", "TaskC"))
    assert rows(text, "mean (others)") == ["90.0", "80.0", "70.0", "60.0"]
    assert rows(text, "mean (TaskB)") == ["50.0", "40.0", "50.0", "60.0"]
    assert rerank.matching_means(matching, ["TaskA", "TaskB"]) == pytest.approx(dict(zip(views, (0.7, 0.6, 0.6, 0.6))))
    assert rerank.matching_means(matching, ["TaskC"]) == {}


def test_format_table_yes_no_block():
    """The last block splits each accuracy into Yes on positives / No on the hardest
    candidates, per task and view type, with the means of each half (hand-worked); results
    without the split (older records) print no block."""
    views = list(rerank.MATCH_VIEW_TYPES)
    split = lambda y, n: {"yes": dict(zip(views, y)), "no": dict(zip(views, n))}  # noqa: E731
    matching = {"TaskA": {**dict(zip(views, (0.75, 0.5, 0.5, 1.0))), "instances": 4,
                          **split((1.0, 0.75, 0.5, 1.0), (0.5, 0.25, 0.5, 1.0))},
                "TaskB": {**dict(zip(views, (0.5, 0.5, 0.5, 0.5))), "instances": 4,
                          **split((0.0, 0.25, 1.0, 0.5), (1.0, 0.75, 0.0, 0.5))}}
    results = {"TaskA": 0.75, "TaskB": 0.5}
    text = fmt_matching(results, TABLE, matching=matching)
    block = text.split(rerank.YES_NO_TITLE)[1].splitlines()
    row = lambda label: next(l for l in block if l.startswith(label))[len(label):].split()  # noqa: E731
    assert row("TaskA") == ["100.0", "/", "50.0", "75.0", "/", "25.0", "50.0", "/", "50.0", "100.0", "/", "100.0"]
    assert row("mean") == ["50.0", "/", "75.0", "50.0", "/", "50.0", "75.0", "/", "25.0", "75.0", "/", "75.0"]
    text = fmt_matching(results, TABLE, matching=matching, match_apart=("TaskB",))
    assert text.split(rerank.YES_NO_TITLE)[1].count("mean (TaskB)") == 1
    md = fmt_matching(results, TABLE, matching=matching, markdown=True)
    assert f"### {rerank.YES_NO_TITLE}" in md and "| TaskB | 0.0 / 100.0 |" in md
    old = {t: {k: v for k, v in m.items() if k not in ("yes", "no")} for t, m in matching.items()}
    assert rerank.YES_NO_TITLE not in fmt_matching(results, TABLE, matching=old)


# ----------------------------------------------------------------------------------
# 2 gloo processes == 1 process

def _dist_worker(rank, world, rendezvous, mmeb_dir, image_dir, out_dir):
    with gloo_worker(rank, world, rendezvous, out_dir, TIMEOUT_S // 2):
        model, processor = tiny_rematch()
        rec = Recorder(model)
        results = ev.mmeb_report(model, processor, mmeb_dir, image_dir, TABLE, batch_size=2,
                                   out_dir=os.path.join(out_dir, "run"), progress=False)["hit@1"]
        torch.save({"results": results, "q": rec.items("q"), "d": rec.items("d")},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        rec.restore()
        del model, rec


def test_two_gloo_processes_equal_one(bench, reference, tmp_path):
    W = 2
    run_processes(_dist_worker, [(r, W, str(tmp_path / "rdv"), *bench, str(tmp_path)) for r in range(W)],
                  tmp_path, TIMEOUT_S)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(W)]
    ref_results, ref_rec = reference
    assert out[0]["results"] == ref_results and out[1]["results"] == ref_results
    assert (ev.format_table(out[0]["results"], TABLE) == ev.format_table(ref_results, TABLE))
    for side in ("q", "d"):                        # each item embedded once, by exactly one rank
        both = out[0][side] + out[1][side]
        assert sorted(both, key=repr) == sorted(ref_rec.items(side), key=repr)
    assert all(o["q"] + o["d"] for o in out)       # both ranks did a share of the work
    saved = json.loads((tmp_path / "run" / "mmeb_results.json").read_text())
    assert {t: v["hit@1"] for t, v in saved["tasks"].items()} == ref_results


# ----------------------------------------------------------------------------------
# Resume, missing data, CLI

def test_resume_skips_finished_tasks(bench, tiny, reference, tmp_path):
    model, processor = tiny
    out = str(tmp_path / "out")

    def interrupt_after_task_a():
        if os.path.exists(os.path.join(out, "mmeb", "TaskA.json")):
            raise KeyboardInterrupt("simulated interruption during TaskB")

    rec = Recorder(model, before=interrupt_after_task_a)
    try:
        with pytest.raises(KeyboardInterrupt):
            ev.mmeb_report(model, processor, *bench, TABLE, batch_size=3, out_dir=out, progress=False)["hit@1"]
    finally:
        rec.restore()
    assert not os.path.exists(os.path.join(out, "mmeb", "TaskB.json"))
    rec = Recorder(model)
    try:
        results = ev.mmeb_report(model, processor, *bench, TABLE, batch_size=3, out_dir=out, progress=False)["hit@1"]
    finally:
        rec.restore()
    nq, nd = distinct_counts(bench[0], "TaskB")
    assert len(rec.items("q")) == nq and len(rec.items("d")) == nd          # TaskA not re-embedded
    assert results == reference[0]
    assert ev.format_table(results, TABLE) == ev.format_table(reference[0], TABLE)
    with pytest.raises(ValueError, match="another model/config"):
        ev.mmeb_report(model, processor, *bench, TABLE, config={"model": "other"}, out_dir=out,
                         progress=False)["hit@1"]
    saved = model.L_q.detach().clone()             # same config, other weights: not reused either
    with torch.no_grad():
        model.L_q.add_(1e-3)
    try:
        with pytest.raises(ValueError, match="other weights"):
            ev.mmeb_report(model, processor, *bench, TABLE, out_dir=out, progress=False)["hit@1"]
    finally:
        with torch.no_grad():
            model.L_q.copy_(saved)


def test_missing_task_file_and_images(bench, tiny, reference, tmp_path):
    model, processor = tiny
    table = dict(TABLE, TaskC=("Retrieval", True))
    with pytest.raises(FileNotFoundError, match="TaskC") as err:
        ev.mmeb_report(model, processor, *bench, table, progress=False)["hit@1"]
    assert os.path.join(bench[0], "TaskC") in str(err.value)
    results = ev.mmeb_report(model, processor, *bench, table, skip_missing=True, progress=False)["hit@1"]
    assert results == dict(reference[0], TaskC=None)
    text = ev.format_table(results, table)
    assert "missing" in text and "n/a (1 missing)" in text
    s = ev.summarize(results, table)
    assert s["Retrieval"]["mean"] is None and s["Overall"]["missing"] == 1
    assert s["Classification"]["mean"] == reference[0]["TaskA"]
    # a missing image is named
    images = str(tmp_path / "images")
    shutil.copytree(bench[1], images)
    os.remove(os.path.join(images, "TaskB", "c1.png"))
    with pytest.raises(FileNotFoundError, match="c1.png"):
        ev.mmeb_report(model, processor, bench[0], images, TABLE, progress=False)["hit@1"]
    results = ev.mmeb_report(model, processor, bench[0], images, TABLE, skip_missing=True, progress=False)["hit@1"]
    assert results == {"TaskA": reference[0]["TaskA"], "TaskB": None}


def test_cli_main(bench, tmp_path):
    table_file = tmp_path / "tasks.json"
    table_file.write_text(json.dumps(TABLE))
    out = tmp_path / "out"
    res = ev.main(["--model", "tiny-qwen2-vl", "--mmeb_dir", bench[0], "--image_dir", bench[1],
                   "--task_table", str(table_file), "--out", str(out), "--batch_size", "4",
                   "--no_progress", "--device", "cpu"])
    saved = json.loads((out / "mmeb_results.json").read_text())
    assert {t: v["hit@1"] for t, v in saved["tasks"].items()} == res["mmeb"]
    assert saved["config"]["num_tokens"] == 0 and saved["summary"]["Overall"]["tasks"] == 2
    assert saved["name"] == "tiny-qwen2-vl"
    assert "Overall" in (out / "mmeb_results.md").read_text()
    assert sorted(os.listdir(out / "mmeb")) == ["TaskA.json", "TaskB.json"]


# ----------------------------------------------------------------------------------
# Zero-shot readers and metrics

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def write_zeroshot(root):
    """A few images/captions per dataset, each in its real on-disk layout."""
    def img(path, i, size=56):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shape_image(COLOURS[i % 8], size, "circle" if i % 2 else "square",
                    background=COLOURS[(i + 3) % 8]).save(path)

    fl = [{"filename": f"{100 + i}.jpg", "split": "test" if i < 3 else "train", "imgid": i,
           "sentences": [{"raw": f"a {COLOURS[i]} thing number {j} ", "tokens": []} for j in range(5)]}
          for i in range(4)]
    os.makedirs(os.path.join(root, "flickr30k"))
    json.dump({"images": fl, "dataset": "flickr30k"}, open(os.path.join(root, "flickr30k", "dataset_flickr30k.json"), "w"))
    for i in range(3):
        img(os.path.join(root, "flickr30k", "flickr30k-images", f"{100 + i}.jpg"), i)
    co = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg",
           "split": ["test", "test", "restval"][i],
           "sentences": [{"raw": f"a {COLOURS[i + 3]} shape {j}"} for j in range(6)]} for i in range(3)]
    co[1]["sentences"][2]["raw"] = co[0]["sentences"][4]["raw"]    # one caption shared by two images
    os.makedirs(os.path.join(root, "coco"))
    json.dump({"images": co}, open(os.path.join(root, "coco", "dataset_coco.json"), "w"))
    for i in range(2):
        img(os.path.join(root, "coco", "val2014", co[i]["filename"]), i + 3, (10, 6) if i else 56)
    sg = [{"id": str(i), "image": ["coco/train2017", "sam/images"][i % 2] + f"/{i}.jpg",
           "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                             {"from": "gpt", "value": f"A long caption.\nThe {COLOURS[i]} object."}]}
          for i in range(4)]
    os.makedirs(os.path.join(root, "sharegpt4v"))
    json.dump(sg, open(os.path.join(root, "sharegpt4v", benchmarks.SHAREGPT4V_JSON), "w"))
    for i, e in enumerate(sg):
        img(os.path.join(root, "sharegpt4v", e["image"]), i + 1)
    for i in range(3):
        img(os.path.join(root, "Urban1k", "image", f"{i + 1}.jpg"), i + 5)
        os.makedirs(os.path.join(root, "Urban1k", "caption"), exist_ok=True)
        with open(os.path.join(root, "Urban1k", "caption", f"{i + 1}.txt"), "w") as f:
            f.write(f"A street with a {COLOURS[i + 5]} car.\nsecond line\n")
    os.makedirs(os.path.join(root, "sugarcrepe"))
    for k, s in enumerate(benchmarks.SUGARCREPE_SUBSETS):
        json.dump({str(j): {"filename": f"{j:012d}.jpg", "caption": f"a {COLOURS[j]} {s} shape",
                            "negative_caption": f"a {COLOURS[(j + k + 1) % 8]} {s} shape"} for j in range(3)},
                  open(os.path.join(root, "sugarcrepe", f"{s}.json"), "w"))
    for j in range(3):
        img(os.path.join(root, "coco", "val2017", f"{j:012d}.jpg"), j)
    return root


def direct_retrieval(oracle, pairs, ks):
    """Naive R@k: identical captions / images are one item, positive for all their partners."""
    caps, ims = list(dict.fromkeys(c for _, c in pairs)), list(dict.fromkeys(p for p, _ in pairs))
    pos = set(pairs)

    def recall(queries, cands, is_pos, q_emb, c_emb):
        out = {k: 0 for k in ks}
        for q in queries:
            s = {c: cos(q_emb(q), c_emb(c)) for c in cands}
            best = max(s[c] for c in cands if is_pos(q, c))
            before = sum(1 for c in cands if not is_pos(q, c) and s[c] >= best)
            for k in ks:
                out[k] += before < k
        return {k: v / len(queries) for k, v in out.items()}

    t2i = recall(caps, ims, lambda c, p: (p, c) in pos,
                 lambda c: oracle("q", ev.ZS_T2I_QUERY.format(c)), lambda p: oracle("d", ev.ZS_IMAGE_CANDIDATE, p))
    i2t = recall(ims, caps, lambda p, c: (p, c) in pos,
                 lambda p: oracle("q", ev.ZS_I2T_QUERY, p), lambda c: oracle("d", c))
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def test_zeroshot_readers(tmp_path):
    root = write_zeroshot(str(tmp_path))
    fl = benchmarks.read_flickr30k(root)
    assert len(fl) == 15 and fl[0] == (os.path.join(root, "flickr30k", "flickr30k-images", "100.jpg"),
                                       "a red thing number 0")
    co = benchmarks.read_coco(root)
    assert len(co) == 10 and co[0][0] == os.path.join(root, "coco", "val2014", "COCO_val2014_000000000000.jpg")
    assert "a yellow shape 5" not in [c for _, c in co]                      # first 5 captions only
    sg = benchmarks.read_sharegpt4v(root, limit=3)
    assert len(sg) == 3 and sg[1] == (os.path.join(root, "sharegpt4v", "sam/images/1.jpg"),
                                      "A long caption. The green object.")
    ur = benchmarks.read_urban1k(root)
    assert ur[2] == (os.path.join(root, "Urban1k", "image", "3.jpg"), "A street with a black car.")
    sc = benchmarks.read_sugarcrepe(root)
    assert sorted(sc) == sorted(benchmarks.SUGARCREPE_SUBSETS) and len(sc["swap_att"]) == 3
    assert sc["add_obj"][1] == (os.path.join(root, "coco", "val2017", "000000000001.jpg"),
                                "a green add_obj shape", "a blue add_obj shape")
    os.remove(os.path.join(root, "Urban1k", "image", "2.jpg"))
    with pytest.raises(FileNotFoundError, match="2.jpg"):
        benchmarks.read_urban1k(root)
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        benchmarks.read_flickr30k(str(tmp_path / "nowhere"))


def test_zeroshot_metrics_match_direct_computation(tiny, tmp_path):
    model, processor = tiny
    root = write_zeroshot(str(tmp_path))
    out = str(tmp_path / "out")
    names = list(ev.ZEROSHOT)
    res = ev.evaluate_zeroshot(model, processor, names, root, batch_size=4, out_dir=out, progress=False,
                               name="tiny")
    oracle = Oracle(model, processor)
    for name, reader, ks in (("flickr30k", benchmarks.read_flickr30k, (1, 5, 10)), ("coco", benchmarks.read_coco, (1, 5, 10)),
                             ("sharegpt4v", benchmarks.read_sharegpt4v, (1,)), ("urban1k", benchmarks.read_urban1k, (1,))):
        expect = direct_retrieval(oracle, reader(root), ks)
        assert res[name] == pytest.approx(expect, abs=1e-12), name
    for s, samples in benchmarks.read_sugarcrepe(root).items():
        acc = sum(cos(oracle("q", ev.ZS_I2T_QUERY, p), oracle("d", c)) > cos(oracle("q", ev.ZS_I2T_QUERY, p), oracle("d", n))
                  for p, c, n in samples) / len(samples)
        assert res["sugarcrepe"][s] == pytest.approx(acc, abs=1e-12), s
    for g, members in ev.SUGARCREPE_GROUPS.items():
        assert res["sugarcrepe"][g] == pytest.approx(sum(res["sugarcrepe"][m] for m in members) / len(members))
    saved = json.load(open(os.path.join(out, "zeroshot_results.json")))
    assert saved["results"] == res and saved["name"] == "tiny"
    table = ev.format_zeroshot_table(res, name="tiny")
    assert "Flickr30K" in table and "qt→ci" in table and "Replace" in table and "swap_att" in table
    assert "Flickr30K qt→ci" in ev.format_zeroshot_table(res, markdown=True)
    # restart: every dataset finished, nothing embedded again
    rec = Recorder(model)
    try:
        assert ev.evaluate_zeroshot(model, processor, names, root, out_dir=out, progress=False) == res
    finally:
        rec.restore()
    assert rec.calls == []


# ----------------------------------------------------------------------------------
# Encoder

def test_encoder_unit_norm_and_batch_independent(tiny, tmp_path):
    model, processor = tiny
    ckpt = str(tmp_path / "ckpt")
    save_rematch(model, processor, ckpt, {"model": "tiny-qwen2-vl", "num_tokens": 4, "embed_template": "chat"})
    enc = ev.Encoder(ckpt, device="cpu")
    assert enc.model.num_tokens == 4
    paths = []
    for i, size in enumerate((56, (10, 6), (70, 42))):
        paths.append(str(tmp_path / f"im{i}.png"))
        shape_image(COLOURS[i], size).save(paths[-1])
    images = [paths[0], shape_image("purple", 64), paths[1], paths[2], shape_image("black", (30, 90))]
    texts = ["a red circle", "a purple circle", "tiny", "a blue circle", "a black circle"]
    for kwargs in (dict(texts=texts), dict(images=images, instruction="Represent the given image."),
                   dict(texts=texts, images=images, instruction="Find the caption:", side="d")):
        full = enc.encode(**kwargs, batch_size=5)
        assert full.dtype == torch.float32 and full.shape == (5, 64)
        assert torch.allclose(full.norm(dim=1), torch.ones(5), atol=1e-6)
        assert torch.allclose(enc.encode(**kwargs, batch_size=2), full, atol=1e-5)
        one = {k: v[3:4] if isinstance(v, list) else v for k, v in kwargs.items()}
        assert torch.allclose(enc.encode(**one), full[3:4], atol=1e-5)
    # the same vector as embedding the MMEB string directly
    oracle = Oracle(enc.model, enc.processor)
    e = enc.encode(images=[paths[1]], instruction="Represent the given image.", side="d")[0]
    assert torch.allclose(e, F.normalize(oracle("d", I_IMG, paths[1]), dim=0), atol=1e-5)
    assert ev.format_input("a cat", True, "Find:") == "<|image_1|>\nFind: a cat"
    assert ev.format_input("a cat", False, None) == "a cat"
    assert ev.format_input(None, True, None) == "<|image_1|>"


# ----------------------------------------------------------------------------------
# The matching head as a reranker

def single_p_yes(model, processor, q_item, E_q, d_item, E_d, views, prompt=None):
    """Oracle: p(Yes) of one candidate, in slot 1 of a row of its own, from one decoder pass
    per view (tests/test_matching.py's separate passes, same position ids), mean over views."""
    from data import collate_match
    from util.backbone import answer_token_ids
    from test_matching import separate_pass_logits
    yes, no = answer_token_ids(processor.tokenizer)
    views = {"raw": (("Q", "D1"),), "feat": (("Zq", "Zd1"),),
             "all": (("Q", "D1"), ("Q", "Zd1"), ("Zq", "D1"), ("Zq", "Zd1"))}[views]
    mb = collate_match([q_item], [d_item], [d_item], processor.tokenizer, views, [1],
                       **({"prompt": prompt} if prompt else {}))
    with torch.no_grad():
        x, _, pos = model.match_inputs(mb, E_q[None], E_d[None], E_d[None])
        logits = separate_pass_logits(model, x, pos, mb["segments"], mb["label_idx"], views, 0)
    return torch.sigmoid(logits[:, yes] - logits[:, no]).mean().item()


@pytest.mark.parametrize("views", ["raw", "feat", "all"])
def test_matching_p_yes_equals_one_row_per_candidate(tiny, views):
    model, processor = tiny
    texts = ["a red circle", "a blue square", "a green cross", "a red square", "an orange circle"]
    items = [encode_item(processor, t) for t in texts]
    q_item = encode_item(processor, "<|image_1|>\nWhat is it?", shape_image("red"))
    g = torch.Generator().manual_seed(0)
    E_q, E_d = torch.randn(64, generator=g), torch.randn(5, 64, generator=g)
    p = rerank.matching_p_yes(model, processor, q_item, E_q, items, E_d, views, batch_size=2)
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()
    for j in range(5):
        ref = single_p_yes(model, processor, q_item, E_q, items[j], E_d[j], views)
        assert p[j].item() == pytest.approx(ref, abs=1e-5), (views, j)
    # a checkpoint trained with --match_prompt header is scored with that prompt
    from data import USER
    assert rerank.match_prompt({"match_prompt": "header"}) == USER and rerank.match_prompt({}) == data.MATCH_PROMPTS["paper"]
    p_h = rerank.matching_p_yes(model, processor, q_item, E_q, items, E_d, views, prompt=USER)
    ref = single_p_yes(model, processor, q_item, E_q, items[0], E_d[0], views, prompt=USER)
    assert p_h[0].item() == pytest.approx(ref, abs=1e-5) and not torch.allclose(p_h, p)


def test_rerank_hits_and_encoder_rerank(bench, tiny, tmp_path):
    model, processor = tiny
    mmeb_dir, image_dir = bench
    config = {"w_qdm": 0.1, "model": "tiny"}
    k = 3
    report = rerank.mmeb_rerank_report(model, processor, mmeb_dir, image_dir, TABLE, config, batch_size=3,
                                       progress=False, top_k=k, queries=4)
    with pytest.raises(ValueError, match="trained with the matching loss"):
        rerank.mmeb_rerank_report(model, processor, mmeb_dir, image_dir, TABLE, {"w_qdm": 0}, top_k=k)
    oracle = Oracle(model, processor)
    path = lambda p: os.path.join(image_dir, p) if p else None  # noqa: E731
    enc = lambda t, p: encode_item(processor, t, load_image(path(p)) if p else None)  # noqa: E731
    for task in TABLE:
        rows = pq.read_table(find_parquet(mmeb_dir, task, "test")[0]).to_pylist()[:4]
        before = after = 0
        for r in rows:
            keys = list(zip(r["tgt_text"], r["tgt_img_path"]))
            keys = [keys[0]] + [x for x in keys[1:] if x != keys[0]]
            q = oracle("q", r["qry_text"], path(r["qry_img_path"]))
            E = [oracle("d", t, path(p)) for t, p in keys]
            s = [cos(q, e) for e in E]
            before += all(x < s[0] for x in s[1:])
            top = sorted(range(len(keys)), key=lambda j: -s[j])[:k]
            if 0 not in top:
                continue
            q_item = enc(r["qry_text"], r["qry_img_path"])
            p = {j: single_p_yes(model, processor, q_item, q, enc(*keys[j]), E[j], "raw")
                 for j in top}
            after += all(p[j] < p[0] for j in top if j != 0)
        got = report["rerank"][task]
        assert (got["queries"], got["k"], got["views"]) == (4, k, "raw")
        assert got["hit@1_before"] == pytest.approx(before / 4) and got["hit@1_after"] == pytest.approx(after / 4)
    # rerank(Encoder): the same p(Yes) as the core, whatever the batch; refuses untrained heads
    ckpt = str(tmp_path / "ckpt")
    save_rematch(model, processor, ckpt, {"model": "tiny-qwen2-vl", "num_tokens": 4,
                                          "embed_template": "chat", "w_qdm": 0.1})
    enc_ = ev.Encoder(ckpt, device="cpu")
    cands = ["a red circle", "a blue square", (shape_image("green"), "a green circle")]
    p1 = rerank.rerank(enc_, "a red circle", cands, batch_size=1)
    p2 = rerank.rerank(enc_, "a red circle", cands, batch_size=8)
    assert p1.shape == (3,) and torch.allclose(p1, p2, atol=1e-5)
    with pytest.raises(ValueError, match="trained with the matching loss"):
        rerank.rerank(ev.Encoder("tiny-qwen2-vl", device="cpu"), "a red circle", cands)
