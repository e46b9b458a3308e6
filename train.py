"""
Training ReMatch (paper §3.2.4, Eq. 5; §4): a plain PyTorch loop launched by torchrun.

Each step, per rank (train_step): embed the B queries and their B positives + B hard
negatives (§3.2.1), Eq. 3 over the global batch + Eq. 2, the unified matching pass over
the instances (Eq. 4, Fig. 3), combined by Eq. 5, one AdamW step. train_step_chunked
computes the same gradients a chunk at a time (cached gradients, --chunk_size).

CPU demo (the default without data): writes the built-in synthetic benchmark, trains
the tiny offline model, evaluates it and prints Hit@1 next to chance:
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

Checkpoints, resume and log.jsonl are util/run.py's; torchrun set-up util/dist.py's.
Tests: pytest tests/test_train.py
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from data import MATCH_PROMPTS, MMEB_TRAIN_SUBSETS, collate_embed, collate_match, pos_slot_of
from losses import (at_least_fp32, info_nce, matching_loss, orthogonality_loss, rank_world,
                    total_loss)
from masks import VIEW_SETS
from model import ReMatch, apply_lora
from util.backbone import TINY_NAMES, load_backbone, pretrained_build, pretrained_data_seed, write_model_card
from util.dist import DIST_TIMEOUT_MINUTES, peak_tflops, print0, setup_distributed, teardown_distributed
from util.run import (append_log, checkpoint_dirs, cut_log, last_intact, load_checkpoint, read_log,
                      run_config, save_checkpoint, start_run, subset_summary)
from util.inputs import check_train_flags
from util.speed import ATTENTION, set_attention

# ----------------------------------------------------------------------------------
# One training step (Eq. 2–5)

@dataclasses.dataclass
class Step:
    """What a training step needs besides its examples and its number: the model, the
    module to call (DDP(model) under torchrun; the model itself by default), the
    tokenizer, the run's arguments and the autocast context (bf16 on CUDA)."""
    model: torch.nn.Module
    tok: object
    args: argparse.Namespace
    ddp_model: torch.nn.Module = None
    autocast: object = dataclasses.field(default_factory=contextlib.nullcontext)

    def __post_init__(self):
        if self.ddp_model is None:
            self.ddp_model = self.model


def train_step(run, examples, step):
    """One step's forward and losses (Eq. 2–5) on this rank's B examples (run: Step).
    Returns (loss, logged terms, filled)."""
    B, args = len(examples), run.args
    inst = step_instances(examples, args, step)
    out = run.ddp_model(*collate_step(inst, run.tok, args), n_pos=B)
    E_pos, E_neg = out["E_d"][:B], out["E_d"][B:]                            # (B, d) each
    l_cl = info_nce(out["E_q"], E_pos, E_neg, args.tau, *doc_ids(inst, args, E_pos.device))  # Eq. 3
    l_orth, l_qdm, correct, answers = local_terms(out, args)                 # Eq. 2, Eq. 4
    loss = total_loss(l_cl, l_orth, l_qdm, args.w_orth, args.w_qdm)          # Eq. 5
    return loss, log_terms(l_cl, l_orth, l_qdm, correct, answers, args), inst.filled


def forward_backward(run, examples, step):
    """The step's forward and backward, plain or with cached-gradient chunks; → (terms, filled)."""
    if run.args.chunk_size and run.args.chunk_size < len(examples):
        return train_step_chunked(run, examples, step)
    with run.autocast:
        loss, terms, filled = train_step(run, examples, step)
    loss.backward()
    return terms, filled


def train_step_chunked(run, examples, step):
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
    Chunks are cut from the instances in length_grouped_order (--length_grouped_chunks):
    E is put back in step order before Eq. 3, and g taken back to chunk order after it.
    Does the backward itself; returns (logged terms, filled) like train_step.
    """
    model, ddp_model, tok, args, autocast = run.model, run.ddp_model, run.tok, run.args, run.autocast
    B, c, device = len(examples), args.chunk_size, model.device
    inst = step_instances(examples, args, step)
    order = list(range(B))
    if args.length_grouped_chunks:                       # fewer padded tokens, the same loss
        order = length_grouped_order(*([len(it["ids"]) for it in side] for side in (inst.q, inst.pos, inst.neg)),
                                     n_match=inst.n_match)
    grouped = inst.reorder(order)
    chunks = [grouped.chunk(a, min(a + c, B)) for a in range(0, B, c)]
    back = torch.argsort(torch.tensor(order, device=device))                 # grouped → step order

    states, E_q, E_pos, E_neg = [], [], [], []
    with torch.no_grad(), autocast:                                           # phase 1
        for ch in chunks:
            states.append(_rng_state(device))
            q, d, _ = collate_step(dataclasses.replace(ch, pos_slot=[]), tok, args)
            E_q.append(model.embed(q, "q")[0])
            E_d = model.embed(d, "d")[0]                                      # (2c, d)
            E_pos.append(E_d[:len(ch.q)])
            E_neg.append(E_d[len(ch.q):])
    E_q, E_pos, E_neg = (at_least_fp32(torch.cat(E))[back].requires_grad_()
                         for E in (E_q, E_pos, E_neg))                        # (B, d), step order
    l_cl = info_nce(E_q, E_pos, E_neg, args.tau, *doc_ids(inst, args, device))  # Eq. 3
    l_cl.backward()                                       # g = ∂L_cl/∂E, gathered over ranks
    at = torch.tensor(order, device=device)                                  # step → grouped order
    g_q, g_d = E_q.grad[at], torch.stack([E_pos.grad[at], E_neg.grad[at]])   # (B, d), (2, B, d)

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
                share = qdm_j * ch.n_match / grouped.n_match
                part = part + args.w_qdm * share
                l_qdm += share.detach()
                correct += correct_j
            part.backward()
    answers = inst.n_match * len(VIEW_SETS[args.match_views])
    return log_terms(l_cl, l_orth, l_qdm, correct, answers, args), inst.filled


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


# ----------------------------------------------------------------------------------
# The step's instances (q, d⁺, d⁻) and its loss terms

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

    def reorder(self, order):
        """The instances in `order` (a permutation that keeps the M matching ones first, as
        length_grouped_order does), each with its own slot."""
        M = self.n_match
        if sorted(order[:M]) != list(range(M)):
            raise ValueError("a reordering must keep the matching instances first")
        pick = lambda xs: [xs[i] for i in order]                            # noqa: E731
        return Instances(pick(self.q), pick(self.pos), pick(self.neg), pick(self.pos_ids),
                         pick(self.neg_ids), [self.pos_slot[i] for i in order[:M]], self.filled)


def length_grouped_order(len_q, len_pos, len_neg, n_match, key="sum"):
    """
    The order in which train_step_chunked cuts a step's instances into chunks
    (--length_grouped_chunks, the default): each chunk's passes pad to their longest item,
    so instances of similar length go together. The M matching instances come first (chunk
    0 must hold some: it runs last, alone synchronises DDP, and every parameter, the
    projector's too, must get its gradient there), then the others; each group is sorted
    by token length, longest first (the largest chunk runs first: a chunk size that does
    not fit fails at once), ties in step order. key: "sum" = q + d⁺ + d⁻ (the default:
    also the matching row's length), "q" = the query's, "d" = the longer document's
    (bench/tokens.py compares them). Which instances share a chunk changes nothing in the
    loss: Eq. 3 is computed on the whole batch, Eq. 2 and Eq. 4 are means over items.
    """
    keys = {"sum": lambda i: len_q[i] + len_pos[i] + len_neg[i], "q": lambda i: len_q[i],
            "d": lambda i: max(len_pos[i], len_neg[i])}[key]
    B = len(len_q)
    return (sorted(range(n_match), key=lambda i: -keys(i))
            + sorted(range(n_match, B), key=lambda i: -keys(i)))


def step_instances(examples, args, step):
    """This rank's Instances: the items, document ids, and d⁺'s slot for the M instances
    that enter matching (seeded per (step, row), whatever rank or chunk the row lands on)."""
    neg, neg_ids, filled = fill_negatives(
        examples if args.hard_negative else [dict(ex, neg=None) for ex in examples])
    M = min(args.match_instances or len(examples), len(examples)) if args.w_qdm > 0 else 0
    pos_slot = [pos_slot_of(args.seed, step, ex["index"]) for ex in examples[:M]]
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
# Model, schedule

def build_model(args, device):
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    backbone, processor = load_backbone(args.model, device=device, dtype=dtype, seed=args.seed,
                                        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                        revision=args.model_revision)
    if args.lora:
        backbone = apply_lora(backbone, args.lora_r, args.lora_alpha, args.lora_dropout)
    model = ReMatch(backbone, args.num_tokens, args.embed_template, seed=args.seed)
    set_attention(model, args.attn, training=True, pack=args.pack)
    if args.w_qdm == 0:                        # no matching: projector and LM head get no gradient
        model.projector.requires_grad_(False)
        model.backbone.lm_head.requires_grad_(False)
    if args.grad_checkpointing:                # non-reentrant: safe with DDP and several forwards
        hf = model.backbone
        if hasattr(hf, "activation_checkpointing_enable"):                    # transformers ≥ 5.x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), processor


def seed_everything(seed):
    """Python's, numpy's and torch's global RNGs (CPU and CUDA) from one seed: what they
    draw (dropout masks) repeats from run to run. Model init, data order and d⁺'s slot have
    their own seeded generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                   # seeds every CUDA device too


def uses_autocast(args, device):
    """bf16 autocast on CUDA unless --dtype asks for full precision (float32 / float64)."""
    return device.type == "cuda" and args.dtype in ("auto", "bfloat16")


def lr_at(step, args):
    """Linear warm-up to args.lr, then cosine decay to 0 over the remaining steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------
# The run

def main(argv=None, args=None, after_eval=None):
    """The run. Hooks of the extensions: `args` parsed by an extended parser (parse_args),
    `after_eval` a function (model, processor, args, eval_dir, results) → {key: results}
    called after the evaluation (tools/mmeb_v2.py train)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    args = args or parse_args(argv)
    ddp, rank, world, device = setup_distributed(timeout_minutes=args.dist_timeout_minutes)
    master = rank == 0
    seed_everything(args.seed + rank)                 # dropout masks differ per rank, repeat per run
    source, state = start_run(args, world, master, ddp,    # before building anything (util/run.py)
                              defaults=vars(build_parser().parse_args([])))
    eval_tasks, task_meta, match_apart = args.eval_tasks, None, ()
    if args.train_data is None:                  # the built-in synthetic benchmark (demo/)
        eval_tasks, task_meta, match_apart = demo_data(args, master, ddp)

    model, processor = build_model(args, device)
    tok = processor.tokenizer
    dataset = build_dataset(args, processor, task_meta, master)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all tensors (CPU and CUDA)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                            fused=True)
    start = 0
    if source:
        start = load_checkpoint(source, model, opt, state)
        if master:
            cut_log(args.out_dir, start)                 # steps after the checkpoint run again
        print0(f"resumed from {source} at step {start}")
    if start >= args.steps:                           # a finished run resumed: no step, no eval
        print0(f"{source} is at step {start} of --steps {args.steps}: nothing to train")
        teardown_distributed()
        return None
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=args.find_unused_parameters) if ddp else model
    loader = build_loader(args, dataset, world, rank, start, device)
    print0(f"{args.model} ({'LoRA' if args.lora else 'full'}; {sum(p.numel() for p in params):,} "
           f"trainable) | {len(dataset):,} rows | global batch {world} × {args.batch_size} = "
           f"{world * args.batch_size} | lr {args.lr:g} | K={args.num_tokens} | tau={args.tau:g} | "
           f"w_orth={args.w_orth:g} w_qdm={args.w_qdm:g} views={args.match_views} | "
           f"{device.type} × {world}")

    bar = tqdm(total=args.steps, initial=start, dynamic_ncols=True,   # no bar in log files
               disable=not master or not sys.stderr.isatty())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_autocast(args, device))
    run = Step(model, tok, args, ddp_model, autocast)
    batches, t_start, filled_total, step = iter(loader), time.time(), 0, start
    peak, n_params, tokens_before = peak_tflops(device, args.peak_tflops), sum(p.numel() for p in model.parameters()), 0
    model.train()
    for step in range(start, args.steps):
        t0 = time.time()
        examples = next(batches)
        dataset.record_skipped(examples)
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        terms, filled = forward_backward(run, examples, step)
        filled_total += filled
        stats = all_ranks_finite(terms, step, args.out_dir, world)          # (5,) mean over ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if not math.isfinite(float(grad_norm)):  # DDP: gradients are all-reduced, every rank sees it
            last = last_intact(args.out_dir)
            raise FloatingPointError(
                f"step {step}: finite loss ({stats[0].item():.4g}) but non-finite gradient norm "
                f"({float(grad_norm)}); stopping before the optimizer step, so no NaN reaches the "
                f"weights. Last checkpoint: {last} (intact).")
        opt.step()

        dt = time.time() - t0
        tokens = world * (model.tokens_processed - tokens_before)   # decoder tokens, all ranks
        tokens_before = model.tokens_processed
        record = {"step": step + 1, **({"subset": examples[0]["subset"]} if args.homogeneous_batches else {}),
                  **{k: round(v, 6) for k, v in zip(terms, stats.tolist())},
                  "lr": lr, "grad_norm": round(float(grad_norm), 4),
                  "samples_per_s": round(world * len(examples) / dt, 2),
                  "tokens_per_s": round(tokens / dt)}
        if peak:   # MFU ≈ 6·N·tokens/s / peak (forward + backward; frozen LoRA weights make it an upper bound)
            record["mfu"] = round(6 * n_params * tokens / dt / (world * peak * 1e12), 4)
        if master:
            append_log(args.out_dir, record)
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
                path = save_checkpoint(model, processor, opt, step + 1, run_config(args, world),
                                       args.out_dir, args.keep_checkpoints)
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
    summary = subset_summary(read_log(args.out_dir)) if master and step + 1 > start else ""
    if summary:                                             # which subsets the head learns
        print0(summary)
    if filled_total:
        print0(f"{filled_total} instances had no hard negative: d- was the next instance's positive")
    if args.skip_bad_rows:
        dataset.gather_skipped(world)
        print0(dataset.report())

    results = None
    if args.eval_data:
        results = run_eval(model, processor, args, eval_tasks, step + 1, match_apart, after_eval)
    del ddp_model, run, opt, batches, loader      # DDP state first (teardown_distributed)
    teardown_distributed()
    return results


def demo_data(args, master, ddp):
    """Write the built-in synthetic benchmark into <out_dir>/demo_data (rank 0; once) and
    point --train_data / --image_dir (and, unless given, --eval_data) at it.
    Returns (eval tasks, the demo's task → meta-task table, its binding tasks: their
    matching accuracy is reported apart)."""
    from demo import DEMO_BINDING_TASKS, DEMO_EVAL_TASKS, DEMO_META, make_synthetic
    seed = args.seed if args.data_seed is None else args.data_seed      # parse_args checked it
    root = os.path.join(args.out_dir, "demo_data")
    if master:
        t0 = time.time()
        make_synthetic(root, seed=seed)
        print0(f"synthetic benchmark in {root} ({time.time() - t0:.1f} s)")
    if ddp:
        dist.barrier()
    paths = make_synthetic(root, seed=seed)               # already there: returns paths
    args.train_data, args.image_dir = paths["train"], paths["image_dir"]
    eval_tasks = args.eval_tasks
    if args.eval_data is None:
        args.eval_data, args.eval_image_dir = paths["eval"], paths["image_dir"]
        eval_tasks = eval_tasks or DEMO_EVAL_TASKS
    return eval_tasks, DEMO_META, DEMO_BINDING_TASKS


def build_dataset(args, processor, task_meta, master):
    """The training rows (data.TrainDataset), with the flags' checks and policies."""
    from data import TrainDataset
    dataset = TrainDataset(args.train_data, args.image_dir, processor, subsets=args.subsets,
                           split=args.split, max_rows_per_subset=args.max_rows_per_subset,
                           target_instructions=args.target_instructions,
                           skip_bad_rows=args.skip_bad_rows, cache_items=args.cache_items,
                           task_meta=task_meta, max_text_tokens=args.max_text_tokens,
                           allow_outside_image_dir=args.allow_outside_image_dir,
                           target_prompts=args.target_prompt_table, revision=args.data_revision)
    if dataset.no_target_prompt:
        print0(f"no target prompt for subset(s) {', '.join(dataset.no_target_prompt)}: they train "
               "without one (give them one with --target_prompts FILE.json)")
    if args.check_images:
        n = dataset.check_images(progress=master and sys.stderr.isatty())
        print0(f"checked {n:,} images")
    return dataset


def build_loader(args, dataset, world, rank, start, device):
    """Global batches of one subset, this rank's slice, resumed at step `start`."""
    from torch.utils.data import DataLoader

    from data import TrainBatchSampler
    sampler = TrainBatchSampler(dataset, args.batch_size, world, rank, args.seed,
                                homogeneous=args.homogeneous_batches, start_step=start)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=list,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=args.num_workers > 0)


def all_ranks_finite(terms, step, out_dir, world):
    """The logged terms averaged over ranks, (5,) fp32; every rank stops together with a
    FloatingPointError naming the intact last checkpoint when any rank's loss is not finite."""
    stats = torch.stack(list(terms.values())).float()                    # (5,) this rank
    finite = torch.isfinite(terms["loss"]).float()[None]
    if world > 1:
        dist.all_reduce(stats)
        stats /= world
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0:
        last = last_intact(out_dir)
        raise FloatingPointError(
            f"step {step}: non-finite loss on some rank (this rank: "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            + f"); stopping. Last checkpoint: {last} (intact).")
    return stats


def run_eval(model, processor, args, tasks, step, match_apart=(), after_eval=None):
    """MMEB-style evaluation of the trained model (the demo: the synthetic eval split),
    by the same code path as real MMEB (evaluate.py); match_apart: tasks whose matching
    accuracy is averaged apart (the demo's binding tasks). Results go to a fresh folder,
    <out_dir>/eval/step-<step> (-2, -3, ... when a rerun reaches the same step): earlier
    results are never deleted (only --overwrite clears eval/)."""
    from evaluate import chance_table, discovered_task_table, format_table, mmeb_report, summarize
    from tools.rerank import MatchingAccuracy, matching_means     # the matching head after training
    out = base = os.path.join(args.out_dir, "eval", f"step-{step}")
    for k in itertools.count(2):                         # the same on every rank: decided first
        if not os.path.exists(out):
            break
        out = f"{base}-{k}"
    if dist.is_initialized():
        dist.barrier()
    model.eval()
    eval_dir = out
    table = discovered_task_table(args.eval_data, tasks, args.eval_task_table)
    extras = [MatchingAccuracy(run_config(args), args.eval_match_queries, apart=match_apart)] \
        if args.eval_match_queries and args.w_qdm > 0 else []
    with torch.no_grad():
        report = mmeb_report(model, processor, args.eval_data, args.eval_image_dir, table,
                             config=run_config(args), out_dir=out, progress=sys.stderr.isatty(),
                             extras=extras, allow_outside_image_dir=args.allow_outside_image_dir)
    results, matching = report["hit@1"], report.get("matching")
    chance = chance_table(args.eval_data, results)
    print0(format_table(results, table, chance=chance, extras=[(x, matching) for x in extras]))
    done = {t: chance[t] for t in results if results[t] is not None}
    overall, overall_chance = (summarize(results, {t: table[t] for t in done})["Overall"]["mean"],
                               summarize(done, {t: table[t] for t in done})["Overall"]["mean"])
    out = {"hit_at_1": results, "chance": chance, "overall": overall, "overall_chance": overall_chance,
           "matching": matching}
    if matching:                                      # {view type: mean}, the apart tasks apart
        out["matching_mean"] = matching_means(matching, [t for t in matching if t not in match_apart])
        out["matching_mean_apart"] = matching_means(matching, [t for t in matching if t in match_apart])
    if after_eval:                                    # an extension's evaluation (main's hook)
        out.update(after_eval(model, processor, args, eval_dir, results))
    last = checkpoint_dirs(args.out_dir)
    if rank_world()[0] == 0 and last:                 # the final checkpoint's card gets the results
        with open(os.path.join(last[-1], "rematch_config.json")) as f:
            write_model_card(last[-1], json.load(f), out)
    return out


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
    # the paper's recipe on Qwen3-VL (no published ReMatch number exists for it): a merged
    # image token is 32 × 32 px there (16-px patches), so the same 1280-token cap is
    # 1280 · 32² pixels; DeepStack, interleaved M-RoPE and geometry are the code's concern
    "qwen3-vl-2b": dict(PAPER, model="Qwen/Qwen3-VL-2B-Instruct", max_pixels=1280 * 32 * 32),
    "qwen3-vl-4b": dict(PAPER, model="Qwen/Qwen3-VL-4B-Instruct", max_pixels=1280 * 32 * 32),
    "qwen3-vl-8b": dict(PAPER, model="Qwen/Qwen3-VL-8B-Instruct", max_pixels=1280 * 32 * 32),
    # calibrated on 2 CPU cores (docs/demo.md §1): full fine-tuning of the random
    # tiny model needs a larger lr and temperature than LoRA on a pretrained one, and its
    # matching head learns within the demo's minutes only with a short P (the bare user
    # header) and more weight and instances than the paper's (docs/demo.md §3); 2000 steps
    # because its raw views learn near misses late (docs/demo.md §3.7)
    "demo": dict(model="tiny-qwen2-vl", steps=2000, batch_size=32, lr=1e-3, warmup_steps=20,
                 tau=0.05, num_tokens=4, weight_decay=0.01, lora=False, log_every=100,
                 save_every=500, num_workers=0, cache_items=100_000, match_instances=16,
                 w_qdm=0.5, match_prompt="header", eval_match_queries=150),
}


def build_parser():
    """train.py's flags, with their defaults before any preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for a paper model or the CPU demo "
                   "(default: demo when no --train_data is given)")
    # model
    p.add_argument("--model", default="tiny-qwen2-vl", help="hub id or local dir of Qwen2-VL / Qwen2.5-VL / Qwen3-VL, "
                   "or tiny-qwen2-vl / tiny-qwen2.5-vl / tiny-qwen3-vl (random init), tiny-qwen2-vl-chat (taught to "
                   "speak about the demo's TRAIN images: demo/pretrain.py, built once)")
    p.add_argument("--model_revision", default=None, help="hub ids: the commit, branch or tag of --model to "
                   "download (recorded: loading the checkpoint later pins its base model to it); "
                   "tiny-qwen2-vl-chat: its build, set by the code")
    p.add_argument("--num_tokens", type=int, default=16,
                   help="K learnable tokens per side (§3.2.1); 0 = last-token pooling (baseline)")
    p.add_argument("--embed_template", choices=("chat", "plain"), default="chat",
                   help="chat = MVQDM++ embedding template (default); plain = VLM2Vec layout")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None, help="LoRA on the language model "
                   "(default: on for pretrained, off = full training for the tiny random models)")
    p.add_argument("--lora_r", type=int, default=32, help="LoRA rank (§4: 32)")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha (§4: 64)")
    p.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--min_pixels", type=int, default=None, help="image processor min pixels")
    p.add_argument("--max_pixels", type=int, default=None, help="image processor max pixels")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float64"), default="auto",
                   help="backbone weights: auto = bf16 on CUDA, fp32 on CPU (float64: exact checks); "
                        "bf16 autocast on CUDA with auto / bfloat16 only")
    p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="non-reentrant activation checkpointing of the decoder (and vision) layers")
    p.add_argument("--attn", choices=ATTENTION, default="sdpa", help="attention of the unified matching pass: sdpa = "
                   "the dense additive mask (default; the oracle), flex = FlexAttention's block mask, which skips the "
                   "empty blocks (CUDA: no CPU backward in torch; bench/matching.py)")
    # data
    p.add_argument("--train_data", default=None, help="MMEB-train (hub id or dir of <Subset>/original-*.parquet) or "
                   "mmE5 hard-negative files; default: the built-in synthetic benchmark")
    p.add_argument("--image_dir", default=None, help="root the rows' image paths are relative to")
    p.add_argument("--data_revision", default=None,
                   help="hub ids only: the commit, branch or tag of --train_data (recorded in the checkpoint)")
    p.add_argument("--subsets", nargs="+", default=None, help="training subsets (default: all)")
    p.add_argument("--split", default="original", help="MMEB-train split (original | diverse_instruction)")
    p.add_argument("--max_rows_per_subset", type=int, default=None, help="cap rows per subset (head)")
    p.add_argument("--target_prompts", default=None, help="JSON {subset, task or meta-task: prompt}: target prompts "
                   "for your own subsets (or to replace MMEB's); a subset with none trains without one")
    p.add_argument("--target_instructions", action=argparse.BooleanOptionalAction, default=True,
                   help="prepend the per-subset target prompt to text documents (Table 3 row 2)")
    p.add_argument("--hard_negative", action=argparse.BooleanOptionalAction, default=True,
                   help="use each row's explicit hard negative (Table 3 row 3); without it, and "
                        "for rows that have none, d- is the next instance's positive")
    p.add_argument("--homogeneous_batches", action=argparse.BooleanOptionalAction, default=True,
                   help="each global batch from one subset (in-batch negatives of one task)")
    p.add_argument("--skip_bad_rows", action="store_true", help="drop rows with missing/corrupt images or no content, "
                   "count and report them (default: stop with an error naming the row)")
    p.add_argument("--check_images", action="store_true", help="decode every training image before the first step (a "
                   "progress bar), so a corrupt file stops the run (or, with --skip_bad_rows, is counted) at once, not "
                   "when its batch comes")
    p.add_argument("--max_text_tokens", type=int, default=1024, help="longest text (tokens, image tokens not counted) "
                   "of a query or document; a longer one is an error naming its row (or skipped with --skip_bad_rows)")
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
    p.add_argument("--match_prompt", choices=sorted(MATCH_PROMPTS), default="paper", help="segment P of the matching "
                   "rows: paper = system prompt + App. S7's instruction (default); header = the bare user header, for "
                   "tiny random models whose near-uniform attention the long prompt dilutes (docs/demo.md §3)")
    p.add_argument("--match_instances", type=int, default=None,
                   help="instances per rank entering the matching pass (default: all B)")
    p.add_argument("--mask_duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="leave documents identical to a query's positive out of its Eq. 3 "
                        "denominator (docs/readings.md §2); --no-mask_duplicates = Eq. 3 literally")
    # optimisation
    p.add_argument("--steps", type=int, default=2500, help="optimiser steps (§4: 2500)")
    p.add_argument("--batch_size", type=int, default=128, help="queries per rank per step (§4: 128 × 8)")
    p.add_argument("--pack", action="store_true", help="padding-free embedding passes: each pass's items in one row "
                   "under a block-diagonal causal FlexAttention mask (same embeddings; CUDA training only; default "
                   "off: the padded SDPA passes)")
    p.add_argument("--length_grouped_chunks", action=argparse.BooleanOptionalAction, default=True,
                   help="with --chunk_size: chunks of instances of similar token length (less "
                        "padding; the same loss and gradients; default on)")
    p.add_argument("--chunk_size", type=int, default=None, help="cached-gradient micro-batching: embed and "
                   "backpropagate this many instances at a time (same gradients, memory of one chunk); default off")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (§4: 1e-4)")
    p.add_argument("--warmup_steps", type=int, default=100, help="linear warm-up steps, then cosine decay")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed (model init, data order, slot placement)")
    p.add_argument("--data_seed", type=int, default=None,
                   help="the demo's synthetic benchmark's seed (default: --seed; tiny-qwen2-vl-chat: 0)")
    # run
    p.add_argument("--out_dir", default="runs/demo", help="checkpoints, log.jsonl, eval results")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in out_dir (an error if there is none)")
    p.add_argument("--resume_if_exists", action="store_true", help="continue from the latest checkpoint in out_dir if "
                   "there is one, else start afresh (for job scripts that are restarted)")
    p.add_argument("--resume_from", default=None, help="continue from this checkpoint folder (a path, or the hub id of "
                   "a checkpoint folder: downloaded once, rank 0 first) into an --out_dir without checkpoints")
    p.add_argument("--resume_revision", default=None,
                   help="with a hub id as --resume_from: the commit, branch or tag to download")
    p.add_argument("--allow_changed", nargs="+", default=None, metavar="FLAG", help="resume although these flags "
                   "(names without --) differ from the checkpoint's; without it any such difference stops the run")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that holds checkpoints, "
                   "deleting them (without it such a run stops, so no checkpoint is lost by accident)")
    p.add_argument("--save_every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    p.add_argument("--log_every", type=int, default=1, help="print a log line every N steps (log.jsonl: every step)")
    p.add_argument("--eval_data", default=None,
                   help="MMEB-eval dir/hub id to evaluate after training (demo: the synthetic eval split)")
    p.add_argument("--eval_image_dir", default=None, help="image root of --eval_data")
    p.add_argument("--eval_tasks", nargs="+", default=None, help="tasks to evaluate (default: every task folder of a "
                   "local --eval_data; MMEB's 36 for a hub id)")
    p.add_argument("--eval_task_table", default=None, help="JSON {task: [meta_task, is_ind]} for tasks outside MMEB's "
                   "table (their category and IND/OOD means); without it they count as 'Other', IND")
    p.add_argument("--eval_match_queries", type=int, default=0, help="after training, also report the matching head's "
                   "held-out Yes/No accuracy per view type on the first N queries of each eval task (0 = off; only "
                   "when trained with matching)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop (and checkpoint) after this much training time")
    p.add_argument("--stop_after_steps", type=int, default=None, help="stop (and checkpoint) after this many steps in "
                   "this run, e.g. to fit a job time limit; continue later with --resume (the schedule stays --steps)")
    p.add_argument("--peak_tflops", type=float, default=None, help="accelerator peak TFLOP/s for the MFU estimate in "
                   "the logs (CUDA only; default: from the GPU name for A100/H100/H200/H800/L40S, else no MFU)")
    p.add_argument("--dist_timeout_minutes", type=float, default=DIST_TIMEOUT_MINUTES,
                   help="torchrun: how long a collective waits for the other ranks (rank 0 alone "
                        "downloads a hub checkpoint or saves one meanwhile; default "
                        f"{DIST_TIMEOUT_MINUTES}, NCCL's own is 10)")
    p.add_argument("--find_unused_parameters", action="store_true",
                   help="DDP find_unused_parameters (needed when some trainable weights get no "
                        "gradient in a step, e.g. a fully trained vision tower on text-only batches)")
    return p


def parse_args(argv=None, parser=None):
    """Parse and check train.py's flags (`parser`: build_parser's, possibly extended)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    preset = args.preset or ("demo" if args.train_data is None else None)
    if preset:                                     # preset values, unless given explicitly
        p.set_defaults(**PRESETS[preset])
        args = p.parse_args(argv)
        args.preset = preset
    if args.lora is None:
        args.lora = args.model not in TINY_NAMES
    seed, pretrained_on = args.seed if args.data_seed is None else args.data_seed, pretrained_data_seed(args.model)
    if args.train_data is None and pretrained_on is not None and seed != pretrained_on:   # the demo's benchmark
        p.error(f"--model {args.model} was pretrained on the TRAIN split of the synthetic benchmark with seed "
                f"{pretrained_on}; the benchmark with seed {seed} holds out other pairs, some of which it has "
                f"seen: pass --data_seed {pretrained_on}")
    build = pretrained_build(args.model)
    if build is not None:                      # recorded: a LoRA checkpoint names the weights it sits on
        if args.model_revision not in (None, build):
            p.error(f"--model_revision {args.model_revision}: this code builds {args.model} {build} only")
        args.model_revision = build
    check_train_flags(args, p.error)           # util/inputs.py: ranges, rules, the files flags name
    return args


if __name__ == "__main__":
    main()
