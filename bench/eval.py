"""
Benchmark of the deduplicating MMEB evaluation (evaluate.py: "each distinct (text, image)
is embedded once per side") against a naive evaluation that embeds, for every row, its
query and its whole candidate list, duplicates included.

Data: the built-in synthetic benchmark (demo.make_synthetic, MMEB's own file format)
written to a temporary directory, --queries rows per task. Images (56-112 px) are
resized to about image_size² pixels, so an image costs (image_size/28)² tokens as an
MMEB image does. Side by side in one run, per task:
  dedup   evaluate.mmeb_report(tasks=[task]) (its per-task print is muted);
  naive   the loop below: per row, embed_inputs on [query] + candidates, cosine scores,
          the same rule for a copy of the positive later in its list (score_rows), Hit@1.
Reported: embedded items and ReMatch.embed calls (batches) of each, median wall time
(reading the parquet file and loading images included in both), their ratios, whether
both give the same Hit@1, and the largest score difference (mmeb_report's scores
recomputed untimed with its own evaluate.embed_task). The model
is the untrained tiny backbone with K learnable tokens: its Hit@1 is near chance, which
is fine for a cost comparison.

    python bench/eval.py                                          # 4 tasks, 20 queries each
    python bench/eval.py --tasks ShapesCLS ShapesVG --queries 100 --reps 3
    python bench/eval.py --reps 1 --warmup 0 --queries 5 --tasks ShapesCLS ShapesT2I   # smoke run
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, fmt, print_config, print_table, ratio, setup, time_variants  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402
from demo import DEMO_EVAL_TASKS, make_synthetic  # noqa: E402
from evaluate import cosine_scores, embed_inputs, embed_task, hit_at_1, mmeb_report  # noqa: E402
from model import ReMatch  # noqa: E402


PATHS = ("naive", "dedup")


class CountingReMatch(ReMatch):
    """ReMatch that counts its embedding calls (batches) and the items they embed."""
    calls = items = 0

    def embed(self, batch, side):
        self.calls += 1
        self.items += len(batch["input_ids"])
        return super().embed(batch, side)


def naive_hit_at_1(model, processor, eval_dir, image_dir, task, batch_size):
    """Hit@1 and scores (rows, max candidates) of `task`, embedding every row's query and
    candidates afresh (no dedup)."""
    rows = read_eval_task(eval_dir, task)
    scores = torch.full((len(rows), max(len(r["tgt_text"]) for r in rows)), float("-inf"))
    for i, r in enumerate(rows):
        keys = [(r["qry_text"], r["qry_img_path"])] + list(zip(r["tgt_text"], r["tgt_img_path"]))
        items = [("q" if k == 0 else "d", text, os.path.join(image_dir, path) if path else None)
                 for k, (text, path) in enumerate(keys)]
        E = embed_inputs(model, processor, items, batch_size, distributed=False)   # (1 + n_cand, d)
        cands = [1] + [k for k in range(2, len(keys)) if keys[k] != keys[1]]       # as score_rows
        scores[i, :len(cands)] = cosine_scores(E[:1], E[cands])[0]                # (n_cand,)
    return hit_at_1(scores), scores


def dedup_scores(model, processor, eval_dir, image_dir, task, batch_size):
    """The scores mmeb_report computes (its own embed_task, untimed), to compare with naive's."""
    return embed_task(model, processor, read_eval_task(eval_dir, task), task, image_dir,
                      batch_size=batch_size).scores                      # (rows, max candidates)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Deduplicating MMEB evaluation vs a naive per-row loop.")
    p.add_argument("--tasks", nargs="+", default=["ShapesCLS", "ShapesVQA", "ShapesT2I", "ShapesI2T"],
                   choices=list(DEMO_EVAL_TASKS), help="synthetic eval tasks to run")
    p.add_argument("--queries", type=int, default=20, help="rows (queries) per task")
    p.add_argument("--batch", type=int, default=16, help="embedding batch size (both paths)")
    p.add_argument("--num_tokens", type=int, default=16, help="K learnable tokens of the model")
    p.add_argument("--data_dir", default=None,
                   help="where to write the synthetic benchmark (default: a temporary directory)")
    return add_common_args(p, reps=3).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    backbone, processor = setup(args)
    model = CountingReMatch(backbone, num_tokens=args.num_tokens, seed=args.seed).eval()
    with contextlib.ExitStack() as stack:
        root = args.data_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_eval_"))
        data = make_synthetic(root, seed=args.seed, train_rows=1, eval_queries=args.queries)
        print_config(args, data_root=root)

        last, scores = {}, {}                                    # (task, path) → (hit@1, calls, items)

        def run(task, path):
            def fn():
                model.calls = model.items = 0
                if path == "dedup":
                    with contextlib.redirect_stdout(io.StringIO()):
                        hit = mmeb_report(model, processor, data["eval"], data["image_dir"], tasks=[task],
                                          batch_size=args.batch, progress=False)["hit@1"][task]
                else:
                    hit, scores[task] = naive_hit_at_1(model, processor, data["eval"], data["image_dir"],
                                                       task, args.batch)
                last[task, path] = (hit, model.calls, model.items)
            return fn

        fns = {(task, path): run(task, path) for task in args.tasks for path in PATHS}
        t = time_variants(fns, args.reps, args.warmup, args.device)
        delta = {task: (scores[task] - dedup_scores(model, processor, data["eval"], data["image_dir"], task,
                                                    args.batch)).nan_to_num().abs().max().item()
                 for task in args.tasks}                         # -inf padding at the same places

    header = ["task", "naive items", "dedup items", "items naive/dedup", "naive calls", "dedup calls",
              "naive s", "dedup s", "time naive/dedup", "Hit@1 naive", "Hit@1 dedup", "same",
              "max abs Δ score"]
    rows = []
    for name, tasks in [(task, [task]) for task in args.tasks] + [("total", args.tasks)]:
        n = {p: sum(last[k, p][2] for k in tasks) for p in PATHS}        # embedded items
        c = {p: sum(last[k, p][1] for k in tasks) for p in PATHS}        # ReMatch.embed calls
        s = {p: sum(t[k, p] for k in tasks) for p in PATHS}              # median seconds
        hit = {p: last[tasks[0], p][0] for p in PATHS}
        check = ([f"{hit['naive']:.3f}", f"{hit['dedup']:.3f}", "yes" if hit["naive"] == hit["dedup"] else "NO",
                  f"{delta[name]:.1e}"] if name != "total" else [""] * 4)
        rows.append([name, n["naive"], n["dedup"], ratio(n["naive"], n["dedup"]), c["naive"], c["dedup"],
                     fmt(s["naive"], ".2f"), fmt(s["dedup"], ".2f"), ratio(s["naive"], s["dedup"]), *check])
    print(f"\nmedian of {args.reps} (after {args.warmup} warm-up), {args.queries} queries per task, "
          f"embedding batch {args.batch}, K={args.num_tokens}")
    print_table(header, rows)
    return {"time": t, "counts": last, "max_abs_score_diff": delta}


if __name__ == "__main__":
    main()
