"""
Table 3 and Table 5 of the paper, on the CPU demo: does matching help here, and by how much?

Trains the demo (`python train.py`: the tiny model on the synthetic benchmark, demo preset)
once per (row, seed) with the flags of Table 3 rows 3–7 and, for Table 5, row 4 with each
matching view set; prints the mean ± std over seeds of the overall Hit@1 (and of the
non-binding and the binding tasks ShapesT2I / ShapesI2T apart) and of the held-out matching
accuracy (p(Yes) > p(No) on (query, positive) and (query, hardest other candidate) pairs)
of each view type, the binding tasks apart, and writes every run's numbers, each task's
Hit@1 included, as JSON.

    python bench/table3.py                         # all rows, seeds 0 1 2 (about 3–4 min a run)
    python bench/table3.py --rows 3 7 --seeds 0 --steps 300     # a quick look
    python bench/table3.py --table 5 --json runs/table5.json

Rows (the demo preset supplies K = 4, lr, τ; each row changes only what the paper's does):
  3  + hard negative (baseline)  --num_tokens 0 --embed_template plain --w_orth 0 --w_qdm 0
  4  Exp3 + MVQDM                 --num_tokens 0 --embed_template plain --w_orth 0
  5  Exp3 + MVQDM++               --num_tokens 0 --w_orth 0
  6  Exp3 + MEF                   --embed_template plain --w_qdm 0
  7  ReMatch                      (the demo as it is)
  7a ReMatch without matching     --w_qdm 0                  (not in the paper: what the
  7b ReMatch, plain template      --embed_template plain      matching loss and the chat
                                                              template each cost)
Table 5: row 4 with --match_views all | feat | raw | raw2feat | feat2raw.

The demo's benchmark depends on --seed; it is written once per seed and shared by every run
with that seed (each run's out_dir/demo_data links to it).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from demo import DEMO_BINDING_TASKS  # noqa: E402
from tools.generate import caption_heldout  # noqa: E402
from tools.rerank import MATCH_VIEW_TYPES  # noqa: E402
from util.backbone import pretrained_build, pretrained_data_seed  # noqa: E402
from util.run import checkpoint_dirs  # noqa: E402

CAPTION_KEYS = ("exact", "token_f1", "distinct_2", "repetition", "mean_len")

ROWS = {
    "3": ("+ hard negative", ["--num_tokens", "0", "--embed_template", "plain", "--w_orth", "0", "--w_qdm", "0"]),
    "4": ("Exp3 + MVQDM", ["--num_tokens", "0", "--embed_template", "plain", "--w_orth", "0"]),
    "5": ("Exp3 + MVQDM++", ["--num_tokens", "0", "--w_orth", "0"]),
    # not in the paper: GME's recipe (the last token of the chat template, no matching), App. S9
    "5a": ("Exp3 + chat template (GME)", ["--num_tokens", "0", "--w_orth", "0", "--w_qdm", "0"]),
    "6": ("Exp3 + MEF", ["--embed_template", "plain", "--w_qdm", "0"]),
    "7": ("ReMatch", []),
    # not in the paper: row 7 less one part each, to tell the matching loss's cost from the template's
    "7a": ("ReMatch w/o MVQDM (chat, no L_qdm)", ["--w_qdm", "0"]),
    "7b": ("ReMatch, plain template", ["--embed_template", "plain"]),
}
VIEWS = ("all", "feat", "raw", "raw2feat", "feat2raw")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=("3", "5", "both"), default="both", help="which table to run")
    p.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=sorted(ROWS),
                   help="Table 3 rows to run (default: all, 7a and 7b included)")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS),
                   help="Table 5 view sets to run (row 4 flags)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds per row")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's, 2000)")
    p.add_argument("--model", default=None,
                   help="the backbone (default: the demo's, tiny-qwen2-vl; tiny-qwen2-vl-chat: the speaking one)")
    p.add_argument("--lora_r", type=int, default=None,
                   help="LoRA on the paper's targets at this rank, alpha 2r (default: full fine-tuning, the demo's)")
    p.add_argument("--captions", type=int, default=0,
                   help="App. S9: caption N held-out images with the backbone and with each run's final "
                        "checkpoint (tools/generate.py's metrics, mean ± std over seeds)")
    p.add_argument("--out_dir", default=None, help="where runs go (default: a temporary directory)")
    p.add_argument("--markdown", action="store_true", help="print the final table as markdown")
    p.add_argument("--json", default=None,
                   help="write every run's numbers here, after each run (a rerun with the same settings "
                        "keeps the runs already there and does the rest)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.lora_r is not None and args.lora_r < 1:
        p.error(f"--lora_r must be >= 1, got {args.lora_r}")
    if args.captions < 0:
        p.error(f"--captions must be >= 0, got {args.captions}")
    return args


def data_seed_of(model, seed):
    """The synthetic benchmark's seed for a run: the run's own, or for a model pretrained on
    one benchmark's TRAIN split (tiny-qwen2-vl-chat) always that benchmark's (train.py --data_seed)."""
    on = pretrained_data_seed(model)
    return seed if on is None else on


def one_run(flags, seed, steps, out_dir, data_root, model=None, lora_r=None, captions=0):
    """Train and evaluate the demo with `flags`; → overall Hit@1 and mean matching accuracy
    (run_record), and with captions > 0 the final checkpoint's caption metrics ("caption …")."""
    os.makedirs(out_dir, exist_ok=True)
    link = os.path.join(out_dir, "demo_data")
    os.makedirs(data_root, exist_ok=True)
    if not os.path.exists(link):
        os.symlink(data_root, link)                  # train.py writes it once, then reuses it
    argv = flags + ["--seed", str(seed), "--out_dir", out_dir, "--overwrite", "--log_every", "500",
                    "--data_seed", str(data_seed_of(model, seed))]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if model is not None:
        argv += ["--model", model]
    if lora_r is not None:
        argv += ["--lora", "--lora_r", str(lora_r), "--lora_alpha", str(2 * lora_r)]
    record = run_record(train.main(argv))
    if captions:
        final = checkpoint_dirs(out_dir)[-1]
        metrics, caps, _ = caption_heldout(final, data_root, captions, data_seed_of(model, seed))
        record.update(caption_record(metrics))
        record["captions"] = caps
    return record


def caption_record(metrics):
    """tools/generate.py's caption metrics as flat "caption …" numbers (overall and per kind)."""
    out = {f"caption {k}": v for k, v in metrics.items() if k in CAPTION_KEYS}
    for kind in ("object", "pair"):
        out.update({f"caption {kind} {k}": v for k, v in metrics.get(kind, {}).items() if k in CAPTION_KEYS})
    return out


def run_record(res, binding=DEMO_BINDING_TASKS):
    """One run's numbers from train.main's result: the overall Hit@1 and its chance level,
    the mean Hit@1 of the non-binding and of the binding tasks, the held-out matching
    accuracy of each view type averaged over each of the two groups (train.run_eval sets
    the binding tasks apart), and every task's Hit@1 ("per_task")."""
    hit = {t: v for t, v in res["hit_at_1"].items() if v is not None}
    groups = {"non-binding": [t for t in hit if t not in binding],
              "binding": [t for t in hit if t in binding]}
    out = {"hit@1": res["overall"], "chance": res["overall_chance"]}
    for name, tasks in groups.items():
        if tasks:
            out[f"hit@1 {name}"] = statistics.mean(hit[t] for t in tasks)
    for kind in MATCH_VIEW_TYPES if res.get("matching") else ():
        out[f"match {kind}"] = res["matching_mean"][kind]
        if res.get("matching_mean_apart"):
            out[f"binding {kind}"] = res["matching_mean_apart"][kind]
    out["per_task"] = dict(hit)
    return out


def mean_std(xs, scale=100):
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.1f} ± {scale * sd:.1f}"


def main(argv=None):
    args = parse_args(argv)
    work = args.out_dir or tempfile.mkdtemp(prefix="table3-")
    configs = []
    if args.table in ("3", "both"):
        configs += [(f"Table 3 row {r}: {ROWS[r][0]}", ROWS[r][1]) for r in args.rows]
    if args.table in ("5", "both"):
        configs += [(f"Table 5: {v}", ROWS["4"][1] + ["--match_views", v]) for v in args.views]
    data_root = lambda seed: os.path.abspath(os.path.join(work, f"demo_data_seed{data_seed_of(args.model, seed)}"))  # noqa: E731
    runs, before = [], None
    settings = {"seeds": args.seeds, "steps": args.steps, "model": args.model, "lora_r": args.lora_r,
                "captions": args.captions, "build": pretrained_build(args.model or train.PRESETS["demo"]["model"])}
    if args.json and os.path.isfile(args.json):      # a rerun keeps the runs already done with these settings
        with open(args.json) as f:
            old = json.load(f)
        if {k: old.get(k) for k in settings} == settings:
            runs, before = old["runs"], old.get("before")
            print(f"{args.json}: {len(runs)} runs already done with these settings, kept")

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json + ".tmp", "w") as f:
                json.dump({**settings, "before": before, "runs": runs}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)
    if args.captions and before is None:              # App. S9's "before": the backbone itself
        from demo.synthetic import make_synthetic
        seed = args.seeds[0]
        make_synthetic(data_root(seed), seed=data_seed_of(args.model, seed))
        metrics, caps, items = caption_heldout(args.model or train.PRESETS["demo"]["model"], data_root(seed), args.captions,
                                               data_seed_of(args.model, seed))
        before = {**caption_record(metrics), "captions": caps, "images": [os.path.basename(i) for i, _, _ in items],
                  "references": [r for _, r, _ in items]}
        print("before training: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if k.startswith("caption ")),
              flush=True)
        save()
    for name, flags in configs:
        for seed in args.seeds:
            if any(r["config"] == name and r["seed"] == seed for r in runs):
                continue
            slug = "".join(c if c.isalnum() else "_" for c in name) + f"_seed{seed}"
            r = one_run(flags, seed, args.steps, os.path.join(work, slug), data_root(seed),
                        args.model, args.lora_r, args.captions)
            runs.append({"config": name, "flags": flags, "seed": seed, **r})
            save()
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                      if isinstance(v, float)), flush=True)
    cols = ["hit@1", "hit@1 non-binding", "hit@1 binding", *(f"match {k}" for k in MATCH_VIEW_TYPES),
            "binding raw→raw", "binding feat→feat"]
    if args.captions:
        cols += [f"caption {k}" for k in CAPTION_KEYS]
    cell = lambda rs, c: mean_std([r[c] for r in rs if c in r], 1 if c.endswith("mean_len") else 100)  # noqa: E731
    table = ([("before training", [before])] if before else []) + \
        [(name, [r for r in runs if r["config"] == name]) for name, _ in configs]
    print("(mean ± std over seeds, %; caption mean_len in words)")
    if args.markdown:
        print("| config | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
        print("\n".join(f"| {name} | " + " | ".join(cell(rs, c) for c in cols) + " |" for name, rs in table))
    else:
        print(f"{'config':<34} " + " ".join(f"{c:>19}" for c in cols))
        print("\n".join(f"{name:<34} " + " ".join(f"{cell(rs, c):>19}" for c in cols) for name, rs in table))


if __name__ == "__main__":
    main()
