"""
Benchmark of the unified multi-view matching pass (paper §3.2.3 "Multi-view input &
efficiency", Fig. 3): "a unified attention mask that enables the model [to] process all
eight raw/embedding query-document combinations in one forward pass".

On a batch of M (q, d⁺, d⁻) instances with an image in the query and in both documents,
side by side in one run:
  unified   ReMatch.match on a collate_match batch (view set `all`): one decoder pass
            over the packed row [P, Q, Zq, D1, Zd1, D2, Zd2, H, A1..A8];
  separate  8 decoder passes, one per view v, each over the sub-sequence
            [P, query view, doc view, H, A_v] of every row (batched over the M rows),
            with the packed row's position ids and that view's own mask (the idea of
            tests/test_matching.py; the mask from masks.unified_mask with one view);
  feat      ReMatch.match with the `feat` view set (Zq × {Zd1, Zd2}, Table 5);
  flex      `unified` with --attn flex (util.speed.set_attention): the same mask as a
            FlexAttention BlockMask (masks.unified_block_mask) whose empty blocks are
            skipped. Compiled on CUDA; on the CPU torch runs flex uncompiled (dense
            inside, correct but not fast) and has no backward, so fwd+bwd is "n/a" there.
Both `all` paths call ReMatch.match_inputs once per call (projector Z, the unified mask,
M-RoPE positions; the table's "shared" row times it alone). The images' features are
computed once beforehand and passed in, as in training, where ReMatch.forward hands the
matching rows the features of the embedding passes (--no-reuse_images: run the vision
tower inside every call instead, as a matching pass on its own would). The separate
baseline shares the features instead of re-encoding each raw view, so its cost is a
lower bound of truly separate forwards; "decoder only" subtracts the shared time from
both forwards. The separate path's gather indices and per-view masks are built once
beforehand, like a collate (so it pays for building the packed row's mask, inside
match_inputs, instead of its own eight). Forward+backward: cross-entropy on the label logits,
backward into every decoder weight (full fine-tuning) and the projector (and into the
vision tower only with --no-reuse_images: in training its gradient arrives through the
embedding passes whose features are reused); E_q, E_d⁺, E_d⁻ are
computed once (K=16) and held fixed. Reported: median wall time, tokens (real,
unpadded: Σ sequence lengths), peak memory above the start of the call (bench/common.py;
with the tiny model the forward peak is set by the shared match_inputs), and max |Δ| of
the unified vs separate label logits (fp32, i.e. CPU or --dtype float32: expect ~1e-6).

    python bench/matching.py                                  # M=4, 224² images (64 tokens)
    python bench/matching.py --batch 8 --image_size 448 --reps 10
    python bench/matching.py --reps 2 --batch 2 --image_size 112    # smoke run
    python bench/matching.py --image_size 896 --no-flex              # 1024 tokens per image, dense only
"""
import argparse
import contextlib
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_common_args, fmt, make_item, peak_mib, print_config, print_table,  # noqa: E402
                    ratio, setup, time_variants)
from data import collate_embed, collate_match  # noqa: E402
from masks import VIEW_SETS, additive_mask, unified_mask_batch  # noqa: E402
from model import ReMatch  # noqa: E402
from util.speed import flex_unavailable, set_attention  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Unified 8-view matching pass vs 8 separate passes.")
    p.add_argument("--batch", type=int, default=4, help="M instances (q, d+, d-) in the matching batch")
    p.add_argument("--num_tokens", type=int, default=16, help="K learnable tokens for E_q, E_d")
    p.add_argument("--reuse_images", action=argparse.BooleanOptionalAction, default=True,
                   help="image features computed once and passed in, as in training (default)")
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True,
                   help="add the --attn flex row (FlexAttention block mask)")
    return add_common_args(p).parse_args(argv)


def view_plans(mb, dtype):
    """
    For every view v of the batch: gather indices (M, l) of each row's sub-sequence
    [P, q-view, d-view, H, A_v] in the packed row (right-padded with index 0), a
    `valid` mask (M, l), the additive mask (M, 1, l, l) of that sub-sequence alone, and
    the position of v's label-predicting token in the sub-sequence (M,).
    """
    plans = []
    for v, (qs, ds) in enumerate(mb["views"]):
        keep, segs, at = [], [], []
        for row, segments in enumerate(mb["segments"]):
            start, spans = 0, {}
            for name, n in segments:
                spans[name] = range(start, start + n)
                start += n
            idx, sub = [], []
            for name, new in (("P", "P"), (qs, qs), (ds, ds), ("H", "H"), (f"A{v + 1}", "A1")):
                idx += spans[name]
                sub.append((new, len(spans[name])))    # A_v becomes the only answer, A1
            keep.append(idx)
            segs.append(sub)
            at.append(idx.index(int(mb["label_idx"][row, v])))
        l = max(len(k) for k in keep)
        valid = torch.tensor([[1] * len(k) + [0] * (l - len(k)) for k in keep], dtype=torch.bool)
        index = torch.tensor([k + [0] * (l - len(k)) for k in keep])          # (M, l)
        mask = additive_mask(unified_mask_batch(segs, ((qs, ds),)), dtype)   # (M, 1, l, l)
        plans.append({"index": index, "valid": valid, "mask": mask, "at": torch.tensor(at),
                      "tokens": int(valid.sum())})
    return plans


def separate_logits(model, mb, E, plans, images=None):
    """Label logits (M·V, vocab) in ReMatch.match's order, from one decoder pass per view
    (Qwen3-VL: each pass with the DeepStack features of the images its segments hold)."""
    if images is None:
        images = model.image_features(mb["pixel_values"], mb["image_grid_thw"])
    x, mask, pos = model.match_inputs(mb, *E, images=images)   # (M, L, d), (M, 1, L, L), (3, M, L)
    del mask                                                    # the packed row's mask: unused here
    dev = x.device
    ids = mb["input_ids"].to(dev)                               # (M, L)
    is_img = ids == model.backbone.config.image_token_id        # (M, L)
    S = images[0].shape[1] - 1 if images else 0                 # DeepStack levels (Qwen3-VL)
    if S:
        D = x.new_zeros(*ids.shape, S, x.shape[-1])             # (M, L, S, d)
        D[is_img] = torch.cat(images)[:, 1:].to(x.dtype)
    rows = torch.arange(x.shape[0], device=dev)[:, None]        # (M, 1)
    out = []
    for p in plans:
        index, valid = p["index"].to(dev), p["valid"].to(dev)
        xs = x[rows, index]                                     # (M, l, d)
        ps = pos[:, rows, index] * valid                        # (3, M, l), padding → 0
        deepstack = {}
        if S:
            vis = is_img[rows, index] & valid                   # (M, l)
            deepstack = {"visual_pos_masks": vis,
                         "deepstack_visual_embeds": list(D[rows, index][vis].unbind(1))}
        h = model.last_hidden(xs, p["mask"].to(dev), ps, **deepstack)   # (M, l, d)
        out.append(model.backbone.lm_head(h[rows[:, 0], p["at"].to(dev)]))   # (M, vocab)
    return torch.stack(out, dim=1).flatten(0, 1)                # (M, V, vocab) → (M·V, vocab)


def main(argv=None):
    args = parse_args(argv)
    backbone, processor = setup(args)
    model = ReMatch(backbone, num_tokens=args.num_tokens, seed=args.seed).train()
    tok, M, S = processor.tokenizer, args.batch, args.image_size
    q = [make_item(processor, "query", i, S) for i in range(M)]
    pos = [make_item(processor, "doc_image", 2 * i, S) for i in range(M)]
    neg = [make_item(processor, "doc_image", 2 * i + 1, S) for i in range(M)]
    with torch.no_grad():                                       # fixed embeddings, (M, d) each
        E = [model.embed(collate_embed(items, tok, args.num_tokens), side)[0]
             for items, side in ((q, "q"), (pos, "d"), (neg, "d"))]
    mb = {name: collate_match(q, pos, neg, tok, VIEW_SETS[name], random.Random(args.seed))
          for name in ("all", "feat")}
    dtype = model.backbone.get_input_embeddings().weight.dtype
    plans = view_plans(mb["all"], dtype)
    n_img = int(mb["all"]["image_grid_thw"].prod(dim=1).sum()) // 4       # merged image tokens
    print_config(args, image_tokens_per_image=n_img // (3 * M),
                 packed_row_length=mb["all"]["input_ids"].shape[1])

    images = {"all": None, "feat": None}
    if args.reuse_images:                                       # as ReMatch.forward does in training
        with torch.no_grad():
            images = {k: model.image_features(m["pixel_values"], m["image_grid_thw"]) for k, m in mb.items()}

    @contextlib.contextmanager
    def flex_attention():                                       # --attn flex for one call
        set_attention(model, "flex", training=torch.is_grad_enabled())
        try:
            yield
        finally:
            set_attention(model, "sdpa")

    def logits_of(name):
        if name == "separate":
            return separate_logits(model, mb["all"], E, plans, images["all"])
        if name == "flex":                                      # the same pass, block-sparse
            with flex_attention():
                return model.match(mb["all"], *E, images=images["all"])[0]
        which = "feat" if name == "feat" else "all"
        return model.match(mb[which], *E, images=images[which])[0]

    def fwd(name):
        return torch.no_grad()(lambda: logits_of(name))

    def fwd_bwd(name):
        def run():
            logits = logits_of(name)
            labels = mb["feat" if name == "feat" else "all"]["labels"].flatten().to(logits.device)
            F.cross_entropy(logits.float(), labels).backward()
            model.zero_grad(set_to_none=True)             # grads freed: every call starts alike
        return run

    device = torch.device(args.device)
    flex = args.flex and flex_unavailable(device, training=False) is None
    flex_bwd = flex and flex_unavailable(device, training=True) is None
    with torch.no_grad():                                       # parity: one pass per view
        dense = logits_of("unified")
        delta = (dense - logits_of("separate")).abs().max().item()
        delta_flex = (dense - logits_of("flex")).abs().max().item() if flex else None
    names = ("unified", "separate", "feat") + (("flex",) if flex else ())
    fns = {**{(n, "fwd"): fwd(n) for n in names},
           **{(n, "fwd+bwd"): fwd_bwd(n) for n in names if n != "flex" or flex_bwd}}
    fns["inputs", "fwd"] = torch.no_grad()(lambda: model.match_inputs(mb["all"], *E, images=images["all"]))

    @torch.no_grad()
    def flex_inputs():                                          # flex's shared part: the BlockMask
        with flex_attention():
            return model.match_inputs(mb["all"], *E, images=images["all"])
    if flex:
        fns["inputs_flex", "fwd"] = flex_inputs
    t = time_variants(fns, args.reps, args.warmup, args.device)
    mem = {k: peak_mib(fn, args.device) for k, fn in fns.items()}         # after all timings
    tokens = {"unified": int(mb["all"]["attention_mask"].sum()),
              "separate": sum(p["tokens"] for p in plans),
              "feat": int(mb["feat"]["attention_mask"].sum())}
    tokens["flex"] = tokens["unified"]
    passes = {"unified": "1 (8 views)", "separate": "8 (1 view each)", "feat": "1 (2 views)",
              "flex": "1 (8 views)"}
    label = {"unified": "unified (all)", "separate": "separate (all)", "feat": "feat (feat)",
             "flex": "unified, --attn flex (all)"}
    na = "n/a (no CPU backward)"
    get = lambda d, k: fmt(d[k] * 1e3 if d is t else d[k]) if k in d else na
    ratio_of = lambda d, a, b, phase: ratio(d[a, phase], d[b, phase]) if (a, phase) in d and (b, phase) in d else ""

    header = ["", "decoder passes", "tokens", "fwd ms", "fwd+bwd ms", "fwd peak MiB", "fwd+bwd peak MiB"]
    rows = [[label[n], passes[n], tokens[n], get(t, (n, "fwd")), get(t, (n, "fwd+bwd")),
             get(mem, (n, "fwd")), get(mem, (n, "fwd+bwd"))] for n in names]
    rows.append(["  shared: match_inputs (all)", "-", "", fmt(1e3 * t["inputs", "fwd"]), "",
                 fmt(mem["inputs", "fwd"]), ""])
    if flex:
        rows.append(["  shared, flex: match_inputs (all)", "-", "", fmt(1e3 * t["inputs_flex", "fwd"]), "",
                     fmt(mem["inputs_flex", "fwd"]), ""])
    pairs = [("separate", "unified", "separate / unified"), ("feat", "unified", "feat / all (unified)")]
    if flex:
        pairs += [("separate", "flex", "separate / flex"), ("unified", "flex", "unified sdpa / flex")]
    for a, b, name in pairs:
        rows.append([name, "", ratio(tokens[a], tokens[b]), ratio_of(t, a, b, "fwd"),
                     ratio_of(t, a, b, "fwd+bwd"), ratio_of(mem, a, b, "fwd"), ratio_of(mem, a, b, "fwd+bwd")])
    dec = lambda n: t[n, "fwd"] - t["inputs_flex" if n == "flex" else "inputs", "fwd"]
    for n in ("unified",) + (("flex",) if flex else ()):
        rows.append([f"separate / {n}, decoder only", "", "", ratio(dec("separate"), dec(n)), "", "", ""])
    print(f"\nmedian of {args.reps} (after {args.warmup} warm-up), M={M}; "
          f"max |Δ| label logits unified vs separate: {delta:.2e}"
          + (f", flex vs dense unified: {delta_flex:.2e}" if flex else ""))
    print_table(header, rows)
    return {"time": t, "tokens": tokens, "memory": mem, "max_abs_diff": delta, "max_abs_diff_flex": delta_flex}


if __name__ == "__main__":
    main()
