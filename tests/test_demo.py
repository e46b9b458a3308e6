"""
The CPU demo's support code (demo/): the synthetic benchmark in MMEB's schema (deterministic,
held-out eval pairs never seen in training, attribute-swapped distractors), its target
prompts, and the tiny tokenizer's corpus.

Run: python -m pytest -q tests/test_demo.py
"""
import hashlib
import os
import pathlib
import re

import pyarrow.parquet as pq
import pytest

import data
from data import TrainBatchSampler, TrainDataset, with_target_instruction
from util.benchmarks import read_eval_task
from util.inputs import find_parquet
from demo import (DEMO_BINDING_TASKS, DEMO_EVAL_TASKS, DEMO_META, DEMO_TRAIN_SUBSETS, make_synthetic,
                  tokenizer_corpus)
from demo.synthetic import COLOURS, SHAPES, TRAIN_SHARE, synthetic_texts


@pytest.fixture(scope="module")
def processor():
    from util.backbone import load_backbone
    _, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    return processor


def text_ids(processor, s):
    return processor.tokenizer(s, add_special_tokens=False)["input_ids"]


def test_demo_tables_and_target_prompts():
    assert DEMO_TRAIN_SUBSETS == [t for t in DEMO_EVAL_TASKS if t != "ShapesObjectT2I"]
    assert set(DEMO_BINDING_TASKS) == {"ShapesT2I", "ShapesI2T"}
    assert [ind for _, ind in DEMO_EVAL_TASKS.values()].count(False) == 1      # one OOD task
    for name in DEMO_EVAL_TASKS:
        meta = DEMO_META[name]
        prompt = data.TARGET_BY_META[meta]
        assert prompt.endswith(": ")
        assert with_target_instruction("red circle", name, meta) == prompt + "red circle"
    assert with_target_instruction("red circle", "ShapesCLS") == "red circle"   # no meta-task: none


# The tiny tokenizer is trained on demo.tokenizer_corpus(): its vocabulary is a function of
# the demo's strings and data.py's templates. This fingerprint makes a change to either
# visible (the demo's figures and every tiny-model test move with it). If you changed a
# demo string or a template on purpose, re-run the demo, update the README's demo table and docs/demo.md and
# this fingerprint (the failure message prints the new one).
TINY_VOCAB_SHA = "4897b09ce3e6ace7"


def test_tiny_vocabulary_fingerprint(processor):
    vocab = sorted(processor.tokenizer.get_vocab().items())
    sha = hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]
    assert sha == TINY_VOCAB_SHA, f"the tiny vocabulary changed: fingerprint {sha} (see comment)"
    corpus = tokenizer_corpus()
    assert corpus == tokenizer_corpus() and all("<|image_1|>" not in s for s in corpus)


@pytest.fixture(scope="module")
def synthetic(demo_benchmark):
    return demo_benchmark                   # make_synthetic(seed=0), the session's (conftest)


def table_rows(path):
    return pq.read_table(path).to_pylist()


def all_rows(paths):
    train = {s: table_rows(find_parquet(paths["train"], s, "original")[0]) for s in DEMO_TRAIN_SUBSETS}
    evals = {t: read_eval_task(paths["eval"], t) for t in DEMO_EVAL_TASKS}
    return train, evals


def test_synthetic_deterministic(tmp_path):
    a = make_synthetic(str(tmp_path / "a"), seed=1, train_rows=200, eval_queries=40)
    b = make_synthetic(str(tmp_path / "b"), seed=1, train_rows=200, eval_queries=40)
    assert all_rows(a) == all_rows(b)

    def digests(root):
        out = {}
        for d, _, files in os.walk(os.path.join(root, "images")):
            for f in files:
                p = os.path.join(d, f)
                out[os.path.relpath(p, root)] = hashlib.md5(pathlib.Path(p).read_bytes()).hexdigest()
        return out
    assert digests(a["root"]) == digests(b["root"])
    c = make_synthetic(str(tmp_path / "c"), seed=2, train_rows=200, eval_queries=40)
    assert all_rows(c) != all_rows(a)
    f = find_parquet(a["train"], "ShapesCLS", "original")[0]
    mtime = os.stat(f).st_mtime_ns
    assert make_synthetic(a["root"], seed=1, train_rows=200, eval_queries=40) == a   # reused
    assert os.stat(f).st_mtime_ns == mtime


OBJ = r"([a-z]+)-([a-z]+)-j\d\d"


def objects_in(path):
    """The (colour, shape) objects an image file name encodes, in order."""
    return re.findall(OBJ, os.path.basename(path))


def phrase(c, s):
    return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}"


def caption(objs):
    (c1, s1), (c2, s2) = objs
    return f"{phrase(c1, s1)} on the left and {phrase(c2, s2)} on the right"


def swapped(objs):
    """Colour swap, shape swap, side swap of a two-object pair."""
    (c1, s1), (c2, s2) = objs
    return [((c2, s1), (c1, s2)), ((c1, s2), (c2, s1)), ((c2, s2), (c1, s1))]


def test_synthetic_eval_rows(synthetic):
    train, evals = all_rows(synthetic)
    root = synthetic["image_dir"]
    for task, rows in evals.items():
        assert 100 <= len(rows) <= 200, task
        for r in rows:
            cands = list(zip(r["tgt_text"], r["tgt_img_path"]))
            assert 4 <= len(cands) <= 24 and len(set(cands)) == len(cands), task
            for p in [r["qry_img_path"], *r["tgt_img_path"]]:
                assert p == "" or os.path.isfile(os.path.join(root, p)), p
            q, pos_text, pos_img = r["qry_text"], r["tgt_text"][0], r["tgt_img_path"][0]
            # the positive at 0, checked from the content the file names encode
            if task == "ShapesCLS":
                assert pos_text == " ".join(objects_in(r["qry_img_path"])[0])
                assert len(r["tgt_text"]) == 24
            elif task in ("ShapesColour", "ShapesShape"):                # one attribute, every value
                k = task == "ShapesShape"
                assert pos_text == objects_in(r["qry_img_path"])[0][k]
                assert sorted(r["tgt_text"]) == sorted((COLOURS, SHAPES)[k])
            elif task == "ShapesI2T":
                objs = objects_in(r["qry_img_path"])
                assert pos_text == caption(objs)
                assert {caption(t) for t in swapped(objs)} <= set(r["tgt_text"])   # compositional
                assert sorted(caption(swapped(objs)[0]).split()) == sorted(pos_text.split())
            elif task == "ShapesT2I":
                objs = objects_in(pos_img)
                assert q.endswith(caption(objs))
                cand_objs = [tuple(objects_in(p)) for p in r["tgt_img_path"]]
                assert all(tuple(t) in cand_objs for t in swapped(objs))              # compositional
            elif task == "ShapesObjectT2I":
                assert q.endswith(phrase(*objects_in(pos_img)[0]))
            elif task == "ShapesVG":
                label = re.search(r"labeled as '(\w+ \w+)'", q).group(1)
                assert " ".join(objects_in(pos_img)[0]) == label
                assert objects_in(pos_img)[0] in objects_in(r["qry_img_path"])
                assert sum(" ".join(objects_in(p)[0]) == label for p in r["tgt_img_path"]) == 1
            elif task == "ShapesVQA":                                      # one object, one attribute
                [(c, sh)] = objects_in(r["qry_img_path"])
                question = q.split("question: ")[1]
                assert pos_text == {"What colour is the object?": c, "What shape is the object?": sh}[question]
                assert sorted(r["tgt_text"]) == sorted(COLOURS + SHAPES)
    chance = {t: sum(1 / len(r["tgt_text"]) for r in rows) / len(rows) for t, rows in evals.items()}
    assert chance == pytest.approx({"ShapesColour": 1 / 6, "ShapesShape": 1 / 4,
                                    "ShapesCLS": 1 / 24, "ShapesVQA": 1 / 10, "ShapesT2I": 1 / 16,
                                    "ShapesI2T": 1 / 16, "ShapesObjectT2I": 1 / 12, "ShapesVG": 1 / 12})


def test_synthetic_heldout_never_in_train(synthetic):
    train, evals = all_rows(synthetic)
    root = synthetic["image_dir"]

    def digest(p):
        return hashlib.md5(pathlib.Path(root, p).read_bytes()).hexdigest()
    train_images = {p for rows in train.values() for r in rows
                    for p in (r["qry_image_path"], r["pos_image_path"], r["neg_image_path"]) if p}
    eval_queries = {r["qry_img_path"] for rows in evals.values() for r in rows if r["qry_img_path"]}
    assert not train_images & eval_queries
    assert not {digest(p) for p in train_images} & {digest(p) for p in eval_queries}
    # held-out pairs: their captions never occur in training, as query or document
    train_text = {t for rows in train.values() for r in rows
                  for t in (r["qry"], r["pos_text"], r["neg_text"])}
    train_pairs = {tuple(objects_in(p)) for p in train_images if "/pair/" in p}
    for r in evals["ShapesI2T"]:
        objs = tuple(objects_in(r["qry_img_path"]))
        assert objs not in train_pairs and r["tgt_text"][0] not in train_text
    for r in evals["ShapesT2I"]:
        assert r["qry_text"] not in train_text
    # single-object tasks: every eval image is a render (size 40 px) that training never shows
    for t in ("ShapesColour", "ShapesShape", "ShapesCLS", "ShapesVQA"):
        assert all("/object/" in r["qry_img_path"] for r in evals[t])


def test_synthetic_train_reads_and_encodes(synthetic, processor):
    ds = TrainDataset(synthetic["train"], synthetic["image_dir"], processor,
                      subsets=DEMO_TRAIN_SUBSETS, task_meta=DEMO_META)
    assert ds.subsets == DEMO_TRAIN_SUBSETS
    assert {s: len(ix) for s, ix in ds.indices_by_subset.items()} == \
        {s: round(3000 * TRAIN_SHARE.get(s, 1)) for s in DEMO_TRAIN_SUBSETS}
    assert TRAIN_SHARE == {"ShapesColour": 0.5, "ShapesShape": 2.0}   # docs/demo.md §1 describes it
    assert not any(ds.skipped.values()) and not any(ds.no_negative.values())
    for s in ds.subsets:
        for i in ds.indices_by_subset[s][:20]:
            ex = ds[i]
            assert ex["subset"] == s and ex["neg"] is not None
            assert len(ex["q"]["ids"]) <= 36 and len(ex["pos"]["ids"]) <= 24 and len(ex["neg"]["ids"]) <= 24
    # every target instruction and synthetic string is a short sequence for the tiny tokenizer
    for instruction in set(data.TARGET_INSTRUCTIONS.values()):
        assert len(text_ids(processor, instruction)) <= 12, instruction
    assert max(len(text_ids(processor, s.replace("<|image_1|>", ""))) for s in synthetic_texts()) <= 25
    assert [len(text_ids(processor, w)) for w in data.ANSWER_WORDS] == [1, 1]
    sampler = TrainBatchSampler(ds, 32, seed=0)
    batch = next(iter(sampler))
    assert len({ds.subset_of(i) for i in batch}) == 1
