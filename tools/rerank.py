"""
Reranking with the matching head — the one extension beyond the paper. The paper trains
the matching loss (Eq. 4) to shape the embedding and does not rerank with it; the same
weights that embed can also judge (query, candidate) pairs as a cross-encoder: the
embedding retrieval's top k candidates of each query are reordered by p(Yes)
(evaluate.matching_p_yes), and Hit@1 is reported before and after, on the same queries.

    python tools/rerank.py --model CKPT --mmeb_dir MMEB-eval --image_dir eval_images --top_k 4
    python tools/rerank.py --model runs/demo/checkpoint-2000 --benchmark synthetic \\
        --mmeb_dir runs/demo/demo_data/eval --image_dir runs/demo/demo_data --top_k 4

Every flag of evaluate.py applies (the MMEB ones; --out keeps per-task results for a
restart). Needs a checkpoint trained with matching (w_qdm > 0). The items are encoded
once: the rerank passes reuse the embedding pass's encodings (evaluate.embed_task).
For one query and your own candidates: evaluate.Encoder.rerank.
Tests: pytest tests/test_evaluate.py -k rerank
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from losses import rank_world  # noqa: E402
from util.dist import sum_over_ranks  # noqa: E402


def rerank_hits(model, processor, emb, k, views="raw", n=None, batch_size=16, desc="rerank",
                prompt=None):
    """
    Hit@1 of the first n queries (default all) of one task before and after reranking: the
    embedding retrieval's top k candidates are reordered by the matching head's p(Yes)
    (evaluate.matching_p_yes); the query is a hit after reranking if its positive is among
    the top k and gets a strictly higher p(Yes) than the other k − 1 (ties are misses, as
    in hit_at_1). emb: the task's evaluate.TaskEmbeddings. Sharded over ranks.
    Returns {"hit@1_before", "hit@1_after", "k", "views", "queries"}.
    """
    rank, world = rank_world()
    n = len(emb.pairs) if n is None else min(n, len(emb.pairs))
    lo, hi = (n * rank) // world, (n * (rank + 1)) // world
    hits = torch.zeros(2, dtype=torch.float64)                             # before, after
    for i in range(lo, hi):
        qi, cands = emb.pairs[i]
        cands = evaluate.distinct_candidates(cands)                        # score_rows' columns
        s = emb.scores[i, :len(cands)]
        hits[0] += float(bool((s[1:] < s[0]).all()))
        top = torch.argsort(s, descending=True, stable=True)[:k].tolist()  # column indices
        if 0 not in top:
            continue                                                       # positive not retrieved
        docs = [cands[j] for j in top]
        p = evaluate.matching_p_yes(model, processor, emb.item(processor, "q", qi, desc), emb.Q[qi],
                                    [emb.item(processor, "d", c, desc) for c in docs], emb.D[docs],
                                    views, batch_size, prompt)             # (k,)
        at = top.index(0)
        hits[1] += float(bool((torch.cat([p[:at], p[at + 1:]]) < p[at]).all()))
    hits = sum_over_ranks(hits, model.device)
    return {"hit@1_before": hits[0].item() / max(n, 1), "hit@1_after": hits[1].item() / max(n, 1),
            "k": k, "views": views, "queries": n}


class Reranking:
    """The per-task measurement evaluate.mmeb_report runs on each task's embeddings
    (its `extra`): rerank_hits with these settings, the matching prompt as trained."""
    name = "rerank"

    def __init__(self, config, top_k, views="raw", queries=None, batch_size=16):
        evaluate.require_matching(config, "reranking")
        self.top_k, self.views, self.queries, self.batch_size = top_k, views, queries, batch_size
        self.prompt = evaluate.match_prompt(config)
        self.settings = [top_k, views, queries]          # a saved result with others is redone
        self.rows = queries if queries is not None else 10 ** 9   # encoded items kept for these rows

    def run(self, model, processor, emb, task):
        return rerank_hits(model, processor, emb, self.top_k, self.views, self.queries,
                           self.batch_size, desc=task, prompt=self.prompt)

    def line(self, r):
        return (f"reranked top {self.top_k} ({self.views}): Hit@1 "
                f"{100 * r['hit@1_before']:.1f} → {100 * r['hit@1_after']:.1f}")

    @staticmethod
    def table(rerank):
        return format_rerank_table(rerank)


def mmeb_rerank_report(model, processor, mmeb_dir, image_dir, tasks=None, config=None, top_k=4,
                       views="raw", queries=None, batch_size=16, **kw):
    """evaluate.mmeb_report with reranking: its result plus {"rerank": {task: rerank_hits}}."""
    extra = Reranking(dict(config or {}), top_k, views, queries, batch_size)
    return evaluate.mmeb_report(model, processor, mmeb_dir, image_dir, tasks, config, batch_size,
                                extra=extra, **kw)


def format_rerank_table(rerank):
    """Per task: Hit@1 (%) of the embedding retrieval and after reranking its top k with the
    matching head, on the same queries; then the mean over tasks."""
    rows = [["task", "queries", "k", "views", "Hit@1 embedding", "Hit@1 reranked"]]
    for t, r in rerank.items():
        rows.append([t, str(r["queries"]), str(r["k"]), r["views"], evaluate.percent_cell(r["hit@1_before"]),
                     evaluate.percent_cell(r["hit@1_after"])])
    mean = lambda key: sum(r[key] for r in rerank.values()) / len(rerank)   # noqa: E731
    rows.append(["mean", "", "", "", evaluate.percent_cell(mean("hit@1_before")), evaluate.percent_cell(mean("hit@1_after"))])
    return ("Reranking the embedding's top k with the matching head (Eq. 4)\n"
            + evaluate.render_table(rows, False))


def parse_args(argv=None):
    p = evaluate.build_parser("Rerank each query's top k candidates (by embedding) with the trained "
                              "matching head; Hit@1 before and after (MMEB-format data).")
    p.add_argument("--top_k", type=int, default=4,
                   help="candidates per query to rerank (>= 2): the embedding's top k")
    p.add_argument("--views", choices=evaluate.RERANK_VIEWS, default="raw",
                   help="matching views that score a candidate: raw (default), feat, or all (mean of 4)")
    p.add_argument("--queries", type=int, default=None,
                   help="rerank only the first N queries of each task (default: all)")
    args = evaluate.parse_args(argv, p)
    if not args.mmeb_dir or args.zeroshot:
        p.error("reranking runs on MMEB-format data: give --mmeb_dir and --image_dir (no --zeroshot)")
    if args.top_k < 2:
        p.error(f"--top_k must be >= 2, got {args.top_k}")
    if args.queries is not None and args.queries < 1:
        p.error(f"--queries must be >= 1, got {args.queries}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return evaluate.main(args=args, extra=lambda config: Reranking(
        config, args.top_k, args.views, args.queries, args.batch_size))


if __name__ == "__main__":
    main()
