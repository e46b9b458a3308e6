"""
What a failing cluster does to a run: checkpoint names are matched exactly, a torn log
line does not stop a resume, a checkpoint save is flushed to the disk before it counts and
cleans up after itself when it fails, resume falls back past a damaged checkpoint. (Bad
input from a careful user — files, rows, flags, API calls: tests/test_inputs.py.)

    pytest tests/test_reliability.py
"""
import json
import os
import pathlib

import pytest
import torch

import evaluate as ev
from conftest import shape_image
from losses import info_nce
from model import ReMatch
from tools.rerank import matching_accuracy
from util import run as util_run
from util.backbone import load_backbone, resolve_checkpoint
from util.benchmarks import read_eval_task

# ----------------------------------------------------------------------------------
# The library API refuses instead of guessing


def test_info_nce_refuses_a_temperature_that_is_not_positive():
    q = torch.randn(3, 8)
    for tau in (0, 0.0, -0.02):
        with pytest.raises(ValueError, match="tau must be > 0"):
            info_nce(q, q, tau=tau)


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
    import safetensors.torch

    import util.backbone as backbone_py
    model, processor, opt = small_model
    out = str(tmp_path)
    first = util_run.save_checkpoint(model, processor, opt, 1, {"model": "tiny-qwen2-vl"}, out, keep=2)
    before = {p.relative_to(first): p.read_bytes() for p in pathlib.Path(first).rglob("*") if p.is_file()}
    if fail_at == "backbone":                        # the full backbone (no LoRA)
        monkeypatch.setattr(backbone_py, "save_backbone",
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


def test_a_hub_revision_is_pinned_and_recorded(monkeypatch, tmp_path):
    """--revision reaches every hub download and the returned config; a local path with a
    revision is refused."""
    import huggingface_hub

    from util.backbone import save_rematch
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
    read = lambda: read_eval_task(str(tmp_path), "T")                    # noqa: E731
    emb = ev.embed_task(model, processor, read(), "T", str(tmp_path), keep_rows=3)
    n_embed = len(encodes)
    kept = matching_accuracy(model, processor, emb, 3)
    assert len(encodes) == n_embed == 6                                       # 3 queries + 3 images, once
    emb0 = ev.embed_task(model, processor, read(), "T", str(tmp_path), keep_rows=3)
    emb0.items.clear()
    emb0.budget = 0                                                           # nothing fits
    encodes.clear()
    assert matching_accuracy(model, processor, emb0, 3) == kept
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
    from model import apply_lora, load_rematch
    from util.backbone import save_rematch
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

    def resolve(name, revision=None, train_state=False):
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
