"""
What a careful user and a failing cluster do to the project: the library API refuses what
it cannot do (one row per bad call, each with its message), checkpoint names are matched
exactly, a torn log line does not stop a resume, and a checkpoint save is flushed to the
disk before it counts and cleans up after itself when it fails.

    pytest tests/test_reliability.py
"""
import json
import os
import pathlib

import pytest
import torch

import data
import evaluate as ev
from conftest import shape_image
from losses import info_nce
from model import ReMatch
from util import run as util_run
from util.backbone import load_backbone, resolve_checkpoint

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
    from model import save_rematch
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
        matching_encoder.rerank(query, candidates, **kwargs)


def test_info_nce_refuses_a_temperature_that_is_not_positive():
    q = torch.randn(3, 8)
    for tau in (0, 0.0, -0.02):
        with pytest.raises(ValueError, match="tau must be > 0"):
            info_nce(q, q, tau=tau)


def test_a_missing_local_looking_path_says_so_at_once(tmp_path, monkeypatch):
    """runs/typo with a runs/ folder here is a missing directory, not a hub id to retry."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for call in (lambda: resolve_checkpoint("runs/typo"), lambda: load_backbone("runs/typo"),
                 lambda: ev.Encoder("runs/typo")):
        with pytest.raises(FileNotFoundError, match="runs/typo: no such directory"):
            call()


# ----------------------------------------------------------------------------------
# Checkpoints and the log on disk

def test_only_exact_checkpoint_names_count(tmp_path):
    for name in ("checkpoint-3", "checkpoint-12", "checkpoint-9-best", "checkpoint-0007",
                 "checkpoint-", "checkpoint-3.tmp", "xcheckpoint-5"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-20").write_text("a file, not a checkpoint")
    assert [os.path.basename(p) for p in util_run.checkpoint_dirs(str(tmp_path))] == \
        ["checkpoint-3", "checkpoint-12"]


def test_a_torn_log_line_is_dropped_with_its_name(tmp_path, capsys):
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo'     # torn write
    (tmp_path / "log.jsonl").write_text(text)
    util_run.cut_log(str(tmp_path), 2)
    kept = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kept == records[:2]
    assert f"{tmp_path / 'log.jsonl'}:4: not a JSON record" in capsys.readouterr().out


@pytest.fixture()
def small_model():
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    model = ReMatch(backbone, num_tokens=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, processor, opt


def test_a_save_is_flushed_to_the_disk_before_it_counts(tmp_path, small_model, monkeypatch):
    """Every file and folder of the new checkpoint is fsynced before the rename, and
    out_dir after it, before any older checkpoint is deleted."""
    model, processor, opt = small_model
    out = str(tmp_path)
    events, real_fsync, real_replace, real_rmtree = [], os.fsync, os.replace, util_run.shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(util_run.shutil, "rmtree",
                        lambda p, **kw: (events.append(("rmtree", str(p))), real_rmtree(p, **kw))[1])
    util_run.save_checkpoint(model, processor, opt, 1, {"model": "tiny-qwen2-vl"}, out, keep=1)
    events.clear()
    final = util_run.save_checkpoint(model, processor, opt, 2, {"model": "tiny-qwen2-vl"}, out, keep=1)
    tmp = final + ".tmp"
    rename = events.index(("replace", final))
    synced_before = {p for kind, p in events[:rename] if kind == "fsync"}
    for d, _, files in os.walk(final):                        # every file and folder, as in tmp
        for p in [d, *(os.path.join(d, f) for f in files)]:
            assert tmp + p[len(final):] in synced_before, p
    rotated = events.index(("rmtree", os.path.join(out, "checkpoint-1")))
    assert ("fsync", out) in events[rename:rotated]
    assert [os.path.basename(p) for p in util_run.checkpoint_dirs(out)] == ["checkpoint-2"]


def _full_disk(path):
    """Leave a partial file at `path`, then fail as a full disk does."""
    import errno
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pathlib.Path(path).write_bytes(b"\0" * 10)
    raise OSError(errno.ENOSPC, "No space left on device", path)


@pytest.mark.parametrize("fail_at", ["backbone", "rematch_heads.safetensors", "train_state.pt"])
def test_a_failed_save_cleans_up_and_names_the_last_checkpoint(tmp_path, small_model, monkeypatch, fail_at):
    """A full disk at each part of a save: its .tmp folder is removed, the previous
    checkpoint stays whole, and the error names the cause and that checkpoint."""
    import model as model_py
    import safetensors.torch
    model, processor, opt = small_model
    out = str(tmp_path)
    first = util_run.save_checkpoint(model, processor, opt, 1, {"model": "tiny-qwen2-vl"}, out, keep=2)
    before = {p.relative_to(first): p.read_bytes() for p in pathlib.Path(first).rglob("*") if p.is_file()}
    if fail_at == "backbone":                        # the full backbone (no LoRA)
        monkeypatch.setattr(model_py, "save_backbone",
                            lambda m, proc, path: _full_disk(os.path.join(path, "model.safetensors")))
    elif fail_at == "rematch_heads.safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, **kw: _full_disk(path))
    else:                                            # torch.save says ENOSPC as a RuntimeError

        def torch_save(obj, path, **kw):
            pathlib.Path(path).write_bytes(b"\0")
            raise RuntimeError("[enforce fail at inline_container.cc] . basic_ios::clear: iostream error")
        monkeypatch.setattr(util_run.torch, "save", torch_save)
    with pytest.raises(OSError) as err:
        util_run.save_checkpoint(model, processor, opt, 2, {"model": "tiny-qwen2-vl"}, out, keep=2)
    message = str(err.value)
    assert "checkpoint-2 failed" in message and f"Last intact checkpoint: {first}" in message
    assert ("No space left" in message) or ("iostream error" in message)
    assert "GiB free" in message
    assert sorted(os.listdir(out)) == ["checkpoint-1"]                       # no .tmp left
    after = {p.relative_to(first): p.read_bytes() for p in pathlib.Path(first).rglob("*") if p.is_file()}
    assert after == before


def _literal(text):
    import re
    return re.escape(text)


# ----------------------------------------------------------------------------------
# Distributed

def test_collectives_wait_as_long_as_the_flag_says(monkeypatch):
    """init_process_group gets --dist_timeout_minutes (default 60: NCCL's 10 minutes abort
    a healthy job while rank 0 alone downloads or saves)."""
    import datetime

    import torch.distributed as dist

    import train
    from util import dist as util_dist
    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    util_dist.setup_distributed("cpu", train.parse_args([]).dist_timeout_minutes)
    assert seen == {"b": "gloo", "t": datetime.timedelta(minutes=60)}
    util_dist.setup_distributed("cpu", train.parse_args(["--dist_timeout_minutes", "90"]).dist_timeout_minutes)
    assert seen["t"] == datetime.timedelta(minutes=90)
    with pytest.raises(SystemExit):
        train.parse_args(["--dist_timeout_minutes", "0"])


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
# Resume falls back to the last intact checkpoint

def _truncate(path):
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:len(data) // 2])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoint-2 and checkpoint-4 (and its log), to copy and damage."""
    import train
    from test_train import flags, write_train_fixture
    root = tmp_path_factory.mktemp("resume")
    fx = write_train_fixture(str(root / "fx"), n=6)
    out = str(root / "run")
    train.main(flags(fx, out, "--steps", "4", "--save_every", "2"))
    return fx, out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["train_state.pt", "backbone/model.safetensors",
                                    "rematch_heads.safetensors", "rematch_config.json", "missing heads"])
def test_resume_falls_back_past_a_damaged_checkpoint(two_checkpoints, tmp_path, capsys, damage):
    import shutil

    import train
    from test_train import flags
    fx, src = two_checkpoints
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    newest = os.path.join(out, "checkpoint-4")
    if damage == "missing heads":
        os.remove(os.path.join(newest, "rematch_heads.safetensors"))
    else:
        _truncate(os.path.join(newest, damage))
    assert util_run.checkpoint_damage(newest) and util_run.checkpoint_damage(os.path.join(out, "checkpoint-2")) is None
    train.main(flags(fx, out, "--steps", "4", "--save_every", "2", "--resume"))
    printed = capsys.readouterr().out
    older = os.path.join(out, "checkpoint-2")
    assert f"{newest} is damaged (" in printed and f"resuming from {older} instead" in printed
    assert f"resumed from {older} at step 2" in printed
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]
    assert steps == [1, 2, 3, 4]                                      # cut back to 2, then 3 and 4
    assert util_run.checkpoint_damage(newest) is None                 # written anew at step 4


@pytest.mark.slow
def test_resume_with_no_intact_checkpoint_names_each(two_checkpoints, tmp_path):
    import shutil

    import train
    from test_train import flags
    fx, src = two_checkpoints
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    for step in (2, 4):
        _truncate(os.path.join(out, f"checkpoint-{step}", "train_state.pt"))
    with pytest.raises(SystemExit, match="no intact checkpoint: .*checkpoint-4: train_state.pt does not read"
                                         ".*checkpoint-2: train_state.pt does not read"):
        train.main(flags(fx, out, "--steps", "4", "--resume"))


# ----------------------------------------------------------------------------------
# Seeds, autocast, checkpoint configs, hub downloads

@pytest.mark.slow
def test_two_fresh_runs_with_dropout_give_the_same_losses(two_checkpoints, tmp_path):
    """The global RNGs are seeded from --seed: LoRA dropout masks repeat run to run."""
    import train
    from test_train import flags
    fx, _ = two_checkpoints
    logs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        train.main(flags(fx, out, "--steps", "3", "--lora", "--lora_dropout", "0.5"))
        logs.append([json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))])
    assert logs[0] == logs[1]
    torch.manual_seed(12345)                       # another seed's masks: other losses
    out = str(tmp_path / "c")
    train.main(flags(fx, out, "--steps", "3", "--lora", "--lora_dropout", "0.5", "--seed", "1"))
    assert [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))] != logs[0]


def test_autocast_follows_dtype():
    import train
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for dtype, on_cuda in (("auto", True), ("bfloat16", True), ("float32", False), ("float64", False)):
        args = train.parse_args(["--dtype", dtype])
        assert train.uses_autocast(args, cuda) is on_cuda and train.uses_autocast(args, cpu) is False


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


def test_a_hub_checkpoint_downloads_only_what_the_project_reads(monkeypatch, tmp_path):
    import huggingface_hub
    calls = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: str(tmp_path / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.update(kw) or str(tmp_path))
    assert resolve_checkpoint("someone/rematch-2b") == str(tmp_path)
    assert sorted(calls["allow_patterns"]) == sorted(["rematch_config.json", "rematch_heads.safetensors",
                                                      "train_state.pt", "README.md", "adapter/*", "backbone/*"])


def test_evaluation_after_training_never_deletes_earlier_results(tmp_path, monkeypatch):
    """run_eval writes to eval/step-<N>, or a fresh -2, -3 ... beside an existing one."""
    import argparse

    import evaluate
    import train
    seen = []
    monkeypatch.setattr(evaluate, "mmeb_report", lambda *a, out_dir, **kw: seen.append(out_dir)
                        or {"hit@1": {"T": 1.0}})
    monkeypatch.setattr(evaluate, "discovered_task_table", lambda *a: {"T": ("Other", True)})
    monkeypatch.setattr(evaluate, "chance_table", lambda root, results: {"T": 0.5})
    args = argparse.Namespace(out_dir=str(tmp_path), eval_data="d", eval_image_dir="d", eval_task_table=None,
                              w_qdm=0, eval_match_queries=0, allow_outside_image_dir=False)
    model = torch.nn.Linear(1, 1)
    earlier = tmp_path / "eval" / "step-3"
    earlier.mkdir(parents=True)
    (earlier / "mmeb_results.json").write_text("{}")
    out = train.run_eval(model, None, args, None, 3)
    train.run_eval(model, None, args, None, 5)
    assert seen == [str(tmp_path / "eval" / "step-3-2"), str(tmp_path / "eval" / "step-5")]
    assert (earlier / "mmeb_results.json").read_text() == "{}" and out["overall"] == 1.0


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

    from data import read_eval_task
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
    from data import _is_list_literal, first_negative
    _is_list_literal(cell)                                 # never raises, whatever the cell
    with pytest.raises(ValueError, match=_literal(f"Sub row 3 neg_text: {message}")):
        first_negative(cell, "Sub row 3 neg_text")


def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path):
    """A PNG of 10000 × 9000 = 90M pixels (PIL only warns up to 179M) is refused by name,
    before a pixel is decoded; one just below the bound loads."""
    import struct
    import zlib

    from data import MAX_DECODE_PIXELS, BadImageError, load_image

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
    with pytest.raises(ValueError, match=r"T d-item 1: a text of \d+ tokens, more than --max_text_tokens 100"):
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
        for sub in data.SUGARCREPE_SUBSETS[1:]:
            _write_json(tmp_path / "sugarcrepe" / f"{sub}.json", {})
    with pytest.raises(ValueError, match=_literal(str(tmp_path / rel)) + ".*" + _literal(message)):
        getattr(data, reader)(str(tmp_path))


def test_a_hub_revision_is_pinned_and_recorded(monkeypatch, tmp_path):
    """--revision reaches every hub download and the returned config; a local path with a
    revision is refused."""
    import huggingface_hub

    from model import save_rematch
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    ckpt = tmp_path / "snapshot"
    save_rematch(ReMatch(backbone, num_tokens=2), processor, str(ckpt),
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat"})
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, **kw: calls.append(("file", kw.get("revision"))) or str(ckpt / name))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append(("snapshot", kw.get("revision"))) or str(ckpt))
    enc = ev.Encoder("someone/rematch-2b", device="cpu", revision="0123abc")
    assert calls == [("file", "0123abc"), ("snapshot", "0123abc")]
    assert enc.config["revision"] == "0123abc"
    args = ev.parse_args(["--model", "someone/rematch-2b", "--revision", "v1", "--mmeb_dir", "d", "--image_dir", "d"])
    assert args.revision == "v1"
    for call in (lambda: resolve_checkpoint(str(ckpt), revision="v1"),
                 lambda: load_backbone(str(ckpt / "backbone"), revision="v1")):
        with pytest.raises(ValueError, match="--revision v1: .* (is not a hub id|is a local directory)"):
            call()


def test_matching_passes_reuse_encodings_within_a_memory_budget(tmp_path, monkeypatch):
    """embed_task keeps the wanted rows' encodings for matching_accuracy (no item encoded
    twice), but only within TaskEmbeddings.budget bytes; past it items are encoded again on
    use, with the same accuracies."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "T").mkdir()
    rows = []
    for i, c in enumerate(("red", "green", "blue")):
        shape_image(c).save(tmp_path / f"{c}.png")
        rows.append(dict(qry_text=f"a {c} circle", qry_img_path="",
                         tgt_text=["<|image_1|>\nan image"] * 3,
                         tgt_img_path=[f"{c}.png"] + [f"{o}.png" for o in ("red", "green", "blue") if o != c]))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "T" / "test-00000-of-00001.parquet")
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    model = ReMatch(backbone, num_tokens=2).eval()
    encodes, real = [], ev._encode
    monkeypatch.setattr(ev, "_encode", lambda *a, **kw: encodes.append(a[3]) or real(*a, **kw))
    read = lambda: data.read_eval_task(str(tmp_path), "T")                    # noqa: E731
    emb = ev.embed_task(model, processor, read(), "T", str(tmp_path), keep_rows=3)
    n_embed = len(encodes)
    kept = ev.matching_accuracy(model, processor, emb, 3)
    assert len(encodes) == n_embed == 6                                       # 3 queries + 3 images, once
    emb0 = ev.embed_task(model, processor, read(), "T", str(tmp_path), keep_rows=3)
    emb0.items.clear()
    emb0.budget = 0                                                           # nothing fits
    encodes.clear()
    assert ev.matching_accuracy(model, processor, emb0, 3) == kept
    assert len(encodes) == 9 and not emb0.items                               # 3 instances × 3 items


def test_published_files_hold_no_local_paths(two_checkpoints, tmp_path):
    """What a checkpoint publishes (rematch_config.json, the model card, the merged export)
    names local data and output folders by their last component only; hub ids stay."""
    from tools.export_merged import export_merged
    from util.backbone import published_name
    fx, out = two_checkpoints
    root = os.path.dirname(out)                                   # the absolute tmp layout
    assert [published_name(v) for v in (fx, out + "/", "./a/b", "Qwen/Qwen2-VL-2B-Instruct",
                                        "tiny-qwen2-vl", None, "")] == \
        ["fx", "run", "b", "Qwen/Qwen2-VL-2B-Instruct", "tiny-qwen2-vl", None, ""]
    ckpt = os.path.join(out, "checkpoint-4")
    with open(os.path.join(ckpt, "rematch_config.json")) as f:
        config = json.load(f)
    assert (config["train_data"], config["image_dir"], config["out_dir"]) == ("fx", "fx", "run")
    assert config["model"] == "tiny-qwen2-vl"
    export_merged(ckpt, str(tmp_path / "merged"))
    for path in (os.path.join(ckpt, "rematch_config.json"), os.path.join(ckpt, "README.md"),
                 str(tmp_path / "merged" / "rematch_pooling.json")):
        assert root not in pathlib.Path(path).read_text(), path
    with open(tmp_path / "merged" / "rematch_pooling.json") as f:
        assert json.load(f)["source_checkpoint"] == "checkpoint-4"


def test_train_pins_the_base_model_and_the_resumed_checkpoint(monkeypatch, tmp_path):
    """--model_revision reaches the base model's download and the checkpoint config, and
    load_rematch pins an adapter's base model to it; --resume_revision reaches the
    download of a hub --resume_from; --resume_revision alone is refused."""
    import model as model_py
    import train
    from model import apply_lora, load_rematch, save_rematch
    seen = []
    real = model_py.load_backbone

    def spy(name, **kw):
        seen.append((name, kw.get("revision")))
        return real(name, **{k: v for k, v in kw.items() if k != "revision"})
    monkeypatch.setattr(train, "load_backbone", spy)
    args = train.parse_args(["--model_revision", "abc123", "--steps", "1"])
    train.build_model(args, torch.device("cpu"))
    assert seen == [("tiny-qwen2-vl", "abc123")]
    assert util_run.run_config(args)["model_revision"] == "abc123"

    backbone, processor = real("tiny-qwen2-vl", device="cpu", seed=0)
    ckpt = str(tmp_path / "ckpt")
    save_rematch(ReMatch(apply_lora(backbone, 4, 8, 0.0), num_tokens=2), processor, ckpt,
                 {"model": "tiny-qwen2-vl", "num_tokens": 2, "embed_template": "chat", "lora": True,
                  "model_revision": "abc123"})
    monkeypatch.setattr(model_py, "load_backbone", spy)
    seen.clear()
    load_rematch(ckpt, device="cpu")
    assert seen == [("tiny-qwen2-vl", "abc123")]

    def resolve(name, revision=None):
        seen.append((name, revision))
        raise SystemExit("stop here")
    monkeypatch.setattr(util_run, "resolve_checkpoint", resolve)
    seen.clear()
    args = train.parse_args(["--resume_from", "someone/rematch-tiny", "--resume_revision", "v2",
                             "--out_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="stop here"):
        util_run.start_run(args, 1, True, False)
    assert seen == [("someone/rematch-tiny", "v2")]
    with pytest.raises(SystemExit):
        train.parse_args(["--resume_revision", "v2"])
