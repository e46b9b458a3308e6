"""Nothing lost on resume, whatever the disk did (util/run.py): a damaged checkpoint is set
aside as checkpoint-N.damaged and never counted; rotation deletes only intact checkpoints
older than the newest intact one; damage is decided once, on rank 0, and only format errors
are damage; old runs resume; leftovers of killed saves are named. A save reads no more
than it needs: rotation checks older checkpoints without loading train_state.pt (its zip
directory and files.json's sizes; torch.load raises in those tests), and still sets a
cut or grown one aside; --overwrite deletes the earlier run's checkpoint-N.damaged folders.

Run:  python -m pytest -q tests/test_resume.py

The fault-injection test (test_random_faults_never_lose_a_run) draws its faults from a
seeded generator (random.Random(0)), one a round, on a 16-step run of the tiny model
(--keep_checkpoints 2, a checkpoint every step) started with 2 steps; each round resumes it
for one step and checks the invariants, until step 16: at least 14 rounds, more when a
fault steps the run back. With seed 0: 19 rounds — 4 files truncated (a tokenizer_config.json,
three rematch_config.json), 2 deleted (a preprocessor_config.json, a train_state.pt), 4 saves
killed (3 before the rename, 1 before rotation), 3 torn log lines, 2 stray .tmp folders, 4
rounds of phantom names. The faults:
truncating or deleting a random file of a random intact checkpoint (weights, heads, config,
train_state.pt), a torn last line of log.jsonl, a stray checkpoint-N.tmp folder, phantom
names (a folder checkpoint-9-best, a file checkpoint-20), and a save killed at a random
point (inside save_rematch, before the rename, before rotation). After every round: at
least one intact checkpoint remains, no intact checkpoint was deleted while a damaged one
kept its name, and the run ends with the same weights as an uninterrupted run. (That every
rank resumes from the same checkpoint is test_damage_is_decided_once_for_all_ranks's: 2 gloo
ranks.)
"""
import json
import os
import pathlib
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import gloo_worker, run_processes
from test_train import flags, write_train_fixture
from util import run as util_run

STEPS = 16       # the fault-injection run's length: one round a step, more after fallbacks


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_train_fixture(str(tmp_path_factory.mktemp("fx")), n=6)


def final_weights(ckpt):
    return {f: load_file(os.path.join(ckpt, f)) for f in ("backbone/model.safetensors", "rematch_heads.safetensors")}


def same_weights(a, b):
    return all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in a)


def truncate(path):
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:len(data) // 2])


def names(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


# ----------------------------------------------------------------------------------
# The case: a fallback resume used to leave the damaged newest counted

def test_a_fallback_sets_the_damaged_checkpoint_aside_and_keeps_the_intact_one(fx, tmp_path, capsys):
    """4 steps, checkpoints 2 and 4; checkpoint-4's train_state.pt truncated; --resume
    --stop_after_steps 1 --keep_checkpoints 1 resumes from 2, saves 3, and keeps 3 (the old
    rotation by step number kept the damaged 4 and deleted 3 and 2: nothing left to resume)."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "4", "--save_every", "2"))
    truncate(os.path.join(out, "checkpoint-4", "train_state.pt"))
    capsys.readouterr()
    train.main(flags(fx, out, "--steps", "4", "--save_every", "2", "--resume", "--stop_after_steps", "1",
                     "--keep_checkpoints", "1"))
    printed = capsys.readouterr().out
    assert names(out) == ["checkpoint-3", "checkpoint-4.damaged"]
    assert printed.count("checkpoint-4 is damaged (train_state.pt does not read") == 1
    assert "set aside as checkpoint-4.damaged" in printed
    assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-3")) is None
    train.main(flags(fx, out, "--steps", "4", "--save_every", "2", "--resume", "--keep_checkpoints", "1"))
    assert names(out) == ["checkpoint-4", "checkpoint-4.damaged"]          # 4 written anew, 3 rotated


def test_rotation_sets_an_older_damaged_checkpoint_aside_instead_of_counting_it(fx, tmp_path):
    """keep 2: checkpoints 1, 2 and 3 saved; checkpoint-2 damaged behind the run's back. The
    next save keeps 4 and the newest intact older one, 3; at 5 the damaged 2 is met, set
    aside, not counted, and the intact ones kept are 4 and 5."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--keep_checkpoints", "3"))
    truncate(os.path.join(out, "checkpoint-3", "rematch_heads.safetensors"))
    os.remove(os.path.join(out, "checkpoint-2", "backbone", "model.safetensors"))
    train.main(flags(fx, out, "--steps", "5", "--save_every", "1", "--keep_checkpoints", "2", "--resume",
                     "--allow_changed", "steps"))
    assert names(out) == ["checkpoint-2.damaged", "checkpoint-3.damaged", "checkpoint-4", "checkpoint-5"]
    assert all(util_run.checkpoint_damage(os.path.join(out, f"checkpoint-{s}")) is None for s in (4, 5))


# ----------------------------------------------------------------------------------
# What counts as damage; decided once

def test_a_missing_weight_file_is_damage(fx, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    os.remove(os.path.join(out, "checkpoint-2", "backbone", "model.safetensors"))
    assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-2")) == "backbone/model.safetensors missing"
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1", "--resume"))
    assert "resumed from" in capsys.readouterr().out and "checkpoint-2.damaged" in names(out)


def test_machine_errors_are_raised_with_the_path_never_read_as_damage(fx, tmp_path, monkeypatch):
    """EIO, EACCES and MemoryError while reading train_state.pt: an OSError naming the file,
    and no checkpoint is passed over or renamed. An error without a message is named too
    (it used to raise IndexError inside the check)."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    state = os.path.join(out, "checkpoint-2", "train_state.pt")
    for err in (OSError(5, "Input/output error"), PermissionError(13, "Permission denied"), MemoryError()):
        def load(*a, err=err, **kw):
            raise err
        monkeypatch.setattr(util_run.torch, "load", load)
        with pytest.raises(OSError, match=f"reading {state} failed .*{type(err).__name__}"):
            train.main(flags(fx, out, "--steps", "2", "--resume"))
        assert names(out) == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.undo()
    truncate(state)
    pathlib.Path(state).write_bytes(b"")                                     # torch.load: EOFError()
    assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-2")) == "train_state.pt does not read (EOFError)"


def test_train_state_is_read_once_on_resume(fx, tmp_path, monkeypatch):
    """The damage check reads train_state.pt and load_checkpoint reuses what it read
    (--keep_checkpoints 1: the save at step 3 rotates without reading checkpoint-2 again)."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    reads, real = [], util_run.read_train_state
    monkeypatch.setattr(util_run, "read_train_state", lambda path: reads.append(path) or real(path))
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--keep_checkpoints", "1", "--resume",
                     "--allow_changed", "steps"))
    assert reads == [os.path.join(out, "checkpoint-2")]


def _rank_worker(rank, world, rendezvous, out, err_dir, case):
    """start_run on 2 gloo ranks. Rank 1 must not judge damage itself (its inspection
    raises here); both must resume from the same checkpoint, or stop with one message."""
    with gloo_worker(rank, world, rendezvous, err_dir):
        if rank == 1:
            def refuse(path):
                raise AssertionError("rank 1 inspected a checkpoint itself")
            util_run.inspect_checkpoint = refuse
        elif case == "machine error":
            def eio(path):
                raise OSError(f"reading {path}/train_state.pt failed (OSError: [Errno 5] Input/output error)")
            util_run.inspect_checkpoint = eio
        util_run.check_resume = lambda *a, **kw: {}          # the flags are not the subject here
        args = train.parse_args(["--train_data", out, "--image_dir", out, "--out_dir", out, "--resume"])
        try:
            source, _ = util_run.start_run(args, world, rank == 0, True)
            result = f"source {os.path.basename(source)}"
        except (SystemExit, OSError) as e:
            result = f"{type(e).__name__}: {e}"
        with open(os.path.join(err_dir, f"result{rank}.txt"), "w") as f:
            f.write(result)


@pytest.mark.parametrize("case", ["damaged newest", "machine error"])
def test_damage_is_decided_once_for_all_ranks(fx, tmp_path, case):
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    if case == "damaged newest":
        truncate(os.path.join(out, "checkpoint-2", "rematch_heads.safetensors"))
    err = tmp_path / "err"
    err.mkdir()
    run_processes(_rank_worker, [(r, 2, str(tmp_path / "rdv"), out, str(err), case) for r in range(2)],
                  str(err), timeout=120)
    results = [(err / f"result{r}.txt").read_text() for r in range(2)]
    assert results[0] == results[1], results
    if case == "damaged newest":
        assert results[0] == "source checkpoint-1" and "checkpoint-2.damaged" in names(out)
    else:
        assert results[0].startswith("OSError: reading") and "Input/output error" in results[0]
        assert names(out) == ["checkpoint-1", "checkpoint-2"]


# ----------------------------------------------------------------------------------
# Old runs, finished runs, leftovers

def test_a_checkpoint_written_before_a_flag_existed_resumes(fx, tmp_path, capsys):
    """Flags absent from the checkpoint's config (model_revision, pack, length_grouped_chunks,
    match_prompt) compare as their defaults: the run resumes without --allow_changed."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    path = os.path.join(out, "checkpoint-2", "rematch_config.json")
    config = json.loads(pathlib.Path(path).read_text())
    for k in ("model_revision", "pack", "length_grouped_chunks", "match_prompt"):
        config.pop(k)
    pathlib.Path(path).write_text(json.dumps(config))
    os.remove(os.path.join(out, "checkpoint-2", util_run.MANIFEST))      # as an older checkpoint: none
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--resume", "--allow_changed", "steps"))
    assert f"resumed from {os.path.join(out, 'checkpoint-2')} at step 2" in capsys.readouterr().out
    config["match_views"] = "feat"                                    # a real difference still stops
    pathlib.Path(os.path.join(out, "checkpoint-3", "rematch_config.json")).write_text(json.dumps(config))
    os.remove(os.path.join(out, "checkpoint-3", util_run.MANIFEST))
    with pytest.raises(SystemExit, match="--match_views: 'feat' in the checkpoint, 'all' now"):
        train.main(flags(fx, out, "--steps", "4", "--resume", "--allow_changed", "steps"))


def test_a_finished_run_resumed_says_there_is_nothing_to_train(fx, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2"))
    capsys.readouterr()
    assert train.main(flags(fx, out, "--steps", "2", "--resume")) is None
    printed = capsys.readouterr().out
    assert "checkpoint-2 is at step 2 of --steps 2: nothing to train" in printed and "trained" not in printed
    assert names(out) == ["checkpoint-2"] and not os.path.exists(os.path.join(out, "eval"))


def test_leftovers_of_killed_saves_and_linked_checkpoints_are_named(fx, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1"))
    os.makedirs(os.path.join(out, "checkpoint-3.tmp", "adapter"))
    capsys.readouterr()
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--resume", "--allow_changed", "steps"))
    assert "checkpoint-3.tmp: the partial folder of a save that never finished; removed" in capsys.readouterr().out
    assert names(out) == ["checkpoint-2", "checkpoint-3"]
    other = tmp_path / "elsewhere"
    shutil.copytree(os.path.join(out, "checkpoint-3"), other)
    os.symlink(other, os.path.join(out, "checkpoint-7"))
    with pytest.raises(SystemExit, match="checkpoint-7 is a symbolic link"):
        train.main(flags(fx, out, "--steps", "8", "--resume", "--allow_changed", "steps"))


# ----------------------------------------------------------------------------------
# A save reads no more than it needs; set-aside folders under --overwrite

def _no_torch_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("torch.load called: rotation read a whole train_state.pt")
    monkeypatch.setattr(util_run.torch, "load", refuse)


def test_rotation_reads_no_train_state_and_still_sets_damage_aside(fx, tmp_path, monkeypatch, capsys):
    """Checkpoints 1-4 (keep 4); checkpoint-3's train_state.pt gains bytes (the zip still
    parses; files.json's size does not match), checkpoint-2's is cut (its zip directory is
    gone). Rotating after 4 with keep 2 while torch.load raises: 3 and 2 are set aside,
    named, 1 is kept as the second intact one; the full check agrees on each."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "4", "--save_every", "1", "--keep_checkpoints", "4"))
    grown = os.path.join(out, "checkpoint-3", "train_state.pt")
    with open(grown, "ab") as f:
        f.write(b"\0" * 7)
    truncate(os.path.join(out, "checkpoint-2", "train_state.pt"))
    capsys.readouterr()
    with monkeypatch.context() as m:
        _no_torch_load(m)
        assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-4"), read_state=False) is None
        util_run.rotate(out, 4, keep=2)
        assert util_run.last_intact(out) == os.path.join(out, "checkpoint-4")
    printed = capsys.readouterr().out
    assert names(out) == ["checkpoint-1", "checkpoint-2.damaged", "checkpoint-3.damaged", "checkpoint-4"]
    size = os.path.getsize(os.path.join(out, "checkpoint-3.damaged", "train_state.pt"))
    assert f"checkpoint-3 is damaged (train_state.pt is {size:,} bytes, the save wrote {size - 7:,})" in printed
    assert "checkpoint-2 is damaged (train_state.pt does not read (BadZipFile" in printed
    for name in ("checkpoint-2.damaged", "checkpoint-3.damaged"):          # the full read agrees
        assert util_run.checkpoint_damage(os.path.join(out, name)) is not None
    assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-1")) is None


def test_a_run_saving_and_rotating_never_loads_a_train_state(fx, tmp_path, monkeypatch):
    """A fresh run that saves every step and keeps one: every save rotates the one before
    out after checking it, and torch.load is never called."""
    _no_torch_load(monkeypatch)
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--keep_checkpoints", "2"))
    assert names(out) == ["checkpoint-2", "checkpoint-3"]


def test_the_zip_directory_check_finds_what_a_load_would(tmp_path):
    """check_zip_directory on torch.save's format: a whole file passes; a cut one, one whose
    entry headers were overwritten in place (same size), a zip without data.pkl and a file
    that is not a zip are refused, each as a format error (damage, not the machine's)."""
    import zipfile
    good = tmp_path / "train_state.pt"
    torch.save({"step": 1, "optimizer": {"state": {0: {"exp_avg": torch.randn(300)}}}}, good)
    util_run.check_zip_directory(str(good))
    data = good.read_bytes()
    with zipfile.ZipFile(good) as z:
        offset = next(e.header_offset for e in z.infolist() if e.filename.endswith("data/0"))
    cases = {"cut": data[:len(data) // 2],
             "overwritten": data[:offset] + b"\0" * 30 + data[offset + 30:],
             "not a zip": b"\0" * len(data)}
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("archive/notes.txt", "no pickle here")
    cases["no data.pkl"] = other.read_bytes()
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises((util_run.CheckpointFormatError, zipfile.BadZipFile)) as e:
            util_run.check_zip_directory(str(bad))
        assert util_run._is_format_error(e.value), name


def test_overwrite_deletes_the_set_aside_folders_of_the_earlier_run(fx, tmp_path, capsys):
    """--overwrite starts over: checkpoints, checkpoint-N.damaged(-k) folders (named), eval/
    and log.jsonl go; a folder of another name stays. Without --overwrite a fresh start
    keeps set-aside folders, named, and --resume with only those says so."""
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "1"))
    for name in ("checkpoint-1.damaged", "checkpoint-7.damaged-2", "checkpoint-7.damaged-mine", "eval"):
        os.makedirs(os.path.join(out, name, "backbone"))
    capsys.readouterr()
    train.main(flags(fx, out, "--steps", "1", "--overwrite"))
    printed = capsys.readouterr().out
    assert f"--overwrite: deleting checkpoint-1.damaged, checkpoint-7.damaged-2 in {out}" in printed
    assert names(out) == ["checkpoint-1", "checkpoint-7.damaged-mine"]
    assert not os.path.exists(os.path.join(out, "eval"))
    shutil.rmtree(os.path.join(out, "checkpoint-1"))
    os.makedirs(os.path.join(out, "checkpoint-1.damaged"))
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint in .*checkpoint-1.damaged set aside as damaged"):
        train.main(flags(fx, out, "--steps", "1", "--resume"))
    train.main(flags(fx, out, "--steps", "1"))
    assert "checkpoint-1.damaged kept (set aside as damaged, never resumed); --overwrite deletes them" \
        in capsys.readouterr().out
    assert names(out) == ["checkpoint-1", "checkpoint-1.damaged", "checkpoint-7.damaged-mine"]


# ----------------------------------------------------------------------------------
# Fault injection

class Killed(BaseException):
    """kill -9 in the middle of a save: no except clause of the save runs."""


def _intact(out):
    return [c for c in util_run.checkpoint_dirs(out) if util_run.checkpoint_damage(c) is None]


def _inject(rng, out, monkeypatch):
    """One random fault; returns its name. A checkpoint is damaged only while another
    intact one remains, so that the run can always be resumed."""
    intact = _intact(out)
    faults = ["torn log", "stray tmp", "phantom names", "killed save"] + ["truncate", "delete"] * (len(intact) >= 2)
    fault = rng.choice(faults)
    if fault in ("truncate", "delete"):
        victim = rng.choice(intact)
        files = sorted(str(p) for p in pathlib.Path(victim).rglob("*") if p.is_file() and p.name != "README.md")
        path = rng.choice(files)
        truncate(path) if fault == "truncate" else os.remove(path)
        return f"{fault} {os.path.relpath(path, out)}"
    if fault == "torn log":
        with open(os.path.join(out, util_run.LOG_FILE), "a") as f:
            f.write('{"step": 99, "loss": 0.')
    elif fault == "stray tmp":
        os.makedirs(os.path.join(out, f"checkpoint-{rng.randint(1, STEPS)}.tmp", "backbone"), exist_ok=True)
    elif fault == "phantom names":
        os.makedirs(os.path.join(out, "checkpoint-9-best"), exist_ok=True)
        pathlib.Path(out, "checkpoint-20").write_text("not a checkpoint")
    else:                                            # killed save: the next resume's save dies
        where = rng.choice(["save_rematch", "replace", "rotate"])
        target = {"save_rematch": (util_run, "save_rematch"), "replace": (util_run.os, "replace"),
                  "rotate": (util_run, "rotate")}[where]
        real = getattr(*target)

        def die(*a, **kw):
            if where == "replace" and not str(a[0]).endswith(".tmp"):
                return real(*a, **kw)                # set_aside's renames still work
            raise Killed(where)
        monkeypatch.setattr(*target, die)
        return f"killed save ({where})"
    return fault


@pytest.mark.slow
def test_random_faults_never_lose_a_run(fx, tmp_path, monkeypatch):
    ref = str(tmp_path / "reference")
    train.main(flags(fx, ref, "--steps", str(STEPS), "--save_every", str(STEPS)))
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", str(STEPS), "--save_every", "1", "--keep_checkpoints", "2",
                     "--stop_after_steps", "2"))
    rng, seen, rounds = random.Random(0), [], 0
    while util_run.checkpoint_dirs(out)[-1] != os.path.join(out, f"checkpoint-{STEPS}"):
        rounds += 1
        assert rounds <= 3 * STEPS, (seen, names(out))
        fault = _inject(rng, out, monkeypatch)
        seen.append(fault)
        before = {c: util_run.checkpoint_damage(c) is None for c in util_run.checkpoint_dirs(out)}
        try:                                         # one step further, a save and a rotation
            train.main(flags(fx, out, "--steps", str(STEPS), "--save_every", "1", "--keep_checkpoints", "2",
                             "--resume", "--stop_after_steps", "1"))
        except Killed:
            pass
        monkeypatch.undo()
        intact = _intact(out)
        assert intact, (rounds, fault, names(out))
        deleted_intact = [c for c, ok in before.items() if ok and not os.path.exists(c)]
        kept_damaged = [c for c in util_run.checkpoint_dirs(out) if c not in intact]
        assert not (deleted_intact and kept_damaged), (rounds, fault, deleted_intact, kept_damaged)
    final = os.path.join(out, f"checkpoint-{STEPS}")
    assert util_run.checkpoint_damage(final) is None
    assert same_weights(final_weights(final), final_weights(os.path.join(ref, f"checkpoint-{STEPS}"))), seen
    kinds = {f.split()[0] for f in seen}
    assert rounds >= STEPS - 2 and {"truncate", "delete", "killed"} <= kinds, seen


def test_messages_never_name_a_damaged_checkpoint_as_intact(fx, tmp_path, monkeypatch):
    """A non-finite loss after checkpoint-2 was damaged behind the run's back names
    checkpoint-1 as the intact one, not the newest by number."""
    real, calls = train.info_nce, {"n": 0}

    def nan_on_the_third_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:                               # step 3, after checkpoint-2 was saved,
            truncate(os.path.join(out, "checkpoint-2", "train_state.pt"))   # which is now damaged
        return real(*a, **k) * (float("nan") if calls["n"] == 3 else 1)
    monkeypatch.setattr(train, "info_nce", nan_on_the_third_call)
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite loss.*Last checkpoint: .*checkpoint-1 \(intact\)"):
        train.main(flags(fx, out, "--steps", "5", "--save_every", "1", "--keep_checkpoints", "3"))


def test_the_final_checkpoint_stays_resumable_after_its_card_gets_the_results(fx, tmp_path, capsys):
    """After evaluation train.py rewrites the final checkpoint's model card (README.md) with
    the results, so the card no longer has the size the save recorded. That is no damage:
    a longer run resumes from that final checkpoint, not from the one before it (a run
    that evaluated used to set its final checkpoint aside here)."""
    from util.backbone import write_model_card
    out = str(tmp_path / "run")
    train.main(flags(fx, out, "--steps", "2", "--save_every", "1", "--keep_checkpoints", "2"))
    last = os.path.join(out, "checkpoint-2")
    config = json.load(open(os.path.join(last, "rematch_config.json")))
    size = os.path.getsize(os.path.join(last, "README.md"))
    write_model_card(last, config, {"overall": 0.5, "hit_at_1": {"TaskA": 0.5, "TaskB": None}})  # as run_eval does
    assert os.path.getsize(os.path.join(last, "README.md")) != size
    assert util_run.checkpoint_damage(last) is None
    capsys.readouterr()
    train.main(flags(fx, out, "--steps", "3", "--save_every", "1", "--resume", "--allow_changed", "steps"))
    said = capsys.readouterr().out
    assert f"resumed from {last} at step 2" in said and "damaged" not in said
    assert names(out) == ["checkpoint-2", "checkpoint-3"]
    truncate(os.path.join(out, "checkpoint-3", "rematch_config.json"))      # other files still count
    assert util_run.checkpoint_damage(os.path.join(out, "checkpoint-3"))
