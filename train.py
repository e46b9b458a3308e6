"""
Training ReMatch (paper §3.2.4, Eq. 5; §4): a plain PyTorch loop launched by torchrun.

Each step, per rank: embed the B queries and their B positives + B hard negatives
(§3.2.1), Eq. 3 over the global batch + Eq. 2, the unified matching pass over the
instances (Eq. 4, Fig. 3), combined by Eq. 5, one AdamW step.

CPU demo (the default without data): writes the built-in synthetic benchmark, trains
the tiny offline model (about 3.5 minutes on 2 cores), evaluates it and prints Hit@1 next to chance:
    python train.py
A CPU smoke run of the paper's loop with tiny flags:
    python train.py --steps 20 --batch_size 8 --out_dir runs/smoke
One GPU, paper preset (MMEB-train parquet + images, mmE5 hard negatives optional):
    python train.py --preset qwen2-vl-2b --train_data TIGER-Lab/MMEB-train --image_dir MMEB-train
8 GPUs (global batch 1024 = 8 × 128):
    torchrun --standalone --nproc_per_node=8 train.py --preset qwen2-vl-2b --train_data ... --image_dir ...
Several machines (run on each, NODE_RANK = 0..N-1):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=$MASTER_HOST:29500 train.py --preset qwen2-vl-7b ...

Tests: pytest tests/test_train.py
"""
import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import pickle
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from data import MATCH_PROMPTS, MMEB_TRAIN_SUBSETS, collate_embed, collate_match
from losses import (at_least_fp32, info_nce, matching_loss, orthogonality_loss, rank_world,
                    total_loss)
from masks import VIEW_SETS
from model import (ATTENTION, TINY, ReMatch, apply_lora, default_device, flex_unavailable,
                   load_backbone, load_heads, resolve_checkpoint, save_rematch, set_attention,
                   write_model_card)

# ----------------------------------------------------------------------------------
# Presets: the paper's four models (§4) and the CPU demo. Explicit flags override them.

PAPER = dict(subsets=list(MMEB_TRAIN_SUBSETS),             # MMEB-train's 20, not mmE5's extra 4
             steps=2500, batch_size=128, lr=1e-4, warmup_steps=100, tau=0.02, num_tokens=16,
             lora=True, lora_r=32, lora_alpha=64, grad_checkpointing=True,
             max_pixels=1280 * 28 * 28, num_workers=8, save_every=500)
PRESETS = {
    "qwen2-vl-2b": dict(PAPER, model="Qwen/Qwen2-VL-2B-Instruct"),
    "qwen2-vl-7b": dict(PAPER, model="Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2.5-vl-3b": dict(PAPER, model="Qwen/Qwen2.5-VL-3B-Instruct"),
    "qwen2.5-vl-7b": dict(PAPER, model="Qwen/Qwen2.5-VL-7B-Instruct"),
    # calibrated on 2 CPU cores (docs/readings.md §7): full fine-tuning of the random
    # tiny model needs a larger lr and temperature than LoRA on a pretrained one
    "demo": dict(model="tiny-qwen2-vl", steps=1500, batch_size=32, lr=1e-3, warmup_steps=20,
                 tau=0.05, num_tokens=4, weight_decay=0.01, lora=False, log_every=100,
                 save_every=500, num_workers=0, cache_items=100_000, match_instances=8,
                 eval_match_queries=150),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="defaults for a paper model or the CPU demo (default: demo when no "
                        "--train_data is given)")
    # model
    p.add_argument("--model", default="tiny-qwen2-vl",
                   help="hub id or local dir of Qwen2-VL/Qwen2.5-VL, or tiny-qwen2-vl / tiny-qwen2.5-vl")
    p.add_argument("--num_tokens", type=int, default=16,
                   help="K learnable tokens per side (§3.2.1); 0 = last-token pooling (baseline)")
    p.add_argument("--embed_template", choices=("chat", "plain"), default="chat",
                   help="chat = MVQDM++ embedding template (default); plain = VLM2Vec layout")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA on the language model (default: on for pretrained, off = full "
                        "training for the tiny random models)")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA rank (§4: 32)")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha (§4: 64)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--min_pixels", type=int, default=None, help="image processor min pixels")
    p.add_argument("--max_pixels", type=int, default=None, help="image processor max pixels")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float64"), default="auto",
                   help="backbone weights: auto = bf16 on CUDA, fp32 on CPU (float64: exact checks)")
    p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="non-reentrant activation checkpointing of the decoder (and vision) layers")
    p.add_argument("--attn", choices=ATTENTION, default="sdpa",
                   help="attention of the unified matching pass: sdpa = the dense additive mask "
                        "(default; the oracle), flex = FlexAttention's block mask, which skips "
                        "the empty blocks (CUDA: no CPU backward in torch; bench/matching.py)")
    # data
    p.add_argument("--train_data", default=None,
                   help="MMEB-train (hub id or dir of <Subset>/original-*.parquet) or mmE5 "
                        "hard-negative files; default: the built-in synthetic benchmark")
    p.add_argument("--image_dir", default=None, help="root the rows' image paths are relative to")
    p.add_argument("--subsets", nargs="+", default=None, help="training subsets (default: all)")
    p.add_argument("--split", default="original", help="MMEB-train split (original | diverse_instruction)")
    p.add_argument("--max_rows_per_subset", type=int, default=None, help="cap rows per subset (head)")
    p.add_argument("--target_prompts", default=None,
                   help="JSON {subset, task or meta-task: prompt}: target prompts for your own "
                        "subsets (or to replace MMEB's); a subset with none trains without one")
    p.add_argument("--target_instructions", action=argparse.BooleanOptionalAction, default=True,
                   help="prepend the per-subset target prompt to text documents (Table 3 row 2)")
    p.add_argument("--hard_negative", action=argparse.BooleanOptionalAction, default=True,
                   help="use each row's explicit hard negative (Table 3 row 3); without it, and "
                        "for rows that have none, d- is the next instance's positive")
    p.add_argument("--homogeneous_batches", action=argparse.BooleanOptionalAction, default=True,
                   help="each global batch from one subset (in-batch negatives of one task)")
    p.add_argument("--skip_bad_rows", action="store_true",
                   help="drop rows with missing/corrupt images or no content, count and report "
                        "them (default: stop with an error naming the row)")
    p.add_argument("--check_images", action="store_true",
                   help="decode every training image before the first step (a progress bar), so a "
                        "corrupt file stops the run (or, with --skip_bad_rows, is counted) at once, "
                        "not when its batch comes")
    p.add_argument("--max_text_tokens", type=int, default=1024,
                   help="longest text (tokens, image tokens not counted) of a query or document; a "
                        "longer one is an error naming its row (or skipped with --skip_bad_rows)")
    p.add_argument("--allow_outside_image_dir", action="store_true",
                   help="accept image paths that are absolute or leave --image_dir with '..'")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (image decoding)")
    p.add_argument("--cache_items", type=int, default=0,
                   help="keep up to N encoded (text, image) items in memory (small data; 0 = off)")
    # losses
    p.add_argument("--tau", type=float, default=0.02, help="temperature of Eq. 3 (§4: 0.02)")
    p.add_argument("--w_orth", type=float, default=0.5, help="weight of Eq. 2 in Eq. 5 (0.5)")
    p.add_argument("--w_qdm", type=float, default=0.1, help="weight of Eq. 4 in Eq. 5 (0.1); 0 = no matching")
    p.add_argument("--match_views", choices=sorted(VIEW_SETS), default="all",
                   help="matching views (Table 5): all, feat (lightweight), raw, raw2feat, feat2raw")
    p.add_argument("--match_prompt", choices=sorted(MATCH_PROMPTS), default="paper",
                   help="segment P of the matching rows: paper = system prompt + App. S7's "
                        "instruction (default); header = the bare user header, for tiny random "
                        "models whose near-uniform attention the long prompt dilutes "
                        "(docs/readings.md §8)")
    p.add_argument("--match_instances", type=int, default=None,
                   help="instances per rank entering the matching pass (default: all B)")
    p.add_argument("--mask_duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="leave documents identical to a query's positive out of its Eq. 3 "
                        "denominator (docs/readings.md §2); --no-mask_duplicates = Eq. 3 literally")
    # optimisation
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps (§4: 2500)")
    p.add_argument("--batch_size", type=int, default=128, help="queries per rank per step (§4: 128 × 8)")
    p.add_argument("--chunk_size", type=int, default=None,
                   help="cached-gradient micro-batching: embed and backpropagate this many "
                        "instances at a time (same gradients, memory of one chunk); default off")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (§4: 1e-4)")
    p.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed (model init, data order, slot placement)")
    # run
    p.add_argument("--out_dir", default="runs/demo", help="checkpoints, log.jsonl, eval results")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in out_dir (an error if there is none)")
    p.add_argument("--resume_if_exists", action="store_true",
                   help="continue from the latest checkpoint in out_dir if there is one, else start "
                        "afresh (for job scripts that are restarted)")
    p.add_argument("--resume_from", default=None,
                   help="continue from this checkpoint folder (a path, or the hub id of a checkpoint "
                        "folder: downloaded once, rank 0 first) into an --out_dir without checkpoints")
    p.add_argument("--allow_changed", nargs="+", default=None, metavar="FLAG",
                   help="resume although these flags (names without --) differ from the "
                        "checkpoint's; without it any such difference stops the run")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an out_dir that holds checkpoints, deleting them "
                        "(without it such a run stops, so no checkpoint is lost by accident)")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--log_every", type=int, default=1, help="print a log line every N steps (log.jsonl: every step)")
    p.add_argument("--eval_data", default=None,
                   help="MMEB-eval dir/hub id to evaluate after training (demo: the synthetic eval split)")
    p.add_argument("--eval_image_dir", default=None, help="image root of --eval_data")
    p.add_argument("--eval_tasks", nargs="+", default=None,
                   help="tasks to evaluate (default: every task folder of a local --eval_data; "
                        "MMEB's 36 for a hub id)")
    p.add_argument("--eval_task_table", default=None,
                   help="JSON {task: [meta_task, is_ind]} for tasks outside MMEB's table (their "
                        "category and IND/OOD means); without it they count as 'Other', IND")
    p.add_argument("--eval_match_queries", type=int, default=0,
                   help="after training, also report the matching head's held-out Yes/No accuracy "
                        "per view type on the first N queries of each eval task (0 = off; only "
                        "when trained with matching)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop (and checkpoint) after this much training time")
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="stop (and checkpoint) after this many steps in this run, e.g. to fit a "
                        "job time limit; continue later with --resume (the schedule stays --steps)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="accelerator peak TFLOP/s for the MFU estimate in the logs (CUDA only; "
                        "default: from the GPU name for A100/H100/H200/H800/L40S, else no MFU)")
    p.add_argument("--find_unused_parameters", action="store_true",
                   help="DDP find_unused_parameters (needed when some trainable weights get no "
                        "gradient in a step, e.g. a fully trained vision tower on text-only batches)")
    args = p.parse_args(argv)
    preset = args.preset or ("demo" if args.train_data is None else None)
    if preset:                                     # preset values, unless given explicitly
        p.set_defaults(**PRESETS[preset])
        args = p.parse_args(argv)
        args.preset = preset
    if args.lora is None:
        args.lora = args.model not in TINY
    for name in ("steps", "batch_size", "save_every", "log_every", "keep_checkpoints", "max_text_tokens",
                 "chunk_size", "match_instances", "max_rows_per_subset", "stop_after_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_match_queries", "num_workers", "cache_items", "warmup_steps", "num_tokens",
                 "weight_decay", "grad_clip", "w_orth", "w_qdm"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", "max_minutes"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 1e-3 <= args.tau <= 10:       # logits are cos/τ: τ = 1e-12 gives losses of 1e10
        p.error(f"--tau must be in [1e-3, 10] (the paper uses 0.02), got {args.tau}")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other: pick one")
    if args.attn == "flex":                        # before any data or model is loaded
        why = flex_unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"), training=True)
        if why:
            p.error(why)
    args.target_prompt_table = None           # the file's contents go into the checkpoint config
    if args.target_prompts:
        from data import read_target_prompts
        try:
            args.target_prompt_table = read_target_prompts(args.target_prompts)
        except ValueError as e:
            p.error(str(e))
    if args.eval_task_table:
        from evaluate import read_task_table
        try:
            read_task_table(args.eval_task_table, "--eval_task_table")
        except ValueError as e:
            p.error(str(e))
    if args.train_data is not None and args.image_dir is None:
        p.error("--train_data needs --image_dir (the root of the rows' relative image paths)")
    return args


# ----------------------------------------------------------------------------------
# Distributed set-up (torchrun env vars; nccl on CUDA, gloo on CPU). The one place for
# it: evaluate.py imports these; (rank, world) comes from losses.rank_world.

def setup_distributed(device=None):
    """
    Under torchrun (RANK set): join the process group, nccl on cuda:LOCAL_RANK when CUDA is
    there (and `device` is not "cpu"), else gloo on the CPU. Alone: `device`, or the
    default device. Returns (ddp, rank, world, device).
    """
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, torch.device(device) if device else default_device()
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available() and str(device) != "cpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, rank, world, device


def teardown_distributed():
    """Leave the process group. gloo can abort at interpreter exit while DDP state is alive
    (docs/readings.md §6): callers `del` their DDP model and optimizer first, then this
    collects garbage, waits for every rank and destroys the group."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*a, **kw):
    """print on rank 0 only (every process prints without a process group)."""
    if rank_world()[0] == 0:
        print(*a, **kw, flush=True)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(args, device):
    """Peak bf16 TFLOP/s of this GPU (flag, else by name), None if unknown or on CPU."""
    if device.type != "cuda":
        return None
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def lr_at(step, args):
    """Linear warm-up to args.lr, then cosine decay to 0 over the remaining steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------
# Model and data

def build_model(args, device):
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    backbone, processor = load_backbone(args.model, device=device, dtype=dtype, seed=args.seed,
                                        min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    if args.lora:
        backbone = apply_lora(backbone, args.lora_r, args.lora_alpha, args.lora_dropout)
    model = ReMatch(backbone, args.num_tokens, args.embed_template, seed=args.seed)
    set_attention(model, args.attn, training=True)
    if args.w_qdm == 0:                        # no matching: projector and LM head get no gradient
        model.projector.requires_grad_(False)
        model.hf.lm_head.requires_grad_(False)
    if args.grad_checkpointing:                # non-reentrant: safe with DDP and several forwards
        hf = model.hf
        if hasattr(hf, "activation_checkpointing_enable"):                    # transformers ≥ 5.x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), processor


def model_config(args):
    """The run's arguments (rematch_config.json): load_rematch rebuilds the model from
    model, num_tokens, embed_template, seed and the pixel bounds among them."""
    return dict(vars(args))


def fill_negatives(examples):
    """One d⁻ per instance: the row's hard negative, else the next instance's positive
    (an in-batch negative). Returns (neg items, neg ids, how many were filled)."""
    n = len(examples)
    neg, neg_ids, filled = [], [], 0
    for i, ex in enumerate(examples):
        if ex["neg"] is not None:
            neg.append(ex["neg"])
            neg_ids.append(ex["neg_id"])
        else:
            nxt = examples[(i + 1) % n]
            neg.append(nxt["pos"])
            neg_ids.append(nxt["pos_id"])
            filled += 1
    return neg, neg_ids, filled


# ----------------------------------------------------------------------------------
# Checkpoints: rank 0 writes from the unwrapped model, atomically (tmp dir + rename)

def checkpoint_dirs(out_dir):
    if not os.path.isdir(out_dir):
        return []
    steps = [int(n.split("-")[1]) for n in os.listdir(out_dir)
             if n.startswith("checkpoint-") and n.split("-")[1].isdigit()]
    return [os.path.join(out_dir, f"checkpoint-{s}") for s in sorted(steps)]


TRAIN_STATE = "train_state.pt"


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


def save_checkpoint(model, processor, opt, step, args, world=1):
    final = os.path.join(args.out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_rematch(model, processor, tmp, dict(model_config(args), world_size=world))
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng_state()},
               os.path.join(tmp, TRAIN_STATE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(args.out_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(path, model, opt):
    """Restore weights, optimizer and RNG state into the freshly built model; → step."""
    from safetensors.torch import load_file
    state = read_train_state(path)                        # first: refuse before touching anything
    if os.path.isdir(os.path.join(path, "adapter")):
        from peft import set_peft_model_state_dict
        adapter = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
        set_peft_model_state_dict(model.backbone, adapter)
    else:
        saved, _ = load_backbone(os.path.join(path, "backbone"), device=model.device,
                                 dtype=model.hf.dtype)       # from_pretrained maps the key names
        model.hf.load_state_dict(saved.state_dict(), strict=True)
    load_heads(model, path)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


# Flags that may change between a run and its resumption: where things go, how often to
# log/save, evaluation, time limits, data locations and loading, and ways of computing
# the same step (chunks, activation checkpointing). Every other flag defines the run.
RESUME_FREE = {"out_dir", "resume", "resume_if_exists", "resume_from", "allow_changed", "overwrite",
               "resumed_with_changes", "preset", "save_every", "keep_checkpoints", "log_every",
               "eval_data", "eval_image_dir", "eval_tasks", "eval_task_table", "eval_match_queries",
               "max_minutes", "stop_after_steps", "peak_tflops", "find_unused_parameters",
               "num_workers", "cache_items", "skip_bad_rows", "check_images",
               "allow_outside_image_dir", "train_data", "image_dir", "chunk_size", "grad_checkpointing",
               "attn"}


def resume_changes(path, args, world):
    """{flag: (checkpoint value, this run's value)} for the flags that define the run
    (all but RESUME_FREE) and the number of ranks."""
    with open(os.path.join(path, "rematch_config.json")) as f:
        saved = json.load(f)
    now = dict(model_config(args), world_size=world)
    keys = (set(saved) | set(now)) - RESUME_FREE
    return {k: (saved.get(k, "(absent)"), now.get(k, "(absent)")) for k in sorted(keys)
            if saved.get(k, "(absent)") != now.get(k, "(absent)")}


def check_resume(path, args, world):
    """Stop when this run's flags differ from the checkpoint's, naming every difference,
    unless --allow_changed names them all (then they are printed and kept in the
    checkpoint config's `resumed_with_changes`)."""
    changes = resume_changes(path, args, world)
    allowed = set(args.allow_changed or [])
    refused = {k: v for k, v in changes.items() if k not in allowed}
    listing = "; ".join(f"--{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in refused.items())
    if refused:
        raise SystemExit(f"--resume from {path}: this run's flags differ from the checkpoint's: "
                         f"{listing}. Use the checkpoint's values, or, if the change is intended, "
                         f"pass --allow_changed {' '.join(refused)} (it is logged)")
    return changes


def cut_log(out_dir, step):
    """Keep only the log.jsonl records up to `step` (a resumed run rewrites the rest)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------
# The loop

@dataclasses.dataclass
class Instances:
    """This rank's B training instances (q, d⁺, d⁻) of one step.
    q, pos, neg: encoded items (data.encode_item), B each; pos_ids, neg_ids: document ids
    (data.doc_id) for duplicate masking; pos_slot: the slot (1 or 2) of d⁺ for each of
    the first M instances, those that enter the matching pass (M = 0: no matching);
    filled: how many d⁻ were another instance's positive (rows without a hard negative)."""
    q: list
    pos: list
    neg: list
    pos_ids: list
    neg_ids: list
    pos_slot: list
    filled: int

    @property
    def n_match(self):
        """M, the number of instances that enter the matching pass."""
        return len(self.pos_slot)

    def chunk(self, lo, hi):
        """Instances lo..hi-1; the matching ones among them keep their slots."""
        return Instances(self.q[lo:hi], self.pos[lo:hi], self.neg[lo:hi], self.pos_ids[lo:hi],
                         self.neg_ids[lo:hi], self.pos_slot[lo:hi], 0)


def step_instances(examples, args, step):
    """This rank's Instances: the items, document ids, and d⁺'s slot for the M instances
    that enter matching (seeded per (step, row), whatever rank or chunk the row lands on)."""
    neg, neg_ids, filled = fill_negatives(
        examples if args.hard_negative else [dict(ex, neg=None) for ex in examples])
    M = min(args.match_instances or len(examples), len(examples)) if args.w_qdm > 0 else 0
    pos_slot = [1 if random.Random(f"{args.seed}-{step}-{ex['index']}").random() < 0.5 else 2
                for ex in examples[:M]]
    return Instances([ex["q"] for ex in examples], [ex["pos"] for ex in examples], neg,
                     [ex["pos_id"] for ex in examples], neg_ids, pos_slot, filled)


def collate_step(inst, tok, args):
    """Model inputs: query batch, document batch [d⁺ ; d⁻], matching batch over the first
    M instances (None without matching)."""
    q = collate_embed(inst.q, tok, args.num_tokens, args.embed_template)
    d = collate_embed(inst.pos + inst.neg, tok, args.num_tokens, args.embed_template)
    M = inst.n_match
    match = collate_match(inst.q[:M], inst.pos[:M], inst.neg[:M], tok,
                          VIEW_SETS[args.match_views], inst.pos_slot,
                          prompt=MATCH_PROMPTS[args.match_prompt]) if M else None
    return q, d, match


def doc_ids(inst, args, device):
    """(pos_ids, neg_ids) tensors for Eq. 3's duplicate masking, (None, None) when off."""
    if not args.mask_duplicates:
        return None, None
    return torch.tensor(inst.pos_ids, device=device), torch.tensor(inst.neg_ids, device=device)


def local_terms(out, args):
    """
    The per-item loss terms of one forward (`ReMatch.forward` output), with their gates:
    Eq. 2 over the queries' and documents' token states (when w_orth > 0 and K > 1) and
    Eq. 4 over the matching answers (when the forward ran matching). Both are means over
    items, so a chunk's share of the batch value is its mean × its fraction of the items.
    Returns (L_orth, L_qdm, correct answers, answers); absent terms are 0.
    """
    zero = torch.zeros((), device=out["E_q"].device)
    l_orth = orthogonality_loss(torch.cat([out["e_q"], out["e_d"]])) \
        if args.w_orth > 0 and args.num_tokens > 1 else zero                          # Eq. 2
    if "logits" not in out:
        return l_orth, zero, zero, 0
    l_qdm = matching_loss(out["logits"], out["labels"])                               # Eq. 4
    correct = (out["logits"].argmax(-1) == out["labels"]).float().sum()
    return l_orth, l_qdm, correct, len(out["labels"])


def log_terms(l_cl, l_orth, l_qdm, correct, answers, args):
    """The logged terms of a step (detached): Eq. 5's total, its parts, matching accuracy."""
    loss = total_loss(l_cl, l_orth, l_qdm, args.w_orth, args.w_qdm)                   # Eq. 5
    acc = correct / answers if answers else correct
    return {"loss": loss.detach(), "L_cl": l_cl.detach(), "L_orth": l_orth.detach(),
            "L_qdm": l_qdm.detach(), "match_acc": acc.detach()}


def train_step(model, examples, tok, args, step):
    """One step's forward and losses (Eq. 2–5) on this rank's B examples.
    Returns (loss, logged terms, filled)."""
    B = len(examples)
    inst = step_instances(examples, args, step)
    out = model(*collate_step(inst, tok, args), n_pos=B)
    E_pos, E_neg = out["E_d"][:B], out["E_d"][B:]                            # (B, d) each
    l_cl = info_nce(out["E_q"], E_pos, E_neg, args.tau, *doc_ids(inst, args, E_pos.device))  # Eq. 3
    l_orth, l_qdm, correct, answers = local_terms(out, args)                 # Eq. 2, Eq. 4
    loss = total_loss(l_cl, l_orth, l_qdm, args.w_orth, args.w_qdm)          # Eq. 5
    return loss, log_terms(l_cl, l_orth, l_qdm, correct, answers, args), inst.filled


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replayed_rng(state, device):
    """Run a block with the RNG state of phase 1 (dropout masks repeat), then restore."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def train_step_chunked(ddp_model, model, examples, tok, args, step, autocast):
    """
    Cached-gradient micro-batching (GradCache; docs/readings.md §4): the same gradients as
    train_step on the whole per-rank batch, with activation memory of one chunk of
    args.chunk_size.
      phase 1  embed every chunk without a graph (RNG state kept per chunk) → E (B, d);
               Eq. 3 on the full (global) batch; keep g = ∂L_cl/∂E.
      phase 2  re-embed each chunk with a graph under the same RNG state and backpropagate
               Σ E·g (the chain rule through E) plus the chunk's share of Eq. 2 (per item)
               and of Eq. 4 (per instance: the chunk's own instances build their matching
               rows from the re-embedded E) — local_terms, as in train_step. Chunk 0 runs
               last: only it synchronises DDP gradients, and it holds matching instances
               (the first M of the batch).
    Does the backward itself; returns (logged terms, filled) like train_step.
    """
    B, c, device = len(examples), args.chunk_size, model.device
    inst = step_instances(examples, args, step)
    chunks = [inst.chunk(a, min(a + c, B)) for a in range(0, B, c)]

    states, E_q, E_pos, E_neg = [], [], [], []
    with torch.no_grad(), autocast:                                           # phase 1
        for ch in chunks:
            states.append(_rng_state(device))
            q, d, _ = collate_step(dataclasses.replace(ch, pos_slot=[]), tok, args)
            E_q.append(model.embed(q, "q")[0])
            E_d = model.embed(d, "d")[0]                                      # (2c, d)
            E_pos.append(E_d[:len(ch.q)])
            E_neg.append(E_d[len(ch.q):])
    E_q, E_pos, E_neg = (at_least_fp32(torch.cat(E)).requires_grad_() for E in (E_q, E_pos, E_neg))  # (B, d)
    l_cl = info_nce(E_q, E_pos, E_neg, args.tau, *doc_ids(inst, args, device))  # Eq. 3
    l_cl.backward()                                       # g = ∂L_cl/∂E, gathered over ranks
    g_q, g_d = E_q.grad, torch.stack([E_pos.grad, E_neg.grad])               # (B, d), (2, B, d)

    l_orth, l_qdm, correct = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))
    starts = range(0, B, c)
    for j in reversed(range(len(chunks))):                                   # phase 2
        ch, lo, sync = chunks[j], starts[j], j == 0
        hi = lo + len(ch.q)
        no_sync = ddp_model.no_sync() if hasattr(ddp_model, "no_sync") and not sync \
            else contextlib.nullcontext()
        with no_sync, _replayed_rng(states[j], device):
            with autocast:
                out = ddp_model(*collate_step(ch, tok, args), n_pos=len(ch.q))
            g_dj = g_d[:, lo:hi].reshape(-1, g_d.shape[-1])                   # (2c, d): [d⁺ ; d⁻]
            part = (at_least_fp32(out["E_q"]) * g_q[lo:hi]).sum() \
                + (at_least_fp32(out["E_d"]) * g_dj).sum()                  # Σ E·g
            orth_j, qdm_j, correct_j, answers_j = local_terms(out, args)      # Eq. 2, Eq. 4
            share = orth_j * len(ch.q) / B                                    # this chunk's share
            part = part + args.w_orth * share
            l_orth += share.detach()
            if answers_j:
                share = qdm_j * ch.n_match / inst.n_match
                part = part + args.w_qdm * share
                l_qdm += share.detach()
                correct += correct_j
            part.backward()
    answers = inst.n_match * len(VIEW_SETS[args.match_views])
    return log_terms(l_cl, l_orth, l_qdm, correct, answers, args), inst.filled


def forward_backward(ddp_model, model, examples, tok, args, step, autocast):
    """The step's forward and backward, plain or with cached-gradient chunks; → (terms, filled)."""
    if args.chunk_size and args.chunk_size < len(examples):
        return train_step_chunked(ddp_model, model, examples, tok, args, step, autocast)
    with autocast:
        loss, terms, filled = train_step(ddp_model, examples, tok, args, step)
    loss.backward()
    return terms, filled


def main(argv=None):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from data import TrainBatchSampler, TrainDataset

    args = parse_args(argv)
    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    os.makedirs(args.out_dir, exist_ok=True)
    existing = checkpoint_dirs(args.out_dir)
    if args.resume and not existing:
        raise SystemExit(f"--resume: no checkpoint in {args.out_dir} (checkpoint-<step> folders); "
                         "check --out_dir, or use --resume_if_exists to start afresh when there is none")
    resume = bool(existing) and (args.resume or args.resume_if_exists)
    source = existing[-1] if resume else None
    if args.resume_from:
        if existing:
            raise SystemExit(f"--resume_from: {args.out_dir} already holds checkpoints; continue "
                             "them with --resume, or pick an empty --out_dir")
        source, resume = resolve_checkpoint(args.resume_from), True
        if not os.path.isfile(os.path.join(source, TRAIN_STATE)):
            raise SystemExit(f"--resume_from {args.resume_from}: {source} has no {TRAIN_STATE} "
                             "(not a train.py checkpoint folder, or uploaded without it)")
    if resume:          # before building anything: a changed flag stops here, naming it
        changes = check_resume(source, args, world)
        if changes:
            args.resumed_with_changes = {k: list(v) for k, v in changes.items()}
            print0("resuming with changed flags (--allow_changed): " + "; ".join(
                f"--{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not existing and not resume and master and os.path.exists(log_path):
        print0(f"{log_path}: left by a run without checkpoints; starting a new one")
        os.remove(log_path)
    if existing and not resume:
        if not args.overwrite:
            raise SystemExit(f"{args.out_dir} already holds {', '.join(map(os.path.basename, existing))}: "
                             "pass --resume to continue, --overwrite to start over, or another --out_dir")
        if master:
            for path in existing + [os.path.join(args.out_dir, "eval")]:
                shutil.rmtree(path, ignore_errors=True)
            if os.path.exists(os.path.join(args.out_dir, "log.jsonl")):
                os.remove(os.path.join(args.out_dir, "log.jsonl"))
        if ddp:
            dist.barrier()

    eval_tasks, task_meta = args.eval_tasks, None
    if args.train_data is None:                  # the built-in synthetic benchmark (demo/)
        from demo import DEMO_EVAL_TASKS, DEMO_META, make_synthetic
        task_meta = DEMO_META
        root = os.path.join(args.out_dir, "demo_data")
        if master:
            t0 = time.time()
            paths = make_synthetic(root, seed=args.seed)
            print0(f"synthetic benchmark in {root} ({time.time() - t0:.1f} s)")
        if ddp:
            dist.barrier()
        paths = make_synthetic(root, seed=args.seed)          # already there: returns paths
        args.train_data, args.image_dir = paths["train"], paths["image_dir"]
        if args.eval_data is None:
            args.eval_data, args.eval_image_dir = paths["eval"], paths["image_dir"]
            eval_tasks = eval_tasks or DEMO_EVAL_TASKS

    model, processor = build_model(args, device)
    tok = processor.tokenizer
    dataset = TrainDataset(args.train_data, args.image_dir, processor, subsets=args.subsets,
                           split=args.split, max_rows_per_subset=args.max_rows_per_subset,
                           target_instructions=args.target_instructions,
                           skip_bad_rows=args.skip_bad_rows, cache_items=args.cache_items,
                           task_meta=task_meta, max_text_tokens=args.max_text_tokens,
                           allow_outside_image_dir=args.allow_outside_image_dir,
                           target_prompts=args.target_prompt_table)
    if dataset.no_target_prompt:
        print0(f"no target prompt for subset(s) {', '.join(dataset.no_target_prompt)}: they train "
               "without one (give them one with --target_prompts FILE.json)")
    if args.check_images:
        n = dataset.check_images(progress=master and sys.stderr.isatty())
        print0(f"checked {n:,} images")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all tensors (CPU and CUDA); 2.8 → 0.8 ms a demo step on 2 cores
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                            fused=True)
    start = 0
    if resume:
        latest = source
        start = load_checkpoint(latest, model, opt)
        if master:
            cut_log(args.out_dir, start)                 # steps after the checkpoint run again
        print0(f"resumed from {latest} at step {start}")
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters) if ddp else model
    sampler = TrainBatchSampler(dataset, args.batch_size, world, rank, args.seed,
                                homogeneous=args.homogeneous_batches, start_step=start)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    n_trainable = sum(p.numel() for p in params)
    print0(f"{args.model} ({'LoRA' if args.lora else 'full'}; {n_trainable:,} trainable) | "
           f"{len(dataset):,} rows | global batch {world} × {args.batch_size} = "
           f"{world * args.batch_size} | lr {args.lr:g} | K={args.num_tokens} | tau={args.tau:g} | "
           f"w_orth={args.w_orth:g} w_qdm={args.w_qdm:g} views={args.match_views} | "
           f"{device.type} × {world}")

    bar = tqdm(total=args.steps, initial=start, dynamic_ncols=True,   # no bar in log files
               disable=not master or not sys.stderr.isatty())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches, t_start, filled_total, step = iter(loader), time.time(), 0, start
    peak, n_params, tokens_before = peak_tflops(args, device), sum(p.numel() for p in model.parameters()), 0
    model.train()
    for step in range(start, args.steps):
        t0 = time.time()
        examples = next(batches)
        dataset.record_skipped(examples)
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        terms, filled = forward_backward(ddp_model, model, examples, tok, args, step, autocast)
        filled_total += filled
        stats = torch.stack(list(terms.values())).float()                    # (5,) this rank
        finite = torch.isfinite(terms["loss"]).float()[None]
        if ddp:                                  # every rank stops together on a bad loss
            dist.all_reduce(stats)
            stats /= world
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            last = checkpoint_dirs(args.out_dir)
            raise FloatingPointError(
                f"step {step}: non-finite loss on some rank (this rank: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                + f"); stopping. Last checkpoint: {last[-1] if last else 'none'} (intact).")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if not math.isfinite(float(grad_norm)):  # DDP: gradients are all-reduced, every rank sees it
            last = checkpoint_dirs(args.out_dir)
            raise FloatingPointError(
                f"step {step}: finite loss ({stats[0].item():.4g}) but non-finite gradient norm "
                f"({float(grad_norm)}); stopping before the optimizer step, so no NaN reaches the "
                f"weights. Last checkpoint: {last[-1] if last else 'none'} (intact).")
        opt.step()

        dt = time.time() - t0
        tokens = world * (model.tokens_processed - tokens_before)   # decoder tokens, all ranks
        tokens_before = model.tokens_processed
        record = {"step": step + 1, **{k: round(v, 6) for k, v in zip(terms, stats.tolist())},
                  "lr": lr, "grad_norm": round(float(grad_norm), 4),
                  "samples_per_s": round(world * len(examples) / dt, 2),
                  "tokens_per_s": round(tokens / dt)}
        if peak:   # MFU ≈ 6·N·tokens/s / peak (forward + backward; frozen LoRA weights make it an upper bound)
            record["mfu"] = round(6 * n_params * tokens / dt / (world * peak * 1e12), 4)
        if master:
            with open(log_path, "a") as log:                 # closed at once, whatever happens next
                log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            if (step + 1) % args.log_every == 0 or step == start:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in record.items()))
        out_of_time = (args.max_minutes is not None and (time.time() - t_start) > 60 * args.max_minutes) \
            or (args.stop_after_steps is not None and step + 1 - start >= args.stop_after_steps)
        if ddp:                                  # rank 0's clock decides for everyone
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.broadcast(flag, 0)
            out_of_time = bool(flag.item())
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or out_of_time:
            if master:
                path = save_checkpoint(model, processor, opt, step + 1, args, world)
                bar.write(f"saved {path}")
            if ddp:
                dist.barrier()
        if out_of_time:
            print0(f"stopping at step {step + 1} (--max_minutes / --stop_after_steps)")
            break
    bar.close()
    train_time = time.time() - t_start
    print0(f"trained {step + 1 - start} steps in {train_time:.0f} s "
           f"({(step + 1 - start) / max(train_time, 1e-9):.1f} steps/s)")
    if filled_total:
        print0(f"{filled_total} instances had no hard negative: d- was the next instance's positive")
    if args.skip_bad_rows:
        print0(dataset.report())

    results = None
    if args.eval_data:
        results = run_eval(model, processor, args, eval_tasks)
    del ddp_model, opt, batches, loader          # DDP state first (teardown_distributed)
    teardown_distributed()
    return results


def run_eval(model, processor, args, tasks):
    """MMEB-style evaluation of the trained model (the demo: the synthetic eval split),
    by the same code path as real MMEB (evaluate.py)."""
    from evaluate import chance_table, discovered_task_table, format_table, mmeb_report, summarize
    out = os.path.join(args.out_dir, "eval")
    if rank_world()[0] == 0:
        shutil.rmtree(out, ignore_errors=True)           # results of these weights only
    if dist.is_initialized():
        dist.barrier()
    model.eval()
    table = discovered_task_table(args.eval_data, tasks, args.eval_task_table)
    with torch.no_grad():
        report = mmeb_report(model, processor, args.eval_data, args.eval_image_dir, table,
                             config=model_config(args), out_dir=out, progress=sys.stderr.isatty(),
                             match_queries=args.eval_match_queries if args.w_qdm > 0 else 0)
    results, matching = report["hit@1"], report.get("matching")
    chance = chance_table(args.eval_data, results)
    print0(format_table(results, table, chance=chance, matching=matching))
    done = {t: chance[t] for t in results if results[t] is not None}
    overall, overall_chance = (summarize(results, {t: table[t] for t in done})["Overall"]["mean"],
                               summarize(done, {t: table[t] for t in done})["Overall"]["mean"])
    out = {"hit_at_1": results, "chance": chance, "overall": overall, "overall_chance": overall_chance,
           "matching": matching}
    last = checkpoint_dirs(args.out_dir)
    if rank_world()[0] == 0 and last:                 # the final checkpoint's card gets the results
        with open(os.path.join(last[-1], "rematch_config.json")) as f:
            write_model_card(last[-1], json.load(f), out)
    return out

if __name__ == "__main__":
    main()
