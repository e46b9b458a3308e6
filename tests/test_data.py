"""
Data pipeline: MMEB/mmE5 parquet reading, hard negatives, target instructions, bad-input
handling, the batch sampler and the built-in synthetic benchmark.

Run: cd /work/main && python -m pytest -q tests/test_data.py
"""
import hashlib
import itertools
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
from data import (BadImageError, TrainBatchSampler, TrainDataset, find_parquet, load_image,
                  make_synthetic, read_eval_task, with_target_instruction)


@pytest.fixture(scope="module")
def processor():
    from model import load_backbone
    _, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    return processor


def write_subset(root, subset, rows, split="original"):
    path = os.path.join(root, subset, f"{split}-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_image(root, rel, size=(56, 56), colour="red"):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return rel


def text_ids(processor, s):
    return processor.tokenizer(s, add_special_tokens=False)["input_ids"]


IMG_Q = "<|image_1|>\nRepresent the given image for classification"
IMG_DOC = "<|image_1|>\nRepresent the given image."


def row(qry, qry_image, pos, pos_image, **neg):
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image, **neg}


# ----------------------------------------------------------------------------------
# Reading MMEB-train and mmE5 files

@pytest.fixture()
def mmeb(tmp_path):
    """Three subsets in MMEB's schema (one without neg columns) and one in mmE5's."""
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a, b, c = (write_image(imgs, f"images/{n}.jpg", colour=col)
               for n, col in (("a", "red"), ("b", "blue"), ("c", "green")))
    write_subset(root, "VOC2007", [          # CLS: text documents get the target instruction
        row(IMG_Q, a, "red circle", "", neg_text="blue circle", neg_image_path=""),
        row(IMG_Q, b, "blue circle", "", neg_text="red circle", neg_image_path=""),
        row(IMG_Q, c, "red circle", "", neg_text="green circle", neg_image_path=""),
    ])
    write_subset(root, "VisDial", [          # image documents; image-only negative
        row("a dialogue about a red image", "", IMG_DOC, a, neg_text="", neg_image_path=b),
        row("no negative here", "", IMG_DOC, b, neg_text="", neg_image_path=""),
    ])
    write_subset(root, "CIRR", [             # no neg columns at all
        row("<|image_1|>\nmake it blue", a, IMG_DOC, b),
        row("<|image_1|>\nmake it green", a, IMG_DOC, c),
    ])
    write_subset(root, "MSCOCO_t2i", [       # mmE5: neg columns hold list literals
        row("a red picture", "", IMG_DOC, a, neg_text="['', '']", neg_image_path=f"['{b}', '{c}']"),
        row("a blue picture", "", IMG_DOC, b, neg_text="['', '']", neg_image_path="['', '']"),
        row("a green picture", "", IMG_DOC, c, neg_text="[]", neg_image_path="[]"),
    ])
    write_subset(root, "OK-VQA", [
        row("<|image_1|>\nRepresent the given image with the following question: colour?", a,
            "red", "", neg_text="['blue', 'green']", neg_image_path="['', '']"),
    ])
    return root, imgs


def test_reader_negatives_instructions_ids(mmeb, processor):
    root, imgs = mmeb
    ds = TrainDataset(root, imgs, processor,
                      subsets=["VOC2007", "VisDial", "CIRR", "MSCOCO_t2i", "OK-VQA"])
    assert len(ds) == 11
    by = {s: [ds[i] for i in ds.indices_by_subset[s]] for s in ds.subsets}
    voc = by["VOC2007"]
    # text document: target instruction prepended (to documents only, never to the query)
    assert voc[0]["pos"]["ids"] == text_ids(processor, "Represent the class label: red circle")
    assert voc[0]["neg"]["ids"] == text_ids(processor, "Represent the class label: blue circle")
    assert voc[0]["q"]["pixel_values"] is not None and voc[0]["subset"] == "VOC2007"
    # equal documents → equal ids; different → different
    assert voc[0]["pos_id"] == voc[2]["pos_id"] == voc[1]["neg_id"]
    assert voc[0]["pos_id"] != voc[1]["pos_id"]
    # image-only negative takes the positive's text; image documents unchanged
    vd = by["VisDial"]
    assert vd[0]["neg"]["ids"] == vd[1]["pos"]["ids"]            # same text, same image b
    assert vd[0]["neg_id"] == vd[1]["pos_id"]
    assert "Represent the caption" not in processor.tokenizer.decode(vd[0]["pos"]["ids"])
    assert vd[1]["neg"] is None and vd[1]["neg_id"] == -1
    # no neg columns → no negative, counted
    assert all(ex["neg"] is None for ex in by["CIRR"])
    assert ds.no_negative == {"VOC2007": 0, "VisDial": 1, "CIRR": 2, "MSCOCO_t2i": 2, "OK-VQA": 0}
    # mmE5 list literals: element 0; "['', '']" text → the positive's text
    m = by["MSCOCO_t2i"]
    assert m[0]["neg"] is not None and m[0]["neg_id"] == by["CIRR"][0]["pos_id"]   # IMG_DOC + b
    assert m[1]["neg"] is None and m[2]["neg"] is None
    assert by["OK-VQA"][0]["neg"]["ids"] == text_ids(
        processor, "Represent the answer to a question about an image: blue")
    # without target instructions the documents are the raw strings
    raw = TrainDataset(root, imgs, processor, subsets=["VOC2007"], target_instructions=False)
    assert raw[0]["pos"]["ids"] == text_ids(processor, "red circle")
    # per-subset cap (head of the file), subset_of
    capped = TrainDataset(root, imgs, processor, subsets=["VOC2007", "MSCOCO_t2i"],
                          max_rows_per_subset=2)
    assert [len(ix) for ix in capped.indices_by_subset.values()] == [2, 2]
    assert [capped[i]["row"] for i in range(4)] == [0, 1, 0, 1]
    assert [capped.subset_of(i) for i in range(4)] == ["VOC2007"] * 2 + ["MSCOCO_t2i"] * 2
    # subsets=None: every subset found under root
    assert sorted(TrainDataset(root, imgs, processor).subsets) == sorted(by)


def test_target_instruction_tables():
    assert len(data.MMEB_TRAIN_SUBSETS) == 20
    assert len(data.MMEB_EVAL_TASKS) == 36
    ind = [t for t, (_, is_ind) in data.MMEB_EVAL_TASKS.items() if is_ind]
    assert len(ind) == 20 and len(data.MMEB_EVAL_TASKS) - len(ind) == 16
    metas = [m for m, _ in data.MMEB_EVAL_TASKS.values()]
    assert [metas.count(m) for m in ("Classification", "VQA", "Retrieval", "Grounding")] == [10, 10, 12, 4]
    for name in [*data.MMEB_TRAIN_SUBSETS, *data.MMEB_EVAL_TASKS, *data.DEMO_EVAL_TASKS,
                 *data.DEMO_TRAIN_SUBSETS]:
        assert data.TARGET_INSTRUCTIONS[name].endswith(": ")
    assert with_target_instruction("red circle", "ImageNet-1K") == "Represent the class label: red circle"
    assert with_target_instruction("red circle", "ImageNet_1K") == "Represent the class label: red circle"
    assert with_target_instruction(IMG_DOC, "MSCOCO_t2i") == IMG_DOC
    once = with_target_instruction("a cat", "MSCOCO_i2t")
    assert with_target_instruction(once, "MSCOCO_i2t") == once
    with pytest.raises(KeyError, match="NoSuchTask"):
        with_target_instruction("x", "NoSuchTask")


# ----------------------------------------------------------------------------------
# Bad inputs

def test_missing_image_and_empty_side(tmp_path, processor):
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a = write_image(imgs, "images/a.jpg")
    write_subset(root, "CIRR", [row(IMG_Q, a, "x", ""), row(IMG_Q, "images/gone.jpg", "y", ""),
                                row("", "", "z", ""), row(IMG_Q, a, "w", "")])
    with pytest.raises(ValueError) as e:
        TrainDataset(root, imgs, processor, subsets=["CIRR"])
    msg = str(e.value)
    assert "CIRR" in msg and "row 1" in msg and os.path.join(imgs, "images/gone.jpg") in msg
    write_subset(root, "NIGHTS", [row(IMG_Q, a, "x", ""), row("", "", "z", "")])
    with pytest.raises(ValueError, match=r"NIGHTS row 1 qry: no text and no image"):
        TrainDataset(root, imgs, processor, subsets=["NIGHTS"])
    ds = TrainDataset(root, imgs, processor, subsets=["CIRR"], skip_bad_rows=True)
    assert len(ds) == 2 and [ds[i]["row"] for i in range(2)] == [0, 3]
    assert [r for r, _ in ds.skipped["CIRR"]] == [1, 2]
    assert "missing image" in ds.skipped["CIRR"][0][1]
    report = ds.report()
    assert "CIRR" in report and "row 1" in report and "gone.jpg" in report


def test_corrupt_image_at_load_time(tmp_path, processor):
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a = write_image(imgs, "images/a.jpg")
    os.makedirs(os.path.join(imgs, "images"), exist_ok=True)
    with open(os.path.join(imgs, "images/bad.jpg"), "wb") as f:
        f.write(b"not a jpeg at all" * 10)
    write_subset(root, "WebQA", [row(IMG_Q, a, "x", ""), row(IMG_Q, "images/bad.jpg", "y", ""),
                                 row(IMG_Q, a, "z", "")])
    ds = TrainDataset(root, imgs, processor, subsets=["WebQA"])     # exists: passes the check
    with pytest.raises(BadImageError) as e:
        ds[1]
    assert "WebQA row 1 qry" in str(e.value) and "bad.jpg" in str(e.value)
    assert isinstance(e.value, ValueError)
    ds = TrainDataset(root, imgs, processor, subsets=["WebQA"], skip_bad_rows=True)
    ex = ds[1]
    assert ex["row"] == 2 and ex["index"] == 1 and ex["subset"] == "WebQA"   # next valid row
    assert ex["pos"]["ids"] == text_ids(processor, "Represent the caption of an image: z")
    assert ds[1]["row"] == 2 and len(ds.skipped["WebQA"]) == 1              # counted once
    assert "bad.jpg" in ds.report()


def test_missing_subset_and_bad_list_literals(tmp_path, processor):
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a = write_image(imgs, "images/a.jpg")
    write_subset(root, "CIRR", [row(IMG_Q, a, "x", "")])
    with pytest.raises(FileNotFoundError) as e:
        TrainDataset(root, imgs, processor, subsets=["CIRR", "ChartQA"])
    assert "ChartQA" in str(e.value) and os.path.join(root, "ChartQA") in str(e.value)
    with pytest.raises(FileNotFoundError, match="VisDial"):
        find_parquet(root, "VisDial", "original")
    write_subset(root, "ChartQA", [row(IMG_Q, a, "x", "", neg_text="['a', 'b'", neg_image_path="")])
    with pytest.raises(ValueError, match=r"ChartQA row 0 neg_text: cannot parse"):
        TrainDataset(root, imgs, processor, subsets=["ChartQA"])
    write_subset(root, "DocVQA", [row(IMG_Q, a, "x", "", neg_text="['y']", neg_image_path=""),
                                  row(IMG_Q, a, "x", "", neg_text="[1, 2]", neg_image_path="")])
    with pytest.raises(ValueError, match=r"DocVQA row 1 neg_text: expected a list of strings"):
        TrainDataset(root, imgs, processor, subsets=["DocVQA"])
    ds = TrainDataset(root, imgs, processor, subsets=["DocVQA"], skip_bad_rows=True)
    assert len(ds) == 1 and ds.skipped["DocVQA"][0][0] == 1
    # a plain-string (MMEB) column is never parsed, even where a value starts with "["
    write_subset(root, "ChartQA", [row(IMG_Q, a, "x", "", neg_text="[2019, 2020]", neg_image_path=""),
                                   row(IMG_Q, a, "x", "", neg_text="2021", neg_image_path="")])
    ex = TrainDataset(root, imgs, processor, subsets=["ChartQA"], target_instructions=False)[0]
    assert ex["neg"]["ids"] == text_ids(processor, "[2019, 2020]")
    # an image given to a text without <|image_1|> is a bad row too
    write_subset(root, "A-OKVQA", [row("no placeholder", a, "x", "")])
    with pytest.raises(ValueError, match=r"A-OKVQA row 0 qry: 0 <\|image_1\|> placeholders"):
        TrainDataset(root, imgs, processor, subsets=["A-OKVQA"])


def test_small_image_is_upscaled(tmp_path, processor):
    write_image(str(tmp_path), "tiny.png", size=(10, 5))
    im = load_image(str(tmp_path / "tiny.png"))
    assert im.size == (56, 28) and im.mode == "RGB"
    item = data.encode_item(processor, IMG_Q, im)
    assert item["pixel_values"] is not None
    root = str(tmp_path / "train")
    write_subset(root, "SUN397", [row(IMG_Q, "tiny.png", "x", "")])
    ex = TrainDataset(root, str(tmp_path), processor, subsets=["SUN397"])[0]
    assert ex["q"]["image_grid_thw"] is not None


def test_eval_reader(tmp_path):
    rows = [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}]
    d = tmp_path / "GQA" / "test"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), str(d / "shard-0.parquet"))   # <Task>/test/*.parquet
    assert read_eval_task(str(tmp_path), "GQA") == rows
    with pytest.raises(FileNotFoundError, match="TextVQA"):
        read_eval_task(str(tmp_path), "TextVQA")


# ----------------------------------------------------------------------------------
# Batch sampler

GROUPS = {"A": list(range(0, 40)), "B": list(range(40, 100)), "C": list(range(100, 130))}


def subset_of(i):
    return next(s for s, ix in GROUPS.items() if i in ix)


def steps(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_ranks_homogeneous_deterministic():
    B, W = 4, 2
    ranks = [steps(TrainBatchSampler(GROUPS, B, W, r, seed=3), 40) for r in range(W)]
    for step in zip(*ranks):
        assert all(len(part) == B for part in step)
        glob = [i for part in step for i in part]
        assert len(set(glob)) == W * B                          # disjoint slices
        assert len({subset_of(i) for i in glob}) == 1           # one subset per global batch
    assert steps(TrainBatchSampler(GROUPS, B, W, 0, seed=3), 40) == ranks[0]
    assert steps(TrainBatchSampler(GROUPS, B, W, 0, seed=4), 40) != ranks[0]
    mixed = steps(TrainBatchSampler(GROUPS, B, 1, 0, seed=3, homogeneous=False), 30)
    assert any(len({subset_of(i) for i in b}) > 1 for b in mixed)


def test_sampler_epoch_proportional_and_resume():
    G = 8
    s = TrainBatchSampler(GROUPS, G)
    epoch = steps(s, s.steps_per_epoch)
    assert s.steps_per_epoch == 40 // 8 + 60 // 8 + 30 // 8 == 15
    counts = {k: sum(subset_of(b[0]) == k for b in epoch) for k in GROUPS}
    assert counts == {"A": 5, "B": 7, "C": 3}                   # ∝ subset size (floor)
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat))                          # each row at most once an epoch
    full = steps(s, 50)
    for k in (0, 7, 15, 23):                                    # within and across epochs
        assert steps(TrainBatchSampler(GROUPS, G, start_step=k), 50 - k) == full[k:]
    with pytest.raises(ValueError, match=r"C \(30 rows\)"):
        TrainBatchSampler(GROUPS, 16, world_size=2)


# ----------------------------------------------------------------------------------
# Synthetic benchmark

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.mktemp("synthetic")), seed=0)


def table_rows(path):
    return pq.read_table(path).to_pylist()


def all_rows(paths):
    train = {s: table_rows(find_parquet(paths["train"], s, "original")[0]) for s in data.DEMO_TRAIN_SUBSETS}
    evals = {t: read_eval_task(paths["eval"], t) for t in data.DEMO_EVAL_TASKS}
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
                out[os.path.relpath(p, root)] = hashlib.md5(open(p, "rb").read()).hexdigest()
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
            assert 8 <= len(cands) <= 24 and len(set(cands)) == len(cands), task
            for p in [r["qry_img_path"], *r["tgt_img_path"]]:
                assert p == "" or os.path.isfile(os.path.join(root, p)), p
            q, pos_text, pos_img = r["qry_text"], r["tgt_text"][0], r["tgt_img_path"][0]
            # the positive at 0, checked from the content the file names encode
            if task == "ShapesCLS":
                assert pos_text == " ".join(objects_in(r["qry_img_path"])[0])
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
            elif task == "ShapesVQA":
                (c1, s1), (c2, s2) = objects_in(r["qry_img_path"])
                question = q.split("question: ")[1]
                answer = {"What colour is the object on the left?": c1,
                          "What colour is the object on the right?": c2,
                          "What shape is on the left?": s1, "What shape is on the right?": s2,
                          f"What colour is the {s1}?": c1, f"What colour is the {s2}?": c2,
                          f"What shape is the {c1} object?": s1,
                          f"What shape is the {c2} object?": s2}[question]
                assert pos_text == answer
                assert {c1, c2, s1, s2} <= set(r["tgt_text"])             # binding distractors
    chance = {t: sum(1 / len(r["tgt_text"]) for r in rows) / len(rows) for t, rows in evals.items()}
    assert chance == pytest.approx({"ShapesCLS": 1 / 24, "ShapesVQA": 1 / 10, "ShapesT2I": 1 / 16,
                                    "ShapesI2T": 1 / 16, "ShapesObjectT2I": 1 / 12, "ShapesVG": 1 / 12})


def test_synthetic_heldout_never_in_train(synthetic):
    train, evals = all_rows(synthetic)
    root = synthetic["image_dir"]

    def digest(p):
        return hashlib.md5(open(os.path.join(root, p), "rb").read()).hexdigest()
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
    for r in evals["ShapesVQA"]:
        assert tuple(objects_in(r["qry_img_path"])) not in train_pairs


def test_synthetic_train_reads_and_encodes(synthetic, processor):
    ds = TrainDataset(synthetic["train"], synthetic["image_dir"], processor,
                      subsets=data.DEMO_TRAIN_SUBSETS)
    assert ds.subsets == data.DEMO_TRAIN_SUBSETS and len(ds) == 5 * 3000
    assert not any(ds.skipped.values()) and not any(ds.no_negative.values())
    for s in ds.subsets:
        for i in ds.indices_by_subset[s][:20]:
            ex = ds[i]
            assert ex["subset"] == s and ex["neg"] is not None
            assert len(ex["q"]["ids"]) <= 36 and len(ex["pos"]["ids"]) <= 24 and len(ex["neg"]["ids"]) <= 24
    # every target instruction and synthetic string is a short sequence for the tiny tokenizer
    for instruction in set(data.TARGET_INSTRUCTIONS.values()):
        assert len(text_ids(processor, instruction)) <= 12, instruction
    assert max(len(text_ids(processor, s.replace("<|image_1|>", ""))) for s in data.synthetic_texts()) <= 25
    assert [len(text_ids(processor, w)) for w in data.ANSWER_WORDS] == [1, 1]
    sampler = TrainBatchSampler(ds, 32, seed=0)
    batch = next(iter(sampler))
    assert len({ds.subset_of(i) for i in batch}) == 1
