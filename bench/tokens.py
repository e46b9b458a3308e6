"""
What one training step pays for at paper scale: real tokens, computed tokens (padding
included) and decoder FLOPs of the step's embedding passes and matching pass, per
--chunk_size, for each way of forming chunks:

  index    chunks of consecutive instances in loader order (before length grouping)
  length   train.py's length-grouped chunks (the default under --chunk_size; same loss and
           gradients, tests/test_train.py): instances sorted by their token length first
  q / d    the same with other sort keys (query length only; longest document only), to
           show which key the default should use
  packed   what a padding-free pass computes: every item's own tokens, nothing else (the
           attention term with a block-diagonal causal kernel)

    python bench/tokens.py                                   # qwen2-vl-2b, the paper preset
    python bench/tokens.py --preset qwen3-vl-2b --chunk_sizes 16 32 64 128
    python bench/tokens.py --json runs/tokens.json

No model runs: token counts come from the project's own code on the real Qwen tokenizer
(data.collate_embed / collate_match row lengths, the real image processor's smart_resize
with the preset's max_pixels), FLOPs from bench/real_widths.flops (linear layers ∝ tokens,
attention ∝ pairs; the vision tower, which sees each image once in every mode, is left out).

The MMEB-like mix (an assumption, stated here because no MMEB file is on this machine):
per MMEB-train subset, what a query and a document hold — an image drawn from the source
dataset's typical native sizes (COCO 640×480 and its portrait/landscape variants, ImageNet
/ VOC ≈ 500×375, DocVQA scans 1700×2200 and larger, infographics up to 1000×5000, ChartQA
≈ 800×600, news photos ≈ 1024×683, NIGHTS 512², COCO region crops 80–300 px) and a text
length drawn uniformly from a range (instruction + question / caption / dialogue / label,
in Qwen tokens), read off the MMEB-train rows' formats (docs: MMEB's subsets table). A
global batch comes from one subset (train.py's homogeneous batches), so padding comes from
lengths varying inside a subset: dialogue lengths (VisDial), answers, image aspect ratios
and sizes under the 1280-token cap. Steps cycle through the 20 subsets, --steps_per_subset
each; every number is summed over those steps. Change the mix by editing MIX.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # noqa: E402

import train  # noqa: E402
from common import print_table  # noqa: E402
from data import EMBED_TEMPLATES, MATCH_PROMPTS, collate_match  # noqa: E402
from masks import VIEW_SETS  # noqa: E402
from real_widths import flops, real_tokenizer  # noqa: E402
from tools.width_real import ARCH  # noqa: E402

COCO = [(640, 480), (640, 427), (480, 640), (640, 512), (500, 375)]
IMAGENET = [(500, 375), (500, 333), (375, 500), (500, 500), (640, 480)]
NEWS = [(1024, 683), (800, 533), (1024, 576), (620, 413)]
DOCS = [(1700, 2200), (2550, 3300), (1000, 1300), (1240, 1754)]
INFOGRAPHICS = [(1000, 5000), (800, 3000), (1200, 2400), (1080, 1920)]
CHARTS = [(800, 600), (850, 600), (1000, 800), (700, 500)]
SCENES = [(800, 600), (1024, 768), (640, 480), (500, 400)]
CROPS = [(120, 90), (200, 150), (80, 160), (300, 250), (160, 120)]

# subset → (query: image sizes or None, text tokens (lo, hi)), (document: the same)
MIX = {
    "ImageNet_1K": ((IMAGENET, (8, 10)), (None, (8, 16))),
    "N24News": ((NEWS, (30, 90)), (None, (8, 12))),
    "HatefulMemes": (([(800, 600), (500, 500), (640, 800)], (10, 14)), (None, (8, 10))),
    "VOC2007": ((IMAGENET, (8, 10)), (None, (8, 12))),
    "SUN397": ((SCENES, (8, 10)), (None, (8, 16))),
    "OK-VQA": ((COCO, (18, 35)), (None, (10, 16))),
    "A-OKVQA": ((COCO, (18, 40)), (None, (10, 18))),
    "DocVQA": ((DOCS, (18, 40)), (None, (10, 30))),
    "InfographicsVQA": ((INFOGRAPHICS, (18, 45)), (None, (10, 25))),
    "ChartQA": ((CHARTS, (18, 45)), (None, (10, 16))),
    "Visual7W": ((COCO, (18, 35)), (None, (10, 25))),
    "VisDial": ((None, (60, 260)), (COCO, (6, 8))),
    "CIRR": (([(600, 400), (800, 600), (500, 700)], (20, 40)), ([(600, 400), (800, 600), (500, 700)], (6, 8))),
    "VisualNews_t2i": ((None, (20, 60)), (NEWS, (6, 8))),
    "VisualNews_i2t": ((NEWS, (10, 12)), (None, (20, 60))),
    "MSCOCO_t2i": ((None, (18, 30)), (COCO, (6, 8))),
    "MSCOCO_i2t": ((COCO, (10, 12)), (None, (16, 28))),
    "NIGHTS": (([(512, 512)], (12, 14)), ([(512, 512)], (8, 10))),
    "WebQA": ((None, (20, 45)), (SCENES, (20, 80))),
    "MSCOCO": ((COCO, (16, 24)), (CROPS, (6, 8))),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2-vl-2b", choices=sorted(k for k in train.PRESETS if k in ARCH))
    p.add_argument("--batch", type=int, default=128, help="instances per rank and step (§4: 128)")
    p.add_argument("--chunk_sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--steps_per_subset", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def image_tokens(size, px, max_pixels):
    """Merged tokens of a (w, h) image after the Qwen processor's smart_resize (min_pixels:
    the Qwen2-VL default of 4 merged tokens), px = pixels per merged token side."""
    w, h = size
    H, W = smart_resize(h, w, factor=px, min_pixels=4 * px * px, max_pixels=max_pixels)
    return (H // px) * (W // px)


def fake_item(text_tokens, img_tokens):
    """An encoded item of the right length only (data.encode_item's layout: text ids and,
    with an image, <|vision_start|> + pads + <|vision_end|>); enough for row lengths."""
    n = text_tokens + (img_tokens + 2 if img_tokens else 0)
    return {"ids": [0] * n, "pixel_values": None, "image_grid_thw": None, "n_img": img_tokens}


def draw_side(rng, spec, px, max_pixels):
    sizes, (lo, hi) = spec
    img = image_tokens(rng.choice(sizes), px, max_pixels) if sizes else 0
    return fake_item(rng.randint(lo, hi), img)


def step_items(rng, subset, B, px, max_pixels):
    q_spec, d_spec = MIX[subset]
    return ([draw_side(rng, q_spec, px, max_pixels) for _ in range(B)],
            [draw_side(rng, d_spec, px, max_pixels) for _ in range(B)],
            [draw_side(rng, d_spec, px, max_pixels) for _ in range(B)])


def cost(lengths, preset, padded):
    """(computed tokens, decoder FLOPs) of one pass over rows of these real lengths: padded
    to the longest (dense attention over the padded row, as SDPA with a padding mask), or
    packed (each item its own tokens; causal pairs only, an ideal block-diagonal kernel)."""
    if padded:
        T = max(lengths)
        f = flops(preset, T, T * T, 0)["dense"] * len(lengths)
        return T * len(lengths), f
    return sum(lengths), sum(flops(preset, L, L * (L + 1) // 2, 0)["sparse"] for L in lengths)


def main(argv=None):
    a = parse_args(argv)
    args = train.parse_args(["--preset", a.preset, "--train_data", "-", "--image_dir", "-"])
    vision = ARCH[a.preset]["vision_config"]
    px = vision["patch_size"] * vision["spatial_merge_size"]
    tok = real_tokenizer(ARCH[a.preset]["model_type"])
    prefix, suffix = (len(tok(s, add_special_tokens=False)["input_ids"]) for s in EMBED_TEMPLATES[args.embed_template])
    K = args.num_tokens
    embed_len = lambda it: prefix + len(it["ids"]) + suffix + K            # noqa: E731  collate_embed's row
    views = VIEW_SETS[args.match_views]

    def match_len(q, p, n):
        mb = collate_match([q], [p], [n], tok, views, [1], prompt=MATCH_PROMPTS[args.match_prompt])
        return int(mb["attention_mask"][0].sum())

    rng = random.Random(a.seed)
    steps = [(s, step_items(rng, s, a.batch, px, args.max_pixels)) for s in MIX for _ in range(a.steps_per_subset)]
    modes = ("index", "length", "q", "d")
    totals = {}                              # (chunk, mode, pass) → [real, computed, flops_padded, flops_packed]
    per_subset = {}
    for subset, (q, pos, neg) in steps:
        Lq, Lp, Ln = ([embed_len(it) for it in side] for side in (q, pos, neg))
        Lm = [match_len(*t) for t in zip(q, pos, neg)]                       # the paper preset: M = B
        for c in a.chunk_sizes:
            for mode in modes:
                order = list(range(a.batch)) if mode == "index" else \
                    train.length_grouped_order(Lq, Lp, Ln, n_match=a.batch, key="sum" if mode == "length" else mode)
                for lo in range(0, a.batch, c):
                    idx = order[lo:lo + c]
                    for name, group in (("embed", ([Lq[i] for i in idx], [Lp[i] for i in idx] + [Ln[i] for i in idx])),
                                        ("match", ([Lm[i] for i in idx],))):
                        t = totals.setdefault((c, mode, name), [0, 0, 0.0, 0.0])
                        s = per_subset.setdefault((subset, c, mode, name), [0, 0])
                        for rows in group:
                            real, f_packed = cost(rows, a.preset, padded=False)
                            computed, f_padded = cost(rows, a.preset, padded=True)
                            t[0] += real
                            t[1] += computed
                            t[2] += f_padded
                            t[3] += f_packed
                            s[0] += real
                            s[1] += computed

    print(f"bench/tokens.py: preset {a.preset} ({args.model}), {a.batch} instances per rank and step, "
          f"K={K}, views {args.match_views} (M = B), max_pixels {args.max_pixels} ({px} px per merged token), "
          f"{len(steps)} steps ({a.steps_per_subset} per subset), seed {a.seed}")
    rows = []
    for c in a.chunk_sizes:
        for mode in modes:
            e, m = totals[c, mode, "embed"], totals[c, mode, "match"]
            rows.append([str(c), mode, f"{e[0] / len(steps):,.0f}", f"{e[1] / len(steps):,.0f}", f"{e[1] / e[0]:.2f}",
                         f"{m[0] / len(steps):,.0f}", f"{m[1] / len(steps):,.0f}", f"{m[1] / m[0]:.2f}",
                         f"{(e[2] + m[2]) / len(steps) / 1e12:.1f}", f"{(e[3] + m[3]) / len(steps) / 1e12:.1f}"])
    print_table(["chunk", "chunks by", "embed real/step", "embed computed", "×", "match real/step",
                 "match computed", "×", "TFLOP/step padded", "TFLOP/step packed"], rows)
    c = max(a.chunk_sizes) if 32 not in a.chunk_sizes else 32
    print(f"\nPer subset at chunk {c}: computed / real tokens of the embedding passes (index → length)")
    print_table(["subset", "index", "length", "packed"],
                [[s, f"{per_subset[s, c, 'index', 'embed'][1] / per_subset[s, c, 'index', 'embed'][0]:.2f}",
                  f"{per_subset[s, c, 'length', 'embed'][1] / per_subset[s, c, 'length', 'embed'][0]:.2f}", "1.00"]
                 for s in MIX])
    out = {"preset": a.preset, "batch": a.batch, "steps": len(steps),
           "rows": [{"chunk_size": c, "mode": mode, "pass": name, "real_tokens": v[0], "computed_tokens": v[1],
                     "flops_padded": v[2], "flops_packed": v[3]} for (c, mode, name), v in totals.items()]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
