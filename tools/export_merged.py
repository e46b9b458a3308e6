"""
Export a trained ReMatch checkpoint as a standard Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory
that plain `transformers` can run, with none of this repository's code.

What changes against the training checkpoint:
  - the LoRA adapter (if any) is merged into the weights (peft merge_and_unload);
  - the 2·K learnable tokens (§3.2.1: L_q for queries, L_d for documents) become special
    tokens of the tokenizer, <|rematch_q_0|> … and <|rematch_d_0|> …, whose rows of the
    input-embedding table are L_q and L_d. Qwen's embedding tables have spare rows past
    the tokenizer (151936 rows for 151657 tokens), so the new ids usually fit; otherwise
    the table grows. With tied embeddings (Qwen2-VL-2B, Qwen2.5-VL-3B) the LM head's rows of
    those ids change too; nothing ever predicts them;
  - rematch_pooling.json says how to embed: the MMEB string with <|image_1|> replaced by
    the Qwen vision block, wrapped in the embedding template (prefix/suffix), followed by
    the K tokens of its side; the embedding is the mean of their last-layer (final-norm)
    hidden states, L2-normalised (K = 0: the last token's state).

    python tools/export_merged.py runs/demo/checkpoint-2000 runs/demo/merged

The plain-transformers snippet that uses the directory is in the README ("Merged export");
tests/test_export.py runs it against ReMatch.embed.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import EMBED_TEMPLATES, IMAGE_BLOCK, IMAGE_PLACEHOLDER  # noqa: E402
from model import load_rematch  # noqa: E402
from util.backbone import published_name  # noqa: E402

POOLING_FILE = "rematch_pooling.json"


def token_names(K):
    """The special tokens that carry L_q and L_d: (query tokens, document tokens)."""
    return [f"<|rematch_q_{k}|>" for k in range(K)], [f"<|rematch_d_{k}|>" for k in range(K)]


@torch.no_grad()
def export_merged(checkpoint, out_dir, dtype=torch.float32):
    """Write the merged checkpoint of `checkpoint` (a train.py checkpoint directory) to
    out_dir; returns the pooling description (also written as rematch_pooling.json)."""
    model, processor, config = load_rematch(checkpoint, device="cpu", dtype=dtype)
    backbone = model.backbone
    if model.peft is not None:                                 # peft: LoRA into the weights
        backbone = model.peft.merge_and_unload()
    tok, K = processor.tokenizer, model.num_tokens
    q_tokens, d_tokens = token_names(K)
    if K:
        tok.add_special_tokens({"additional_special_tokens": q_tokens + d_tokens},
                               replace_extra_special_tokens=False)
        ids = tok.convert_tokens_to_ids(q_tokens + d_tokens)
        emb = backbone.get_input_embeddings()
        if max(ids) >= emb.weight.shape[0]:
            backbone.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            emb = backbone.get_input_embeddings()
        emb.weight[ids] = torch.cat([model.L_q, model.L_d]).to(emb.weight.dtype)   # (2K, d)
    backbone.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    prefix, suffix = EMBED_TEMPLATES[model.embed_template]
    pooling = {
        "format": "rematch-merged-v1",
        "num_tokens": K,
        "query_tokens": q_tokens,
        "document_tokens": d_tokens,
        "prefix": prefix,
        "suffix": suffix,
        "image_placeholder": IMAGE_PLACEHOLDER,
        "image_block": IMAGE_BLOCK,
        "pooling": "mean" if K else "last",
        "normalize": True,
        "target_instructions": bool(config.get("target_instructions")),
        "base_model": published_name(config.get("model")),
        "source_checkpoint": published_name(str(checkpoint)),       # a name, not a local path
    }
    with open(os.path.join(out_dir, POOLING_FILE), "w") as f:
        json.dump(pooling, f, indent=2)
    return pooling


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a train.py checkpoint directory (checkpoint-N)")
    p.add_argument("out_dir", help="where to write the merged Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the written weights")
    a = p.parse_args(argv)
    if os.path.exists(a.out_dir) and os.listdir(a.out_dir):
        p.error(f"{a.out_dir} exists and is not empty: choose a new directory")
    pooling = export_merged(a.checkpoint, a.out_dir, getattr(torch, a.dtype))
    print(f"wrote {a.out_dir}: K={pooling['num_tokens']}, pooling={pooling['pooling']}, "
          f"tokens {pooling['query_tokens'][:1]}…/{pooling['document_tokens'][:1]}…")


if __name__ == "__main__":
    main()
