"""
Benchmark of the embedding cost of K learnable tokens (paper §3.2.1; §4.1: "at test time
ReMatch merely processes 16 additional tokens, incurring computational overhead
comparable to VLM2Vec").

ReMatch.embed on a batch of N items with K = 0 (last-token pooling, the VLM2Vec-style
baseline), 1, 4, 16, 64 learnable tokens appended, side by side in one run, at
MMEB-like lengths: query = an image of (image_size/28)² merged tokens + a ~30-token
instruction; document = a caption (text only) or an image with a short instruction.
Each kind runs on its own batch (as evaluate.py embeds one side per batch); the chat
template of §3.2.1 wraps every item. Times are medians of the full embedding call
(vision tower included, no grad), and of forward + backward of a scalar of E into
every weight (the training side), and the peak memory of the latter above its start
(bench/common.py). Ratios are relative to K = 0 of the same kind.

    python bench/embed.py                                 # N=8, 224² images (64 tokens)
    python bench/embed.py --image_size 448 --batch 16 --reps 10
    python bench/embed.py --reps 2 --batch 2 --num_tokens 0 16   # smoke run
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_args, fmt, make_item, peak_mib, print_config, print_table,  # noqa: E402
                    ratio, setup, time_variants)
from data import EMBED_TEMPLATES, collate_embed  # noqa: E402
from model import ReMatch  # noqa: E402

KINDS = ("query", "doc_text", "doc_image")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Embedding cost with K learnable tokens vs K=0.")
    p.add_argument("--batch", type=int, default=8, help="N items per embedding batch")
    p.add_argument("--num_tokens", type=int, nargs="+", default=[0, 1, 4, 16, 64],
                   help="values of K to compare (0 = last token; ratios are vs the first value)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="query = image + instruction (side q); doc_text / doc_image (side d)")
    p.add_argument("--embed_template", default="chat", choices=sorted(EMBED_TEMPLATES),
                   help="chat = MVQDM++ template (ReMatch), plain = the MMEB string alone")
    return add_common_args(p).parse_args(argv)


def content_tokens(items, image_token_id):
    """Mean image / other tokens per item's content (before the template and the K learnable tokens)."""
    n_img = sum(t == image_token_id for it in items for t in it["ids"]) / len(items)
    n_all = sum(len(it["ids"]) for it in items) / len(items)
    return f"{n_img:.0f} image + {n_all - n_img:.0f} text"


def main(argv=None):
    args = parse_args(argv)
    backbone, processor = setup(args)
    tok, N = processor.tokenizer, args.batch
    models = {K: ReMatch(backbone, num_tokens=K, embed_template=args.embed_template,
                         seed=args.seed).train() for K in args.num_tokens}   # one shared backbone
    items = {kind: [make_item(processor, kind, i, args.image_size) for i in range(N)] for kind in args.kinds}
    content = {kind: content_tokens(its, backbone.config.image_token_id) for kind, its in items.items()}
    print_config(args, content_tokens_per_item=content)

    batches = {(kind, K): collate_embed(items[kind], tok, K, args.embed_template)
               for kind in args.kinds for K in args.num_tokens}

    def fwd(kind, K):
        side = "q" if kind == "query" else "d"
        return torch.no_grad()(lambda: models[K].embed(batches[kind, K], side))

    def fwd_bwd(kind, K):
        side = "q" if kind == "query" else "d"

        def run():
            E, _ = models[K].embed(batches[kind, K], side)              # (N, d)
            E.float().pow(2).mean().backward()
            models[K].zero_grad(set_to_none=True)
        return run

    fns = {}
    for kind in args.kinds:
        for K in args.num_tokens:
            fns[kind, K, "fwd"] = fwd(kind, K)
            fns[kind, K, "fwd+bwd"] = fwd_bwd(kind, K)
    t = time_variants(fns, args.reps, args.warmup, args.device)
    mem = {k: peak_mib(fns[k], args.device) for k in fns if k[2] == "fwd+bwd"}   # after all timings

    K0 = args.num_tokens[0]
    tokens = {k: b["attention_mask"].sum().item() / N for k, b in batches.items()}   # per item
    header = ["kind", "K", "tokens/item", "tokens vs K0", "fwd ms", "fwd vs K0", "fwd+bwd ms",
              "fwd+bwd vs K0", "fwd+bwd peak MiB", "peak vs K0"]
    rows = [[kind, K, fmt(tokens[kind, K], ".0f"), ratio(tokens[kind, K], tokens[kind, K0], ".3f"),
             fmt(1e3 * t[kind, K, "fwd"]), ratio(t[kind, K, "fwd"], t[kind, K0, "fwd"]),
             fmt(1e3 * t[kind, K, "fwd+bwd"]), ratio(t[kind, K, "fwd+bwd"], t[kind, K0, "fwd+bwd"]),
             fmt(mem[kind, K, "fwd+bwd"]), ratio(mem[kind, K, "fwd+bwd"], mem[kind, K0, "fwd+bwd"])]
            for kind in args.kinds for K in args.num_tokens]
    print(f"\nmedian of {args.reps} (after {args.warmup} warm-up), N={N} items per batch, "
          f"ratios vs K={K0}")
    print_table(header, rows)
    return {"time": t, "tokens": tokens, "memory": mem}


if __name__ == "__main__":
    main()
