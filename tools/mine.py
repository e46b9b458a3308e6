"""
Hard negatives mined by the model itself: the embedding proposes, its own matching
head vetoes false negatives. Eq. 3 (InfoNCE with one explicit hard negative) and Eq. 4 (the
matching loss on (q, d⁺, d⁻)) both need a hard negative per instance; rows without one fall
back to an in-batch negative in train.py. This tool writes them.

    python tools/mine.py --model CKPT --train_data DIR --image_dir DIR --out OUT
    python tools/mine.py --model CKPT --train_data DIR --image_dir DIR --out OUT \\
        --relative_margin 0.05 --num_negatives 3 --judge          # NV-Retriever's TopK-PercPos + the head's veto
    torchrun --standalone --nproc_per_node=8 tools/mine.py --model CKPT --train_data ... --out ...
    python train.py --train_data OUT --image_dir DIR ...          # trains on the mined negatives, unchanged

Input: MMEB-train-schema subsets (<DIR>/<Subset>/<split>-*.parquet, columns qry,
qry_image_path, pos_text, pos_image_path, optional neg_text / neg_image_path; a hub id
works too), read and checked by util/inputs.TrainRows (the one door: a bad row stops
naming subset, row, column and path; --skip_bad_rows drops it, reported; an undecodable
image stops naming its path, --check_images finds them all before any encoding).

Per subset:
  1. corpus: the subset's distinct documents (positives and given negatives; a document is
     (text, image path after os.path.normpath)), embedded with L_d once through
     tools/search.py's encode_corpus into a flat faiss index (sharded over torchrun ranks,
     resumable: a shard is re-encoded only when its documents, weights or settings
     changed). Text documents are embedded with the subset's target instruction when the
     checkpoint trained with them (as data.TrainDataset gives them), and written raw.
  2. queries: the distinct (qry, qry_image_path) embedded with L_q, sharded and resumable
     the same way (search.shard_manifest / stale_reason).
  3. mining, sharded over ranks by blocks of --shard_size rows, each block's result kept
     (resumable): for each row, the index's nearest documents, best first, without the
     positives of its query (every row with the same query: their positives are all
     positives, as sentence-transformers does); then the rules, each candidate counted
     under the first rule that drops it:
       range_min / range_max  the rank window [range_min, range_max) of that list
       absolute_margin        drop s > s⁺ − absolute_margin
       relative_margin        drop s > s⁺ − |s⁺|·relative_margin (positive-aware: 0.05
                              keeps a candidate at least 5% of the positive's score below it)
       max_score / min_score  drop s > max_score / s < min_score
       judge (--judge)        drop p(Yes) > --judge_threshold, p(Yes) of the checkpoint's
                              matching head on (query, candidate), raw→raw view
                              (tools/rerank.py matching_p_yes, the trained prompt)
     s: the cosine of query and candidate (Eq. 1), rescored exactly from embeddings.npy; s⁺
     the row's own positive's. Of the survivors, --num_negatives are kept:
     --sampling_strategy top (the best) or random (seeded per subset and row: the same on
     any number of ranks), in score order.
  4. rank 0 writes OUT/<Subset>/<split>-00000-of-00001.parquet: every input column, with
     neg_text / neg_image_path holding the mined negatives (--output_format list: mmE5's
     list cells, one row per query, train.py takes the first; triplet: one row per mined
     negative, plain strings as MMEB-train, each a training row), and OUT/mining_report.json
     (also printed): per subset, rows, documents, candidates, how many each rule dropped,
     how many the head vetoed, negatives written, rows left with fewer than
     --num_negatives or none (those train with an in-batch negative). Nothing is skipped
     silently.

--measure_veto: on data whose true labels are known (demo/synthetic.py writes the same
objects in other renders: images whose names differ only in the jitter tag -jNN are
attribute-identical, true positives), every window candidate is scored by the head, and
the share of mined negatives that are in fact positives is reported with no filter, with
the relative margin rule (--relative_margin, else 0.05), with the head's veto, and with
both, with the precision and recall of each filter (veto_table), over all subsets and per
subset; printed and written into the report ("veto").

Where this differs from sentence-transformers' util.mine_hard_negatives (same names where
the meaning is the same: num_negatives, range_min, range_max, absolute_margin,
relative_margin, max_score, min_score, sampling_strategy, output_format, output_scores,
batch_size):
  - multimodal rows in MMEB's schema (text and/or image on each side) instead of a text
    Dataset; output: parquet files train.py reads; "list" (mmE5's layout) instead of
    "n-tuple"; no "labeled-pair" / "labeled-list";
  - range_min counts ranks of the retrieved list (positives removed) before the score
    rules; sentence-transformers skips the first range_min *surviving* candidates. Default
    range_max: range_min + num_negatives (x10 when a score rule or the judge is on), the
    positives not counted (sentence-transformers adds the most positives of a query);
  - the corpus is the subset's own documents (positives and given negatives), one index
    per subset: a negative comes from its own task (no `corpus` argument);
  - the cross-encoder does not rescore and reorder: the model's own matching head vetoes
    (--judge, --judge_threshold on p(Yes)); sentence-transformers' `cross_encoder` replaces
    the scores the rules then read;
  - faiss always (tools/search.py's flat index, exact; use_faiss has no meaning here);
    sharded over torchrun ranks, resumable from its shards (cache_folder's role);
  - a row without enough survivors keeps what it has (none: neg null, an in-batch negative
    in training) and is counted; --keep_given puts the row's own negative first.
Tests: pytest tests/test_mine.py --full
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import search  # noqa: E402
from util.inputs import TrainRows  # noqa: E402

FORMAT = 1                       # layout of the mining shards' manifests
RULES = ("range_min", "absolute_margin", "relative_margin", "max_score", "min_score")   # counted, in order
OUTPUT_FORMATS = ("list", "triplet")
MEASURE_MARGIN = 0.05            # --measure_veto's margin rule when --relative_margin is unset (NV-Retriever's)
JUDGE_CACHE = 256                # encoded documents the judge keeps (LRU; images decoded once while they recur)

# ----------------------------------------------------------------------------------
# Documents and queries of a subset


def doc_key(text, image):
    """A document's identity: (text, image path after os.path.normpath, "" for none)."""
    return (text or "", os.path.normpath(image) if image else "")


def default_range_max(num_negatives, range_min=0, filtering=False):
    """range_min + num_negatives, ten times as many candidates when a rule may drop some."""
    return range_min + num_negatives * (10 if filtering else 1)


class SubsetPlan:
    """One subset's rows, distinct documents and queries.
    rows: [(file row, q key, pos key, given neg key or None)]; docs: distinct document keys
    (positives, then given negatives, in row order); queries: distinct query keys;
    positives[query index]: the document indices of every positive of that query."""

    def __init__(self, subset, rows):
        self.subset = subset
        self.rows, self.docs, self.queries = [], [], []
        self.doc_index, self.query_index = {}, {}
        for _, r, q, pos, neg in rows:
            self.rows.append((r, doc_key(*q), doc_key(*pos), doc_key(*neg) if neg else None))
        for _, q, pos, _ in self.rows:
            self._add(self.doc_index, self.docs, pos)
            self._add(self.query_index, self.queries, q)
        for *_, neg in self.rows:
            if neg is not None:
                self._add(self.doc_index, self.docs, neg)
        self.positives = [set() for _ in self.queries]
        for _, q, pos, _ in self.rows:
            self.positives[self.query_index[q]].add(self.doc_index[pos])

    @staticmethod
    def _add(index, keys, key):
        if key not in index:
            index[key] = len(keys)
            keys.append(key)


def target_text_fn(config):
    """(subset, text, image) → the text a document is embedded with: the subset's target
    instruction before a text-only document when the checkpoint trained with target
    instructions (data.with_target_instruction with its --target_prompts table; the demo's
    subsets by their meta-task), else the text as it is."""
    from data import with_target_instruction
    from demo.synthetic import DEMO_META
    config = config or {}
    if not config.get("target_instructions"):
        return lambda subset, text, image: text
    prompts = config.get("target_prompt_table")
    return lambda subset, text, image: with_target_instruction(text, subset, DEMO_META.get(subset), prompts)


# ----------------------------------------------------------------------------------
# The rules (pure: tests/test_mine.py works them by hand)


def apply_rules(ranked, pos_score, range_min=0, range_max=None, absolute_margin=None, relative_margin=None,
                max_score=None, min_score=None):
    """ranked: [(document, score)] best first, the query's positives already removed.
    Returns (survivors [(document, score)] in order, {rule: candidates it dropped}): the
    window [range_min, range_max) of `ranked` (range_min: the ranks skipped), each window
    candidate counted under the first score rule that drops it, in RULES order."""
    drops = dict.fromkeys(RULES, 0)
    drops["range_min"] = min(range_min, len(ranked))
    window = ranked[range_min:range_max]                       # ranks beyond range_max are no candidates
    tests = (("absolute_margin", absolute_margin, lambda s, m: s > pos_score - m),
             ("relative_margin", relative_margin, lambda s, m: s > pos_score - abs(pos_score) * m),
             ("max_score", max_score, lambda s, m: s > m),
             ("min_score", min_score, lambda s, m: s < m))
    out = []
    for doc, s in window:
        rule = next((name for name, v, drop in tests if v is not None and drop(s, v)), None)
        if rule:
            drops[rule] += 1
        else:
            out.append((doc, s))
    return out, drops


def sample(survivors, num_negatives, strategy, rng=None):
    """num_negatives of the survivors [(document, score, ...)], in their (score) order:
    the first ("top") or drawn by rng ("random"); all of them when there are fewer."""
    if strategy == "top" or len(survivors) <= num_negatives:
        return survivors[:num_negatives]
    keep = sorted(rng.sample(range(len(survivors)), num_negatives))
    return [survivors[i] for i in keep]


# ----------------------------------------------------------------------------------
# The judge: the checkpoint's matching head, raw→raw


class Judge:
    """p(Yes) of the checkpoint's matching head for one query and its candidates:
    tools/rerank.py's matching_p_yes on the raw→raw view with the trained prompt. Items are
    encoded as evaluate.embed_inputs encodes them (util.inputs.load_image, data.encode_item),
    the documents kept in an LRU of JUDGE_CACHE. The raw view reads no fused embedding; the
    index's vectors are passed as E_q / E_d."""

    def __init__(self, encoder, image_dir, batch_size=16):
        from tools import rerank
        rerank.require_matching(encoder.config, "--judge")
        self.encoder, self.image_dir, self.batch_size = encoder, image_dir, batch_size
        self.prompt = rerank.match_prompt(encoder.config)
        self.cache = {}

    def item(self, text, image, where):
        import data
        from util.inputs import load_image
        key = (text, image)
        if key in self.cache:
            self.cache[key] = self.cache.pop(key)                  # most recent last
            return self.cache[key]
        im = load_image(os.path.join(self.image_dir, image), where) if image else None
        it = data.encode_item(self.encoder.processor, text, im, where=where)
        self.cache[key] = it
        if len(self.cache) > JUDGE_CACHE:
            self.cache.pop(next(iter(self.cache)))
        return it

    def p_yes(self, query, q_vec, docs, d_vecs, where):
        """query (text, image), docs [(text, image)]; q_vec (d,), d_vecs (n, d) → p(Yes) (n,) list."""
        import torch

        from tools import rerank
        if not docs:
            return []
        q = self.item(*query, f"{where} qry")
        d = [self.item(t, im, f"{where} candidate {j}") for j, (t, im) in enumerate(docs)]
        p = rerank.matching_p_yes(self.encoder.model, self.encoder.processor, q, torch.as_tensor(q_vec),
                                  d, torch.as_tensor(np.asarray(d_vecs)), "raw", self.batch_size, self.prompt)
        return p.tolist()                                                            # (n,)


# ----------------------------------------------------------------------------------
# Files: atomic writes, shards


def _atomic_write(path, write):
    """write(tmp path), fsync, rename onto path: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic_write(path, write)


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _barrier():
    from util.dist import rank_world
    if rank_world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def encode_queries(encoder, queries, folder, shard_size=1024, batch_size=32, progress=True):
    """The queries [(id, text, image path)] embedded with L_q (evaluate.embed_inputs),
    L2-normalised, (n, d) float32: shards of shard_size, shard s on rank s mod W, each kept
    with its manifest (tools/search.py's shard_manifest, side "q") and reused by a rerun only
    when it holds exactly these vectors (search.stale_reason). Every rank returns all."""
    import torch
    from tqdm import tqdm

    import evaluate
    from util.dist import rank_world
    rank, world = rank_world()
    os.makedirs(folder, exist_ok=True)
    key = {**search.encoding_key(encoder, None), "side": "q"}
    n_shards = (len(queries) + shard_size - 1) // shard_size
    part = lambda s: queries[s * shard_size:(s + 1) * shard_size]              # noqa: E731
    wants = [search.shard_manifest(key, s, part(s), shard_size) for s in range(n_shards)]
    todo = [s for s in range(rank, n_shards, world) if search.stale_reason(folder, s, wants[s])]
    for s in tqdm(todo, desc="encode queries", disable=not progress or rank != 0):
        E = evaluate.embed_inputs(encoder.model, encoder.processor, [("q", t, im) for _, t, im in part(s)],
                                  batch_size, desc=f"query shard {s}", distributed=False)   # (n_s, d)
        E = torch.nn.functional.normalize(E.float(), dim=-1).numpy()
        npy, man = search.shard_paths(folder, s)
        if os.path.exists(man):
            os.remove(man)

        def write(tmp, E=E):
            with open(tmp, "wb") as f:
                np.save(f, E)
        _atomic_write(npy, write)
        _write_json(man, wants[s])
    _barrier()
    for s in range(n_shards):
        why = search.stale_reason(folder, s, wants[s])
        if why:
            raise RuntimeError(f"{search.shard_paths(folder, s)[0]}: {why} after encoding (did another job "
                               f"write into {folder}?); rerun the command")
    if not queries:
        return np.zeros((0, key["dim"]), np.float32)
    return np.concatenate([np.load(search.shard_paths(folder, s)[0]) for s in range(n_shards)])   # (n, d)


# ----------------------------------------------------------------------------------
# Mining


def mine_block(plan, block, Q, E, index, settings, judge=None, measure=False, embed_text=None):
    """The mined negatives of the rows `block` (indices into plan.rows): per row
    {"row", "neg": [document indices], "scores", "p_yes" (with the judge, else None),
    "pos_score", "drops": {rule or "judge": count}, "candidates": the window's size}; with
    `measure` also "window": [[document, score, p(Yes)]] of every window candidate, before
    any rule (veto_table). Q (nq, d), E (N, d): the queries' and documents' vectors. The
    judge scores the survivors of the score rules (measure: the whole window)."""
    st = settings
    if not block:
        return []
    exclude = max(len(plan.positives[plan.query_index[plan.rows[i][1]]]) for i in block)
    k = min(len(plan.docs), st["range_max"] + exclude)
    qi = [plan.query_index[plan.rows[i][1]] for i in block]
    _, found = search.search(index, Q[qi], k)                                 # (b, k) document indices
    embed_text = embed_text or (lambda subset, t, im: t)
    rules = {x: st[x] for x in RULES[1:]}
    out = []
    for b, i in enumerate(block):
        r, qk, pk, _ = plan.rows[i]
        q, where = qi[b], f"{plan.subset} row {r}"
        ranked = [int(j) for j in found[b] if j >= 0 and int(j) not in plan.positives[q]][:st["range_max"]]
        s = E[ranked] @ Q[q] if ranked else np.zeros(0, np.float32)          # (n, d) @ (d,) → (n,), exact
        pos_score = float(E[plan.doc_index[pk]] @ Q[q])
        ranked = list(zip(ranked, s.tolist()))
        p_of = {}

        def judged(docs):                                                     # p(Yes) of documents not yet judged
            new = [j for j in docs if j not in p_of]
            texts = [(embed_text(plan.subset, *plan.docs[j]), plan.docs[j][1]) for j in new]
            p_of.update(zip(new, judge.p_yes(qk, Q[q], texts, E[new], where)))
        rec = {}
        if measure:
            window = ranked[st["range_min"]:st["range_max"]]
            judged([j for j, _ in window])
            rec["window"] = [[j, sc, p_of[j]] for j, sc in window]
        survivors, drops = apply_rules(ranked, pos_score, st["range_min"], st["range_max"], **rules)
        drops["judge"] = 0
        if st["judge_threshold"] is not None:
            judged([j for j, _ in survivors])
            kept = [(j, sc) for j, sc in survivors if p_of[j] <= st["judge_threshold"]]
            drops["judge"], survivors = len(survivors) - len(kept), kept
        rng = random.Random(f"{st['seed']}-{plan.subset}-{r}")
        mined = sample(survivors, st["num_negatives"], st["sampling_strategy"], rng)
        out.append({"row": i, "neg": [j for j, _ in mined], "scores": [sc for _, sc in mined],
                    "p_yes": [p_of[j] for j, _ in mined] if st["judge_threshold"] is not None else None,
                    "pos_score": pos_score, "drops": drops,
                    "candidates": len(ranked) - drops["range_min"], **rec})
    return out


def mine_subset(encoder, plan, work, image_dir, settings, shard_size=1024, batch_size=32, judge=None,
                measure=False, progress=True, embed_text=None):
    """Encode the subset's documents (search.encode_corpus) and queries (encode_queries),
    then mine its rows block by block (mine_block), block s on rank s mod W, each block's
    records kept under work/mined/ with a manifest of what they were mined from (a rerun
    reuses a block only when it is equal). Returns every row's record on rank 0, None on
    the others."""
    from tqdm import tqdm

    from util.dist import rank_world
    rank, world = rank_world()
    embed_text = embed_text or (lambda subset, t, im: t)
    docs = [(str(j), embed_text(plan.subset, t, im), os.path.join(image_dir, im) if im else None)
            for j, (t, im) in enumerate(plan.docs)]
    search.encode_corpus(encoder, docs, os.path.join(work, "index"), instruction=None, shard_size=shard_size,
                         batch_size=batch_size, progress=progress, checkpoint=None)
    _barrier()                                                   # rank 0 wrote the index
    index, _, meta = search.load_index(os.path.join(work, "index"))
    E = np.asarray(search.load_vectors(os.path.join(work, "index")))            # (N, d)
    Q = encode_queries(encoder, [(str(j), t, os.path.join(image_dir, im) if im else None)
                                 for j, (t, im) in enumerate(plan.queries)],
                       os.path.join(work, "queries"), shard_size, batch_size, progress)   # (nq, d)
    mined_dir = os.path.join(work, "mined")
    os.makedirs(mined_dir, exist_ok=True)
    n_blocks = (len(plan.rows) + shard_size - 1) // shard_size
    common = {"format": FORMAT, "settings": settings, "judge": judge is not None, "measure": measure,
              "weights_sha256": meta["weights_sha256"], "docs_sha256": meta["ids_sha256"],
              "docs": _sha256_json(plan.docs), "queries": _sha256_json(plan.queries),
              "judge_prompt": judge.prompt if judge else None}

    def manifest(s):
        rows = plan.rows[s * shard_size:(s + 1) * shard_size]
        return {**common, "block": s, "rows": _sha256_json(rows)}
    path = lambda s: os.path.join(mined_dir, f"{s:06d}.json")                    # noqa: E731
    mine = [s for s in range(rank, n_blocks, world)
            if (_read_json(path(s)) or {}).get("manifest") != json.loads(json.dumps(manifest(s)))]
    for s in tqdm(mine, desc=f"mine {plan.subset}", disable=not progress or rank != 0):
        block = list(range(s * shard_size, min((s + 1) * shard_size, len(plan.rows))))
        recs = mine_block(plan, block, Q, E, index, settings, judge, measure, embed_text)
        _write_json(path(s), {"manifest": manifest(s), "records": recs})
    _barrier()
    if rank != 0:
        return None
    records = []
    for s in range(n_blocks):
        got = _read_json(path(s)) or {}
        if got.get("manifest") != json.loads(json.dumps(manifest(s))):
            raise RuntimeError(f"{path(s)}: missing or of other settings after mining (did another job write "
                               f"into {work}?); rerun the command")
        records += got["records"]
    return records


# ----------------------------------------------------------------------------------
# Output rows, the report, the veto measurement


def row_negatives(plan, rec, keep_given=False, num_negatives=3):
    """(documents, scores, p(Yes) or None) written for a row's record: its mined negatives,
    or with keep_given the row's own negative first (score None), then the mined ones not
    equal to it, num_negatives in all."""
    given = plan.rows[rec["row"]][3]
    negs, scores, p = [plan.docs[j] for j in rec["neg"]], list(rec["scores"]), rec["p_yes"]
    if keep_given and given is not None:
        keep = [k for k, d in enumerate(negs) if d != given][:num_negatives - 1]
        negs, scores = [given] + [negs[k] for k in keep], [None] + [scores[k] for k in keep]
        p = None if p is None else [None] + [p[k] for k in keep]
    return negs, scores, p


def output_rows(plan, file_rows, records, output_format="list", output_scores=False, keep_given=False,
                num_negatives=3):
    """The subset's output rows: each input row (file_rows[r], every column) with neg_text /
    neg_image_path holding its negatives (row_negatives): "list", one row with list cells
    (null without any); "triplet", one row per negative with plain strings (one row with
    null negatives without any). output_scores: pos_score, neg_scores / neg_score, neg_p_yes."""
    out = []
    for rec in records:
        negs, scores, p = row_negatives(plan, rec, keep_given, num_negatives)
        row = dict(file_rows[plan.rows[rec["row"]][0]])
        if output_format == "list":
            extra = {"pos_score": rec["pos_score"], "neg_scores": scores, "neg_p_yes": p} if output_scores else {}
            out.append({**row, "neg_text": [t for t, _ in negs] or None,
                        "neg_image_path": [im for _, im in negs] or None, **extra})
            continue
        for k, (t, im) in enumerate(negs or [(None, None)]):
            extra = {"pos_score": rec["pos_score"], "neg_score": scores[k] if negs else None,
                     "neg_p_yes": p[k] if negs and p else None} if output_scores else {}
            out.append({**row, "neg_text": t, "neg_image_path": im, **extra})
    return out


def write_parquet(rows, path, output_format):
    """rows → parquet at path (atomic); neg_* typed list<string> or string even when all null."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    typ = pa.list_(pa.string()) if output_format == "list" else pa.string()
    table = pa.Table.from_pylist(rows)
    for c in ("neg_text", "neg_image_path"):
        table = table.set_column(table.schema.get_field_index(c), c, pa.array(table[c].to_pylist(), typ))
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def subset_report(plan, records, skipped, num_negatives, keep_given=False):
    """One subset's counts: rows, documents, queries, candidates in the rank window, each
    rule's drops (first rule that drops a candidate), negatives written, rows short of
    num_negatives and rows with none (they train with an in-batch negative)."""
    written = [len(row_negatives(plan, r, keep_given, num_negatives)[0]) for r in records]
    return {"rows": len(records), "skipped_rows": len(skipped), "documents": len(plan.docs),
            "queries": len(plan.queries), "candidates": sum(r["candidates"] for r in records),
            "dropped": {k: sum(r["drops"][k] for r in records) for k in RULES + ("judge",)},
            "negatives": sum(written), "rows_short": sum(0 < w < num_negatives for w in written),
            "rows_without": sum(w == 0 for w in written)}


def format_report(report):
    """The report as a table, one line per subset."""
    head = ("subset", "rows", "docs", "cand.", *RULES, "judge", "negatives", "short", "none")
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for s, r in report["subsets"].items():
        cells = (s, r["rows"], r["documents"], r["candidates"], *(r["dropped"][k] for k in RULES + ("judge",)),
                 r["negatives"], r["rows_short"], r["rows_without"])
        lines.append("  ".join(f"{str(c):>12}" for c in cells))
        if r["skipped_rows"]:
            lines.append(f"  {s}: {r['skipped_rows']} row(s) skipped by --skip_bad_rows (not written)")
    return "\n".join(lines)


JITTER_TAG = re.compile(r"-j\d+")


def synthetic_key(doc):
    """demo/synthetic.py's truth as a key: documents (text, image) with equal keys show the
    same thing (the same text, the same image path once the render's jitter tag -jNN is
    dropped: the same objects, colours, shapes and sides in another render)."""
    return doc[0], JITTER_TAG.sub("", doc[1])


def synthetic_same(a, b):
    """Documents a, b show the same thing (synthetic_key)."""
    return synthetic_key(a) == synthetic_key(b)


def veto_table(plan_records, num_negatives, relative_margin, judge_threshold, truth=synthetic_same):
    """plan_records: [(plan, records of a --measure_veto run)]. For each filter (none, the
    relative margin, the head's veto, both): the negatives that top-num_negatives mining
    keeps after it and the share of them that are in fact positives (truth(positive,
    candidate)); and of the window candidates it drops, its precision (dropped that are
    positives / dropped) and recall (dropped positives / positives in the window)."""
    filters = {"none": lambda s, p, sp: False,
               f"relative_margin {relative_margin:g}": lambda s, p, sp: s > sp - abs(sp) * relative_margin,
               f"judge p(Yes) > {judge_threshold:g}": lambda s, p, sp: p > judge_threshold}
    filters["margin + judge"] = lambda s, p, sp, f=list(filters.values()): f[1](s, p, sp) or f[2](s, p, sp)
    out = {}
    for name, drop in filters.items():
        mined = mined_pos = dropped = dropped_pos = window_pos = 0
        for plan, records in plan_records:
            for rec in records:
                pk = plan.rows[rec["row"]][2]
                kept = []
                for j, s, p in rec.get("window", []):
                    true = truth(pk, plan.docs[j])
                    window_pos += true
                    if drop(s, p, rec["pos_score"]):
                        dropped, dropped_pos = dropped + 1, dropped_pos + true
                    else:
                        kept.append(true)
                mined, mined_pos = mined + len(kept[:num_negatives]), mined_pos + sum(kept[:num_negatives])
        out[name] = {"negatives": mined, "false_negatives": mined_pos,
                     "false_negative_share": mined_pos / mined if mined else None, "dropped": dropped,
                     "precision": dropped_pos / dropped if dropped else None,
                     "recall": dropped_pos / window_pos if window_pos else None, "positives_in_window": window_pos}
    return out


def format_veto(table):
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"                 # noqa: E731
    lines = [f"{'filter':<26} {'negatives':>9} {'in fact positives %':>20} {'dropped':>8} "
             f"{'precision %':>11} {'recall %':>9}"]
    for name, r in table.items():
        lines.append(f"{name:<26} {r['negatives']:>9} {pct(r['false_negative_share']):>20} {r['dropped']:>8} "
                     f"{pct(r['precision']):>11} {pct(r['recall']):>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The run


def mine(encoder, rows, out, num_negatives=3, range_min=0, range_max=None, absolute_margin=None,
         relative_margin=None, max_score=None, min_score=None, sampling_strategy="top", seed=0, judge=False,
         judge_threshold=0.5, output_format="list", output_scores=False, keep_given=False, shard_size=1024,
         batch_size=32, work_dir=None, measure_veto=False, progress=True):
    """Mine every subset of `rows` (util.inputs.TrainRows) into `out` (module doc).
    Returns the report (rank 0; None on the other ranks)."""
    from util.dist import rank_world
    from util.inputs import find_parquet, read_rows
    rank, _ = rank_world()
    filtering = judge or measure_veto or any(v is not None for v in (absolute_margin, relative_margin,
                                                                      max_score, min_score))
    range_max = range_max or default_range_max(num_negatives, range_min, filtering)
    settings = {"num_negatives": num_negatives, "range_min": range_min, "range_max": range_max,
                "absolute_margin": absolute_margin, "relative_margin": relative_margin, "max_score": max_score,
                "min_score": min_score, "sampling_strategy": sampling_strategy, "seed": seed,
                "judge_threshold": judge_threshold if judge else None}
    check_settings(settings)
    work = work_dir or os.path.join(out, ".mining")
    judge_ = Judge(encoder, rows.image_dir, batch_size) if (judge or measure_veto) else None
    embed_text = target_text_fn(encoder.config)
    report = {"settings": {**settings, "judge": judge, "output_format": output_format, "keep_given": keep_given},
              "subsets": {}}
    measured = []
    for subset in rows.subsets:
        plan = SubsetPlan(subset, [row for row in rows.rows if row[0] == subset])
        if not plan.rows:
            raise ValueError(f"{subset}: no row to mine (all skipped: {rows.skipped[subset][:1]})")
        records = mine_subset(encoder, plan, os.path.join(work, subset), rows.image_dir, settings, shard_size,
                              batch_size, judge_, measure_veto, progress, embed_text)
        if rank != 0:
            continue
        file_rows = read_rows(find_parquet(rows.root, subset, rows.split))
        write_parquet(output_rows(plan, file_rows, records, output_format, output_scores, keep_given, num_negatives),
                      os.path.join(out, subset, f"{rows.split}-00000-of-00001.parquet"), output_format)
        report["subsets"][subset] = subset_report(plan, records, rows.skipped[subset], num_negatives, keep_given)
        measured.append((plan, records))
    if rank != 0:
        return None
    if measure_veto:                                 # over all subsets, then per subset
        margin = relative_margin if relative_margin is not None else MEASURE_MARGIN
        report["veto"] = {"all": veto_table(measured, num_negatives, margin, judge_threshold),
                          **{plan.subset: veto_table([(plan, recs)], num_negatives, margin, judge_threshold)
                             for plan, recs in measured}}
    _write_json(os.path.join(out, "mining_report.json"), report)
    return report


def check_settings(st):
    """ValueError naming the flag: the rank window and num_negatives (sentence-transformers'
    checks), the sampling strategy, the judge's threshold."""
    if st["num_negatives"] < 1:
        raise ValueError(f"--num_negatives must be >= 1, got {st['num_negatives']}")
    if st["range_min"] < 0:
        raise ValueError(f"--range_min must be >= 0, got {st['range_min']}")
    if st["range_max"] <= st["range_min"]:
        raise ValueError(f"--range_max {st['range_max']} must be > --range_min {st['range_min']}")
    if st["num_negatives"] > st["range_max"] - st["range_min"]:
        raise ValueError(f"--num_negatives {st['num_negatives']}: only {st['range_max'] - st['range_min']} "
                         f"candidates in the window [--range_min {st['range_min']}, --range_max {st['range_max']})")
    if st["sampling_strategy"] not in ("top", "random"):
        raise ValueError(f"--sampling_strategy must be top or random, got {st['sampling_strategy']!r}")
    t = st["judge_threshold"]
    if t is not None and not 0 < t < 1:
        raise ValueError(f"--judge_threshold must be in (0, 1) (a p(Yes)), got {t}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", required=True, help="train.py checkpoint folder, its hub id, or an export")
    p.add_argument("--revision", default=None, help="hub ids: the commit, branch or tag of --model")
    p.add_argument("--num_tokens", type=int, default=0, help="raw backbones only: K learnable tokens")
    p.add_argument("--embed_template", default="plain", choices=("plain", "chat"), help="raw backbones only")
    p.add_argument("--train_data", required=True, help="MMEB-train-schema subsets: <DIR>/<Subset>/<split>-*.parquet "
                   "(or a hub id), with or without neg_text / neg_image_path")
    p.add_argument("--image_dir", required=True, help="the root of the rows' image paths")
    p.add_argument("--out", required=True, help="output folder: <Subset>/<split>-00000-of-00001.parquet, "
                   "mining_report.json")
    p.add_argument("--subsets", nargs="+", default=None, help="subsets to mine (default: all)")
    p.add_argument("--split", default="original", help="the files' split name (read and written)")
    p.add_argument("--max_rows_per_subset", type=int, default=None, help="the first N rows of each subset")
    p.add_argument("--skip_bad_rows", action="store_true", help="drop rows failing the checks (reported, "
                   "not written) instead of stopping")
    p.add_argument("--check_images", action="store_true", help="decode every image before encoding")
    p.add_argument("--allow_outside_image_dir", action="store_true", help="image paths may leave --image_dir")
    g = p.add_argument_group("mining (sentence-transformers' names where the meaning is the same)")
    g.add_argument("--num_negatives", type=int, default=3, help="negatives per row (3)")
    g.add_argument("--range_min", type=int, default=0, help="skip the first N retrieved candidates (0)")
    g.add_argument("--range_max", type=int, default=None, help="consider candidates up to this rank "
                   "(range_min + num_negatives, x10 with a score rule or --judge)")
    g.add_argument("--absolute_margin", type=float, default=None, help="drop s > s_pos - margin")
    g.add_argument("--relative_margin", type=float, default=None, help="drop s > s_pos - |s_pos| * margin "
                   "(0.05: NV-Retriever's TopK-PercPos 95%%)")
    g.add_argument("--max_score", type=float, default=None, help="drop s > max_score")
    g.add_argument("--min_score", type=float, default=None, help="drop s < min_score")
    g.add_argument("--sampling_strategy", default="top", choices=("top", "random"), help="top: the best "
                   "survivors; random: drawn among them (seeded per row)")
    g.add_argument("--seed", type=int, default=0, help="random sampling's seed")
    g.add_argument("--judge", action="store_true", help="veto candidates the checkpoint's matching head "
                   "calls a match (raw->raw p(Yes) > --judge_threshold)")
    g.add_argument("--judge_threshold", type=float, default=0.5, help="p(Yes) above which --judge drops (0.5)")
    g.add_argument("--output_format", default="list", choices=OUTPUT_FORMATS, help="list: mmE5 list cells, "
                   "one row per query (train.py takes the first); triplet: one row per negative")
    g.add_argument("--output_scores", action="store_true", help="also write pos_score, neg_scores, neg_p_yes")
    g.add_argument("--keep_given", action="store_true", help="the row's own negative first, then mined ones")
    g.add_argument("--measure_veto", action="store_true", help="data with known labels (demo/synthetic.py): "
                   "report the share of mined negatives that are positives per filter, and each filter's "
                   "precision and recall")
    p.add_argument("--shard_size", type=int, default=1024, help="documents, queries and rows per shard")
    p.add_argument("--batch_size", type=int, default=32, help="items per forward")
    p.add_argument("--work_dir", default=None, help="the shards (default OUT/.mining)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("shard_size", "batch_size", "max_rows_per_subset"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if os.path.isfile(args.train_data):
        p.error(f"--train_data {args.train_data} is a file: give the folder holding <Subset>/{args.split}-*.parquet "
                f"(e.g. put it at DIR/MySubset/{args.split}-00000-of-00001.parquet)")
    if not os.path.isdir(args.image_dir):
        p.error(f"--image_dir {args.image_dir}: no such directory")
    filtering = args.judge or args.measure_veto or any(getattr(args, f) is not None for f in RULES[1:])
    try:
        check_settings({"num_negatives": args.num_negatives, "range_min": args.range_min,
                        "range_max": args.range_max or default_range_max(args.num_negatives, args.range_min, filtering),
                        "sampling_strategy": args.sampling_strategy,
                        "judge_threshold": args.judge_threshold if args.judge else None})
    except ValueError as e:
        p.error(str(e))
    from evaluate import Encoder
    from util.dist import print0, setup_distributed, teardown_distributed
    _, _, _, device = setup_distributed()
    from data import MMEB_TRAIN_SUBSETS
    rows = TrainRows(args.train_data, args.image_dir, args.subsets, args.split, args.max_rows_per_subset,
                     args.skip_bad_rows, args.allow_outside_image_dir, hub_subsets=MMEB_TRAIN_SUBSETS)  # the one door
    if args.check_images:
        rows.check_images(progress=args.progress)
    print0(rows.report())
    encoder = Encoder(args.model, device=device, num_tokens=args.num_tokens, embed_template=args.embed_template,
                      revision=args.revision)
    report = mine(encoder, rows, args.out, args.num_negatives, args.range_min, args.range_max, args.absolute_margin,
                  args.relative_margin, args.max_score, args.min_score, args.sampling_strategy, args.seed,
                  args.judge, args.judge_threshold, args.output_format, args.output_scores, args.keep_given,
                  args.shard_size, args.batch_size, args.work_dir, args.measure_veto, args.progress)
    if report is not None:
        print0(format_report(report))
        for name, table in report.get("veto", {}).items():
            print0(f"\nFalse negatives among mined negatives, {name} (labels known: demo/synthetic.py)\n"
                   + format_veto(table))
        print0(f"→ {args.out} (report: {os.path.join(args.out, 'mining_report.json')})")
    teardown_distributed()
    return report


if __name__ == "__main__":
    main()
