"""
Does a second round on self-mined hard negatives help? The CPU demo, round 1 then round 2.

Round 1 is the demo (`python train.py --seed S`: the tiny model on the synthetic benchmark,
the demo preset). Its final checkpoint mines each training row's hard negative from the
row's own subset (tools/mine.py, one negative a row), and round 2 trains the demo recipe
afresh (the same seed, the same initialisation) on:

  a  the built-in negatives         the demo's own rows (the control)
  b  in-batch negatives only        the same rows, --no-hard_negative
  c  mined, no filter               tools/mine.py's nearest non-positive document
  d  mined, positive-aware margin   --relative_margin 0.05 (NV-Retriever's TopK-PercPos)
  e  mined, the head's veto         --judge: the round-1 matching head drops what it calls a
                                    match (p(Yes) > 0.5); also --measure_veto's table

Round 2 reads its rows through `--train_data` with the demo preset, the demo's evaluation
split and its target prompts (a --target_prompts file: the demo's meta-task prompts), so
every variant takes one path; variant a checks that this path is the demo itself (its
log.jsonl against round 1's, the throughput fields aside). Reported per variant, mean ±
std over seeds: Hit@1 overall, non-binding and binding (ShapesT2I / ShapesI2T), the
held-out matching accuracy of the non-binding tasks (raw→raw, feat→feat), and per mined
variant what the rules and the veto dropped and, from --measure_veto (labels known: the
benchmark writes attribute-identical renders), the share of mined negatives that are in
fact positives. Every run's numbers go to --json after each run; a rerun with the same
settings keeps what is there and does the rest.

    python bench/mining_rounds.py --json runs/mining_rounds.json --out_dir runs/mining_rounds   # ~2 h on 2 cores
    python bench/mining_rounds.py --seeds 0 --steps 100 --json /tmp/mr.json   # a quick look
"""
import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import train  # noqa: E402
from data import TARGET_BY_META  # noqa: E402
from demo import DEMO_BINDING_TASKS, DEMO_META, make_synthetic  # noqa: E402
from table3 import mean_std, one_run, run_record  # noqa: E402
from tools import mine  # noqa: E402
from tools.rerank import matching_means  # noqa: E402
from util.run import checkpoint_dirs  # noqa: E402

VARIANTS = {  # name → (what, tools/mine.py flags or None for the built-in rows, train.py flags)
    "a": ("built-in negatives", None, []),
    "b": ("in-batch negatives only", None, ["--no-hard_negative"]),
    "c": ("mined, no filter", [], []),
    "d": ("mined, relative margin 0.05", ["--relative_margin", "0.05"], []),
    "e": ("mined, the head's veto", ["--judge", "--measure_veto"], []),
}
THROUGHPUT = ("samples_per_s", "tokens_per_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="training steps of both rounds (default: the demo's)")
    p.add_argument("--out_dir", default=None, help="where runs go (default: a temporary directory)")
    p.add_argument("--json", default=None, help="every run's numbers, written after each run (resumable)")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    return args


def record(res):
    """table3.run_record, with the matching accuracy of the binding tasks apart (round 2's
    --train_data path does not set them apart itself)."""
    if res.get("matching"):
        res = dict(res, matching_mean=matching_means(res["matching"], [t for t in res["matching"]
                                                                       if t not in DEMO_BINDING_TASKS]),
                   matching_mean_apart=matching_means(res["matching"], [t for t in res["matching"]
                                                                        if t in DEMO_BINDING_TASKS]))
    return run_record(res)


def log_of(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in THROUGHPUT} for line in f]


def round2(paths, rows, seed, steps, out_dir, prompts, flags):
    """The demo recipe on `rows` (a folder of <Subset>/original-*.parquet), evaluated on the demo's split."""
    argv = ["--preset", "demo", "--seed", str(seed), "--train_data", rows, "--image_dir", paths["image_dir"],
            "--eval_data", paths["eval"], "--eval_image_dir", paths["image_dir"], "--target_prompts", prompts,
            "--out_dir", out_dir, "--overwrite", "--log_every", "500", *flags]
    return record(train.main(argv + (["--steps", str(steps)] if steps else [])))


def main(argv=None):
    args = parse_args(argv)
    work = os.path.abspath(args.out_dir or tempfile.mkdtemp(prefix="mining-rounds-"))
    os.makedirs(work, exist_ok=True)
    prompts = os.path.join(work, "demo_target_prompts.json")     # the demo's prompts, by subset
    with open(prompts, "w") as f:
        json.dump({s: TARGET_BY_META[m] for s, m in DEMO_META.items()}, f)
    settings = {"seeds": args.seeds, "steps": args.steps}
    runs = []
    if args.json and os.path.isfile(args.json):
        with open(args.json) as f:
            old = json.load(f)
        if {k: old.get(k) for k in settings} == settings:
            runs = old["runs"]
            print(f"{args.json}: {len(runs)} runs already done with these settings, kept")

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json + ".tmp", "w") as f:
                json.dump({**settings, "runs": runs}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    def done(name, seed):
        return next((r for r in runs if r["config"] == name and r["seed"] == seed), None)

    for seed in args.seeds:
        data_root = os.path.join(work, f"demo_data_seed{seed}")
        r1_dir = os.path.join(work, f"round1_seed{seed}")
        if not done("round 1", seed):
            runs.append({"config": "round 1", "seed": seed, **one_run([], seed, args.steps, r1_dir, data_root)})
            save()
        paths = make_synthetic(data_root, seed=seed)
        final = checkpoint_dirs(r1_dir)[-1]
        for v in args.variants:
            what, mine_flags, train_flags = VARIANTS[v]
            name = f"round 2 {v}: {what}"
            if done(name, seed):
                continue
            rows, extra = paths["train"], {}
            if mine_flags is not None:
                rows = os.path.join(work, f"mined_{v}_seed{seed}")
                report = mine.main(["--model", final, "--train_data", paths["train"], "--image_dir",
                                    paths["image_dir"], "--out", rows, "--num_negatives", "1", "--no-progress",
                                    *mine_flags])
                extra["mining"] = report
            r2_dir = os.path.join(work, f"round2_{v}_seed{seed}")
            r = round2(paths, rows, seed, args.steps, r2_dir, prompts, train_flags)
            if v == "a":                  # the --train_data path is the demo itself
                r["log_equals_round1"] = log_of(r2_dir) == log_of(r1_dir)
            runs.append({"config": name, "seed": seed, **r, **extra})
            save()
            print(f"{name} seed {seed}: hit@1 {r['hit@1']:.3f}", flush=True)

    cols = ["hit@1", "hit@1 non-binding", "hit@1 binding", "match raw→raw", "match feat→feat"]
    names = ["round 1"] + [f"round 2 {v}: {VARIANTS[v][0]}" for v in args.variants]
    print("(mean ± std over seeds, %)\n| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        print(f"| {name} | " + " | ".join(mean_std([r[c] for r in rs if c in r]) for c in cols) + " |")


if __name__ == "__main__":
    main()
