"""
GPU kit: the paper preset's training step on width-real checkpoints, one command.

For each preset (default qwen2-vl-2b and qwen2-vl-7b; also qwen2.5-vl-3b/7b and
qwen3-vl-2b/4b/8b) it writes a width-real random-init
checkpoint in the hub layout (tools/width_real.py: real widths, heads, vocabulary, vision
tower and tokenizer; --layers decoder layers, default the real depth) and, in bf16 with
the preset's flags (LoRA r=32, K=16, all 8 views, τ=0.02), measures one training step
(forward + backward, no optimizer step) at --batch queries per GPU (the paper's 128) for
each --chunk_sizes value (cached-gradient micro-batches):
  step time (median of --reps after --warmup), decoder tokens/s, MFU (6·N·tokens/s over
  the GPU's bf16 peak; frozen LoRA weights make it an upper bound), peak memory
  (torch.cuda.max_memory_allocated above the start), or "OOM";
and, once per preset, the agreement of the unified 8-view pass with 8 separate passes in
bf16 (max |Δ| of the label logits, and whether every argmax agrees). Each step is timed
with every --attn value: sdpa (the dense additive unified mask) and flex (the same mask as
a FlexAttention block mask, masks.unified_block_mask), side by side on the same model and
inputs; the flex pass's label logits are compared with the dense pass's too. And with every
--embed_modes value: index (chunks in loader order, padded), grouped (length-grouped
chunks, padded: train.py's default) and packed (grouped + --pack, padding-free embedding
passes). Padding only costs when lengths differ: --image_sizes gives the instances images
of different sizes (an MMEB-like spread; without it every image is --image_size², as in
the first H100 run). One table with the GPU's name is printed and written as JSON (--out).

    python bench/gpu_kit.py                                   # on a CUDA machine
    python bench/gpu_kit.py --presets qwen2-vl-2b --chunk_sizes 8 16 32 --reps 3
    python bench/gpu_kit.py --presets qwen2-vl-7b --chunk_sizes 16 --attn sdpa flex
    python bench/gpu_kit.py --presets qwen2-vl-2b --chunk_sizes 32 --image_sizes 224 448 672 896 \
        --embed_modes index grouped packed --reps 2          # what padding costs, and what --pack saves
    python bench/gpu_kit.py --presets qwen2-vl-7b --chunk_sizes 32 --image_sizes 224 448 672 896 \
        --embed_modes packed --reps 1 --warmup 1             # the 7B row, meant for one 10-minute call
    python bench/gpu_kit.py --presets qwen3-vl-2b qwen3-vl-8b --chunk_sizes 32
    python bench/gpu_kit.py --device cpu --presets qwen2-vl-2b --layers 1 --vision_depth 1 \\
        --batch 2 --chunk_sizes 1 2 --image_size 56 --reps 1 --warmup 0   # a dry run of the code path

Without CUDA (and without --device cpu) it says so and exits 0. MMEB-like inputs: an
image query with a ~30-token instruction, an image positive, a text hard negative, images
resized to --image_size² pixels ((image_size/28)² merged tokens: 448 → 256; Qwen3-VL
presets, 32 px per merged token, get the side with the same token count: 448 → 512).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import make_item, print_table  # noqa: E402
from matching import separate_logits, view_plans  # noqa: E402
import train  # noqa: E402
from util.dist import peak_tflops  # noqa: E402
from data import collate_embed, collate_match  # noqa: E402
from masks import VIEW_SETS  # noqa: E402
from util.speed import ATTENTION, flex_unavailable, set_attention  # noqa: E402
from tools.width_real import ARCH, merged_px, write_checkpoint  # noqa: E402


EMBED_MODES = ("index", "grouped", "packed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-2b", "qwen2-vl-7b"], choices=sorted(ARCH))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real depth)")
    p.add_argument("--vision_depth", type=int, default=None, help="vision blocks (default: the real depth)")
    p.add_argument("--batch", type=int, default=128, help="queries per GPU (§4: 128)")
    p.add_argument("--chunk_sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--attn", nargs="+", choices=ATTENTION, default=list(ATTENTION),
                   help="unified-mask attention paths to time (train.py --attn)")
    p.add_argument("--image_size", type=int, default=448, help="images resized to about this² px")
    p.add_argument("--image_sizes", type=int, nargs="+", default=None,
                   help="a length mix instead: instance i's query image is sizes[i % n]² px and its "
                        "positive's sizes[(3i + 1) % n]² px (Qwen2-VL px; min 4, max 1280 tokens), so "
                        "rows differ in length as in MMEB and padding costs (e.g. 224 448 672 896)")
    p.add_argument("--embed_modes", nargs="+", choices=EMBED_MODES, default=["grouped"],
                   help="how the embedding passes are cut and run: index = chunks in loader order, "
                        "padded (--no-length_grouped_chunks); grouped = length-grouped chunks, padded "
                        "(the default); packed = grouped + --pack (padding-free; needs flex)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--out", default="gpu_kit.json", help="JSON results")
    return p.parse_args(argv)


def image_side(preset, image_size):
    """--image_size is given in Qwen2-VL pixels (28 px per merged token); a Qwen3-VL preset
    (32 px) gets the side with the same number of image tokens (448 → 512: 256 tokens)."""
    return image_size * merged_px(preset) // 28


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def instances(processor, n, size, sizes=None):
    """n MMEB-like training instances, in the format train.forward_backward takes; with
    `sizes`, image sides vary by instance (query sizes[i % n], positive sizes[(3i + 1) % n])."""
    side = (lambda i: sizes[i % len(sizes)]) if sizes else (lambda i: size)       # noqa: E731
    return [{"q": make_item(processor, "query", i, side(i)), "pos": make_item(processor, "doc_image", i, side(3 * i + 1)),
             "neg": make_item(processor, "doc_text", i, size), "pos_id": 2 * i, "neg_id": 2 * i + 1,
             "index": i} for i in range(n)]


def build(preset, ckpt, device, size, mix=False):
    """train.py's model for `preset` (its flags: LoRA, K, views, τ) on the width-real `ckpt`,
    every image resized to size² px (mix: images keep their size, 4 to 1280 tokens)."""
    px = merged_px(preset)
    lo, hi = (4 * px * px, 1280 * px * px) if mix else (size * size, size * size)
    flags = ["--preset", preset, "--model", ckpt, "--train_data", "-", "--image_dir", "-",
             "--min_pixels", str(lo), "--max_pixels", str(hi), "--dtype",
             "bfloat16" if device.type == "cuda" else "float32", "--no-grad_checkpointing"]
    args = train.parse_args(flags)
    args.grad_checkpointing = device.type == "cuda"             # the preset's setting, on GPU
    model, processor = train.build_model(args, device)
    return args, model.train(), processor


def measure_step(args, model, processor, batch, device, reps, warmup):
    """Median step time (s), decoder tokens per step, peak memory (MiB) above the start."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        model.zero_grad(set_to_none=True)
        train.forward_backward(train.Step(model, processor.tokenizer, args, autocast=autocast), batch, 0)

    for _ in range(warmup):
        step()
    times, tokens = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(reps):
        before = model.tokens_processed
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        tokens = model.tokens_processed - before
    peak = (torch.cuda.max_memory_allocated(device) - start_mem) / 2 ** 20 if device.type == "cuda" else None
    return statistics.median(times), tokens, peak


@torch.no_grad()
def logit_agreement(model, processor, device, size, M=4):
    """Unified vs 8 separate passes on M instances in the model's dtype: max |Δ| of the
    label logits and the fraction of answers whose Yes/No argmax agrees."""
    tok = processor.tokenizer
    q = [make_item(processor, "query", i, size) for i in range(M)]
    pos = [make_item(processor, "doc_image", 2 * i, size) for i in range(M)]
    neg = [make_item(processor, "doc_image", 2 * i + 1, size) for i in range(M)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        E = [model.embed(collate_embed(items, tok, model.num_tokens), side)[0]
             for items, side in ((q, "q"), (pos, "d"), (neg, "d"))]
        mb = collate_match(q, pos, neg, tok, VIEW_SETS["all"], [1, 2] * (M // 2) + [1] * (M % 2))
        set_attention(model, "sdpa")
        unified, _ = model.match(mb, *E)
        separate = separate_logits(model, mb, E, view_plans(mb, model.backbone.dtype))
        flex = None
        if flex_unavailable(device, training=False) is None:
            set_attention(model, "flex")
            flex, _ = model.match(mb, *E)
            set_attention(model, "sdpa")
    yes_no = [tok.convert_tokens_to_ids(w) for w in ("Yes", "No")]

    def agreement(a, b):
        return {"max_abs_logit_diff": (a.float() - b.float()).abs().max().item(),
                "yes_no_argmax_agreement": (a.float()[:, yes_no].argmax(1) == b.float()[:, yes_no].argmax(1))
                .float().mean().item()}
    return {"unified_vs_separate": agreement(unified, separate),
            "flex_vs_dense": agreement(flex, unified) if flex is not None else None}


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_kit.py: no CUDA device here; nothing measured (use a GPU machine, or "
              "--device cpu for a dry run of the code path).")
        return None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    peak = peak_tflops(device)                                              # None on CPU / unknown GPU
    tmp = contextlib.nullcontext(a.workdir) if a.workdir else tempfile.TemporaryDirectory()
    results = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "batch": a.batch, "image_size": a.image_size, "image_sizes": a.image_sizes, "rows": []}
    with tmp as work:
        for preset in a.presets:
            ckpt = os.path.join(work, preset)
            write_checkpoint(preset, ckpt, num_layers=a.layers or ARCH[preset]["text_config"]["num_hidden_layers"],
                             vision_depth=a.vision_depth or ARCH[preset]["vision_config"]["depth"],
                             dtype="bfloat16" if device.type == "cuda" else "float32")  # 7B: 17 GB, not 33
            size = image_side(preset, a.image_size)
            sizes = [image_side(preset, s) for s in a.image_sizes] if a.image_sizes else None
            args, model, processor = build(preset, ckpt, device, size, mix=bool(sizes))
            agreement = logit_agreement(model, processor, device, size)
            batch = instances(processor, a.batch, size, sizes)
            n = sum(p.numel() for p in model.parameters())
            for chunk in a.chunk_sizes:
                args.chunk_size = chunk                           # train.py --chunk_size
                for attn, mode in [(t, m) for t in a.attn for m in a.embed_modes]:
                    row = {"preset": preset, "chunk_size": chunk, "attention": attn, "embed": mode}
                    args.length_grouped_chunks, pack = mode != "index", mode == "packed"
                    why = (flex_unavailable(device, training=True) if attn == "flex" else None) \
                        or (flex_unavailable(device, training=True, flag="--pack") if pack else None)
                    if why:                                       # e.g. no CPU backward
                        row.update(step_s=None, error="n/a", why=why)
                        results["rows"].append(row)
                        continue
                    try:
                        set_attention(model, attn, training=True, pack=pack)
                        t, tokens, mib = measure_step(args, model, processor, batch, device, a.reps, a.warmup)
                        row.update(step_s=t, tokens_per_s=tokens / t, peak_mib=mib,
                                   mfu=6 * n * tokens / t / (peak * 1e12) if peak else None)
                    except (torch.OutOfMemoryError, RuntimeError) as e:   # one row fails, the kit goes on
                        oom = isinstance(e, torch.OutOfMemoryError)
                        row.update(step_s=None, error="OOM" if oom else "error", why=f"{type(e).__name__}: {e}"[:500])
                        model.zero_grad(set_to_none=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    set_attention(model, "sdpa")
                    results["rows"].append(row)
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results[f"{preset}_bf16_agreement"] = agreement
    print(f"GPU kit: {gpu}, {results['date']}, torch {torch.__version__}, {a.batch} queries per GPU, "
          f"{a.image_size}² images, bf16 peak {peak or 'unknown'} TFLOP/s")
    print_table(["preset", "chunk", "attention", "embed", "step s", "tokens/s", "MFU", "peak MiB"],
                [[r["preset"], str(r["chunk_size"] or "-"), r["attention"], r["embed"],
                  r.get("error") or f"{r['step_s']:.3f}",
                  f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-",
                  f"{r['mfu']:.3f}" if r.get("mfu") else "-",
                  f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"] for r in results["rows"]])
    for r in results["rows"]:
        if r.get("why"):
            print(f"{r['preset']}, chunk {r['chunk_size']}, {r['attention']}: {r['why']}")
    precision = "bf16" if device.type == "cuda" else "fp32"
    for preset in a.presets:
        for what, d in (results[f"{preset}_bf16_agreement"] or {}).items():
            if d is not None:
                print(f"{preset}: {what.replace('_', ' ')} ({precision}): max |Δ logit| "
                      f"{d['max_abs_logit_diff']:.3g}, Yes/No argmax agreement {d['yes_no_argmax_agreement']:.3f}")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
