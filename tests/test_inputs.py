"""The one door for untrusted input (util/inputs.py, util/benchmarks.py): every bad file,
row, flag and API argument is refused with a message that names it, before any work.

Run:  python -m pytest -q tests/test_inputs.py     (part of the full suite: pytest --full)

- training rows (MMEB-train, mmE5 list cells): missing or corrupt images, empty sides,
  numbers or NaN as text, paths leaving --image_dir, texts over --max_text_tokens,
  crafted list literals; the skip policy counts and reports, in DataLoader workers and
  over DDP ranks;
- images: decode guards (unreadable, decompression bombs), small images upscaled;
- benchmark files: malformed MMEB-eval rows, zero-shot files and entries, confined image
  paths, runaway texts;
- hub ids and directories, a checkpoint's config key by key;
- flags of train.py and evaluate.py (the range table and the rules between flags);
- the API: Encoder.encode's and rerank's arguments, encode_item's items.
"""
import json
import os
import pathlib
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
from conftest import shape_image
from data import TrainDataset, encode_item
from model import ReMatch
from test_data import IMG_Q, processor, row, text_ids, write_image, write_subset  # noqa: F401 (fixture)
from test_evaluate import bench  # noqa: F401 (fixture)
from test_model import Q_IMG
from test_train import flags, write_train_fixture
from tools.rerank import rerank
from util import benchmarks
from util.backbone import load_backbone, resolve_checkpoint
from util.benchmarks import read_eval_task
from util.inputs import BadImageError, BadItemError, find_parquet, load_image


def _literal(text):
    import re
    return re.escape(text)


# ----------------------------------------------------------------------------------
# The library API refuses instead of guessing


@pytest.fixture(scope="module")
def encoder():
    return ev.Encoder("tiny-qwen2-vl", device="cpu")


class _Array:                      # an image-like object of a type Encoder does not take
    shape = (56, 56, 3)


BAD_ENCODE_CALLS = [   # (keyword arguments of Encoder.encode, error type, message part)
    (dict(texts=["a red circle"], side="query"), ValueError, "side must be 'q'"),
    (dict(texts=["a red circle"], side="Q"), ValueError, "got 'Q'"),
    (dict(texts=["a red circle"], side="doc"), ValueError, "'d' (documents"),
    (dict(texts="circle"), TypeError, "texts must be a list, got str (for one, pass [text])"),
    (dict(images=shape_image("red")), TypeError, "images must be a list, got Image"),
    (dict(images=[_Array()]), TypeError, "images[0]: an image must be a PIL image or a path"),
    (dict(images=[torch.zeros(3, 56, 56)]), TypeError, "got Tensor"),
    (dict(texts=[3]), TypeError, "texts[0] is a int"),
    (dict(texts=["a"], batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(texts=["a"], batch_size=2.5), ValueError, "batch_size must be an int >= 1, got 2.5"),
    (dict(), ValueError, "give texts, images, or both"),
    (dict(texts=["a", "b"], images=[None]), ValueError, "2 texts but 1 images"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ENCODE_CALLS,
                         ids=[str(i) for i in range(len(BAD_ENCODE_CALLS))])
def test_encode_refuses_bad_calls(encoder, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        encoder.encode(**kwargs)


def test_encode_still_takes_what_it_documents(encoder):
    """The refusals leave the documented calls alone: lists of texts, PIL images, paths."""
    img = shape_image("red")
    E = encoder.encode(texts=["a red circle", None], images=[img, img], side="d", batch_size=1)
    assert E.shape[0] == 2 and torch.isfinite(E).all()
    assert torch.allclose(E.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.fixture(scope="module")
def matching_encoder(tmp_path_factory):
    from util.backbone import save_rematch
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    save_rematch(ReMatch(backbone, num_tokens=2), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat", "w_qdm": 0.1})
    return ev.Encoder(ckpt, device="cpu")


BAD_RERANK_CALLS = [   # (query, candidates, keyword arguments, error type, message part)
    ("a red circle", "red circle", {}, TypeError, "candidates must be a list, got str"),
    ("a red circle", ["a", ("a red circle", shape_image("red"))], {}, TypeError,
     "candidates[1]: a pair must be (image, text)"),
    ("a red circle", ["a", _Array()], {}, TypeError, "candidates[1]: expected a text (str), an image"),
    (_Array(), ["a"], {}, TypeError, "query: expected a text"),
    ("a red circle", ["a"], {"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
]


@pytest.mark.parametrize("query, candidates, kwargs, error, message", BAD_RERANK_CALLS,
                         ids=[str(i) for i in range(len(BAD_RERANK_CALLS))])
def test_rerank_refuses_bad_calls(matching_encoder, query, candidates, kwargs, error, message):
    with pytest.raises(error, match=_literal(message)):
        rerank(matching_encoder, query, candidates, **kwargs)


GOOD_CONFIG = {"model": "tiny-qwen2-vl", "num_tokens": 4, "embed_template": "chat", "min_pixels": None,
               "max_pixels": 12544, "seed": 0, "w_qdm": 0.1, "match_prompt": "paper",
               "target_instructions": True, "lora": False}


BAD_CONFIGS = [   # (key, value, message part)
    ("num_tokens", "2", "num_tokens must be an integer in [0, 1024], got '2'"),
    ("num_tokens", -3, "num_tokens must be an integer in [0, 1024], got -3"),
    ("num_tokens", True, "num_tokens must be"),
    ("embed_template", "fancy", "embed_template must be 'chat' or 'plain'"),
    ("min_pixels", 4_000_000, "min_pixels must be null or an integer in [784, 1310720], got 4000000"),
    ("max_pixels", 10, "max_pixels must be null or an integer"),
    ("min_pixels", 20000, "min_pixels must be <= max_pixels (12544)"),
    ("model", 7, "model must be the base model's hub id"),
    ("seed", "0", "seed must be an integer"),
    ("w_qdm", -1, "w_qdm must be a number >= 0"),
    ("match_prompt", "long", "match_prompt must be 'paper' or 'header'"),
    ("target_instructions", "yes", "target_instructions must be true or false"),
    ("model_revision", 5, "model_revision must be null or the base model's commit"),
    ("target_prompt_table", {"VOC2007": ""}, "target_prompt_table must be null or {subset"),
    ("target_prompt_table", ["x"], "target_prompt_table must be null or {subset"),
    ("dtype", "float8", "dtype must be 'auto', 'float32', 'bfloat16' or 'float64'"),
]


@pytest.mark.parametrize("key, value, message", BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIGS])
def test_a_checkpoint_config_is_checked_key_by_key(tmp_path, key, value, message):
    from util.backbone import check_config
    assert check_config(dict(GOOD_CONFIG), "cfg") == GOOD_CONFIG
    with pytest.raises(ValueError, match=_literal(f"cfg: {message}")):
        check_config(dict(GOOD_CONFIG, **{key: value}), "cfg")
    path = tmp_path / "ckpt"                               # load_rematch checks before building
    path.mkdir()
    (path / "rematch_config.json").write_text(json.dumps(dict(GOOD_CONFIG, **{key: value})))
    from model import load_rematch
    with pytest.raises(ValueError, match=_literal(message)):
        load_rematch(str(path), device="cpu")


BAD_EVAL_ROWS = [   # (a task's row, message part)
    (dict(qry_text="q", qry_img_path="", tgt_text=["a", "b"], tgt_img_path="a.png"),
     "row 0 tgt_img_path: expected a list of strings, got 'a.png'"),
    (dict(qry_text="q", qry_img_path=7, tgt_text=["a", "b"], tgt_img_path=["", ""]),
     "row 0 qry_img_path: expected a string"),
    (dict(qry_text="q", qry_img_path="", tgt_text=["a", "a", "a"], tgt_img_path=["", "", ""]),
     "row 0: every candidate equals the positive"),
]


@pytest.mark.parametrize("row, message", BAD_EVAL_ROWS, ids=["str-paths", "int-path", "no-negative"])
def test_malformed_eval_rows_are_named(tmp_path, row, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from util.benchmarks import read_eval_task
    (tmp_path / "T").mkdir()
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "T" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=_literal(f"MMEB task T {message}")):
        read_eval_task(str(tmp_path), "T")


def test_evaluation_confines_image_paths_as_training_does(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "imgs").mkdir()
    shape_image("red").save(tmp_path / "x.png")                      # outside --image_dir
    (tmp_path / "mmeb" / "T").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([dict(qry_text="<|image_1|>\nq", qry_img_path="../x.png",
                                              tgt_text=["a", "b"], tgt_img_path=["", ""])]),
                   tmp_path / "mmeb" / "T" / "test-00000-of-00001.parquet")
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    model = ReMatch(backbone, num_tokens=2).eval()
    table, args = {"T": ("Other", True)}, (str(tmp_path / "mmeb"), str(tmp_path / "imgs"))
    with pytest.raises(ValueError, match=_literal("MMEB task T: image path(s) leave --image_dir")
                       + ".*'../x.png'.*--allow_outside_image_dir"):
        ev.mmeb_report(model, processor, *args, table, progress=False)
    report = ev.mmeb_report(model, processor, *args, table, progress=False, allow_outside_image_dir=True)
    assert set(report["hit@1"]) == {"T"}


CRAFTED_CELLS = [   # (an mmE5 neg_text cell, message part)
    ("[{}]", "expected a list of strings (mmE5 format)"),
    ("[{[]}]", "cannot parse the list literal '[{[]}]' (TypeError"),
    ("[" * 5000 + "]" * 5000, "cannot parse the list literal"),
    ("['" + "a" * 200_000 + "']", "a list cell of 200,004 characters (at most 100,000)"),
    ("[1, 2", "cannot parse the list literal '[1, 2'"),
]


@pytest.mark.parametrize("cell, message", CRAFTED_CELLS, ids=["dict", "unhashable", "deep", "huge", "torn"])
def test_crafted_list_cells_are_named_row_errors(cell, message):
    from util.inputs import _is_list_literal, first_negative
    _is_list_literal(cell)                                 # never raises, whatever the cell
    with pytest.raises(ValueError, match=_literal(f"Sub row 3 neg_text: {message}")):
        first_negative(cell, "Sub row 3 neg_text")


def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path):
    """A PNG of 10000 × 9000 = 90M pixels (PIL only warns up to 179M) is refused by name,
    before a pixel is decoded; one just below the bound loads."""
    import struct
    import zlib

    from util.inputs import MAX_DECODE_PIXELS, BadImageError, load_image

    def png_header(w, h):                              # a valid header; the pixel data is never read
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    big = tmp_path / "big.png"
    big.write_bytes(png_header(10000, 9000))
    assert 10000 * 9000 > MAX_DECODE_PIXELS
    with pytest.raises(BadImageError, match=_literal(f"row 2 qry: image {big} is 10000 × 9000 = 90,000,000 pixels")):
        load_image(str(big), "row 2 qry")
    small = tmp_path / "small.png"
    shape_image("red").save(small)
    assert load_image(str(small)).size == (56, 56)


def test_evaluation_refuses_a_runaway_text_by_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "T").mkdir()
    long_text = " ".join(["circle"] * 300)
    pq.write_table(pa.Table.from_pylist([dict(qry_text="a red circle", qry_img_path="",
                                              tgt_text=["a", long_text], tgt_img_path=["", ""])]),
                   tmp_path / "T" / "test-00000-of-00001.parquet")
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    model = ReMatch(backbone, num_tokens=2).eval()
    table = {"T": ("Other", True)}
    with pytest.raises(ValueError, match=r"T d-item 1: the text is \d+ tokens, more than --max_text_tokens 100"):
        ev.mmeb_report(model, processor, str(tmp_path), str(tmp_path), table, progress=False, max_text_tokens=100)
    assert set(ev.mmeb_report(model, processor, str(tmp_path), str(tmp_path), table, progress=False)["hit@1"]) == {"T"}
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "m", "--mmeb_dir", "d", "--image_dir", "d", "--max_text_tokens", "0"])


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


BAD_ZEROSHOT = [   # (reader, relative file, content, message part)
    ("read_flickr30k", "flickr30k/dataset_flickr30k.json",
     {"images": [{"split": "test", "filename": "1.jpg", "sentences": [{"raw": None}]}]},
     "entry 1.jpg: malformed (TypeError: expected a caption string, got NoneType)"),
    ("read_flickr30k", "flickr30k/dataset_flickr30k.json",
     {"images": [{"split": "train", "filename": "1.jpg", "sentences": []}]}, "holds no usable entry"),
    ("read_coco", "coco/dataset_coco.json", {"images": [{"filename": "1.jpg"}]},
     "entry 0: malformed (KeyError: 'split')"),
    ("read_sharegpt4v", "sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json",
     [{"image": "a.jpg", "conversations": [{"value": "q"}]}], "entry 0: malformed (IndexError"),
    ("read_sugarcrepe", "sugarcrepe/add_obj.json", {"7": {"filename": "a.jpg", "caption": "c"}},
     "entry 7: malformed (KeyError: 'negative_caption')"),
    ("read_coco", "coco/dataset_coco.json", "not json", "is not valid JSON"),
]


@pytest.mark.parametrize("reader, rel, content, message", BAD_ZEROSHOT,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_ZEROSHOT)])
def test_zeroshot_readers_name_the_file_and_entry(tmp_path, reader, rel, content, message):
    if content == "not json":
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text("{")
    else:
        _write_json(tmp_path / rel, content)
    if reader == "read_sugarcrepe":                              # the other six subsets: well formed
        for sub in benchmarks.SUGARCREPE_SUBSETS[1:]:
            _write_json(tmp_path / "sugarcrepe" / f"{sub}.json", {})
    with pytest.raises(ValueError, match=_literal(str(tmp_path / rel)) + ".*" + _literal(message)):
        getattr(benchmarks, reader)(str(tmp_path))


@pytest.mark.slow
def test_ddp_reports_the_skips_of_every_rank(tmp_path):
    """torchrun, 2 ranks, --skip_bad_rows: a truncated image that only rank 1 reads is in
    rank 0's report (each rank used to report its own skips, and only rank 0 prints)."""
    import shutil
    import subprocess
    import sys

    from data import TrainBatchSampler, TrainDataset
    from test_train import REPO, flags, write_train_fixture
    root = write_train_fixture(str(tmp_path / "fx"), n=6)
    shutil.rmtree(os.path.join(root, "MSCOCO_t2i"))                 # one subset, 6 rows
    _, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    ds = TrainDataset(root, root, processor)
    rank1 = next(iter(TrainBatchSampler(ds, 3, 2, 1, seed=0)))       # rank 1's rows at step 0
    row = ds.rows[rank1[0]][1]
    png = os.path.join(root, "ImageNet_1K", f"{row}.png")
    data = pathlib.Path(png).read_bytes()
    pathlib.Path(png).write_bytes(data[:len(data) // 2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "train.py"), *flags(root, str(tmp_path / "out"), "--steps", "1",
                                                   "--skip_bad_rows")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped ImageNet_1K row {row}: ImageNet_1K row {row} qry: cannot read image" in proc.stdout


# ----------------------------------------------------------------------------------
# Training rows (MMEB-train, mmE5): named refusals and the skip policy


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
    assert [(s, r) for s, r, _ in ex["skipped"]] == [("WebQA", 1)]           # travels with it
    again = ds[1]
    assert again["row"] == 2 and again["skipped"] == []                      # found once
    ds.record_skipped([ex, again])
    assert len(ds.skipped["WebQA"]) == 1 and "bad.jpg" in ds.report()


def test_skips_found_in_dataloader_workers_are_counted(tmp_path, processor):
    """A truncated PNG under --skip_bad_rows with a worker process: the skip reaches the
    main process's report (it travels in the batch), and --check_images finds it up front."""
    root, imgs = str(tmp_path / "train"), str(tmp_path)
    a = write_image(imgs, "images/a.png")
    with open(os.path.join(imgs, a), "rb") as f:
        good = f.read()
    with open(os.path.join(imgs, "images/cut.png"), "wb") as f:
        f.write(good[:len(good) // 2])                                   # a truncated PNG
    write_subset(root, "WebQA", [row(IMG_Q, a, "x", ""), row(IMG_Q, "images/cut.png", "y", ""),
                                 row(IMG_Q, a, "z", "")])
    ds = TrainDataset(root, imgs, processor, subsets=["WebQA"], skip_bad_rows=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=list, num_workers=1)
    for batch in loader:
        ds.record_skipped(batch)
    assert [r for r, _ in ds.skipped["WebQA"]] == [1] and "cut.png" in ds.report()

    strict = TrainDataset(root, imgs, processor, subsets=["WebQA"])
    with pytest.raises(BadImageError, match=r"WebQA row 1 qry_image_path: cannot read image .*cut.png"):
        strict.check_images()
    checked = TrainDataset(root, imgs, processor, subsets=["WebQA"], skip_bad_rows=True)
    assert checked.check_images() == 2                                   # distinct images
    assert len(checked) == 2 and [checked[i]["row"] for i in range(2)] == [0, 2]
    assert [r for r, _ in checked.skipped["WebQA"]] == [1]


def test_values_that_must_not_pass_silently(tmp_path, processor):
    """A number or NaN in a text column, a path leaving image_dir, an image whose header
    claims 20000 × 20000, a text over max_text_tokens: each named by row and column."""
    root, imgs = str(tmp_path / "train"), str(tmp_path / "imgs")
    a = write_image(imgs, "images/a.png")
    write_subset(root, "A", [row(IMG_Q, a, float("nan"), "")])        # a float column
    with pytest.raises(ValueError, match=r"A row 0 pos_text: expected text or null, got float nan"):
        TrainDataset(root, imgs, processor, subsets=["A"])
    write_subset(root, "B", [row(7, "", "y", "")])                    # an int column
    with pytest.raises(ValueError, match=r"B row 0 qry: expected text or null, got int 7"):
        TrainDataset(root, imgs, processor, subsets=["B"])

    write_image(str(tmp_path), "outside.png")
    for path in ("../outside.png", os.path.join(str(tmp_path), "outside.png")):
        write_subset(root, "C", [row(IMG_Q, path, "x", "")])
        with pytest.raises(ValueError, match=r"C row 0 qry_image_path: image path .* leaves --image_dir"):
            TrainDataset(root, imgs, processor, subsets=["C"])
        assert len(TrainDataset(root, imgs, processor, subsets=["C"], allow_outside_image_dir=True)) == 1

    Image.new("RGB", (1, 1)).save(os.path.join(imgs, "images/bomb.png"))
    with open(os.path.join(imgs, "images/bomb.png"), "r+b") as f:        # IHDR: width, height, CRC
        png = bytearray(f.read())
        png[16:24] = (20000).to_bytes(4, "big") * 2
        png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
        f.seek(0)
        f.write(png)
    write_subset(root, "D", [row(IMG_Q, "images/bomb.png", "x", "")])
    with pytest.raises(BadImageError, match=r"D row 0 qry: image .*bomb.png is too large to decode"):
        TrainDataset(root, imgs, processor, subsets=["D"])[0]

    write_subset(root, "E", [row("word " * 40, "", "x", ""), row("short", "", "y", "")])
    ds = TrainDataset(root, imgs, processor, subsets=["E"], max_text_tokens=20)
    assert ds[1]["row"] == 1
    n = len(text_ids(processor, "word " * 40))                        # the tiny tokenizer's count
    with pytest.raises(BadItemError, match=f"E row 0 qry: the text is {n} tokens, more than "
                                                r"--max_text_tokens 20"):
        ds[0]


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
    # mixed: one plain string among list literals is itself; the lists give their first
    write_subset(root, "DocVQA", [row(IMG_Q, a, "x", "", neg_text="['blue square', 'other']"),
                                  row(IMG_Q, a, "x", "", neg_text="red circle")])
    ds = TrainDataset(root, imgs, processor, subsets=["DocVQA"], target_instructions=False)
    assert [ds[i]["neg"]["ids"] for i in range(2)] == [text_ids(processor, "blue square"),
                                                       text_ids(processor, "red circle")]
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


def test_skips_in_a_dataloader_worker_reach_the_report(tmp_path, capsys):
    """The issue's case: --skip_bad_rows --num_workers 1 and a truncated PNG. The report at
    the end of training counts it (the worker's own record used to be lost)."""
    import shutil

    import train
    root = write_train_fixture(str(tmp_path / "fx"), n=6)
    png = os.path.join(root, "ImageNet_1K", "0.png")
    with open(png, "rb") as f:
        data = f.read()
    with open(png, "wb") as f:
        f.write(data[:len(data) // 2])
    shutil.rmtree(os.path.join(root, "MSCOCO_t2i"))
    train.main(flags(root, str(tmp_path / "out"), "--steps", "2", "--batch_size", "6",
                     "--skip_bad_rows", "--num_workers", "1"))
    report = capsys.readouterr().out
    assert "ImageNet_1K" in report and "skipped ImageNet_1K row 0: ImageNet_1K row 0 qry: cannot read image" in report


@pytest.mark.parametrize("bad,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--train_data", "x"], "--train_data needs --image_dir"),
    (["--chunk_size", "0"], "--chunk_size must be >= 1"),
    (["--tau", "0"], "--tau"),
    (["--match_views", "everything"], "invalid choice"),
    (["--save_every", "0"], "--save_every must be >= 1"),
    (["--log_every", "0"], "--log_every must be >= 1"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--tau", "1e-12"], "--tau must be in [1e-3, 10]"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
])
def test_bad_flags_are_rejected_by_name(bad, message, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(bad)
    assert message in capsys.readouterr().err


def test_bad_eval_inputs_are_named(bench, tmp_path, capsys):
    """An empty task file, a null tgt_text, a malformed or missing --task_table, --batch_size 0
    and a missing absolute --model directory: each a message naming the file, row or flag."""
    root = tmp_path / "mmeb"
    os.makedirs(root / "Empty")
    schema = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                        ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    pq.write_table(schema.empty_table(), root / "Empty" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"MMEB task Empty: no rows in .*Empty"):
        read_eval_task(str(root), "Empty")
    os.makedirs(root / "Nulls")
    pq.write_table(pa.Table.from_pylist([dict(qry_text="q", qry_img_path="", tgt_text=["a"], tgt_img_path=[""]),
                                         dict(qry_text="q", qry_img_path="", tgt_text=None, tgt_img_path=None)],
                                        schema=schema), root / "Nulls" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"MMEB task Nulls row 1 tgt_text: expected a list of strings"):
        read_eval_task(str(root), "Nulls")

    base = ["--model", "tiny-qwen2-vl", "--mmeb_dir", bench[0], "--image_dir", bench[1]]
    bad_json = tmp_path / "table.json"
    bad_json.write_text('{"TaskA": ["Classification", true],')
    bad_entry = tmp_path / "entry.json"
    bad_entry.write_text('{"TaskA": ["Classification", "yes"]}')
    for extra, message in [(["--task_table", str(bad_json)], f"--task_table {bad_json}: not valid JSON"),
                           (["--task_table", str(bad_entry)], "entry 'TaskA' must be [meta_task, true/false]"),
                           (["--task_table", str(tmp_path / "none.json")], "none.json: cannot read it"),
                           (["--batch_size", "0"], "--batch_size must be >= 1")]:
        with pytest.raises(SystemExit):
            ev.parse_args(base + extra)
        assert message in capsys.readouterr().err
    missing = str(tmp_path / "no" / "such-checkpoint")
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such directory"):
        ev.main(["--model", missing, "--mmeb_dir", bench[0], "--image_dir", bench[1], "--device", "cpu"])


def test_bad_items_raise_naming_the_item(tiny):
    _, _, processor = tiny
    with pytest.raises(ValueError, match="VisDial row 7 qry: empty text and no image"):
        encode_item(processor, "  ", None, where="VisDial row 7 qry")
    with pytest.raises(ValueError, match="row 3: text has <\\|image_1\\|> but no image"):
        encode_item(processor, Q_IMG, None, where="row 3")
    with pytest.raises(ValueError, match="row 4: an image was given but the text has 0"):
        encode_item(processor, "a red circle", shape_image("red"), where="row 4")


# ----------------------------------------------------------------------------------
# Evaluation as strict as training

def test_a_hub_checkpoint_downloads_exactly_the_files_evaluation_reads(monkeypatch, tmp_path):
    """Evaluation fetches the checkpoint's config, heads, card and weights, never
    train_state.pt and no subfolder; --resume_from also fetches the training state."""
    import fnmatch

    import huggingface_hub
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append(kw["allow_patterns"]) or str(tmp_path))
    resolve_checkpoint("someone/rematch-2b")
    resolve_checkpoint("someone/rematch-2b", train_state=True)
    evaluation, resume = calls
    match = lambda path, pats: any(fnmatch.fnmatch(path, p) for p in pats)  # noqa: E731 (as huggingface_hub)
    saved = ["rematch_config.json", "rematch_heads.safetensors", "README.md", "adapter/adapter_config.json",
             "adapter/adapter_model.safetensors", "backbone/config.json", "backbone/model.safetensors",
             "backbone/model-00001-of-00002.safetensors", "backbone/model.safetensors.index.json",
             "backbone/tokenizer.json", "backbone/tokenizer_config.json", "backbone/chat_template.jinja",
             "backbone/preprocessor_config.json", "backbone/generation_config.json"]
    assert all(match(f, evaluation) for f in saved)
    for f in ("train_state.pt", "files.json", "backbone/sub/config.json", "adapter/x/adapter_model.safetensors",
              "other/model.safetensors", "backbone/modeling_evil.py"):
        assert not match(f, evaluation), f
    assert match("train_state.pt", resume) and match("files.json", resume)


def test_a_hub_id_is_never_refused_for_an_unrelated_local_folder(tmp_path, monkeypatch):
    """Qwen/Qwen2-VL-2B-Instruct with a folder Qwen/ here is still a hub id; a local path
    that does not exist says so when it starts with ./ or /."""
    import huggingface_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()
    asked = []

    def download(repo, name, **kw):
        asked.append(repo)
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve_checkpoint("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct" and asked
    for call in (lambda: load_backbone("./runs/typo"), lambda: ev.Encoder(str(tmp_path / "runs" / "typo"))):
        with pytest.raises(FileNotFoundError, match="runs/typo: no such directory"):
            call()


def test_a_full_checkpoints_own_pixel_bounds_are_checked(tmp_path):
    """A backbone/preprocessor_config.json with min_pixels of millions (a 56-px image would
    become 20,736 patches) is refused by name; the config's bounds apply to it too."""
    from util.backbone import save_rematch
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    ckpt = str(tmp_path / "ckpt")
    save_rematch(ReMatch(backbone, num_tokens=2), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat", "max_pixels": 3136})
    from model import load_rematch
    _, proc, _ = load_rematch(ckpt, device="cpu")
    assert proc.image_processor.size.longest_edge == 3136                     # the config's bound
    pre = pathlib.Path(ckpt, "backbone", "preprocessor_config.json")
    cfg = json.loads(pre.read_text())
    cfg.update(min_pixels=16_000_000, size={"shortest_edge": 16_000_000, "longest_edge": 16_000_000})
    pre.write_text(json.dumps(cfg))
    config = pathlib.Path(ckpt, "rematch_config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_pixels": None}))
    with pytest.raises(ValueError, match="backbone: preprocessor_config.json's min_pixels is 16000000, outside"):
        load_rematch(ckpt, device="cpu")


def test_evaluation_uses_the_checkpoints_training_dtype(tmp_path):
    from model import load_rematch
    from util.backbone import save_rematch
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    ckpt = str(tmp_path / "ckpt")
    save_rematch(ReMatch(backbone, num_tokens=2), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat", "dtype": "float64"})
    assert next(load_rematch(ckpt, device="cpu")[0].parameters()).dtype == torch.float64
    assert next(load_rematch(ckpt, device="cpu", dtype=torch.float32)[0].parameters()).dtype == torch.float32
    assert ev.parse_args(["--model", ckpt, "--mmeb_dir", "d", "--image_dir", "d", "--dtype", "float32"]).dtype == "float32"


def test_a_runaway_text_is_refused_before_it_is_tokenized_whole(monkeypatch):
    """Encoder (and so rerank and zero-shot, through embed_inputs) caps texts by default;
    a 2-MB text is refused from its first 64 · cap characters, the rest never tokenized."""
    enc = ev.Encoder("tiny-qwen2-vl", device="cpu")
    seen, real = [], enc.processor.tokenizer.__class__.__call__
    monkeypatch.setattr(enc.processor.tokenizer.__class__, "__call__",
                        lambda self, text, *a, **kw: seen.append(len(text)) or real(self, text, *a, **kw))
    with pytest.raises(BadItemError, match="encode d-item 1: the text is 2,000,000 characters, over "
                                           "--max_text_tokens 8192 tokens"):
        enc.encode(texts=["a red circle", "w" * 1_999_998 + " x"], side="d")
    assert max(seen) == 64 * ev.EVAL_MAX_TEXT_TOKENS


def test_zeroshot_image_paths_stay_under_the_data_dir(tmp_path):
    _write_json(tmp_path / "sharegpt4v" / benchmarks.SHAREGPT4V_JSON,
                [{"image": "../../etc/passwd", "conversations": [{}, {"value": "a cat"}]}])
    with pytest.raises(ValueError, match="ShareGPT4V: image path.* leave --data_dir .*allow_outside_image_dir"):
        benchmarks.read_sharegpt4v(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="passwd"):                    # allowed: read, then missing
        benchmarks.read_sharegpt4v(str(tmp_path), allow_outside=True)


def test_a_task_of_single_candidates_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "One").mkdir()
    rows = [dict(qry_text="q", qry_img_path="", tgt_text=["a"], tgt_img_path=[""])] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "One" / "test-00000-of-00001.parquet")
    with pytest.raises(ValueError, match="MMEB task One: every row has a single candidate"):
        read_eval_task(str(tmp_path), "One")
    (tmp_path / "Some").mkdir()
    rows = rows[:1] + [dict(qry_text="q", qry_img_path="", tgt_text=["a", "b"], tgt_img_path=["", ""])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "Some" / "test-00000-of-00001.parquet")
    assert len(read_eval_task(str(tmp_path), "Some")) == 2
    assert "MMEB task Some: 1 of 2 rows have a single candidate (rows 0): each counts as a hit" in capsys.readouterr().out


def test_matching_without_pairs_is_na_and_left_out_of_the_means():
    """A task whose judged rows have no other candidate: n/a, not 0.0, and outside the means;
    the rerank table's mean with no task is n/a, not a division by zero."""
    from tools import rerank as rr
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    emb = ev.TaskEmbeddings([("q", None)], [("a", None)], [(0, [0])], torch.zeros(1, 64), torch.zeros(1, 64),
                            torch.zeros(1, 1))
    none = rr.matching_accuracy(ReMatch(backbone, num_tokens=2), processor, emb, 5)
    assert none["instances"] == 0 and all(none[v] is None for v in rr.MATCH_VIEW_TYPES)
    views = list(rr.MATCH_VIEW_TYPES)
    full = {**dict(zip(views, (0.5, 0.25, 0.75, 1.0))), "instances": 4,
            "yes": dict(zip(views, (0.5, 0.5, 1.0, 1.0))), "no": dict(zip(views, (0.5, 0.0, 0.5, 1.0)))}
    matching = {"TaskA": none, "TaskB": full}
    assert rr.matching_means(matching, ["TaskA", "TaskB"]) == dict(zip(views, (0.5, 0.25, 0.75, 1.0)))
    x = rr.MatchingAccuracy({"w_qdm": 1}, 5)
    text = ev.format_table({"TaskA": 0.5, "TaskB": 1.0}, {"TaskA": ("Classification", True),
                                                          "TaskB": ("Retrieval", True)}, extras=[(x, matching)])
    row = next(line for line in text.splitlines() if line.startswith("TaskA")).split()
    assert row[-4:] == ["n/a"] * 4 and "mean" in text and x.line(none).startswith("matching n/a")
    assert rr.format_rerank_table({}).splitlines()[-1].split()[-2:] == ["n/a", "n/a"]


def test_result_files_hold_no_local_path_and_record_the_data_revision(bench, tmp_path, monkeypatch):  # noqa: F811
    """A raw backbone given as an absolute local folder is named by its last component in
    mmeb_results.{json,md}; --data_revision is recorded (and a local dir with one refused)."""
    from util.backbone import save_backbone
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    local = tmp_path / "my-secret-folder" / "backbone"
    save_backbone(backbone, processor, str(local))
    out = tmp_path / "out"
    ev.main(["--model", str(local), "--mmeb_dir", bench[0], "--image_dir", bench[1], "--tasks", "TaskA",
             "--task_table", _table(tmp_path), "--out", str(out), "--no_progress", "--device", "cpu"])
    for f in ("mmeb_results.json", "mmeb_results.md", "mmeb/TaskA.json"):
        assert str(tmp_path) not in (out / f).read_text(), f
    assert json.loads((out / "mmeb_results.json").read_text())["name"] == "backbone"
    with pytest.raises(ValueError, match="revision v2: .* is a local directory"):
        ev.mmeb_report(backbone, processor, bench[0], bench[1], {"TaskA": ("Other", True)}, data_revision="v2")
    monkeypatch.setattr(ev, "resolve_dir", lambda name, patterns, revision=None: bench[0])
    model = ReMatch(backbone, num_tokens=0).eval()
    ev.mmeb_report(model, processor, "someone/mmeb", bench[1], {"TaskA": ("Other", True)}, out_dir=str(tmp_path / "o2"),
                   data_revision="v2", progress=False)
    assert json.loads((tmp_path / "o2" / "mmeb_results.json").read_text())["config"]["data_revision"] == "v2"


def _table(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"TaskA": ["Classification", True], "TaskB": ["Retrieval", False]}))
    return str(path)
