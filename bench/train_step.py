"""
Benchmark of one training step (paper §3.2, Eq. 5; docs/readings.md §4) and of cached-gradient
micro-batching (train.py --chunk_size).

Table 1, step cost relative to contrastive only (forward + backward of one per-rank
batch of B instances, no optimizer step), side by side in one run:
  contrastive only       K = 0 (last token), Eq. 3 with hard negatives
  + tokens, Eq. 2        K = 16 learnable tokens, w_orth = 0.5
  + matching (feat)      + Eq. 4 over the 2 feature views (the lightweight alternative)
  + matching (all)       + Eq. 4 over all 8 views (ReMatch)
Table 2, peak memory of the full ReMatch step (all views) against the per-rank batch
B, without and with --chunk_size C: with chunks, activation memory is that of one chunk,
so it should stay flat as B grows (what grows is only the cached (B, d) embeddings).

    python bench/train_step.py                                  # B=8, 224² images (64 tokens)
    python bench/train_step.py --batches 8 16 32 64 --chunk_size 8
    python bench/train_step.py --reps 2 --batch 4 --batches 4 8 --chunk_size 4 --image_size 112   # smoke
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_args, fmt, make_item, peak_mib, print_config, print_table,  # noqa: E402
                    ratio, time_variants)
import train  # noqa: E402

VARIANTS = {  # name → train.py flags on top of the shared ones
    "contrastive only": ["--num_tokens", "0", "--w_orth", "0", "--w_qdm", "0"],
    "+ tokens, Eq. 2": ["--num_tokens", "16", "--w_qdm", "0"],
    "+ matching (feat)": ["--num_tokens", "16", "--match_views", "feat"],
    "+ matching (all)": ["--num_tokens", "16", "--match_views", "all"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training-step cost of each ReMatch component, and "
                                            "peak memory with and without cached-gradient chunks.")
    p.add_argument("--batch", type=int, default=8, help="instances (q, d+, d-) per step for table 1")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="per-rank batch sizes of the memory table (table 2)")
    p.add_argument("--chunk_size", type=int, default=8, help="chunk size of the memory table")
    return add_common_args(p, reps=3).parse_args(argv)


def build(args, flags):
    """(train args, model, processor) for the tiny backbone with images of ~image_size² px."""
    pixels = str(args.image_size ** 2)
    targs = train.parse_args(["--model", args.model, "--train_data", "-", "--image_dir", "-",
                              "--min_pixels", pixels, "--max_pixels", pixels, "--seed", str(args.seed),
                              "--dtype", args.dtype, "--no-lora", *flags])
    model, processor = train.build_model(targs, torch.device(args.device))
    return targs, model.train(), processor


def examples(processor, n, size):
    """n MMEB-like instances: image query, image positive, text hard negative."""
    return [{"q": make_item(processor, "query", i, size), "pos": make_item(processor, "doc_image", i, size),
             "neg": make_item(processor, "doc_text", i, size), "pos_id": 2 * i, "neg_id": 2 * i + 1,
             "index": i} for i in range(n)]


def step_fn(targs, model, processor, batch):
    def run():
        model.zero_grad(set_to_none=True)
        train.forward_backward(train.Step(model, processor.tokenizer, targs), batch, 0)
    return run


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print_config(args)

    # -- table 1: step cost per component ------------------------------------------------
    runs, batch = {}, None
    for name, flags in VARIANTS.items():
        targs, model, processor = build(args, flags)
        batch = batch or examples(processor, args.batch, args.image_size)
        runs[name] = step_fn(targs, model, processor, batch)
    times = time_variants(runs, args.reps, args.warmup, args.device)
    base = times["contrastive only"]
    print(f"\nTable 1: one training step, B={args.batch}, {args.image_size}² images "
          f"(median of {args.reps})")
    print_table(["step", "ms", "vs contrastive only"],
                [[n, fmt(1e3 * t), ratio(t, base)] for n, t in times.items()])

    # -- table 2: peak memory vs per-rank batch, with and without chunks ---------------------
    rows, first = [], {}
    for B in args.batches:
        row = [str(B)]
        for chunk in (None, args.chunk_size):
            flags = VARIANTS["+ matching (all)"] + (["--chunk_size", str(chunk)] if chunk else [])
            targs, model, processor = build(args, flags)
            mib = peak_mib(step_fn(targs, model, processor,
                                   examples(processor, B, args.image_size)), args.device)
            first.setdefault(chunk, mib)
            row += [fmt(mib), ratio(mib, first[chunk])]
        rows.append(row)
    print(f"\nTable 2: peak memory of one full ReMatch step (all views) above its start, "
          f"chunk size {args.chunk_size}")
    print_table(["B", "plain MiB", "plain vs first", "chunked MiB", "chunked vs first"], rows)


if __name__ == "__main__":
    main()
