"""
The matching head after training — Eq. 4's Yes/No judge used on held-out data, and the
one extension beyond the paper, reranking. The paper trains the matching loss to shape
the embedding; the same weights can also judge (query, candidate) pairs as a
cross-encoder.

  matching_accuracy   held-out Yes/No accuracy per view type on (query, positive) and
                      (query, hardest other candidate by embedding), and its two halves
  matching_p_yes      p(Yes) for one query and each of its candidates (one row each)
  rerank              an evaluate.Encoder's checkpoint as a cross-encoder: p(Yes) per candidate
  rerank_hits         Hit@1 before and after reordering the embedding's top k by p(Yes)
  MatchingAccuracy, Reranking
                      the two as evaluate.mmeb_report extras: per task, resumable, with their
                      columns in the Table-1 layout (format_table) or a table of their own

    python tools/rerank.py --model CKPT --mmeb_dir MMEB-eval --image_dir eval_images --top_k 4
    python tools/rerank.py --model runs/demo/checkpoint-2000 --benchmark synthetic \\
        --mmeb_dir runs/demo/demo_data/eval --image_dir runs/demo/demo_data --match_queries 150 --top_k 0

Every flag of evaluate.py applies (the MMEB ones; --out keeps per-task results for a
restart). Needs a checkpoint trained with matching (w_qdm > 0). The items are encoded
once: the matching passes reuse the embedding pass's encodings (evaluate.embed_task).
Tests: pytest tests/test_evaluate.py -k "matching or rerank"
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from data import MATCH_PROMPTS, collate_match, pos_slot_of  # noqa: E402
from masks import VIEW_SETS  # noqa: E402
from util.backbone import answer_token_ids  # noqa: E402
from util.dist import rank_world, sum_over_ranks  # noqa: E402
from util.inputs import check_batch_size, check_list, split_input  # noqa: E402

# ----------------------------------------------------------------------------------
# The head's judgments: held-out accuracy, p(Yes)

# view types of the 8 views (masks.VIEWS order): query side → document side
MATCH_VIEW_TYPES = {"raw→raw": (0, 2), "raw→feat": (1, 3), "feat→raw": (4, 6), "feat→feat": (5, 7)}


def match_prompt(config):
    """Segment P of the matching rows as the checkpoint was trained (train.py --match_prompt)."""
    return MATCH_PROMPTS[(config or {}).get("match_prompt") or "paper"]


def require_matching(config, what, views="raw"):
    """Scores from the matching head mean something only if it was trained (w_qdm > 0); a
    feature view (views "feat" / "all") also needs the projector, which an older merged
    export does not carry (util.backbone.load_export_heads: "projector": false)."""
    if not (config or {}).get("w_qdm"):
        raise ValueError(f"{what} needs a checkpoint trained with the matching loss (w_qdm > 0); "
                         f"this model has w_qdm={config.get('w_qdm') if config else None} "
                         f"({config.get('model') if config else 'raw backbone'}): its projector and "
                         "Yes/No answers are untrained, the scores would be meaningless")
    if views != "raw" and config.get("projector") is False:
        raise ValueError(f"{what} with the {views!r} views needs the projector (§3.2.3), and the merged "
                         f"export {config.get('model')} holds none (no rematch_projector.safetensors): "
                         "use views='raw', or the train.py checkpoint it was exported from")


def _hardest_negatives(pairs, scores, n):
    """(query, positive, hardest other candidate) item indices for the first n rows: the
    other candidate the embeddings score highest (rows with one distinct candidate: none)."""
    out = []
    for i, (qi, cands) in enumerate(pairs[:n]):
        cands = evaluate.distinct_candidates(cands)                                     # score_rows' columns
        if len(cands) > 1:
            j = 1 + int(scores[i, 1:len(cands)].argmax())
            out.append((qi, cands[0], cands[j]))
    return out


@torch.no_grad()
def matching_accuracy(model, processor, emb, n, batch_size=16, desc="matching", prompt=None):
    """
    Yes/No accuracy of the matching head (Eq. 4, p(Yes) > p(No)) on held-out pairs: for
    each of the first `n` rows, (query, positive) should get Yes and (query, hardest other
    candidate by embedding score) No. One unified 8-view pass per (q, d⁺, d⁻) instance
    (d⁺'s slot seeded per row: pos_slot_of), with Z = MLP(E) from the evaluation
    embeddings emb.Q, emb.D and the raw segments from emb's encoded items (embed_task);
    prompt: segment P as trained (match_prompt(config)).
    Returns {view type: accuracy over its 2·instances answers (MATCH_VIEW_TYPES),
    "yes": {view type: fraction of the positives answered Yes},
    "no": {view type: fraction of the hardest candidates answered No},
    "instances": count}; each view type's accuracy is the mean of its "yes" and "no".
    Sharded over ranks.
    """
    rank, world = rank_world()
    inst = _hardest_negatives(emb.pairs, emb.scores, n)
    lo, hi = (len(inst) * rank) // world, (len(inst) * (rank + 1)) // world
    yes, no = answer_token_ids(processor.tokenizer)
    right = torch.zeros(2, 8, dtype=torch.float64)          # per view: [on d⁻ ; on d⁺]
    was_training = model.training
    model.eval()
    for s in range(lo, hi, batch_size):
        chunk = range(s, min(s + batch_size, hi))
        q = [emb.item(processor, "q", inst[i][0], desc) for i in chunk]
        dp = [emb.item(processor, "d", inst[i][1], desc) for i in chunk]
        dn = [emb.item(processor, "d", inst[i][2], desc) for i in chunk]
        pos_slot = [pos_slot_of(desc, i) for i in chunk]
        mbatch = collate_match(q, dp, dn, processor.tokenizer, VIEW_SETS["all"], pos_slot,
                           prompt=prompt or MATCH_PROMPTS["paper"])
        E = [X[[inst[i][k] for i in chunk]].to(model.device) for k, X in ((0, emb.Q), (1, emb.D), (2, emb.D))]
        logits, labels = model.match(mbatch, *E)                                # (M·8, vocab)
        is_pos = (labels == yes).reshape(len(chunk), 8)                     # (M, 8): the view reads d⁺
        hit = ((logits[:, yes] > logits[:, no]).reshape(len(chunk), 8) == is_pos).double()  # (M, 8)
        right += torch.stack([(hit * ~is_pos).sum(0), (hit * is_pos).sum(0)]).cpu()   # (2, 8)
    model.train(was_training)
    right = sum_over_ranks(right, model.device)
    if not inst:                                 # no row with another candidate: n/a, not 0.0
        return {**dict.fromkeys(MATCH_VIEW_TYPES), "yes": dict.fromkeys(MATCH_VIEW_TYPES),
                "no": dict.fromkeys(MATCH_VIEW_TYPES), "instances": 0}
    split = {side: {k: (right[i, a] + right[i, b]).item() / len(inst) for k, (a, b) in MATCH_VIEW_TYPES.items()}
             for i, side in ((1, "yes"), (0, "no"))}             # a view type: one d⁺, one d⁻ view
    return {**{k: (split["yes"][k] + split["no"][k]) / 2 for k in MATCH_VIEW_TYPES}, **split,
            "instances": len(inst)}


# the views that score a candidate, all reading slot 1 (the row holds no slot 2)
RERANK_VIEW_SETS = {"raw": (("Q", "D1"),), "feat": (("Zq", "Zd1"),),
                    "all": (("Q", "D1"), ("Q", "Zd1"), ("Zq", "D1"), ("Zq", "Zd1"))}
RERANK_VIEWS = tuple(RERANK_VIEW_SETS)


@torch.no_grad()
def matching_p_yes(model, processor, q_item, E_q, d_items, E_d, views="raw", batch_size=16,
                   prompt=None, logit=False):
    """
    p(Yes | Yes or No) = sigmoid(logit_Yes − logit_No) of the trained matching prompt for
    one query and each of its candidates (logit=True: logit_Yes − logit_No itself, what the
    export's CrossEncoder returns). q_item, d_items: encoded items (encode_item);
    E_q (d,), E_d (n, d): their fused embeddings (used by the feature views). Each candidate
    gets a row of its own holding only slot 1 — [P, Q, Zq, D1, Zd1, H, answers], the
    segments its views use — so its score depends on nothing but (query, candidate): in
    a row with a second document, the second one's length would shift the answers'
    positions (readings §3). views: "raw" (Q, D1), "feat" (Zq, Zd1), or "all" (the mean
    over the 4 views). prompt: segment P as trained (match_prompt(config)). Returns (n,) fp32.
    """
    if views not in RERANK_VIEW_SETS:
        raise ValueError(f"views must be one of {RERANK_VIEWS}, got {views!r}")
    view_set = RERANK_VIEW_SETS[views]
    yes, no = answer_token_ids(processor.tokenizer)
    n, dev = len(d_items), model.device
    out = torch.zeros(n)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(s + batch_size, n)))
        docs = [d_items[j] for j in idx]
        mbatch = collate_match([q_item] * len(idx), docs, docs, processor.tokenizer, view_set,
                           [1] * len(idx), prompt=prompt or MATCH_PROMPTS["paper"])   # no slot 2
        E = [E_q.expand(len(idx), -1), E_d[idx], E_d[idx]]
        logits, _ = model.match(mbatch, *(e.to(dev) for e in E))          # (R·V, vocab)
        p = (logits[:, yes] - logits[:, no]).float()                  # (R·V,)
        p = p if logit else torch.sigmoid(p)
        out[idx] = p.reshape(len(idx), len(view_set)).mean(1).cpu()   # (R,)
    return out


def rerank(encoder, query, candidates, views="raw", query_instruction=None, instruction=None,
           batch_size=16):
    """
    Score candidates with the trained matching head (Eq. 4's chat prompt, App. S7) — the
    same weights that embed, used as a cross-encoder. encoder: an evaluate.Encoder. query
    and each candidate: a text (str), an image (PIL image or pathlib.Path), or an (image,
    text) pair (the image may be a str path there); the instructions as for
    Encoder.encode() (a bare image candidate: DOC_IMAGE_INSTRUCTION, as the export's
    CrossEncoder gives it). views: "raw" (the raw query and candidate, default), "feat" (their
    embeddings fed back as feature tokens) or "all" (mean of the 4 views).
    Returns p(Yes) per candidate, (n,) fp32 — higher is more relevant. Needs a checkpoint
    trained with matching (w_qdm > 0); others raise ValueError.
    """
    require_matching(encoder.config, "rerank", views)
    check_batch_size(batch_size, "rerank")
    check_list(candidates, "candidates", "rerank")
    q_text, q_image = split_input(query, "rerank: query")
    cands = [split_input(c, f"rerank: candidates[{i}]") for i, c in enumerate(candidates)]
    q = [("q", evaluate.format_input(q_text, q_image is not None, query_instruction), q_image)]
    d = [("d", evaluate.format_document(t, im is not None, instruction), im) for t, im in cands]
    encoded = {}
    E = evaluate.embed_inputs(encoder.model, encoder.processor, q + d, batch_size, desc="rerank",
                              distributed=False, keep=encoded.__setitem__)    # (1 + n, d)
    items = [encoded[i] for i in range(len(q + d))]                            # encoded once
    return matching_p_yes(encoder.model, encoder.processor, items[0], E[0], items[1:], E[1:], views,
                          batch_size, match_prompt(encoder.config))


def rerank_hits(model, processor, emb, k, views="raw", n=None, batch_size=16, desc="rerank",
                prompt=None):
    """
    Hit@1 of the first n queries (default all) of one task before and after reranking: the
    embedding retrieval's top k candidates are reordered by the matching head's p(Yes)
    (matching_p_yes); the query is a hit after reranking if its positive is among
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
        p = matching_p_yes(model, processor, emb.item(processor, "q", qi, desc), emb.Q[qi],
                                    [emb.item(processor, "d", c, desc) for c in docs], emb.D[docs],
                                    views, batch_size, prompt)             # (k,)
        at = top.index(0)
        hits[1] += float(bool((torch.cat([p[:at], p[at + 1:]]) < p[at]).all()))
    hits = sum_over_ranks(hits, model.device)
    return {"hit@1_before": hits[0].item() / max(n, 1), "hit@1_after": hits[1].item() / max(n, 1),
            "k": k, "views": views, "queries": n}

# ----------------------------------------------------------------------------------
# The head's report (matching means, the Yes/No halves) and the two mmeb_report extras

def matching_means(matching, tasks, half=None):
    """{view type: mean matching accuracy over `tasks`} (those of them that have one; a
    task without instances, n/a, is left out); half "yes" / "no": the mean of that half of
    it instead (matching_accuracy)."""
    done = [t for t in tasks if t in matching and matching[t].get("instances") != 0]
    of = (lambda t: matching[t]) if half is None else (lambda t: matching[t][half])  # noqa: E731
    return {v: sum(of(t)[v] for t in done) / len(done) for v in MATCH_VIEW_TYPES} if done else {}


YES_NO_TITLE = ("Matching head, the two halves of its accuracy (%): Yes to the positive / No to the "
                "hardest other candidate by embedding score")


def yes_no_rows(matching, table, match_apart=()):
    """The rows of format_table's last block: per task and view type, the fraction of
    positives answered Yes and of hardest candidates answered No (matching_accuracy's
    "yes" and "no"; the accuracy printed above is their mean), then their means over the
    tasks as in the block above. None when no task has the split (older results)."""
    tasks = [t for t in table if t in matching and "yes" in matching[t]]
    if not tasks:
        return None
    cell = lambda y, n: "n/a" if y is None else f"{100 * y:.1f} / {100 * n:.1f}"   # noqa: E731
    rows = [["task", *MATCH_VIEW_TYPES]]
    rows += [[t, *(cell(matching[t]["yes"][v], matching[t]["no"][v]) for v in MATCH_VIEW_TYPES)]
             for t in tasks]
    for label, group in mean_groups(tasks, match_apart):
        if group:
            y, n = (matching_means(matching, group, half) for half in ("yes", "no"))
            rows.append([label, *(cell(y[v], n[v]) for v in MATCH_VIEW_TYPES)])
    return rows


def mean_groups(tasks, match_apart=()):
    """[(label, tasks)] of the matching mean rows: one "mean" row, or, when some tasks are
    set apart (the demo's binding tasks), "mean (others)" and "mean (<the apart tasks>)"."""
    apart = [t for t in tasks if t in match_apart]
    others = [t for t in tasks if t not in apart]
    return [("mean (others)", others), ("mean (" + ", ".join(apart) + ")", apart)] if apart \
        else [("mean", others)]


def format_rerank_table(rerank):
    """Per task: Hit@1 (%) of the embedding retrieval and after reranking its top k with the
    matching head, on the same queries; then the mean over tasks."""
    rows = [["task", "queries", "k", "views", "Hit@1 embedding", "Hit@1 reranked"]]
    for t, r in rerank.items():
        rows.append([t, str(r["queries"]), str(r["k"]), r["views"], evaluate.percent_cell(r["hit@1_before"]),
                     evaluate.percent_cell(r["hit@1_after"])])
    done = [r for r in rerank.values() if r is not None and r["queries"]]   # a missing task has none
    mean = lambda key: evaluate.percent_cell(sum(r[key] for r in done) / len(done)) if done else "n/a"  # noqa: E731
    rows.append(["mean", "", "", "", mean("hit@1_before"), mean("hit@1_after")])
    return ("Reranking the embedding's top k with the matching head (Eq. 4)\n"
            + evaluate.render_table(rows, False))


class MatchingAccuracy:
    """The matching head's held-out accuracy as an evaluate.mmeb_report extra:
    matching_accuracy on the first `queries` rows of each task, the prompt as trained;
    `apart`: tasks whose accuracy is averaged apart (the demo's binding tasks)."""
    name = "matching"

    def __init__(self, config, queries, batch_size=16, apart=()):
        require_matching(config, "matching accuracy", views="all")   # all 8 views
        self.queries, self.batch_size, self.apart = queries, batch_size, tuple(apart)
        self.prompt = match_prompt(config)
        self.settings = self.rows = queries              # a saved result of other settings is redone

    def run(self, model, processor, emb, task):
        return matching_accuracy(model, processor, emb, self.queries, self.batch_size, desc=task,
                                 prompt=self.prompt)

    def line(self, r):
        if not r["instances"]:
            return "matching n/a (no row with another candidate)"
        return "matching " + ", ".join(f"{k} {100 * v:.1f}" for k, v in r.items() if k in MATCH_VIEW_TYPES)

    def columns(self, matching, tasks):
        """format_table's matching part: per task the accuracy (%) per view type (query side →
        document side), the mean rows, and the Yes/No halves as a last block."""
        if not matching:
            return None
        cells = {t: [evaluate.percent_cell(matching[t][v]) if matching[t][v] is not None else "n/a"
                     for v in MATCH_VIEW_TYPES] for t in matching}
        means = [(label, [evaluate.percent_cell(m[v]) for v in MATCH_VIEW_TYPES])
                 for label, group in mean_groups(tasks, self.apart)
                 for m in [matching_means(matching, group)] if m]
        split = yes_no_rows(matching, tasks, self.apart)
        return ([f"match {v}" for v in MATCH_VIEW_TYPES], cells, means,
                (YES_NO_TITLE, split) if split else None)

    def table(self, matching):
        return None                                      # its columns are in format_table's


class Reranking:
    """Reranking as an evaluate.mmeb_report extra: rerank_hits with these settings, the
    matching prompt as trained; its own table (format_rerank_table)."""
    name = "rerank"

    def __init__(self, config, top_k, views="raw", queries=None, batch_size=16):
        require_matching(config, "reranking", views)
        self.top_k, self.views, self.queries, self.batch_size = top_k, views, queries, batch_size
        self.prompt = match_prompt(config)
        self.settings = [top_k, views, queries]          # a saved result with others is redone
        self.rows = queries if queries is not None else 10 ** 9   # encoded items kept for these rows

    def run(self, model, processor, emb, task):
        return rerank_hits(model, processor, emb, self.top_k, self.views, self.queries,
                           self.batch_size, desc=task, prompt=self.prompt)

    def line(self, r):
        return (f"reranked top {self.top_k} ({self.views}): Hit@1 "
                f"{100 * r['hit@1_before']:.1f} → {100 * r['hit@1_after']:.1f}")

    def columns(self, rerank, tasks):
        return None

    @staticmethod
    def table(rerank):
        return format_rerank_table(rerank)


def mmeb_rerank_report(model, processor, mmeb_dir, image_dir, tasks=None, config=None, top_k=4,
                       views="raw", queries=None, batch_size=16, **kw):
    """evaluate.mmeb_report with reranking: its result plus {"rerank": {task: rerank_hits}}."""
    extra = Reranking(dict(config or {}), top_k, views, queries, batch_size)
    return evaluate.mmeb_report(model, processor, mmeb_dir, image_dir, tasks, config, batch_size,
                                extras=[extra], **kw)



# ----------------------------------------------------------------------------------
# CLI: evaluate.py's flags and these two

def parse_args(argv=None):
    p = evaluate.build_parser("The trained matching head on MMEB-format data: its held-out Yes/No "
                              "accuracy (--match_queries) and reranking each query's top k "
                              "candidates by embedding, Hit@1 before and after (--top_k).")
    p.add_argument("--match_queries", type=int, default=0,
                   help="report the matching head's Yes/No accuracy per view type (raw/feat query "
                        "→ raw/feat document) on (query, positive) and (query, hardest other "
                        "candidate) pairs of the first N queries per task (0 = off)")
    p.add_argument("--top_k", type=int, default=4,
                   help="candidates per query to rerank (>= 2): the embedding's top k (0 = no reranking)")
    p.add_argument("--views", choices=RERANK_VIEWS, default="raw",
                   help="matching views that score a candidate: raw (default), feat, or all (mean of 4)")
    p.add_argument("--queries", type=int, default=None,
                   help="rerank only the first N queries of each task (default: all)")
    args = evaluate.parse_args(argv, p)
    if not args.mmeb_dir or args.zeroshot:
        p.error("the matching head runs on MMEB-format data: give --mmeb_dir and --image_dir (no --zeroshot)")
    if args.top_k == 1 or args.top_k < 0:
        p.error(f"--top_k must be >= 2 (or 0: no reranking), got {args.top_k}")
    if args.queries is not None and args.queries < 1:
        p.error(f"--queries must be >= 1, got {args.queries}")
    if not args.top_k and not args.match_queries:
        p.error("nothing to do: give --top_k K (reranking) and/or --match_queries N")
    return args


def main(argv=None):
    args = parse_args(argv)
    return evaluate.main(args=args, extras=lambda config: (
        [MatchingAccuracy(config, args.match_queries, args.batch_size)] if args.match_queries else [])
        + ([Reranking(config, args.top_k, args.views, args.queries, args.batch_size)] if args.top_k else []))


if __name__ == "__main__":
    main()
