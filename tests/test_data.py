"""
Data pipeline: MMEB/mmE5 parquet reading, hard negatives, target instructions, item
encoding and the batch sampler. (Bad input: tests/test_inputs.py; the demo's synthetic
benchmark: tests/test_demo.py.)

Run: python -m pytest -q tests/test_data.py
"""
import itertools
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from data import TrainBatchSampler, TrainDataset, with_target_instruction
from util.benchmarks import read_eval_task


@pytest.fixture(scope="module")
def processor():
    from util.backbone import load_backbone
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
    for name in [*data.MMEB_TRAIN_SUBSETS, *data.MMEB_EVAL_TASKS]:
        assert data.TARGET_INSTRUCTIONS[name].endswith(": ")
    assert with_target_instruction("red circle", "ImageNet-1K") == "Represent the class label: red circle"
    assert with_target_instruction("red circle", "ImageNet_1K") == "Represent the class label: red circle"
    assert with_target_instruction(IMG_DOC, "MSCOCO_t2i") == IMG_DOC
    once = with_target_instruction("a cat", "MSCOCO_i2t")
    assert with_target_instruction(once, "MSCOCO_i2t") == once
    assert with_target_instruction("x", "NoSuchTask") == "x"                  # none: unchanged
    mine = {"Digits": "Represent the digit: ", "VQA": "Answer: "}
    assert with_target_instruction("7", "Digits", None, mine) == "Represent the digit: 7"
    assert with_target_instruction("7", "Mine", "VQA", mine) == "Answer: 7"          # by meta-task
    assert with_target_instruction("7", "Mine", "Retrieval", mine) == "Represent the caption of an image: 7"
    assert with_target_instruction("7", "ImageNet-1K", None, {"ImageNet-1K": "Label: "}) == "Label: 7"


# ----------------------------------------------------------------------------------
# Bad inputs


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
# encode_item: image processor and tokenizer called apart == the processor's own call

def real_qwen_processor(tmp_path, model_type="qwen2_vl"):
    """Qwen2VLProcessor with Qwen's real tokenizer, the family's chat template and its real
    preprocessor_config.json (the files tools/width_real.py writes for a checkpoint, without
    the weights), built as load_backbone builds it."""
    import json

    from transformers import AutoTokenizer

    from util.backbone import ImageOnlyQwenVLProcessor, image_processor_for
    from tools import width_real
    family = width_real.FAMILY[model_type]
    width_real.write_tokenizer(width_real.tokenizer_source(), tmp_path, family)
    pre = dict(family["preprocessor"], processor_class=family["processor_class"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    return ImageOnlyQwenVLProcessor(image_processor=image_processor_for(str(tmp_path), None, None),
                                    tokenizer=AutoTokenizer.from_pretrained(tmp_path))   # as load_backbone


@pytest.mark.proof
@pytest.mark.parametrize("which", ["tiny", "real-qwen"])
def test_encode_item_equals_the_processor_call(which, processor, tmp_path):
    """The ids, pixel values and grid of encode_item (image processor + tokenizer on the
    text whose image pad is expanded) equal processor(text=, images=) exactly, for images
    of several shapes, text-only items, and an image passed as a precomputed
    encode_image output (TrainDataset's per-image cache)."""
    from conftest import shape_image
    proc = processor if which == "tiny" else real_qwen_processor(tmp_path)
    cases = [(IMG_Q, shape_image("red")), (IMG_DOC, shape_image("blue", (112, 56), "square")),
             ("<|image_1|> a question after the image?", shape_image("green", (84, 140))),
             ("a text-only query: red circle left of a blue square.", None),
             ("Représente ce texte — 日本語も", None)]
    for text, image in cases:
        want = proc(text=[data.content_text(text)], images=[image] if image else None,
                    return_tensors="pt")
        for got in [data.encode_item(proc, text, image)] + (
                [data.encode_item(proc, text, image_inputs=data.encode_image(proc, image))]
                if image else []):
            assert got["ids"] == want["input_ids"][0].tolist()
            if image is None:
                assert got["pixel_values"] is None and got["image_grid_thw"] is None
            else:
                assert torch.equal(got["pixel_values"], want["pixel_values"])
                assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    n_pad = data.encode_item(proc, IMG_DOC, shape_image("red", (112, 56)))["ids"].count(
        proc.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert n_pad == (112 // 28) * (56 // 28)                    # one pad per merged 28×28 patch
    with pytest.raises(ValueError, match="row 3 qry: the text holds <\\|image_pad\\|>"):
        data.encode_item(proc, "<|image_pad|> sneaked in", where="row 3 qry")
    with pytest.raises(ValueError, match="row 4 pos: text has <\\|image_1\\|> but no image"):
        data.encode_item(proc, IMG_DOC, where="row 4 pos")


def test_dataset_processes_each_image_file_once(tmp_path, processor, monkeypatch):
    """An image that recurs under other texts goes through the image processor once with
    the item cache on (every time with it off), and the items are the same either way."""
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a = write_image(imgs, "images/a.png", colour="red")
    b = write_image(imgs, "images/b.png", (112, 56), colour="blue")
    write_subset(root, "VQA", [row(f"<|image_1|>\nquestion {i}?", a if i % 2 else b, f"answer {i}", "")
                               for i in range(6)])
    calls = []
    real = data.encode_image
    monkeypatch.setattr(data, "encode_image", lambda p, im: calls.append(im.size) or real(p, im))
    items = {}
    for cache in (0, 100):
        calls.clear()
        ds = TrainDataset(root, imgs, processor, cache_items=cache, target_instructions=False)
        items[cache] = [ds[i] for i in range(len(ds))]
        assert sorted(calls) == (sorted([(56, 56), (112, 56)]) if cache else
                                 sorted([(56, 56)] * 3 + [(112, 56)] * 3))
    for x, y in zip(items[0], items[100]):
        assert x["q"]["ids"] == y["q"]["ids"] and x["pos"]["ids"] == y["pos"]["ids"]
        assert torch.equal(x["q"]["pixel_values"], y["q"]["pixel_values"])
