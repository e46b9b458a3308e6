"""
One export folder, two sentence-transformers classes: retrieval with SentenceTransformer,
then the top k reranked with CrossEncoder (the matching head), on a trained checkpoint's
eval tasks. Side by side in one run:

  - Hit@1 before and after reranking through sentence-transformers, next to the same two
    numbers from this repository (evaluate.embed_task, tools/rerank.rerank_hits): the
    export on trained weights, checked end to end;
  - the cost per query: encode the query and score it against the task's candidates
    (retrieve), then the same plus the CrossEncoder on the top k (retrieve + rerank);
    median over interleaved repetitions, ms per query and the ratio.

    python bench/serving.py --checkpoint runs/demo/checkpoint-2000 --data runs/demo/demo_data
    python bench/serving.py --checkpoint CK --data DIR --tasks ShapesColour ShapesVQA --top_k 4 --queries 100

--data: a directory as the demo writes it (eval/<Task>/*.parquet, images relative to it);
MMEB-format data works the same with --tasks and --meta. Needs requirements-extra.txt.
About 2 minutes on 2 CPU cores for the demo's 8 tasks at 100 queries each.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev
from model import load_rematch
from tools.export_merged import export_merged
from tools.rerank import match_prompt, rerank_hits
from util.backbone import is_export, resolve_checkpoint
from util.benchmarks import read_eval_task
from util.inputs import load_image


def st_input(text, path):
    """sentence-transformers' form of an MMEB input: the MMEB string, with its image."""
    if path is None:
        return text
    image = load_image(path, path)
    return {"image": image, "text": text} if text else image


def hits(scores_of, pairs, top_k, rerank=None):
    """Hit@1 by the scores (ties miss, as evaluate.hit_at_1), and after reordering each
    row's top k by rerank(query index, candidate indices) → scores."""
    before = after = 0
    for qi, cands in pairs:
        cands = ev.distinct_candidates(cands)
        s = scores_of(qi, cands)                                           # (n,)
        before += bool((s[1:] < s[0]).all())
        top = torch.argsort(s, descending=True, stable=True)[:top_k].tolist()
        if rerank is not None and 0 in top:
            p = rerank(qi, [cands[j] for j in top])
            at = top.index(0)
            after += bool((torch.cat([p[:at], p[at + 1:]]) < p[at]).all())
    return before / len(pairs), after / len(pairs)


class Served:
    """One task through the export: its inputs in sentence-transformers' form, the
    candidates encoded once (encode_document), queries encoded on use."""

    def __init__(self, embedder, reranker, emb, top_k):
        self.embedder, self.reranker, self.top_k = embedder, reranker, top_k
        self.Q_in = [st_input(t, im) for t, im in emb.q_inputs]
        self.D_in = [st_input(t, im) for t, im in emb.d_inputs]
        self.Q = embedder.encode_query(self.Q_in, convert_to_tensor=True)                # (nq, d)
        self.D = embedder.encode_document(self.D_in, convert_to_tensor=True)             # (nd, d)

    def score(self, qi, cands):
        return self.D[cands] @ self.Q[qi]                                              # (n,)

    def rerank(self, qi, docs):
        pairs = [(self.Q_in[qi], self.D_in[j]) for j in docs]
        return self.reranker.predict(pairs, convert_to_tensor=True).float()          # (k,)

    def retrieve(self, qi):
        """The timed first stage: encode the query, score every candidate, the top k."""
        q = self.embedder.encode_query([self.Q_in[qi]], convert_to_tensor=True)[0]
        return torch.topk(self.D @ q, min(self.top_k, len(self.D))).indices.tolist()

    def retrieve_rerank(self, qi):
        return self.rerank(qi, self.retrieve(qi))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint trained with matching, or "
                   "its merged export (folder or hub id)")
    p.add_argument("--data", required=True, help="eval/<Task>/*.parquet below it, images relative to it")
    p.add_argument("--tasks", nargs="*", default=None, help="default: the demo's eval tasks")
    p.add_argument("--meta", default=None, help="meta-task of --tasks outside the demo (target prompts)")
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--queries", type=int, default=100, help="rows per task")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (interleaved)")
    p.add_argument("--timed_queries", type=int, default=20, help="queries per task in the timing")
    p.add_argument("--export", default=None, help="an export of --checkpoint (default: written to a temp dir)")
    a = p.parse_args(argv)
    from sentence_transformers import CrossEncoder, SentenceTransformer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from demo import DEMO_EVAL_TASKS
    tasks = {t: DEMO_EVAL_TASKS.get(t, (a.meta, False))[0] for t in (a.tasks or DEMO_EVAL_TASKS)}
    eval_dir, image_dir = os.path.join(a.data, "eval"), a.data
    model, processor, config = load_rematch(a.checkpoint, device="cpu")
    tmp = None
    local = resolve_checkpoint(a.checkpoint)
    if a.export is None and is_export(local):           # an export is its own export
        a.export = local
    if a.export is None:
        tmp = tempfile.TemporaryDirectory()
        a.export = os.path.join(tmp.name, "export")
        export_merged(a.checkpoint, a.export, dtype=torch.float32)   # the repository's precision: equal columns
    embedder = SentenceTransformer(a.export, trust_remote_code=True)
    reranker = CrossEncoder(a.export, trust_remote_code=True)
    print(f"checkpoint {a.checkpoint} | export {a.export} | top_k {a.top_k} | {a.queries} queries "
          f"per task | {torch.get_num_threads()} threads | {a.reps} reps of {a.timed_queries} queries per task")

    rows_out, times = [], {"retrieve": [], "retrieve + rerank": []}
    for task, meta in tasks.items():
        rows = read_eval_task(eval_dir, task, max_rows=a.queries)
        emb = ev.embed_task(model, processor, rows, task, image_dir, config, meta, keep_rows=len(rows))
        repo = rerank_hits(model, processor, emb, a.top_k, "raw", prompt=match_prompt(config))
        st = Served(embedder, reranker, emb, a.top_k)
        st_before, st_after = hits(st.score, emb.pairs, a.top_k, st.rerank)
        rows_out.append((task, repo["hit@1_before"], st_before, repo["hit@1_after"], st_after))
        timed = [qi for qi, _ in emb.pairs[:a.timed_queries]]
        for _ in range(a.reps):                                          # interleaved variants
            for name, fn in (("retrieve", st.retrieve), ("retrieve + rerank", st.retrieve_rerank)):
                t0 = time.perf_counter()
                for qi in timed:
                    fn(qi)
                times[name].append((time.perf_counter() - t0) / len(timed))

    print(f"\n{'task':<16} {'Hit@1 repo':>10} {'Hit@1 ST':>9} {'reranked repo':>14} {'reranked ST':>12}")
    for task, *v in rows_out:
        print(f"{task:<16} " + " ".join(f"{100 * x:>{w}.1f}" for x, w in zip(v, (10, 9, 14, 12))))
    means = [statistics.mean(r[i] for r in rows_out) for i in range(1, 5)]
    print(f"{'mean':<16} " + " ".join(f"{100 * x:>{w}.1f}" for x, w in zip(means, (10, 9, 14, 12))))
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"\ncost per query (median of {len(times['retrieve'])} task × rep runs): retrieve "
          f"{med['retrieve']:.1f} ms | retrieve + rerank top {a.top_k} {med['retrieve + rerank']:.1f} ms | "
          f"ratio {med['retrieve + rerank'] / med['retrieve']:.2f}x")
    if tmp is not None:
        tmp.cleanup()
    return rows_out, med


if __name__ == "__main__":
    main()
