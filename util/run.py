"""
A run on disk — plumbing behind train.py and evaluate.py, none of it in the paper:

  write_atomic, write_json     every file written whole or not at all (tmp + fsync + rename)
  append_log, cut_log          <out_dir>/log.jsonl, one JSON record per training step
  subset_summary               the last steps of log.jsonl per training subset (printed by
                               train.py at the end: which judgments the matching head makes)
  start_run                    what --resume / --resume_if_exists / --resume_from /
                               --overwrite find in --out_dir, checked before anything is built
  save_checkpoint              checkpoint-<step>/ written as a .tmp folder and renamed, then
                               older ones rotated out; load_checkpoint restores weights,
                               optimizer and every RNG (train_state.pt, read weights-only)
  check_resume                 a resumed run's flags must equal the checkpoint's
  checkpoint_damage            a checkpoint whose files do not all read is passed over for
                               the previous one (latest_intact), both named; rotation and
                               messages check train_state.pt from its zip directory and
                               files.json's sizes (check_zip_directory), never loading it;
                               only the resume decision reads it whole
  result_path, load_finished   evaluate.py's per-task result files, reused on restart only
                               for the same config and weights (weights_fingerprint); a
                               task's name made one safe file name first (safe_name)

Tests: tests/test_resume.py and tests/test_reliability.py (damage, rotation, leftovers),
tests/test_train.py (resume, refusals), tests/test_evaluate.py (restarts).
"""
import json
import os
import pickle
import random
import re
import shutil
import struct
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from util.backbone import (CARD_FILE, CONFIG_FILE, HEADS_FILE, load_backbone, load_heads, published_name,
                           resolve_checkpoint, save_rematch)
from util.dist import broadcast_object, print0

LOG_FILE = "log.jsonl"
TRAIN_STATE = "train_state.pt"
MANIFEST = "files.json"         # every file of a checkpoint and its size, written last by the save

# ----------------------------------------------------------------------------------
# Files written whole or not at all


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file, synced and renamed: a crash leaves
    the old file or the new one, never a half."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------------
# log.jsonl

def append_log(out_dir, record):
    """One step's record, appended and closed at once, whatever happens next."""
    with open(os.path.join(out_dir, LOG_FILE), "a") as log:
        log.write(json.dumps(record) + "\n")


def _records(path):
    """(line, record) for each non-blank line of a log.jsonl; a line that is not JSON (the
    torn last write of a full disk) is dropped with a warning naming the file and the line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                print0(f"{path}:{n}: not a JSON record (a torn write?), dropped: {line[:80]!r}")


def cut_log(out_dir, step):
    """Keep only the log.jsonl records up to `step` (a resumed run rewrites the rest); torn
    lines are dropped (_records)."""
    path = os.path.join(out_dir, LOG_FILE)
    if not os.path.exists(path):
        return
    keep = [line if line.endswith("\n") else line + "\n"
            for line, record in _records(path) if record.get("step", 0) <= step]
    write_atomic(path, "".join(keep))


def read_log(out_dir):
    """The records of <out_dir>/log.jsonl, in order ([] without one; torn lines dropped)."""
    path = os.path.join(out_dir, LOG_FILE)
    return [record for _, record in _records(path)] if os.path.exists(path) else []


SUMMARY_KEYS = ("L_cl", "L_qdm", "match_acc")


def subset_summary(records, last=300):
    """Per training subset, the mean of L_cl, L_qdm and the training matching accuracy over
    the records of the last `last` steps (records carry "subset" when batches come from one
    subset, train.py --homogeneous_batches). Shows which subsets' judgments the matching
    head makes in training and which stay at 0.5. Returns the table as text ("" when the
    records carry no subset)."""
    if not records or "subset" not in records[-1]:
        return ""
    end = records[-1]["step"]
    rows = {}
    for r in records:
        if r["step"] > end - last and "subset" in r:
            rows.setdefault(r["subset"], []).append(r)
    width = max(len(s) for s in rows)
    lines = [f"training, steps {max(1, end - last + 1)}-{end}, per subset:",
             f"  {'subset':<{width}}  steps  " + "  ".join(f"{k:>9}" for k in SUMMARY_KEYS)]
    for s in sorted(rows):
        means = [sum(r[k] for r in rows[s]) / len(rows[s]) for k in SUMMARY_KEYS]
        lines.append(f"  {s:<{width}}  {len(rows[s]):>5}  " + "  ".join(f"{m:>9.3f}" for m in means))
    return "\n".join(lines)


def remove_log(out_dir):
    path = os.path.join(out_dir, LOG_FILE)
    if os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------------
# Checkpoints: rank 0 writes from the unwrapped model, atomically (tmp dir + rename)

CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)")      # exactly checkpoint-<int>


def checkpoint_dirs(out_dir):
    """The checkpoint-<step> directories of out_dir, oldest first. Only exact names count:
    checkpoint-9-best, checkpoint-0007 or a file checkpoint-20 are not checkpoints (and are
    never rotated out in place of a real one)."""
    if not os.path.isdir(out_dir):
        return []
    steps = [int(m[1]) for n in os.listdir(out_dir) if (m := CHECKPOINT_NAME.fullmatch(n))
             and os.path.isdir(os.path.join(out_dir, n))]
    return [os.path.join(out_dir, f"checkpoint-{s}") for s in sorted(steps)]


def fsync_path(path):
    """Flush a file's or a directory's entry to the disk (a directory: its names)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root):
    """Every file below root and every directory, root included, flushed to the disk."""
    for d, _, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(d, f))
        fsync_path(d)


def rng_state():
    """Every RNG the loop draws from, as tensors and plain values only (so that
    torch.load(weights_only=True) reads it back and never runs code)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model, processor, opt, step, config, out_dir, keep):
    """
    checkpoint-<step>/ in out_dir: save_rematch's files (config = the run's arguments) and
    train_state.pt (step, optimizer, RNG), written into checkpoint-<step>.tmp, every file
    and the folder flushed to the disk, renamed, out_dir flushed; only then are older
    checkpoints rotated out (the `keep` newest stay). So after a crash or a node failure
    the newest complete checkpoint is whole. A failed save (a full disk, any OSError)
    removes its .tmp folder and stops naming the cause and the last intact checkpoint.
    """
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_rematch(model, processor, tmp, config)
        torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng_state()},
                   os.path.join(tmp, TRAIN_STATE))
        sizes = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(tmp) for f in files}
        write_json(os.path.join(tmp, MANIFEST), dict(sorted(sizes.items())))
        fsync_tree(tmp)
    except (OSError, RuntimeError) as e:          # torch.save reports ENOSPC as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        last = last_intact(out_dir)
        free = shutil.disk_usage(out_dir).free
        raise OSError(f"saving {final} failed: {type(e).__name__}: {e} ({free / 2**30:.1f} GiB "
                      f"free in {out_dir}); its partial folder was removed. Last intact "
                      f"checkpoint: {last}") from e
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(out_dir)                               # the rename is on the disk before rotation
    rotate(out_dir, step, keep)
    return final


def read_train_state(path):
    """train_state.pt with weights_only=True: tensors and plain containers only, so a
    planted pickle payload is refused instead of run."""
    file = os.path.join(path, TRAIN_STATE)
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{file}: refusing to load: it holds objects other than tensors and plain values "
            f"(an older rematch checkpoint with numpy's RNG state, or a tampered file); loading "
            f"it could run code. Start afresh (--overwrite) or from its weights (--resume is "
            f"not possible). Loader said: {str(e).splitlines()[0]}") from None


DAMAGED = ".damaged"      # a damaged checkpoint set aside: checkpoint-N.damaged, never resumed or rotated
DAMAGED_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]*)\.damaged(-[2-9]|-[1-9][0-9]+)?")   # set_aside's names


def damaged_dirs(out_dir):
    """The folders set_aside left in out_dir (checkpoint-N.damaged, checkpoint-N.damaged-2,
    ...), by name: kept for inspection until --overwrite starts the run over."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir))
            if DAMAGED_NAME.fullmatch(n) and os.path.isdir(os.path.join(out_dir, n))]


class CheckpointFormatError(ValueError):
    """A checkpoint file that is there but does not parse."""


def _first_line(e):
    """An exception as "Type: the first line of its message" (an empty message too)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_format_error(e):
    """A file that does not parse: truncated or invalid safetensors, JSON, or torch.save's
    zip. Anything else (EIO, EACCES, ENOSPC, MemoryError) is the machine's, not damage."""
    from safetensors import SafetensorError
    return isinstance(e, (CheckpointFormatError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError,
                          EOFError, zipfile.BadZipFile)) or (
        isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e))


def _weight_files(path):
    """The weight files (relative) a checkpoint folder must hold: the LoRA adapter, or the
    backbone's config and every safetensors shard its index names."""
    if os.path.isdir(os.path.join(path, "adapter")):
        return ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    index = os.path.join(path, "backbone", "model.safetensors.index.json")
    if not os.path.isfile(index):
        return ["backbone/config.json", "backbone/model.safetensors"]
    with open(index) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError("no weight_map")
    return ["backbone/config.json"] + [f"backbone/{s}" for s in sorted(set(map(str, weight_map.values())))]


LOCAL_HEADER = struct.Struct("<4s22xHH")      # a zip entry's local header: signature, name and extra lengths


def check_zip_directory(file):
    """Check torch.save's zip `file` from its directory alone, reading no tensor: the end
    record and central directory parse (a cut file has lost them), data.pkl is listed, and
    each entry's local header is where the directory says, its data ending before the
    directory. Raises CheckpointFormatError (zipfile.BadZipFile for an unreadable
    directory); a few bytes per entry are read, whatever the optimizer state's size."""
    with open(file, "rb") as f, zipfile.ZipFile(f) as z:
        entries = z.infolist()
        start_dir = getattr(z, "start_dir", os.path.getsize(file))
        if not any(e.filename.endswith("/data.pkl") or e.filename == "data.pkl" for e in entries):
            raise CheckpointFormatError("no data.pkl in its zip directory (not a torch.save file)")
        for e in entries:
            if e.header_offset < 0:
                raise CheckpointFormatError(f"entry {e.filename} starts before the file")
            f.seek(e.header_offset)
            header = f.read(LOCAL_HEADER.size)
            if len(header) < LOCAL_HEADER.size:
                raise CheckpointFormatError(f"entry {e.filename} starts past the end of the file")
            magic, n_name, n_extra = LOCAL_HEADER.unpack(header)
            end = e.header_offset + LOCAL_HEADER.size + n_name + n_extra + e.compress_size
            if magic != b"PK\x03\x04" or end > start_dir:
                raise CheckpointFormatError(f"entry {e.filename} is not where its zip directory says")


def inspect_checkpoint(path, read_state=True):
    """
    (why, train state) of the checkpoint folder `path`: why it cannot be resumed from — a
    required file missing (config, heads, train_state.pt, the adapter's or the backbone's
    weights, any file the save listed in files.json), one of another size than the save
    wrote, or one that does not parse (truncated or invalid safetensors, JSON,
    train_state.pt), named — with state None; or (None, its train state, read once,
    weights-only). Only format errors are damage: an error of the machine (EIO, EACCES,
    MemoryError) is raised as an OSError naming the file, so that a transient one never
    steps a run back. A train_state.pt that would run code is refused by name.
    read_state=False (rotation, messages): train_state.pt is checked from its zip
    directory (check_zip_directory) and files.json's size instead of loaded, so no
    optimizer state is read; the state returned is then None. Safetensors files are
    checked from their headers either way. Only the resume decision needs read_state=True.
    """
    from safetensors import safe_open
    file = path
    try:
        for name in (CONFIG_FILE, HEADS_FILE, TRAIN_STATE):
            if not os.path.isfile(os.path.join(path, name)):
                return f"{name} is missing", None
        if not any(os.path.isdir(os.path.join(path, d)) for d in ("adapter", "backbone")):
            return "neither adapter/ nor backbone/ is there", None
        file = os.path.join(path, "backbone", "model.safetensors.index.json")
        missing = [f for f in _weight_files(path) if not os.path.isfile(os.path.join(path, f))]
        if missing:
            return f"{', '.join(missing)} missing", None
        file = os.path.join(path, MANIFEST)
        if os.path.isfile(file):                          # older checkpoints have none
            with open(file) as f:
                sizes = json.load(f)
            if not isinstance(sizes, dict):
                raise CheckpointFormatError(f"expected {{file: size}}, got {type(sizes).__name__}")
            missing = [rel for rel in sizes if not os.path.isfile(os.path.join(path, rel))]
            if missing:
                return f"{', '.join(missing)} missing", None
        else:
            sizes = {}
        sizes.pop(CARD_FILE, None)    # the model card: rewritten with the results after evaluation, not read to resume
        for d, _, files in os.walk(path):
            for f in sorted(files):
                file = os.path.join(d, f)
                if f.endswith(".safetensors"):
                    with safe_open(file, "pt"):              # header and length, no tensor read
                        pass
                elif f.endswith(".json"):
                    with open(file) as fh:
                        json.load(fh)
        file = os.path.join(path, TRAIN_STATE)
        state = read_train_state(path) if read_state else check_zip_directory(file)
        for rel, size in sizes.items():                   # a cut that still parses
            found = os.path.getsize(os.path.join(path, rel))
            if found != size:
                return f"{rel} is {found:,} bytes, the save wrote {size:,}", None
        return None, state
    except Exception as e:                                    # noqa: BLE001 (sorted out here)
        if _is_format_error(e):
            return f"{os.path.relpath(file, path)} does not read ({_first_line(e)})", None
        if isinstance(e, ValueError):
            raise                                             # read_train_state's refusal, by name
        raise OSError(f"reading {file} failed ({_first_line(e)}): an error of the machine, not of the "
                      "checkpoint, which is not passed over for it; fix it and resume again") from e


def checkpoint_damage(path, read_state=True):
    """Why `path` cannot be resumed from, or None when it is whole (inspect_checkpoint;
    read_state=False: train_state.pt checked from its zip directory, not loaded)."""
    return inspect_checkpoint(path, read_state)[0]


def last_intact(out_dir):
    """The newest checkpoint of out_dir that inspect_checkpoint finds whole, or "none" (for
    messages: a damaged or unreadable folder is never named as the one to resume from).
    The check rotation makes: no train_state.pt is loaded (every rank may call this)."""
    for path in reversed(checkpoint_dirs(out_dir)):
        try:
            if checkpoint_damage(path, read_state=False) is None:
                return path
        except (OSError, ValueError):
            continue
    return "none"


def set_aside(path, why):
    """Rename a damaged checkpoint-N to checkpoint-N.damaged (kept for inspection; resume and
    rotation no longer see it), named once with why. Returns the new path."""
    dest, k = path + DAMAGED, 2
    while os.path.exists(dest):
        dest, k = f"{path}{DAMAGED}-{k}", k + 1
    os.replace(path, dest)
    fsync_path(os.path.dirname(path) or ".")
    print0(f"{path} is damaged ({why}): set aside as {os.path.basename(dest)}")
    return dest


def latest_intact(checkpoints):
    """(path, train state, [(damaged path, why)]): the newest of `checkpoints` (oldest first)
    that inspect_checkpoint finds whole, and the damaged newer ones. None intact:
    SystemExit naming each."""
    damaged = []
    for path in reversed(checkpoints):
        why, state = inspect_checkpoint(path)
        if why is None:
            return path, state, damaged
        damaged.append((path, why))
    raise SystemExit("--resume: no intact checkpoint: " + "; ".join(f"{p}: {w}" for p, w in damaged))


def resume_point(out_dir, master):
    """The checkpoint of out_dir to resume from, decided once on rank 0 and broadcast, so
    that every rank resumes from the same step or stops with the same named error. The
    damaged newer checkpoints are set aside. Returns (path, its train state on rank 0;
    None on the others, which read it in load_checkpoint)."""
    decision, state = None, None
    if master:
        try:
            decision, state, damaged = latest_intact(checkpoint_dirs(out_dir))
            for bad, why in damaged:
                set_aside(bad, why)
            if damaged:
                print0(f"resuming from {decision} instead, the newest intact checkpoint")
        except (SystemExit, OSError, ValueError) as e:
            decision = ("error", type(e).__name__, str(e))
    decision = broadcast_object(decision)
    if isinstance(decision, tuple):
        _, kind, message = decision
        raise {"SystemExit": SystemExit, "ValueError": ValueError}.get(kind, OSError)(message)
    return decision, state


def rotate(out_dir, step, keep):
    """After checkpoint-<step> is saved: keep it and the keep - 1 newest intact checkpoints
    older than it, delete the other older ones. A damaged one met on the way is set aside,
    never counted, so at least `keep` intact checkpoints survive any mix of damage,
    fallback and save; one that cannot be read for a machine error is kept, uncounted.
    Newer checkpoints (none after a fallback, which sets them aside) are left alone. The
    check reads no optimizer state (inspect_checkpoint with read_state=False: train_state.pt
    from its zip directory and files.json's size): the save before may be tens of GB."""
    kept = 1
    for old in reversed([c for c in checkpoint_dirs(out_dir) if int(c.rsplit("-", 1)[1]) < step]):
        if kept >= keep:
            shutil.rmtree(old, ignore_errors=True)
            continue
        try:
            why = checkpoint_damage(old, read_state=False)
        except (OSError, ValueError) as e:
            print0(f"{old}: kept, not counted ({e})")
            continue
        if why:
            set_aside(old, why)
        else:
            kept += 1


def load_checkpoint(path, model, opt, state=None):
    """Restore weights, optimizer and RNG state into the freshly built model; → step.
    state: train_state.pt as inspect_checkpoint read it (rank 0), else read here."""
    from safetensors.torch import load_file
    state = state or read_train_state(path)               # first: refuse before touching anything
    if os.path.isdir(os.path.join(path, "adapter")):
        from peft import set_peft_model_state_dict
        adapter = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
        set_peft_model_state_dict(model.peft, adapter)
    else:
        saved, _ = load_backbone(os.path.join(path, "backbone"), device=model.device,
                                 dtype=model.backbone.dtype)  # from_pretrained maps the key names
        model.backbone.load_state_dict(saved.state_dict(), strict=True)
    load_heads(model, path)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


# ----------------------------------------------------------------------------------
# Resuming

# Flags that may change between a run and its resumption: where things go, how often to
# log/save, evaluation, time limits, data locations and loading, and ways of computing
# the same step (chunks, activation checkpointing); so does any eval_* flag (an extension's
# evaluation after training, too). Every other flag defines the run.
RESUME_FREE = {"out_dir", "resume", "resume_if_exists", "resume_from", "allow_changed", "overwrite",
               "resumed_with_changes", "preset", "save_every", "keep_checkpoints", "log_every",
               "eval_data", "eval_image_dir", "eval_tasks", "eval_task_table", "eval_match_queries",
               "max_minutes", "stop_after_steps", "peak_tflops", "find_unused_parameters", "dist_timeout_minutes",
               "num_workers", "cache_items", "skip_bad_rows", "check_images",
               "allow_outside_image_dir", "train_data", "image_dir", "chunk_size", "grad_checkpointing",
               "attn", "target_prompts", "resume_revision", "length_grouped_chunks", "pack"}       # target_prompts: its contents (target_prompt_table) count


# Path-valued flags: the run's config (rematch_config.json, evaluation results) records
# only their last component (published_name); so does any other flag named *_dir (an
# extension's folders). `model` stays as given: load_rematch rebuilds the base model from
# it (train from a hub id to publish nothing local).
PATH_FLAGS = ("train_data", "image_dir", "eval_data", "eval_image_dir", "out_dir", "resume_from",
              "target_prompts", "eval_task_table")


def run_config(args, world=None):
    """The run's arguments (rematch_config.json): load_rematch rebuilds the model from
    model, num_tokens, embed_template, seed and the pixel bounds among them; local paths
    of PATH_FLAGS reduced to their names."""
    config = dict(vars(args), **({"world_size": world} if world is not None else {}))
    for k in config:
        if k in PATH_FLAGS or k.endswith("_dir"):
            config[k] = published_name(config[k])
    return config


def resume_changes(path, args, world, defaults=None):
    """{flag: (checkpoint value, this run's value)} for the flags that define the run
    (all but RESUME_FREE) and the number of ranks. A flag the checkpoint's config lacks (it
    was written before the flag existed) counts as `defaults[flag]`, the value it ran with."""
    with open(os.path.join(path, "rematch_config.json")) as f:
        saved = json.load(f)
    now = run_config(args, world)
    saved = {**{k: v for k, v in (defaults or {}).items() if k in now}, **saved}
    keys = {k for k in set(saved) | set(now) if k not in RESUME_FREE and not k.startswith("eval_")}
    return {k: (saved.get(k, "(absent)"), now.get(k, "(absent)")) for k in sorted(keys)
            if saved.get(k, "(absent)") != now.get(k, "(absent)")}


def check_resume(path, args, world, defaults=None):
    """Stop when this run's flags differ from the checkpoint's, naming every difference,
    unless --allow_changed names them all (then they are printed and kept in the
    checkpoint config's `resumed_with_changes`)."""
    changes = resume_changes(path, args, world, defaults)
    allowed = set(args.allow_changed or [])
    refused = {k: v for k, v in changes.items() if k not in allowed}
    listing = "; ".join(f"--{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in refused.items())
    if refused:
        raise SystemExit(f"--resume from {path}: this run's flags differ from the checkpoint's: "
                         f"{listing}. Use the checkpoint's values, or, if the change is intended, "
                         f"pass --allow_changed {' '.join(refused)} (it is logged)")
    return changes


def check_leftovers(out_dir, master, ddp):
    """What killed or odd runs leave in out_dir, named: a checkpoint-N.tmp folder of a save
    that never finished is removed (rank 0); a checkpoint-N that is a symbolic link stops
    the run (rotation and a new save would reach into its target)."""
    names = sorted(os.listdir(out_dir))
    links = [n for n in names if CHECKPOINT_NAME.fullmatch(n) and os.path.islink(os.path.join(out_dir, n))]
    if links:
        raise SystemExit(f"{out_dir}: {', '.join(links)} is a symbolic link, not a checkpoint folder of this "
                         "run: replace it by a copy (or move it away) and run again")
    for n in names:
        if n.endswith(".tmp") and CHECKPOINT_NAME.fullmatch(n[:-4]) and master:
            print0(f"{os.path.join(out_dir, n)}: the partial folder of a save that never finished; removed")
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    if ddp:
        dist.barrier()


def start_run(args, world, master, ddp, defaults=None):
    """
    Decide, before anything is built, what this run continues: (the checkpoint to resume
    from, its train state if already read) — --resume / --resume_if_exists: out_dir's
    newest intact one (resume_point: decided on rank 0, damaged newer ones set aside);
    --resume_from: a folder or hub id — or (None, None) for a fresh start. A fresh start in
    an out_dir with checkpoints needs --overwrite; --overwrite deletes the earlier run
    whole: its checkpoints, the checkpoint-N.damaged folders set aside from it (named),
    its eval/ and log.jsonl. Without --overwrite set-aside folders are kept, named, and
    never resumed. A resumed run whose flags differ stops here, naming them (check_resume;
    `defaults`: each flag's default, what a checkpoint written before the flag ran with).
    Leftovers are named first: a killed save's .tmp folder is removed, a checkpoint name
    that is a symbolic link stops the run. out_dir is listed once, before the ranks part,
    so that every rank sees the same folders whatever rank 0 deletes.
    """
    os.makedirs(args.out_dir, exist_ok=True)
    existing, damaged = checkpoint_dirs(args.out_dir), damaged_dirs(args.out_dir)
    check_leftovers(args.out_dir, master, ddp)
    aside = ", ".join(map(os.path.basename, damaged))
    if args.resume and not existing:
        raise SystemExit(f"--resume: no checkpoint in {args.out_dir} (checkpoint-<step> folders"
                         + (f"; {aside} set aside as damaged, not resumable" if damaged else "")
                         + "); check --out_dir, or use --resume_if_exists to start afresh when there is none")
    source, state = None, None
    if existing and (args.resume or args.resume_if_exists):
        source, state = resume_point(args.out_dir, master)    # rank 0 decides, damaged set aside
    if args.resume_from:
        if existing:
            raise SystemExit(f"--resume_from: {args.out_dir} already holds checkpoints; continue "
                             "them with --resume, or pick an empty --out_dir")
        source = resolve_checkpoint(args.resume_from, getattr(args, "resume_revision", None), train_state=True)
        if not os.path.isfile(os.path.join(source, TRAIN_STATE)):
            raise SystemExit(f"--resume_from {args.resume_from}: {source} has no {TRAIN_STATE} "
                             "(not a train.py checkpoint folder, or uploaded without it)")
        why, state = inspect_checkpoint(source)
        if why:
            raise SystemExit(f"--resume_from {args.resume_from}: {source} is damaged: {why}")
    if source:
        changes = check_resume(source, args, world, defaults)
        if changes:
            args.resumed_with_changes = {k: list(v) for k, v in changes.items()}
            print0("resuming with changed flags (--allow_changed): " + "; ".join(
                f"--{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return source, state
    if existing and not args.overwrite:
        raise SystemExit(f"{args.out_dir} already holds {', '.join(map(os.path.basename, existing))}: "
                         "pass --resume to continue, --overwrite to start over, or another --out_dir")
    old_run = existing + damaged if args.overwrite else existing
    if master:
        if not existing and os.path.exists(os.path.join(args.out_dir, LOG_FILE)):
            print0(f"{os.path.join(args.out_dir, LOG_FILE)}: left by a run without checkpoints; "
                   "starting a new one")
        if damaged and args.overwrite:
            print0(f"--overwrite: deleting {aside} in {args.out_dir} (set aside as damaged by the earlier run)")
        elif damaged:
            print0(f"{args.out_dir}: {aside} kept (set aside as damaged, never resumed); --overwrite deletes them")
        for path in old_run + [os.path.join(args.out_dir, "eval")] * bool(old_run):
            shutil.rmtree(path, ignore_errors=True)
        remove_log(args.out_dir)
    if old_run and ddp:
        dist.barrier()
    return None, None


# ----------------------------------------------------------------------------------
# Evaluation results on disk (evaluate.py): one file per finished task, reused on restart

UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(name):
    """A task name as one file name inside its folder: every character outside A-Z a-z 0-9
    . _ + - (a path separator, a space) becomes "_", and a name that is empty or starts
    with "." ("..", a hidden file) gets a "_" before it. The task names of MMEB, MMEB-V2
    and the zero-shot sets are unchanged by it."""
    s = UNSAFE.sub("_", str(name))
    return "_" + s if not s or s.startswith(".") else s


def result_path(out_dir, kind, name):
    return os.path.join(out_dir, kind, safe_name(name) + ".json")


@torch.no_grad()
def weights_fingerprint(model):
    """"n_params:float64 sum of all weights": any training step changes it, so a restart
    never reuses results computed with other weights."""
    total = sum(p.sum(dtype=torch.float64).item() for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    return f"{n}:{total:.10e}"


def load_finished(out_dir, kind, names, config, weights):
    """{name: saved record} of the results an earlier run with the same config and
    weights saved under out_dir; results of other weights raise (never silently reused)."""
    found = {}
    for name in names if out_dir else ():
        path = result_path(out_dir, kind, name)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if (saved.get("config"), saved.get("weights")) != (json.loads(json.dumps(config)), weights):
                raise ValueError(f"{path} was written for another model/config or other weights "
                                 f"({saved.get('config')}); use another --out or delete it")
            found[name] = saved
    return found
