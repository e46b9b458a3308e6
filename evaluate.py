"""
Evaluation of ReMatch: retrieval by cosine similarity (paper §3.1, Eq. 1) on MMEB (§4,
Table 1: Hit@1 on 36 tasks) and zero-shot cross-modal retrieval (§4.2, Table 2:
Flickr30K, COCO, ShareGPT4V, Urban1K, SugarCrepe); `Encoder`, the embedding API. The
matching head after training (Eq. 4: held-out Yes/No accuracy, p(Yes) as a reranker) is
tools/rerank.py's, plugged into mmeb_report as an extra; files, flags and arguments from
outside are checked in util/inputs.py and read in util/benchmarks.py.

    d* = argmax_{d ∈ {d_1..d_N}} cos(E(q), E(d))          (Eq. 1; cosine in fp32)

Queries are embedded with the query tokens L_q (side "q"), candidates with L_d (side
"d"); each distinct (text, image) is encoded and embedded once per side, and the
matching passes reuse those encodings. Metrics (docs/readings.md §5):
  Hit@1   the positive (candidate 0) scores strictly above every other candidate; a tie
          is a miss (VLM2Vec v1's argmax counted ties as hits: a constant model scored 100%).
  R@k     a query is a hit if a positive ranks in the top k; ties are pessimistic (a
          negative tied with a positive ranks before it).
  Means   category, IND (20 tasks), OOD (16) and overall are unweighted means over tasks;
          a group with a missing task has no mean ("n/a (1 missing)").

Commands
  python evaluate.py --model CKPT --mmeb_dir MMEB-eval --image_dir eval_images --out runs/eval
  python evaluate.py --model Qwen/Qwen2-VL-2B-Instruct --mmeb_dir TIGER-Lab/MMEB-eval \\
      --image_dir eval_images --tasks ImageNet-1K VOC2007          # raw backbone = last-token baseline
  torchrun --standalone --nproc_per_node=8 evaluate.py --model CKPT --mmeb_dir ... --image_dir ...
  python evaluate.py --model CKPT --zeroshot flickr30k coco sharegpt4v urban1k sugarcrepe --data_dir DATA
  python evaluate.py --model runs/demo/checkpoint-STEP --benchmark synthetic \\
      --mmeb_dir runs/demo/demo_data/eval --image_dir runs/demo/demo_data   # train.py's demo data
  The matching head's accuracy (--match_queries N) and reranking (--top_k K): tools/rerank.py.
  Tests: pytest tests/test_evaluate.py

--model: a checkpoint, an export, or a raw backbone (the single-vector baseline; --help).
Under torchrun each task's embedding work is cut into one contiguous shard per rank, the
embeddings are all-gathered and scored; rank 0 prints and writes. With --out, each finished
task is saved at once (<out>/mmeb/<task>.json) and a restarted run skips it; the tables go
to <out>/mmeb_results.{json,md} and <out>/zeroshot_results.{json,md}. Data layouts: the MMEB
section below; zero-shot: util/benchmarks.py. MMEB-V2 (not the paper's): tools/mmeb_v2.py.
"""
import argparse
import dataclasses
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import IMAGE_PLACEHOLDER, MMEB_EVAL_TASKS, collate_embed, encode_item, with_target_instruction
from model import load_rematch
from util.backbone import published_name
from util.benchmarks import (SUGARCREPE_SUBSETS, mmeb_preflight, read_coco, read_eval_task, read_flickr30k,
                             read_sharegpt4v, read_sugarcrepe, read_urban1k)
from util.dist import (DIST_TIMEOUT_MINUTES, broadcast_object, collective_device, print0, rank_world,
                       setup_distributed, teardown_distributed)
from util.inputs import (DOC_IMAGE_INSTRUCTION, check_encode_args, check_eval_flags, check_side, check_text_length,
                         check_text_tokens, find_subsets, load_image, read_task_table, resolve_dir, upscale_small)
from util.run import load_finished, result_path, weights_fingerprint, write_atomic, write_json
from util.speed import ATTENTION, set_attention
from util.video import VIDEO_TOKEN, Clip

# ----------------------------------------------------------------------------------
# Metrics (Eq. 1). Small pure functions; tests/test_evaluate.py keeps naive loops as oracle.

def cosine_scores(q, c):
    """q (Nq, d), c (Nc, d) → (Nq, Nc) cosine similarities, computed in fp32."""
    q = F.normalize(q.float(), dim=-1)                                       # (Nq, d)
    c = F.normalize(c.float(), dim=-1)                                       # (Nc, d)
    return q @ c.T                                                           # (Nq, Nc)


def hit_at_1(scores):
    """
    scores (Nq, Nc), column 0 = the positive. A query is a hit iff its positive scores
    strictly above every other column: a tie is a miss (a constant model scores 0, not
    100%). NaN scores count as misses. Returns the fraction of hits (float).
    """
    pos = scores[:, :1]                                                      # (Nq, 1)
    hit = (scores[:, 1:] < pos).all(dim=1)                                   # (Nq,)
    return hit.sum().item() / len(hit)


def chance_hit_at_1(rows):
    """Expected Hit@1 of a random ranking: mean over queries of 1 / number of candidates."""
    return sum(1 / len(r["tgt_text"]) for r in rows) / len(rows)


def recall_at_k(scores, is_pos, k):
    """
    scores (Nq, Nc), is_pos (Nq, Nc) bool (≥ 1 positive per row). A query is a hit iff
    its best positive has fewer than k negatives scoring ≥ it: ties rank the negative
    first (pessimistic). NaN scores count against the query. Returns the hit fraction.
    """
    if not bool(is_pos.any(dim=1).all()):
        raise ValueError("recall_at_k: every query needs at least one positive")
    best = scores.masked_fill(~is_pos, float("-inf")).amax(dim=1, keepdim=True)   # (Nq, 1)
    before = ((scores >= best) | scores.isnan()) & ~is_pos                   # (Nq, Nc)
    hit = (before.sum(dim=1) < k) & ~best[:, 0].isnan()                      # (Nq,)
    return hit.sum().item() / len(hit)


# ----------------------------------------------------------------------------------
# Embedding items: each distinct (text, image) once per side, sharded over ranks

def _encode(processor, text, image, where):
    """encode_item of an MMEB string and an image given as None, a path, bytes or a PIL
    image, or a video given as a util.video.Clip."""
    if isinstance(image, Clip):
        return encode_item(processor, text, where=where, video=image)
    if image is not None:
        image = load_image(image, where) if isinstance(image, (str, os.PathLike, bytes)) else upscale_small(image)
    return encode_item(processor, text, image, where=where)


EVAL_MAX_TEXT_TOKENS = 8192        # far above MMEB's longest candidates; a runaway one is refused


@torch.no_grad()
def embed_inputs(model, processor, inputs, batch_size=16, progress=False, desc="embed",
                 distributed=True, keep=None, max_text_tokens=EVAL_MAX_TEXT_TOKENS):
    """
    inputs: list of (side, text, image): side "q" or "d", text the MMEB-format string
    (`<|image_1|>` where the image goes), image None / a path / a PIL image / encoded bytes.
    Each input is encoded (data.encode_item) and embedded exactly once. Under
    torch.distributed the list is cut into W contiguous shards, rank r embeds shard r, and
    every rank receives all rows (all_gather). keep: optional function (input index,
    encoded item), called for every input this rank encodes: the matching passes reuse
    what it keeps. max_text_tokens: an input whose text (image tokens not
    counted) is longer is refused, named (a 20k-word candidate would ask for gigabytes).
    Returns E (len(inputs), d) fp32 on the CPU, in input order.
    """
    bad = next((i for i, x in enumerate(inputs) if x[0] not in ("q", "d")), None)
    if bad is not None:                      # a batch of another side would stay all zeros
        check_side(inputs[bad][0], f"{desc}: input {bad}")
    rank, world = rank_world() if distributed else (0, 1)
    n, d = len(inputs), model.backbone.config.text_config.hidden_size
    ordinal, count = [], {"q": 0, "d": 0}              # an input's index among its side's: its name
    for side, *_ in inputs:
        ordinal.append(count[side])
        count[side] += 1
    size = math.ceil(n / world)                                  # shard size (the last may be short)
    lo, hi = min(rank * size, n), min((rank + 1) * size, n)
    local = torch.zeros(size, d)                                 # (size, d) fp32
    was_training = model.training
    model.eval()
    bar = tqdm(total=hi - lo, desc=desc, disable=not progress or rank != 0)
    for side in ("q", "d"):                                      # a batch holds one side only
        idx = [i for i in range(lo, hi) if inputs[i][0] == side]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            where = [f"{desc} {side}-item {ordinal[i]}" for i in chunk]
            for i, w in zip(chunk, where):                           # util/inputs.py
                check_text_length(processor.tokenizer, inputs[i][1] or "", max_text_tokens, w)
            enc = [_encode(processor, inputs[i][1], inputs[i][2], w)
                   for i, w in zip(chunk, where)]
            pad = tuple(processor.tokenizer.convert_tokens_to_ids([processor.image_token, VIDEO_TOKEN]))
            for i, x, w in zip(chunk, enc, where):                       # util/inputs.py
                check_text_tokens(x["ids"], pad, max_text_tokens, w, inputs[i][1])
            if keep is not None:
                for i, e in zip(chunk, enc):
                    keep(i, e)
            batch = collate_embed(enc, processor.tokenizer, model.num_tokens, model.embed_template)
            E, _ = model.embed(batch, side)                      # (b, d)
            local[[i - lo for i in chunk]] = E.float().cpu()
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    if world == 1:
        return local[:n]
    dev = collective_device(model.device)
    parts = [torch.empty(size, d, device=dev) for _ in range(world)]
    dist.all_gather(parts, local.to(dev))                        # W × (size, d)
    return torch.cat([p[:max(0, min(size, n - r * size))] for r, p in enumerate(parts)]).cpu()


def _target_instruction_fn(config):
    """data.with_target_instruction if the checkpoint was trained with target prompts
    (config "target_instructions": true), with the prompts of the run's --target_prompts
    file (config "target_prompt_table"), else None (text candidates stay raw)."""
    config = config or {}
    if not config.get("target_instructions"):
        return None
    prompts = config.get("target_prompt_table")
    return lambda text, task, meta=None: with_target_instruction(text, task, meta, prompts)


# ----------------------------------------------------------------------------------
# MMEB (Table 1)
# Data (V1, 36 image tasks; docs/readings.md §5): --mmeb_dir is a hub id
# (TIGER-Lab/MMEB-eval, only the requested tasks are fetched) or a local copy:
# <root>/<Task>/test-00000-of-00001.parquet or <root>/<Task>/test/*.parquet with columns
# qry_text, qry_img_path, tgt_text (list), tgt_img_path (list); candidate 0 is the positive.
# Images: unzip the dataset's images.zip and pass that folder as --image_dir. Images with a
# side below 28 px are upscaled (aspect kept) before the Qwen processor. A copy of the
# positive later in its own candidate list is the same document, not a negative: it is
# left out of that row. Any other benchmark in the same file format runs through the same
# code with its own task table ({name: (meta_task, is_ind)}, --benchmark synthetic or
# --task_table FILE.json).

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
# The 36 MMEB-eval tasks: name → (meta_task, is_ind), IND = one of the 20 MMEB-train sets.
# One table, data.MMEB_EVAL_TASKS, next to the target instructions built from it:
#   Classification  IND ImageNet-1K N24News HatefulMemes VOC2007 SUN397
#                   OOD Place365 ImageNet-A ImageNet-R ObjectNet Country211
#   VQA             IND OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W
#                   OOD ScienceQA VizWiz GQA TextVQA
#   Retrieval       IND VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA
#                   OOD FashionIQ Wiki-SS-NQ OVEN EDIS
#   Grounding       IND MSCOCO   OOD RefCOCO RefCOCO-Matching Visual7W-Pointing
BENCHMARK_NAMES = ("mmeb", "synthetic")


def benchmarks():
    """The built-in task tables: MMEB's 36 and the CPU demo's (imported only when asked)."""
    from demo import DEMO_EVAL_TASKS
    return {"mmeb": MMEB_EVAL_TASKS, "synthetic": DEMO_EVAL_TASKS}


def _known_tasks():
    tables = benchmarks()
    return {**tables["mmeb"], **tables["synthetic"]}


def task_table(tasks=None, known=None):
    """None → all tasks of `known` (default: the 36 of MMEB); a list of names → those
    tasks of `known` (default: MMEB's and the synthetic benchmark's); a dict
    {name: (meta_task, is_ind)} (any benchmark in the MMEB file format) → itself."""
    if tasks is None:
        return dict(known or MMEB_EVAL_TASKS)
    if isinstance(tasks, dict):
        return {name: (meta, bool(ind)) for name, (meta, ind) in tasks.items()}
    known = known or _known_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known tasks: {list(known)}")
    return {t: known[t] for t in tasks}


def discovered_task_table(root, tasks=None, table_file=None):
    """The tasks to evaluate in any MMEB-format directory: `tasks` (names), else every
    folder of `root` with test parquet files; each with its (meta_task, is_ind) from
    `table_file` (--task_table format), else MMEB's or the demo's table, else
    ("Other", True). A hub id without `tasks` means MMEB's 36 tasks."""
    known = _known_tasks()
    if table_file:
        known.update(read_task_table(table_file, "--eval_task_table"))
    if tasks is None:
        if not os.path.isdir(str(root)):
            return dict(MMEB_EVAL_TASKS)
        tasks = find_subsets(root, "test")
        if not tasks:
            raise FileNotFoundError(f"{root}: no task folder with test parquet files "
                                    "(<Task>/test-*.parquet or <Task>/test/*.parquet)")
    return {t: tuple(known.get(t, ("Other", True))) for t in tasks}


def chance_table(root, tasks, revision=None):
    """{task: expected Hit@1 of a random ranking} of the tasks' MMEB files under `root`."""
    root = resolve_dir(root, [f"{t}/*" for t in tasks], revision=revision)
    return {t: chance_hit_at_1(read_eval_task(root, t)) for t in tasks}


def task_items(rows, task, config=None, meta=None):
    """
    The distinct items of one task: query keys and candidate keys (text, image path), each
    once, in first-seen order, and per row (query index, [candidate indices]) with the
    positive first. Text-only candidates get the task's target instruction when the
    checkpoint asks for it (by task name for MMEB's tasks, else by its meta-task `meta`).
    """
    target = _target_instruction_fn(config)
    q_index, d_index, pairs = {}, {}, []
    for r in rows:
        qi = q_index.setdefault((r["qry_text"], r["qry_img_path"]), len(q_index))
        cands = []
        for text, path in zip(r["tgt_text"], r["tgt_img_path"]):
            if target is not None and not path:
                text = target(text, task, meta)
            cands.append(d_index.setdefault((text, path), len(d_index)))
        pairs.append((qi, cands))
    return list(q_index), list(d_index), pairs


def distinct_candidates(cands):
    """A row's candidate indices with later copies of the positive (cands[0]) left out: the
    same document, not a negative. score_rows' columns follow this order."""
    return [cands[0]] + [c for c in cands[1:] if c != cands[0]]


def score_rows(Q, D, pairs):
    """
    Q (nq, d), D (nd, d) distinct query / candidate embeddings; pairs [(qi, [ci...])].
    Returns scores (rows, max candidates) with the positive in column 0 and -inf padding.
    A later copy of the positive in its own list is the same document, not a negative.
    """
    scores = torch.full((len(pairs), max(len(c) for _, c in pairs)), float("-inf"))
    for i, (qi, cands) in enumerate(pairs):
        cands = distinct_candidates(cands)
        scores[i, :len(cands)] = cosine_scores(Q[qi:qi + 1], D[cands])[0]   # (n_cand,)
    return scores


KEEP_ITEM_BYTES = 2 * 2 ** 30      # encoded items one task keeps for its matching passes


def _nbytes(item):
    """Memory of an encoded item: its ids and (most of it) its pixel values."""
    px = item["pixel_values"]
    return 8 * len(item["ids"]) + (px.numel() * px.element_size() if px is not None else 0)


@dataclasses.dataclass
class TaskEmbeddings:
    """
    One eval task embedded (embed_task). q_inputs / d_inputs: (text, image path or None) of
    the distinct queries / candidates; pairs: per row (query index, [candidate indices]),
    positive first; Q (nq, d), D (nd, d): their embeddings; scores (rows, max candidates):
    score_rows. items: encoded items (data.encode_item) keyed ("q" | "d", index), kept
    from the embedding pass for the `wanted` ones while they fit in `budget` bytes (a
    retrieval task's thousand large images would not); item() encodes any other on use.
    """
    q_inputs: list
    d_inputs: list
    pairs: list
    Q: torch.Tensor = None
    D: torch.Tensor = None
    scores: torch.Tensor = None
    items: dict = dataclasses.field(default_factory=dict)
    wanted: set = dataclasses.field(default_factory=set)
    budget: int = KEEP_ITEM_BYTES

    def offer(self, key, item):
        """Keep a wanted encoded item while the kept ones stay within the budget."""
        if key in self.wanted and key not in self.items and _nbytes(item) <= self.budget:
            self.items[key] = item
            self.budget -= _nbytes(item)

    def item(self, processor, side, i, desc="task"):
        """The encoded query (side "q") or candidate ("d") of index i."""
        if (side, i) in self.items:
            return self.items[(side, i)]
        text, image = (self.q_inputs if side == "q" else self.d_inputs)[i]
        item = _encode(processor, text, image, f"{desc} {side}-item {i}")
        self.offer((side, i), item)
        return item


def embed_task(model, processor, rows, task, image_dir, config=None, meta=None, batch_size=16,
               progress=False, keep_rows=0, max_text_tokens=EVAL_MAX_TEXT_TOKENS):
    """
    One eval task's rows embedded, each distinct item once (task_items, embed_inputs), as
    TaskEmbeddings. keep_rows: the encoded items of the first N rows (query and every
    candidate) are kept for the matching passes (tools/rerank.py: accuracy, reranking), within
    KEEP_ITEM_BYTES, so that they are not read and encoded twice.
    """
    q_keys, d_keys, pairs = task_items(rows, task, config, meta=meta)
    q_inputs = [(t, os.path.join(image_dir, p) if p else None) for t, p in q_keys]
    d_inputs = [(t, os.path.join(image_dir, p) if p else None) for t, p in d_keys]
    nq = len(q_inputs)
    emb = TaskEmbeddings(q_inputs, d_inputs, pairs,
                         wanted={("q", qi) for qi, _ in pairs[:keep_rows]}
                         | {("d", c) for _, cands in pairs[:keep_rows] for c in cands})
    E = embed_inputs(model, processor, [("q", *x) for x in q_inputs] + [("d", *x) for x in d_inputs],
                     batch_size, progress, desc=task, max_text_tokens=max_text_tokens,
                     keep=lambda i, e: emb.offer(("q", i) if i < nq else ("d", i - nq), e))  # (nq + nd, d)
    emb.Q, emb.D = E[:nq], E[nq:]
    emb.scores = score_rows(emb.Q, emb.D, pairs)
    return emb


def mmeb_report(model, processor, mmeb_dir, image_dir, tasks=None, config=None, batch_size=16,
                out_dir=None, skip_missing=False, progress=True, name=None, extras=(),
                allow_outside_image_dir=False, max_text_tokens=EVAL_MAX_TEXT_TOKENS, data_revision=None):
    """
    {"hit@1": {task: hit@1 (0..1) or None if skipped as missing},
     x.name: {task: x.run(...)} for each x of `extras`}.
    tasks: None (all 36), a list of task names, or {name: (meta_task, is_ind)} (task_table).
    config: the checkpoint's config (load_rematch); recorded with the results and used for
    "target_instructions"; data_revision (a hub id's commit of mmeb_dir) is added to it, so
    it is recorded and a result of another revision is not reused. out_dir: per-task
    results are saved as they finish and reused on restart if config and
    weights_fingerprint match (otherwise: an error), then
    mmeb_results.json / .md (rows labelled `name`, default config["model"]). Every task's
    files and images are checked first (util/benchmarks.mmeb_preflight): missing ones raise an
    error naming them, unless skip_missing (the task is then reported as missing); image
    paths leaving image_dir are refused unless allow_outside_image_dir; a text over
    max_text_tokens is refused, naming the item. extras: further per-task measurements on
    each task's TaskEmbeddings (tools/rerank.py's MatchingAccuracy, the matching head's
    held-out Yes/No accuracy, and Reranking): objects with `name`, `settings` (kept with
    the results: a record with other settings is not reused), `rows` (encoded items to
    keep), run(model, processor, emb, task) → result, line(result) → str and
    columns(results, tasks) → their part of format_table, or None.
    Summaries: summarize(results, task_table(tasks)); the table: format_table(...).
    """
    table, config = task_table(tasks), dict(config or {}, **({"data_revision": data_revision} if data_revision else {}))
    rank, _ = rank_world()
    root = resolve_dir(mmeb_dir, [f"{t}/*" for t in table], revision=data_revision)
    weights = weights_fingerprint(model)
    finished = broadcast_object(load_finished(out_dir, "mmeb", table, config, weights) if rank == 0 else None)
    finished = {t: r for t, r in finished.items()            # a record of other extras is redone
                if all(r.get(x.name) == x.settings for x in extras)}
    problems = mmeb_preflight(root, [t for t in table if t not in finished], image_dir,
                              allow_outside_image_dir, skip_missing)

    results, measured = {}, {x.name: {} for x in extras}
    for task in table:
        if task in finished:
            results[task] = finished[task]["hit@1"]
            for x in extras:
                measured[x.name][task] = finished[task][x.name + "_result"]
            print0(f"{task}: Hit@1 {100 * results[task]:.1f} (finished earlier, skipped)")
            continue
        if task in problems:
            results[task] = None
            print0(f"{task}: missing, skipped ({problems[task]})")
            continue
        rows = read_eval_task(root, task)
        emb = embed_task(model, processor, rows, task, image_dir, config, table[task][0], batch_size,
                         progress, keep_rows=max((x.rows for x in extras), default=0),
                         max_text_tokens=max_text_tokens)
        results[task] = hit_at_1(emb.scores)                    # same on every rank
        record = {"task": task, "meta_task": table[task][0], "is_ind": table[task][1],
                  "hit@1": results[task], "num_queries": len(rows), "num_query_items": len(emb.Q),
                  "num_candidate_items": len(emb.D), "config": config, "weights": weights}
        line = f"{task}: Hit@1 {100 * results[task]:.1f} ({len(rows)} queries, " \
               f"{len(emb.Q)} query items, {len(emb.D)} candidate items)"
        for x in extras:
            measured[x.name][task] = x.run(model, processor, emb, task)
            record.update({x.name + "_result": measured[x.name][task], x.name: x.settings})
            line += "; " + x.line(measured[x.name][task])
        print0(line)
        if rank == 0 and out_dir:
            write_json(result_path(out_dir, "mmeb", task), record)
    if rank == 0 and out_dir:
        name = name or config.get("model")
        write_json(os.path.join(out_dir, "mmeb_results.json"), {
            "name": name, "config": config, "summary": summarize(results, table),
            "tasks": {t: {"meta_task": m, "is_ind": ind, "hit@1": results[t],
                          **{x.name: measured[x.name][t] for x in extras if t in measured[x.name]}}
                      for t, (m, ind) in table.items()}})
        write_atomic(os.path.join(out_dir, "mmeb_results.md"),
                     format_table(results, table, name=name, markdown=True,
                                  extras=[(x, measured[x.name]) for x in extras]))
    return {"hit@1": results, **measured}


def _groups(table):
    """{group: [tasks]}: each meta-task (the 4 of Table 1, then any other), IND, OOD, Overall."""
    metas = list(dict.fromkeys([*META_TASKS, *(m for m, _ in table.values())]))
    groups = {m: [t for t, (mt, _) in table.items() if mt == m] for m in metas}
    groups["IND"] = [t for t, (_, ind) in table.items() if ind]
    groups["OOD"] = [t for t, (_, ind) in table.items() if not ind]
    groups["Overall"] = list(table)
    return groups


def summarize(results, table):
    """
    {group: {"mean", "tasks", "missing"}} for each meta-task, IND, OOD and Overall:
    the unweighted mean of Hit@1 over the group's tasks in `table`. A group with a task
    that has no result has mean None (never a mean over a silently smaller set).
    """
    out = {}
    for g, ts in _groups(table).items():
        vals = [results.get(t) for t in ts]
        missing = sum(v is None for v in vals)
        mean = sum(vals) / len(vals) if ts and not missing else None
        out[g] = {"mean": mean, "tasks": len(ts), "missing": missing}
    return out


def percent_cell(mean, tasks=1, missing=0):
    if tasks == 0:
        return "-"
    if missing:
        return f"n/a ({missing} missing)"
    return f"{100 * mean:.1f}"


def render_table(rows, markdown):
    """rows: list of lists of strings (first row = header) → aligned text or Markdown."""
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])
    w = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip() for r in rows)


def format_table(results, table, name=None, markdown=False, chance=None, extras=()):
    """The Table-1 layout: per meta-task scores, then IND / OOD / Overall (Hit@1, %),
    with the number of tasks behind each mean, followed by the per-task scores.
    chance: optional {task: chance Hit@1} (chance_table): adds a "chance" row of the same
    means and, per task, the chance level and Hit@1 / chance.
    extras: optional [(x, {task: result})] of mmeb_report's extras; each x.columns(results,
    tasks) may add (headers, {task: cells}, [(label, cells)] mean rows, (title, rows) or
    None) — tools/rerank.py's MatchingAccuracy: the matching head's accuracy per view type,
    its means and a last block of its two halves."""
    table = task_table(table) if not isinstance(table, dict) else table
    s = summarize(results, table)
    groups = list(s)
    head = [["model", *groups], [name or "model", *(percent_cell(**s[g]) for g in groups)]]
    if chance is not None:
        c = summarize({t: chance[t] for t in table if results.get(t) is not None}, table)
        head.append(["chance", *(percent_cell(**c[g]) for g in groups)])
    head.append(["tasks", *(str(s[g]["tasks"]) for g in groups)])
    parts = [p for p in (x.columns(r, [t for t in table if t in r]) for x, r in extras) if p]
    per_task = [["task", "meta-task", "split", "Hit@1"] + (["chance", "× chance"] if chance else [])
                + [h for p in parts for h in p[0]]]
    for g in groups[:-3]:
        for t, (m, ind) in table.items():
            if m != g:
                continue
            hit = results.get(t)
            row = [t, m, "IND" if ind else "OOD", "missing" if hit is None else percent_cell(hit)]
            if chance is not None:
                row += [percent_cell(chance[t]), "-" if hit is None else f"{hit / chance[t]:.1f}"]
            per_task.append(row + [c for p in parts for c in p[1].get(t, ["-"] * len(p[0]))])
    width = [len(p[0]) for p in parts]
    for k, p in enumerate(parts):                  # an extra's mean rows, under its columns
        for label, cells in p[2]:
            per_task.append([label, "", "", ""] + (["", ""] if chance else [])
                            + [""] * sum(width[:k]) + cells + [""] * sum(width[k + 1:]))
    title = "Hit@1 (%) in the layout of Table 1: per meta-task score | average score (IND, OOD, Overall)"
    blocks = [p[3] for p in parts if p[3]]
    if markdown:
        return (f"### {title}\n\n{render_table(head, True)}\n\n{render_table(per_task, True)}\n"
                + "".join(f"\n### {t}\n\n{render_table(rows, True)}\n" for t, rows in blocks))
    return (f"{title}\n{render_table(head, False)}\n\n{render_table(per_task, False)}"
            + "".join(f"\n\n{t}\n{render_table(rows, False)}" for t, rows in blocks))


# ----------------------------------------------------------------------------------
# Zero-shot (Table 2): metrics on the datasets util/benchmarks.py reads (their on-disk
# layout is described there). The test sets (the protocol of Table 2):
#   Flickr30K   Karpathy split "test": 1000 images, the first 5 captions each (t2i, i2t R@1/5/10)
#   COCO        Karpathy split "test": 5000 images, the first 5 captions each (R@1/5/10)
#   ShareGPT4V  the first 1000 entries of the ShareCaptioner file; caption = the answer (R@1)
#   Urban1K     every caption/<name>.txt (its first line) ↔ image/<name>.jpg (R@1)
#   SugarCrepe  7 subsets of (COCO val2017 image, caption, negative caption) (accuracy)
# Prompts (MMEB's MSCOCO_t2i / MSCOCO_i2t wording, fixed): text→image query
# ZS_T2I_QUERY.format(caption), image candidate ZS_IMAGE_CANDIDATE; image→text query
# ZS_I2T_QUERY, text candidate the raw caption. Identical captions (or images) are one
# item, a positive for every image they belong to. SugarCrepe: the image must score the
# true caption strictly above the negative one; Replace/Swap/Add = mean of the subsets.

ZS_T2I_QUERY = "Find me an everyday image that matches the given caption: {}"
ZS_IMAGE_CANDIDATE = IMAGE_PLACEHOLDER + "\n" + DOC_IMAGE_INSTRUCTION          # the one rule (format_document)
ZS_I2T_QUERY = IMAGE_PLACEHOLDER + "\nFind an image caption describing the given image."
ZS_TARGET_TASK = "MSCOCO_i2t"          # target instruction of text candidates, if the ckpt uses them
SUGARCREPE_GROUPS = {"Replace": ("replace_obj", "replace_att", "replace_rel"),
                     "Swap": ("swap_obj", "swap_att"), "Add": ("add_obj", "add_att")}


def _text_candidate(config):
    target = _target_instruction_fn(config)
    return (lambda c: c) if target is None else (lambda c: target(c, ZS_TARGET_TASK))


def _recall_chunked(Q, C, q_of_pair, c_of_pair, ks, chunk=1024):
    """R@k of queries Q (nq, d) against all of C (nc, d); positives are the (q, c) index
    positives. Chunked over queries so COCO's 25k × 5k matrix never exists at once."""
    hits = dict.fromkeys(ks, 0.0)
    for a in range(0, len(Q), chunk):
        b = min(a + chunk, len(Q))
        scores = cosine_scores(Q[a:b], C)                                    # (b-a, nc)
        is_pos = torch.zeros(scores.shape, dtype=torch.bool)
        sel = (q_of_pair >= a) & (q_of_pair < b)
        is_pos[q_of_pair[sel] - a, c_of_pair[sel]] = True
        for k in ks:
            hits[k] += recall_at_k(scores, is_pos, k) * (b - a)
    return {k: hits[k] / len(Q) for k in ks}


def eval_retrieval(model, processor, positives, ks=(1, 5, 10), config=None, batch_size=16,
                   progress=True, desc="retrieval"):
    """
    positives: the (image path, caption) pairs of a test set. Text→image: each
    distinct caption (ZS_T2I_QUERY) ranks all distinct images (ZS_IMAGE_CANDIDATE);
    image→text: each image (ZS_I2T_QUERY) ranks all distinct captions, any of its own
    captions is a positive. Returns {"t2i_R@k": .., "i2t_R@k": ..}.
    """
    img_id, txt_id = {}, {}
    pos = torch.tensor([(txt_id.setdefault(c, len(txt_id)), img_id.setdefault(p, len(img_id)))
                        for p, c in positives])                               # (P, 2)
    images, captions = list(img_id), list(txt_id)
    cand = _text_candidate(config)
    inputs = ([("q", ZS_T2I_QUERY.format(c), None) for c in captions]
              + [("d", ZS_IMAGE_CANDIDATE, p) for p in images]
              + [("q", ZS_I2T_QUERY, p) for p in images]
              + [("d", cand(c), None) for c in captions])
    E = embed_inputs(model, processor, inputs, batch_size, progress, desc=desc)
    T_q, I_d, I_q, T_d = E.split([len(captions), len(images), len(images), len(captions)])
    t2i = _recall_chunked(T_q, I_d, pos[:, 0], pos[:, 1], ks)
    i2t = _recall_chunked(I_q, T_d, pos[:, 1], pos[:, 0], ks)
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def eval_sugarcrepe(model, processor, subsets, config=None, batch_size=16, progress=True,
                    desc="sugarcrepe"):
    """Accuracy per subset (the image, as an i2t query, scores the true caption strictly
    above the negative one) and the Replace / Swap / Add means over their subsets."""
    img_id, txt_id = {}, {}
    rows = {s: torch.tensor([(img_id.setdefault(p, len(img_id)), txt_id.setdefault(c, len(txt_id)),
                              txt_id.setdefault(n, len(txt_id))) for p, c, n in samples])
            for s, samples in subsets.items()}                                # (N, 3) each
    cand = _text_candidate(config)
    inputs = [("q", ZS_I2T_QUERY, p) for p in img_id] + [("d", cand(c), None) for c in txt_id]
    E = embed_inputs(model, processor, inputs, batch_size, progress, desc=desc)
    I_q, T_d = E.split([len(img_id), len(txt_id)])
    I_q, T_d = F.normalize(I_q.float(), dim=-1), F.normalize(T_d.float(), dim=-1)
    out = {}
    for s, r in rows.items():
        scores = torch.stack([(I_q[r[:, 0]] * T_d[r[:, 1]]).sum(-1),          # (N,) true caption
                              (I_q[r[:, 0]] * T_d[r[:, 2]]).sum(-1)], dim=1)  # (N, 2) + negative
        out[s] = hit_at_1(scores)
    for g, members in SUGARCREPE_GROUPS.items():
        if all(m in out for m in members):
            out[g] = sum(out[m] for m in members) / len(members)
    return out


ZEROSHOT = {   # name: (reader, kind, recall ks)
    "flickr30k": (read_flickr30k, "retrieval", (1, 5, 10)),
    "coco": (read_coco, "retrieval", (1, 5, 10)),
    "sharegpt4v": (read_sharegpt4v, "retrieval", (1,)),
    "urban1k": (read_urban1k, "retrieval", (1,)),
    "sugarcrepe": (read_sugarcrepe, "sugarcrepe", ()),
}


def evaluate_zeroshot(model, processor, datasets, data_dir, config=None, batch_size=16,
                      out_dir=None, progress=True, name=None, allow_outside_image_dir=False):
    """{dataset: {metric: value (0..1)}} for the names in ZEROSHOT; results saved per
    dataset in out_dir (reused on restart, as in mmeb_report), then
    zeroshot_results.json / .md. Image paths leaving data_dir are refused unless
    allow_outside_image_dir."""
    config = dict(config or {})
    unknown = [d for d in datasets if d not in ZEROSHOT]
    if unknown:
        raise KeyError(f"unknown zero-shot dataset(s) {unknown}; choose from {list(ZEROSHOT)}")
    rank, _ = rank_world()
    weights = weights_fingerprint(model)
    finished = broadcast_object(load_finished(out_dir, "zeroshot", datasets, config, weights)
                                if rank == 0 else None)
    results = {}
    for ds in datasets:
        if ds in finished:
            results[ds] = finished[ds]["metrics"]
            print0(f"{ds}: finished earlier, skipped")
            continue
        reader, kind, ks = ZEROSHOT[ds]
        data = reader(data_dir, allow_outside=allow_outside_image_dir)
        if kind == "retrieval":
            results[ds] = eval_retrieval(model, processor, data, ks, config, batch_size, progress, ds)
        else:
            results[ds] = eval_sugarcrepe(model, processor, data, config, batch_size, progress, ds)
        print0(f"{ds}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results[ds].items()))
        if rank == 0 and out_dir:
            write_json(result_path(out_dir, "zeroshot", ds),
                        {"dataset": ds, "metrics": results[ds], "config": config, "weights": weights})
    if rank == 0 and out_dir:
        name = name or config.get("model")
        write_json(os.path.join(out_dir, "zeroshot_results.json"),
                    {"name": name, "config": config, "results": results})
        write_atomic(os.path.join(out_dir, "zeroshot_results.md"),
                    format_zeroshot_table(results, name=name, markdown=True))
    return results


ZS_TABLE = (("Flickr30K", "flickr30k", ("t2i_R@1", "i2t_R@1")), ("COCO", "coco", ("t2i_R@1", "i2t_R@1")),
            ("ShareGPT4V", "sharegpt4v", ("t2i_R@1", "i2t_R@1")),
            ("Urban1K", "urban1k", ("t2i_R@1", "i2t_R@1")),
            ("SugarCrepe", "sugarcrepe", ("Replace", "Swap", "Add")))


def format_zeroshot_table(results, name=None, markdown=False):
    """The Table-2 layout (R@1 t→i, i→t; SugarCrepe Replace/Swap/Add accuracy, %), then
    R@1/5/10 of Flickr30K/COCO and the 7 SugarCrepe subsets. "-" = not run."""
    def val(ds, m):
        v = results.get(ds, {}).get(m)
        return "-" if v is None else f"{100 * v:.1f}"
    short = {"t2i_R@1": "qt→ci", "i2t_R@1": "qi→ct"}
    cols = [(title, ds, m, j) for title, ds, ms in ZS_TABLE for j, m in enumerate(ms)]
    values = [name or "model", *(val(ds, m) for _, ds, m, _ in cols)]
    if markdown:                                       # one header row: "Flickr30K qt→ci", ...
        head = [["model", *(f"{t} {short.get(m, m)}" for t, _, m, _ in cols)], values]
    else:                                              # Table 2's two header rows
        head = [["", *(t if j == 0 else "" for t, _, _, j in cols)],
                ["model", *(short.get(m, m) for _, _, m, _ in cols)], values]
    detail = [["dataset", "metric", "value"]] + [
        [ds, m, val(ds, m)] for ds in ("flickr30k", "coco") if ds in results
        for m in (f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10))] + [
        ["sugarcrepe", s, val("sugarcrepe", s)] for s in SUGARCREPE_SUBSETS if "sugarcrepe" in results]
    title = "Zero-shot retrieval (Recall@1, %; SugarCrepe accuracy, %)"
    if markdown:
        return f"### {title}\n\n{render_table(head, True)}\n\n{render_table(detail, True)}\n"
    return f"{title}\n{render_table(head, False)}\n\n{render_table(detail, False)}"


# ----------------------------------------------------------------------------------
# Encoder: the embedding API

def format_input(text=None, has_image=False, instruction=None):
    """MMEB-format string: "<|image_1|>\\n{instruction} {text}" (parts that exist). A text
    that already holds <|image_1|> is used as is."""
    body = " ".join(s for s in (instruction, text) if s)
    if has_image and IMAGE_PLACEHOLDER not in body:
        body = IMAGE_PLACEHOLDER + ("\n" + body if body else "")
    return body


def format_document(text=None, has_image=False, instruction=None):
    """format_input for a document: a bare image (no text, no instruction) gets
    DOC_IMAGE_INSTRUCTION, as MMEB's image candidates ("<|image_1|>\nRepresent the given
    image."), tools/search.py's corpus images and the export's encode_document(image) have
    it — the one rule for a bare image document."""
    if has_image and not text and not instruction:
        instruction = DOC_IMAGE_INSTRUCTION
    return format_input(text, has_image, instruction)


class Encoder:
    """
    Load a checkpoint (or a raw backbone / tiny model, see load_rematch) once, then embed
    lists of texts, images (PIL or paths) or (image, text) pairs:
        enc = Encoder("runs/ckpt"); E = enc.encode(texts=[...], images=[...], instruction=..., side="q")
    Returns L2-normalised fp32 (N, d) on the CPU; a vector does not depend on its batch.
    side "q" for queries (L_q), "d" for the documents of an index (L_d); a bare image
    document (no text, no instruction) gets DOC_IMAGE_INSTRUCTION (format_document). Text documents of
    a checkpoint trained with target instructions: pass data.with_target_instruction(text,
    task) as the texts (and no instruction), as mmeb_report does. The same checkpoint as a
    cross-encoder (the matching head's p(Yes)): tools/rerank.py's rerank(enc, query,
    candidates). attn: the attention of that matching pass ("sdpa", or "flex":
    util.speed.set_attention). revision: a hub id's commit, branch or tag (kept in
    self.config).
    """

    def __init__(self, path_or_hub, device=None, dtype=None, num_tokens=0, embed_template="plain",
                 attn="sdpa", revision=None):
        self.model, self.processor, self.config = load_rematch(
            path_or_hub, device=device, dtype=dtype, num_tokens=num_tokens, embed_template=embed_template,
            revision=revision)
        set_attention(self.model.eval(), attn)                  # rerank's matching pass: sdpa | flex

    def encode(self, texts=None, images=None, instruction=None, side="q", batch_size=32, progress=False):
        """texts: a list of str (or None); images: a list of PIL images or paths (str /
        os.PathLike; None for none); both given = (text, image) pairs. side: "q" or "d"."""
        check_encode_args(texts, images, side, batch_size)                    # util/inputs.py
        n = len(texts) if texts is not None else len(images)
        texts = texts if texts is not None else [None] * n
        images = images if images is not None else [None] * n
        fmt = format_document if side == "d" else format_input                  # a bare image document: the rule
        inputs = [(side, fmt(t, im is not None, instruction), im) for t, im in zip(texts, images)]
        E = embed_inputs(self.model, self.processor, inputs, batch_size, progress, desc="encode",
                         distributed=False)                                 # (N, d)
        return F.normalize(E.float(), dim=-1)


# ----------------------------------------------------------------------------------
# CLI

def build_parser(description="Evaluate a ReMatch checkpoint (or a raw backbone) on MMEB (Table 1) "
                              "and zero-shot retrieval (Table 2)."):
    """evaluate.py's flags (tools/rerank.py and tools/mmeb_v2.py add their own to them)."""
    p = argparse.ArgumentParser(description=description)
    # model
    p.add_argument("--model", required=True, help="train.py checkpoint dir or its hub id, a merged export "
                   "(tools/export_merged.py: its own K, template and pooling), a raw Qwen2-VL/Qwen2.5-VL/Qwen3-VL "
                   "(baseline), or tiny-qwen2-vl / tiny-qwen2.5-vl / tiny-qwen3-vl / tiny-qwen2-vl-chat")
    p.add_argument("--revision", default=None, help="hub ids only: the commit, branch or tag of --model "
                   "(recorded with the results; default: main)")
    p.add_argument("--num_tokens", type=int, default=0,
                   help="raw backbones only: K learnable tokens (0 = last-token pooling)")
    p.add_argument("--embed_template", default="plain", choices=("plain", "chat"),
                   help="raw backbones only: plain = VLM2Vec layout, chat = MVQDM++ template")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float64"), default="auto", help="weights: "
                   "auto = the checkpoint's training dtype if full precision, else bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--batch_size", type=int, default=16, help="items per embedding forward (per rank)")
    p.add_argument("--dist_timeout_minutes", type=float, default=DIST_TIMEOUT_MINUTES,
                   help=f"torchrun: how long a collective waits for the other ranks (default "
                        f"{DIST_TIMEOUT_MINUTES}; rank 0 alone may be downloading the checkpoint)")
    p.add_argument("--attn", choices=ATTENTION, default="sdpa", help="attention of the matching passes "
                   "(tools/rerank.py): sdpa = dense mask, flex = FlexAttention block mask (util.speed)")
    # MMEB
    p.add_argument("--mmeb_dir", default=None, help="MMEB-eval: local dir or hub id "
                   "(TIGER-Lab/MMEB-eval); <root>/<Task>/test-*.parquet or <root>/<Task>/test/*.parquet")
    p.add_argument("--image_dir", default=None, help="folder the *_img_path columns are relative to")
    p.add_argument("--data_revision", default=None, help="a hub id as --mmeb_dir: its commit, branch or tag")
    p.add_argument("--benchmark", default="mmeb", choices=BENCHMARK_NAMES, help="task table: mmeb = the 36 "
                   "MMEB tasks, synthetic = the demo's eval split (MMEB-V2: python tools/mmeb_v2.py)")
    p.add_argument("--tasks", nargs="+", default=None, help="a subset of the benchmark's tasks (default: all)")
    p.add_argument("--task_table", default=None, help="JSON {task: [meta_task, is_ind]}: the task "
                   "table of any other benchmark in the MMEB file format (replaces --benchmark)")
    p.add_argument("--max_text_tokens", type=int, default=EVAL_MAX_TEXT_TOKENS, help="refuse (naming it) an "
                   f"item whose text is longer, image tokens not counted (default {EVAL_MAX_TEXT_TOKENS})")
    p.add_argument("--allow_outside_image_dir", action="store_true",
                   help="accept image paths that are absolute or leave --image_dir (--data_dir) with '..'")
    p.add_argument("--skip_missing", action="store_true", help="skip tasks whose files or images "
                   "are missing (reported as missing; their group means as n/a) instead of failing")
    # zero-shot
    p.add_argument("--zeroshot", nargs="+", default=None, choices=list(ZEROSHOT), metavar="NAME",
                   help=f"zero-shot datasets to evaluate (Table 2): {' '.join(ZEROSHOT)}")
    p.add_argument("--data_dir", default=None, help="root of the zero-shot datasets (layouts: util/benchmarks.py)")
    # output
    p.add_argument("--out", default=None, help="output dir: per-task results (resume), tables (.json, .md)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv=None, parser=None):
    """Parse and check evaluate.py's flags (`parser`: build_parser's, possibly extended)."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    check_eval_flags(args, p.error)                          # util/inputs.py
    return args


def main(argv=None, args=None, extras=None, benchmark=None):
    """evaluate.py's run. Hooks of the extensions: tools/rerank.py passes its parsed args and
    `extras`, a function of the checkpoint's config that returns mmeb_report's extras;
    tools/mmeb_v2.py `benchmark`, a function (args, model, processor, config, name) → (key,
    results) run instead of the MMEB table (it prints its own)."""
    args = args or parse_args(argv)
    _, _, world, device = setup_distributed(args.device, args.dist_timeout_minutes)   # torchrun: one shard per rank
    model, processor, config = load_rematch(args.model, device=device, num_tokens=args.num_tokens,
                                            embed_template=args.embed_template, revision=args.revision,
                                            dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    name = published_name(args.model)                           # no local path in a result file
    set_attention(model, args.attn)                             # forward only: flex runs on the CPU too
    extras = extras(config) if extras else []
    print0(f"{args.model} on {device} × {world} rank(s): K={model.num_tokens}, "
           f"template={model.embed_template}, batch {args.batch_size} per rank")
    out = {}
    if benchmark:                                               # an extension's task table
        key, out[key] = benchmark(args, model, processor, config, name)
    elif args.mmeb_dir:
        known = args.task_table_entries if args.task_table else benchmarks()[args.benchmark]
        table = task_table(args.tasks, known)
        report = mmeb_report(model, processor, args.mmeb_dir, args.image_dir, table, config, args.batch_size,
                             args.out, args.skip_missing, not args.no_progress, name=name, extras=extras,
                             allow_outside_image_dir=args.allow_outside_image_dir,
                             max_text_tokens=args.max_text_tokens, data_revision=args.data_revision)
        out["mmeb"] = report["hit@1"]
        print0("\n" + format_table(out["mmeb"], table, name=name, extras=[(x, report[x.name]) for x in extras]))
        for x in extras:
            out[x.name] = report[x.name]
            if x.table(out[x.name]):
                print0("\n" + x.table(out[x.name]))
    if args.zeroshot:
        out["zeroshot"] = evaluate_zeroshot(model, processor, args.zeroshot, args.data_dir, config,
                                            args.batch_size, args.out, not args.no_progress,
                                            name=name, allow_outside_image_dir=args.allow_outside_image_dir)
        print0("\n" + format_zeroshot_table(out["zeroshot"], name=name))
    del model                                                   # then leave the process group
    teardown_distributed()
    return out


if __name__ == "__main__":
    main()
