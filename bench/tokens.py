"""
What one training step pays for at paper scale: real tokens, computed tokens (padding
included) and decoder FLOPs of the step's embedding passes and matching pass, per
--chunk_size, for each way of forming chunks:

  index    chunks of consecutive instances in loader order (before length grouping)
  length   train.py's length-grouped chunks (the default under --chunk_size; same loss and
           gradients, tests/test_train.py): instances sorted by their token length first
  q / d    the same with other sort keys (query length only; longest document only), to
           show which key the default should use
  packed   train.py --pack (length-grouped chunks, padding-free embedding passes: every
           item's own tokens, attention within each item only); the matching pass stays
           padded to its chunk's longest row, as --pack leaves it

    python bench/tokens.py                                   # qwen2-vl-2b, the paper preset
    python bench/tokens.py --preset qwen3-vl-2b --chunk_sizes 16 32 64 128
    python bench/tokens.py --json runs/tokens.json

Memory (activation checkpointing, when it is needed): the bytes autograd keeps per token
and decoder layer, measured on one width-real layer in bf16 (bench/real_widths
activation_per_token: without checkpointing), give each chunk's activation memory in
phase 2 of the cached-gradient step, which holds the chunk's query, document and matching
passes at once: without checkpointing β · layers · tokens; with it (non-reentrant, per
layer) 2·h bytes per token and layer (the layer inputs) plus one layer's β · tokens during
its recomputation. Weights, LoRA state, the frozen vision tower and allocator slack come on
top: the estimate is scaled by measured / estimated on bench/gpu_kit.py's own inputs (the
H100 figures in bench/RESULTS.md), and the advice line says which chunk sizes fit a GPU
(--gpu_gib) with and without activation checkpointing, padded and with --pack.

No model runs for the token counts: they come from the project's own code on the real Qwen tokenizer
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
from real_widths import activation_per_token, flops, real_tokenizer  # noqa: E402
import torch  # noqa: E402
from tools.width_real import ARCH, FAMILY, build_config, merged_px  # noqa: E402

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
    p.add_argument("--gpu_gib", type=float, default=80.0, help="memory of the GPU the advice is for")
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
    return {"ids": [0] * n, "pixel_values": None, "image_grid_thw": None}


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
        return T * len(lengths), flops(preset, T, T * T, 0)["dense"] * len(lengths)
    return sum(lengths), sum(flops(preset, L, L * (L + 1) // 2, 0)["sparse"] for L in lengths)


MODES = ("index", "length", "q", "d", "packed")


def step_costs(L, B, c, mode, preset):
    """{pass: [real, computed, FLOPs]} of one step, and the largest chunk's computed tokens
    (its three passes at once: what phase 2 of the cached-gradient step holds)."""
    Lq, Lp, Ln, Lm = L
    order = list(range(B)) if mode == "index" else train.length_grouped_order(
        Lq, Lp, Ln, n_match=B, key={"length": "sum", "packed": "sum"}.get(mode, mode))
    out = {"embed": [0, 0, 0.0], "match": [0, 0, 0.0]}
    peak = 0
    for lo in range(0, B, c):
        idx = order[lo:lo + c]
        held = 0
        for name, rows in (("embed", [Lq[i] for i in idx]),
                           ("embed", [Lp[i] for i in idx] + [Ln[i] for i in idx]),   # one batch [d⁺ ; d⁻]
                           ("match", [Lm[i] for i in idx])):
            computed, f = cost(rows, preset, padded=not (mode == "packed" and name == "embed"))
            t = out[name]
            t[0] += sum(rows)
            t[1] += computed
            t[2] += f
            held += computed
        peak = max(peak, held)
    return out, peak


def memory_gib(preset, tokens, beta, checkpointing):
    """Activation memory (GiB) of `tokens` decoder tokens held at once (the module docstring)."""
    tc = ARCH[preset]["text_config"]
    layers, h = tc["num_hidden_layers"], tc["hidden_size"]
    per_token = (2 * h * layers + beta) if checkpointing else beta * layers
    return per_token * tokens / 2 ** 30


def main(argv=None):
    a = parse_args(argv)
    args = train.parse_args(["--preset", a.preset, "--train_data", "-", "--image_dir", "-"])
    px = merged_px(a.preset)
    tok = real_tokenizer(ARCH[a.preset]["model_type"])
    prefix, suffix = (len(tok(s, add_special_tokens=False)["input_ids"]) for s in EMBED_TEMPLATES[args.embed_template])
    K = args.num_tokens
    embed_len = lambda it: prefix + len(it["ids"]) + suffix + K            # noqa: E731  collate_embed's row
    views = VIEW_SETS[args.match_views]

    def lengths(q, pos, neg):
        Lm = [int(collate_match([x], [y], [z], tok, views, [1], prompt=MATCH_PROMPTS[args.match_prompt])
                  ["attention_mask"][0].sum()) for x, y, z in zip(q, pos, neg)]   # the paper preset: M = B
        return [embed_len(it) for it in q], [embed_len(it) for it in pos], [embed_len(it) for it in neg], Lm

    rng = random.Random(a.seed)
    steps = [(s, lengths(*step_items(rng, s, a.batch, px, args.max_pixels)))
             for s in MIX for _ in range(a.steps_per_subset)]
    totals, peaks, per_subset = {}, {}, {}
    for subset, L in steps:
        for c in a.chunk_sizes:
            for mode in MODES:
                out, peak = step_costs(L, a.batch, c, mode, a.preset)
                peaks[c, mode] = max(peaks.get((c, mode), 0), peak)
                for name, v in out.items():
                    t = totals.setdefault((c, mode, name), [0, 0, 0.0])
                    u = per_subset.setdefault((subset, c, mode, name), [0, 0, 0.0])
                    for x in (t, u):
                        for i in range(3):
                            x[i] += v[i]

    n = len(steps)
    print(f"bench/tokens.py: preset {a.preset} ({args.model}), {a.batch} instances per rank and step, "
          f"K={K}, views {args.match_views} (M = B), max_pixels {args.max_pixels} ({px} px per merged token), "
          f"{n} steps ({a.steps_per_subset} per subset), seed {a.seed}")
    beta = activation_per_token(a.preset, a.seed)
    factor = calibration_factor(a.seed)
    rows = []
    for c in a.chunk_sizes:
        for mode in MODES:
            e, m = totals[c, mode, "embed"], totals[c, mode, "match"]
            rows.append([str(c), mode, f"{e[0] / n:,.0f}", f"{e[1] / n:,.0f}", f"{e[1] / e[0]:.2f}",
                         f"{m[0] / n:,.0f}", f"{m[1] / n:,.0f}", f"{m[1] / m[0]:.2f}",
                         f"{(e[1] + m[1]) / (e[0] + m[0]):.2f}", f"{(e[2] + m[2]) / n / 1e12:.0f}",
                         f"{peaks[c, mode]:,}", f"{factor * memory_gib(a.preset, peaks[c, mode], beta, False):.0f}",
                         f"{factor * memory_gib(a.preset, peaks[c, mode], beta, True):.1f}"])
    print_table(["chunk", "chunks", "embed real/step", "embed computed", "×", "match real/step",
                 "match computed", "×", "step ×", "TFLOP/step", "largest chunk tokens",
                 "act. GiB", "act. GiB ckpt"], rows)
    print(f"× = computed / real tokens; TFLOP: decoder, forward, all {ARCH[a.preset]['text_config']['num_hidden_layers']} "
          f"layers; act. GiB: activation memory of the largest chunk of any step, without / with "
          f"checkpointing ({beta / 2 ** 10:.0f} KiB per token and layer without, bf16; × {factor:.2f}, "
          f"the calibration), weights not included")
    weights = weight_gib(a.preset)
    budget = 0.9 * a.gpu_gib - weights
    advice = {}
    for mode in ("length", "packed"):
        for ckpt in (True, False):
            advice[mode, ckpt] = [c for c in a.chunk_sizes
                                  if factor * memory_gib(a.preset, peaks[c, mode], beta, ckpt) < budget]
    print(f"Advice for a {a.gpu_gib:.0f} GB GPU: weights {weights:.1f} GiB (bf16), activations (calibrated) "
          f"within 90% of the rest. Chunk sizes that fit: "
          f"with activation checkpointing (the preset) {advice['length', True] or 'none'} padded, "
          f"{advice['packed', True] or 'none'} with --pack; without it (--no-grad_checkpointing) "
          f"{advice['length', False] or 'none'} padded, {advice['packed', False] or 'none'} with --pack.")
    c = 32 if 32 in a.chunk_sizes else max(a.chunk_sizes)
    print(f"\nPer subset at chunk {c}: computed / real tokens of the embedding passes")
    print_table(["subset", "index", "length", "q", "d", "packed"],
                [[s] + [f"{per_subset[s, c, m, 'embed'][1] / per_subset[s, c, m, 'embed'][0]:.2f}" for m in MODES]
                 for s in MIX])
    out = {"preset": a.preset, "batch": a.batch, "steps": n, "beta_bytes_per_token_layer": beta,
           "rows": [{"chunk_size": c, "mode": mode, "pass": name, "real_tokens": v[0], "computed_tokens": v[1],
                     "flops": v[2]} for (c, mode, name), v in totals.items()],
           "largest_chunk_tokens": {f"{c}/{m}": v for (c, m), v in peaks.items()}}
    out["advice"] = {f"{m}/{'ckpt' if c else 'no_ckpt'}": v for (m, c), v in advice.items()}
    out["calibration_factor"], out["weights_gib"] = factor, weights
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


MEASURED_2B = {16: 7.3, 32: 14.6, 64: 29.1}   # GiB: bench/RESULTS.md, gpu_kit.py on the H100,
#                                              qwen2-vl-2b, 448² images, with checkpointing


def calibration_factor(seed):
    """Measured / estimated activation memory on bench/gpu_kit.py's inputs (every instance an
    image query of 256 image tokens and its ~30-token instruction, an image positive, a text
    negative) for qwen2-vl-2b at chunks 16, 32, 64: the estimate leaves out the vision
    tower's outputs, the LM head, masks, LoRA and allocator slack; printed with the ratios."""
    preset = "qwen2-vl-2b"
    args = train.parse_args(["--preset", preset, "--train_data", "-", "--image_dir", "-"])
    tok = real_tokenizer("qwen2_vl")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import DOC_IMAGE_TEXT, DOC_TEXT, QUERY_TEXT                  # the kit's strings
    n_text = lambda s: len(tok(s.replace("<|image_1|>", ""), add_special_tokens=False)["input_ids"])  # noqa: E731
    prefix, suffix = (len(tok(s, add_special_tokens=False)["input_ids"]) for s in EMBED_TEMPLATES[args.embed_template])
    q, p, d = (fake_item(n_text(QUERY_TEXT.format("circle", "left")), 256), fake_item(n_text(DOC_IMAGE_TEXT), 256),
               fake_item(n_text(DOC_TEXT.format("red", "circle", "left", "blue", "square", "right")), 0))
    Lq, Lp, Ln = (prefix + len(it["ids"]) + suffix + args.num_tokens for it in (q, p, d))
    Lm = int(collate_match([q], [p], [d], tok, VIEW_SETS[args.match_views], [1],
                           prompt=MATCH_PROMPTS[args.match_prompt])["attention_mask"][0].sum())
    beta = activation_per_token(preset, seed)
    ratios = {c: m / memory_gib(preset, c * Lq + 2 * c * max(Lp, Ln) + c * Lm, beta, True)
              for c, m in MEASURED_2B.items()}
    print("calibration (qwen2-vl-2b, gpu_kit.py's inputs): measured / estimated activation memory at chunk "
          + ", ".join(f"{c}: {r:.2f}" for c, r in ratios.items()))
    return max(ratios.values())


def weight_gib(preset):
    """The preset's parameters in bf16 (counted on the meta device: no memory used)."""
    cfg = build_config(preset, num_layers=ARCH[preset]["text_config"]["num_hidden_layers"],
                       vision_depth=ARCH[preset]["vision_config"]["depth"])
    with torch.device("meta"):
        model = FAMILY[ARCH[preset]["model_type"]]["model"]._from_config(cfg)
    return sum(p.numel() for p in model.parameters()) * 2 / 2 ** 30


if __name__ == "__main__":
    main()
