"""
Embeddings from a merged ReMatch export (tools/export_merged.py) with plain transformers:
this file imports nothing from the rematch repository (tests/test_export.py runs it from
another directory and compares with ReMatch.embed).

    python plain_embed.py MERGED_DIR inputs.json out.pt
inputs.json: [{"text": "<|image_1|>\\nRepresent the given image.", "image": "cat.png",
               "side": "document"}, {"text": "a cat", "side": "query"}, ...]
out.pt: a (N, d) tensor of L2-normalised embeddings.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


def load(merged_dir):
    spec = json.load(open(os.path.join(merged_dir, "rematch_pooling.json")))
    tok = AutoTokenizer.from_pretrained(merged_dir)
    images = Qwen2VLImageProcessorPil.from_pretrained(merged_dir)      # the PIL one: no torchvision
    model = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    return spec, tok, images, model


@torch.no_grad()
def embed(spec, tok, images, model, text, image=None, side="query"):
    """One MMEB-style input ("<|image_1|>" where the image goes) → its embedding (d,)."""
    content, extra = text.replace(spec["image_placeholder"], spec["image_block"]), {}
    if image is not None:
        px = images(images=[image], return_tensors="pt")
        n = int(px["image_grid_thw"].prod()) // images.merge_size ** 2          # merged patches
        content = content.replace("<|image_pad|>", "<|image_pad|>" * n)
        extra = {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
    K, tokens = spec["num_tokens"], spec[f"{side}_tokens"]
    ids = tok(spec["prefix"] + content + spec["suffix"] + "".join(tokens),
              add_special_tokens=False, return_tensors="pt")
    ids["mm_token_type_ids"] = (ids["input_ids"] == model.config.image_token_id).long()   # M-RoPE
    h = model.model(**ids, **extra).last_hidden_state[0]                        # (T, d), final norm
    e = h[-K:].mean(0) if spec["pooling"] == "mean" else h[-1]                  # the K tokens: last K
    return F.normalize(e, dim=-1) if spec["normalize"] else e


if __name__ == "__main__":
    merged, inputs, out = sys.argv[1:4]
    spec, tok, images, model = load(merged)
    rows = json.load(open(inputs))
    E = [embed(spec, tok, images, model, r["text"],
               Image.open(r["image"]).convert("RGB") if r.get("image") else None, r["side"])
         for r in rows]
    torch.save(torch.stack(E), out)
