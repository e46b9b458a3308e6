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
fact positives; and whether the built-in negatives were already the hardest there are
(given_vs_mined: each row's built-in negative ranked among the true negatives of its
subset by round 1's embedding, against variant c's mined one). Every run's numbers go to
--json after each run; a rerun with the same settings keeps what is there, does the rest
and prints the four tables of docs/demo.md §7.

    python bench/mining_rounds.py --json runs/mining_rounds.json --out_dir runs/mining_rounds   # ~2 h on 2 cores
    python bench/mining_rounds.py --seeds 0 --steps 100 --json /tmp/mr.json   # a quick look
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

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


def given_vs_mined(plan, Q, E, mined, key=mine.synthetic_key):
    """Are the built-in negatives already the hardest there are? With round 1's vectors Q
    (nq, d) and E (N, d) (L2-normalised: a dot product is Eq. 1's cosine) and its top mined
    document per row (`mined[i]`: a document index or None, row i of plan.rows), for every
    row with a built-in negative g:
      rank of g   the documents scoring above g that are neither a positive of the row's
                  query nor the same thing as its positive (key): the true negatives above
                  it; 0 = g is the hardest true negative of the subset's corpus
      false       g, or the mined document, is in fact the same thing as the positive
      gap         s⁺ − s(g) and s⁺ − s(mined): the smaller, the harder
    Returns {"rows": rows with g, "hardest": share of them with rank 0, "median_rank",
    "documents", "given_false", "mined_false": shares, "gap_given", "gap_mined": means,
    "given_harder": share of rows with s(g) ≥ s(mined)}."""
    ids = {}
    cls = np.array([ids.setdefault(key(d), len(ids)) for d in plan.docs])     # (N,) one id per thing
    S = Q @ E.T                                                               # (nq, d) @ (d, N) → (nq, N)
    ranks, g_false, m_false, gap_g, gap_m, harder = [], [], [], [], [], []
    for i, (_, qk, pk, gk) in enumerate(plan.rows):
        if gk is None:
            continue
        q, pos, g = plan.query_index[qk], plan.doc_index[pk], plan.doc_index[gk]
        s = S[q]                                                              # (N,)
        true_neg = cls != cls[pos]
        true_neg[list(plan.positives[q])] = False
        ranks.append(int(((s > s[g]) & true_neg).sum()))
        g_false.append(bool(cls[g] == cls[pos]))
        gap_g.append(float(s[pos] - s[g]))
        if mined[i] is not None:
            m = mined[i]
            m_false.append(bool(cls[m] == cls[pos]))
            gap_m.append(float(s[pos] - s[m]))
            harder.append(bool(s[g] >= s[m]))
    mean = lambda xs: float(np.mean(xs)) if xs else None                      # noqa: E731
    return {"rows": len(ranks), "documents": len(plan.docs), "hardest": mean([r == 0 for r in ranks]),
            "median_rank": float(np.median(ranks)) if ranks else None, "given_false": mean(g_false),
            "mined_false": mean(m_false), "gap_given": mean(gap_g), "gap_mined": mean(gap_m),
            "given_harder": mean(harder)}


def given_vs_mined_run(train_root, image_dir, mined_dir):
    """given_vs_mined per subset, from what a tools/mine.py run (no filter, one negative a
    row) left in mined_dir/.mining: its documents' and queries' vectors and its mined rows."""
    from tools import search
    from util.inputs import TrainRows
    subsets = sorted(os.listdir(os.path.join(mined_dir, ".mining")))
    rows = TrainRows(train_root, image_dir, subsets)
    out = {}
    for subset in subsets:
        plan = mine.SubsetPlan(subset, [r for r in rows.rows if r[0] == subset])
        work = os.path.join(mined_dir, ".mining", subset)
        E = np.asarray(search.load_vectors(os.path.join(work, "index")))                    # (N, d)
        shards = sorted(f for f in os.listdir(os.path.join(work, "queries")) if f.endswith(".npy"))
        Q = np.concatenate([np.load(os.path.join(work, "queries", f)) for f in shards])     # (nq, d)
        records = []
        for f in sorted(os.listdir(os.path.join(work, "mined"))):
            with open(os.path.join(work, "mined", f)) as fh:
                block = json.load(fh)
            if (block["manifest"]["docs"], block["manifest"]["queries"]) != (mine._sha256_json(plan.docs),
                                                                             mine._sha256_json(plan.queries)):
                raise RuntimeError(f"{work}/mined/{f}: mined from other documents or queries than "
                                   f"{train_root}'s {subset}")
            records += block["records"]
        if E.shape[0] != len(plan.docs) or len(Q) != len(plan.queries) or \
                [r["row"] for r in records] != list(range(len(plan.rows))):
            raise RuntimeError(f"{work}: its vectors or mined rows are not {train_root}'s {subset}")
        out[subset] = given_vs_mined(plan, Q, E, [r["neg"][0] if r["neg"] else None for r in records])
    return out


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
        c = done(f"round 2 c: {VARIANTS['c'][0]}", seed)       # the built-in negatives against c's
        if c is not None and "given_vs_mined" not in c:
            c["given_vs_mined"] = given_vs_mined_run(paths["train"], paths["image_dir"],
                                                     os.path.join(work, f"mined_c_seed{seed}"))
            save()
    print(summary(runs, ["round 1"] + [f"round 2 {v}: {VARIANTS[v][0]}" for v in args.variants]))


def summary(runs, names):
    """The four tables of docs/demo.md §7, mean ± std over the seeds in `runs`."""
    cols = ["hit@1", "hit@1 non-binding", "hit@1 binding", "match raw→raw", "match feat→feat"]
    out = ["Hit@1 and the held-out matching accuracy (non-binding tasks), mean ± std over seeds, %",
           "| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        out.append(f"| {name} | " + " | ".join(mean_std([r[c] for r in rs if c in r]) for c in cols) + " |")
    mined = [r for r in runs if "mining" in r]
    if mined:
        subsets = sorted(mined[0]["mining"]["subsets"])
        out += ["", "Mined negatives: rows left without one (they train with an in-batch negative), "
                "by subset, mean over seeds", "| run | " + " | ".join(subsets) + " |",
                "|---|" + "---|" * len(subsets)]
        for name in dict.fromkeys(r["config"] for r in mined):
            rs = [r["mining"]["subsets"] for r in mined if r["config"] == name]
            out.append(f"| {name} | " + " | ".join(f"{np.mean([x[s]['rows_without'] for x in rs]):.0f} / "
                                                   f"{rs[0][s]['rows']}" for s in subsets) + " |")
    veto = [r["mining"]["veto"] for r in mined if "veto" in r["mining"]]
    if veto:
        filters = list(veto[0]["all"])
        out += ["", "Mined negatives that are in fact positives (labels known), each filter on round 1's "
                "top-10 window, mean ± std over seeds, %; the filter's precision (what it drops that is in "
                "fact a positive) and recall (the positives in the window it drops)",
                "| filter | all subsets | ShapesT2I | ShapesVG | precision | precision ShapesT2I | recall |",
                "|---|---|---|---|---|---|---|"]
        for f in filters:
            cell = lambda s, m: mean_std([v[s][f][m] for v in veto if v[s][f][m] is not None])  # noqa: E731
            out.append(f"| {f} | " + " | ".join([cell(s, "false_negative_share") for s in ("all", "ShapesT2I", "ShapesVG")]
                                                + [cell("all", "precision"), cell("ShapesT2I", "precision"),
                                                   cell("all", "recall")]) + " |")
    given = [r["given_vs_mined"] for r in runs if "given_vs_mined" in r]
    if given:
        cols = [("hardest", "built-in is the hardest true negative, %", True),
                ("median_rank", "its median rank among true negatives", False),
                ("gap_given", "s⁺ − s(built-in)", False), ("gap_mined", "s⁺ − s(mined)", False),
                ("mined_false", "mined is in fact a positive, %", True)]
        out += ["", "The built-in negatives against the mined ones (variant c), by round 1's embedding, "
                "mean ± std over seeds", "| subset | " + " | ".join(c[1] for c in cols) + " |",
                "|---|" + "---|" * len(cols)]
        for s in sorted(given[0]):
            cells = []
            for k, _, percent in cols:
                xs = [g[s][k] for g in given if g[s][k] is not None]
                cells.append(mean_std(xs) if percent or not xs else
                             f"{np.mean(xs):.2f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.2f}")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
