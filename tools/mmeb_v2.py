"""
MMEB-V2 — where embedding models report now, beside the paper's MMEB (v1, Table 1). Not
the paper's protocol: the paper reports MMEB v1 only, and evaluate.py's v1 table stays as
it is. MMEB-V2 has 78 tasks in three groups, each with the leaderboard's metric:

  image  (36)  MMEB v1's tasks, local ranking of each query's candidates, Hit@1
               (evaluate.mmeb_report, unchanged)
  visdoc (24)  page retrieval (ViDoRe v1 and v2, VisRAG, ViDoSeek, MMLongBench): each query
               ranked against the task's whole corpus of page images, NDCG@5 with graded
               relevance and linear gain ("ndcg_linear@5"), plus Hit@1 and Recall@k
  video  (18)  classification, QA, text-to-video and moment retrieval over 8 frames per clip
               through the backbone's own video input (util/video.py), each query ranked
               against its own candidates or the task's whole pool as the harness does, Hit@1

The group means and the overall mean are over the tasks that ran, each printed with its
task count and metric; missing tasks are named; the visdoc mean also over the 22 sets of the
harness's newest comparisons (VISDOC_22). Each task's query count is compared with the
published one (EXPECTED_QUERIES); a difference is printed beside the score and recorded.
Per task, a score file with the reference harness's names (<out>/mmeb_v2/<Task>_score.json:
hit@1, ndcg_linear@5, recall@5, ..., num_pred, num_data; for a page task with several relevant
pages per query also ndcg_linear@5_harness_pairing, the harness's NDCG pairing recomputed from
the ranking) and a ranking file (<Task>_pred.jsonl: the top 10 corpus ids per query with the
judged grades) for comparison with its outputs, then the task's record (<Task>.json, written
last: the marker a restart reads). With the harness's full metric set (ranking_metrics: hit,
ndcg_linear, ndcg_exponential, precision, recall, f1, map, mrr @1/5/10) also in its layout,
<out>/{image,video,visdoc}/<Task>_score.json (write_harness_layout; image tasks: the MMEB v1
path's Hit@1 with HarnessImageMetrics), and <out>/<model>.json, the submission JSON of its report script
(harness_submission). A restart reuses a finished task only when its
data are the ones scored: the revision, the digest of the task folder's files (data_digest)
and, for classification, the class pool's digest; otherwise it scores the task again and
says why. File names are the task names made safe (util/run.safe_name).
Text candidates (class labels, QA options, image tasks' text targets) are the harness's raw
text; --v2_target_instructions puts the checkpoint's target instructions before them, as its
MMEB v1 evaluation does, and each task records which (candidate_text).
How this reads the harness where it is open (ties, grades, instructions): docs/readings.md §10.

    python tools/mmeb_v2.py --model CKPT --mmeb_dir MMEB-eval --image_dir eval_images \\
        --visdoc_dir visdoc --video_dir video --out runs/eval_v2        # evaluate.py's flags too
    python tools/mmeb_v2.py train --train_data ... --eval_data ... \\
        --eval_visdoc_dir visdoc --eval_video_dir video                # train.py's run, then these

An extension, like tools/rerank.py: it reaches the paper files only through their hooks
(evaluate.main's `benchmark`, train.main's `after_eval`, their parsers), and no paper file
imports it. Its readers are tools/mmeb_v2_data.py's.

--visdoc_dir: one folder per task (names below), each a local copy of the task's hub dataset
in the BEIR layout (tools/mmeb_v2_data.read_visdoc_task); VISDOC_TASKS names the hub ids, e.g.
    hf download vidore/arxivqa_test_subsampled_beir --repo-type dataset --local-dir visdoc/ViDoRe_arxivqa
--video_dir: one folder per video task (names in VIDEO_TASKS): its hub dataset
(tools/mmeb_v2_data.VIDEO_SOURCES) and frames/, a link to the task's folder of the released
MMEB-V2 frames. The four global classification tasks rank each clip against the harness's class
list, shipped in tools/mmeb_v2_classes/ (a <Task>/classes.txt there overrides it; a row whose
label is in neither stops the task), e.g.
    hf download VLM2Vec/MSR-VTT --repo-type dataset --local-dir video/MSR-VTT
    ln -s $MMEB_V2/video-tasks/frames/video_ret/MSR-VTT video/MSR-VTT/frames
Tests: pytest tests/test_mmeb_v2.py tests/test_mmeb_v2_video.py tests/test_mmeb_v2_classes.py
"""
import hashlib
import json
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402
import train  # noqa: E402
from data import MMEB_EVAL_TASKS  # noqa: E402
from tools.mmeb_v2_data import (V_CLS, VIDEO_SOURCES, class_pool_record, file_sha256, read_video_task,  # noqa: E402
                                 read_visdoc_task, visdoc_ids_are_ints)
from util.dist import broadcast_object, print0, rank_world  # noqa: E402
from util.inputs import check_eval_flags, find_parquet  # noqa: E402
from util.run import (load_finished, result_path, run_config, safe_name, weights_fingerprint,  # noqa: E402
                      write_atomic, write_json)

# The 24 visual-document tasks of the leaderboard: name → (group, hub dataset, split,
# language filter of the queries). The reference config lists 27: the three English-only
# ViDoRe v2 sets are not on the leaderboard, and the two "-page" sets are the "-fixed" releases.
_V1 = ("arxivqa_test_subsampled", "docvqa_test_subsampled", "infovqa_test_subsampled",
       "tabfquad_test_subsampled", "tatdqa_test", "shiftproject_test",
       "syntheticDocQA_artificial_intelligence_test", "syntheticDocQA_energy_test",
       "syntheticDocQA_government_reports_test", "syntheticDocQA_healthcare_industry_test")
VISDOC_TASKS = {
    **{"ViDoRe_" + n.replace("_test_subsampled", "").replace("_test", ""): ("ViDoRe-V1", f"vidore/{n}_beir", "test", None)
       for n in _V1},
    "ViDoRe_esg_reports_human_labeled_v2": ("ViDoRe-V2", "vidore/esg_reports_human_labeled_v2", "test", None),
    "ViDoRe_biomedical_lectures_v2_multilingual": ("ViDoRe-V2", "vidore/biomedical_lectures_v2", "test", None),
    "ViDoRe_economics_reports_v2_multilingual": ("ViDoRe-V2", "vidore/economics_reports_v2", "test", None),
    "ViDoRe_esg_reports_v2_multilingual": ("ViDoRe-V2", "vidore/esg_reports_v2", "test", None),
    **{f"VisRAG_{n}": ("VisRAG", f"openbmb/VisRAG-Ret-Test-{n}", "train", None)
       for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")},
    "ViDoSeek-page": ("VisDoc-OOD", "VLM2Vec/ViDoSeek-page-fixed", "test", None),
    "ViDoSeek-doc": ("VisDoc-OOD", "VLM2Vec/ViDoSeek", "test", None),
    "MMLongBench-page": ("VisDoc-OOD", "VLM2Vec/MMLongBench-page-fixed", "test", None),
    "MMLongBench-doc": ("VisDoc-OOD", "VLM2Vec/MMLongBench-doc", "test", None),
}
# The 18 video tasks: name → group (sources and readers: tools/mmeb_v2_data.VIDEO_SOURCES)
VIDEO_TASKS = {**dict.fromkeys(("K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast"), "V-CLS"),
               **dict.fromkeys(("MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA"), "V-QA"),
               **dict.fromkeys(("DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2"), "V-RET"),
               **dict.fromkeys(("QVHighlight", "Charades-STA", "MomentSeeker"), "V-MRET")}
# The data vintage on record: each task's query count (num_data) in the harness's published
# score files, TIGER-AI-Lab/VLM2Vec experiments/public/all_scores/v2.0.1/VLM2Vec-V2.0-Qwen2VL-2B.json
# (report of 2025-08-15) and docs/mmebv2_reproduction/leaderboard/Qwen3-VL-Embedding-8B.json (the
# leaderboard's file, 2026-01-06); the two agree on every task read in both. A run whose count
# differs says so beside the score and in the task's record (count_note). None: no published
# count found (none so far).
EXPECTED_QUERIES = {
    **dict.fromkeys(MMEB_EVAL_TASKS, 1000),                     # the 36 image tasks, 1000 rows each
    "ViDoRe_arxivqa": 500, "ViDoRe_docvqa": 451, "ViDoRe_infovqa": 494, "ViDoRe_tabfquad": 280,
    "ViDoRe_tatdqa": 1646, "ViDoRe_shiftproject": 100, "ViDoRe_syntheticDocQA_artificial_intelligence": 100,
    "ViDoRe_syntheticDocQA_energy": 100, "ViDoRe_syntheticDocQA_government_reports": 100,
    "ViDoRe_syntheticDocQA_healthcare_industry": 100,
    "ViDoRe_esg_reports_human_labeled_v2": 52, "ViDoRe_biomedical_lectures_v2_multilingual": 640,
    "ViDoRe_economics_reports_v2_multilingual": 232, "ViDoRe_esg_reports_v2_multilingual": 228,
    "VisRAG_ArxivQA": 816, "VisRAG_ChartQA": 63, "VisRAG_MP-DocVQA": 591, "VisRAG_SlideVQA": 556,
    "VisRAG_InfoVQA": 718, "VisRAG_PlotQA": 863,
    "ViDoSeek-page": 1142, "ViDoSeek-doc": 1142,                # -page: the -fixed release (same count)
    "MMLongBench-page": 838, "MMLongBench-doc": 838,
    "K700": 1000, "SmthSmthV2": 1000, "HMDB51": 1000, "UCF101": 1000, "Breakfast": 433,
    "MVBench": 4000, "Video-MME": 2700, "NExTQA": 8564, "EgoSchema": 500, "ActivityNetQA": 1000,
    "DiDeMo": 1004, "MSR-VTT": 1000, "MSVD": 670, "VATEX": 4478, "YouCook2": 3179,
    "QVHighlight": 1083, "Charades-STA": 727,
    "MomentSeeker": 1602,                # since the 2025 de-duplication; 1,800 before (MomentSeeker_1k8)
}
# Vintages a count alone does not name (docs/readings.md §10), recorded with each source
VINTAGE = {"MomentSeeker": "1,602 rows (VLM2Vec/MomentSeeker since its 2025 de-duplication; "
                           "VLM2Vec/MomentSeeker_1k8 holds the 1,800 rows before)",
           "ViDoSeek-page": "the -fixed release (VLM2Vec/ViDoSeek-page-fixed)",
           "MMLongBench-page": "the -fixed release (VLM2Vec/MMLongBench-page-fixed)"}
# The 22 visdoc sets of the harness's newest visdoc comparisons: the 24 without the two page
# sets replaced by -fixed releases (docs/mmebv2_reproduction/README.md, "visdoc (22 of 24)";
# results_qwen3vl8b.md, "(n=22)"). The report prints the 22-set mean beside the 24-set one.
VISDOC_22 = tuple(t for t in VISDOC_TASKS if t not in ("ViDoSeek-page", "MMLongBench-page"))


def count_note(task, n):
    """"" when n queries is the published count of the task (or it has none on record), else
    the difference in words: printed beside the score."""
    want = EXPECTED_QUERIES.get(task)
    return "" if want is None or n == want else \
        f" [{n} queries here, {want} in the published score files: another data vintage?]"


IMAGE_GROUP = {"Classification": "I-CLS", "VQA": "I-QA", "Retrieval": "I-RET", "Grounding": "I-VG"}
MODALITIES = {"image": ("hit@1", ("I-CLS", "I-QA", "I-RET", "I-VG")),
              "video": ("hit@1", ("V-CLS", "V-QA", "V-RET", "V-MRET")),
              "visdoc": ("ndcg_linear@5", ("ViDoRe-V1", "ViDoRe-V2", "VisRAG", "VisDoc-OOD"))}

# Instructions of the reference harness for every visdoc task (query: text only; document: the page)
VISDOC_QUERY = "Find a document image that matches the given query: {}"
VISDOC_DOCUMENT = "<|image_1|> Understand the content of the provided document image."
KS = (1, 5, 10)

# The text of a text-only candidate (a class label, a QA option, an MMEB image task's text
# target): the harness's, as the data gives it, by default; the checkpoint's target
# instruction before it ("Represent the class label: ...") with --v2_target_instructions.
# Page and clip candidates carry the harness's fixed instruction either way.
HARNESS_TEXT, TARGET_TEXT = "harness", "target_instructions"


def candidate_text(kind, task, target_instructions):
    """Which text a task's candidates get: TARGET_TEXT only where the choice applies (image
    tasks, the text candidates of V-CLS and V-QA) and target_instructions is set; else
    HARNESS_TEXT."""
    applies = kind == "image" or (kind == "video" and VIDEO_TASKS.get(task) in ("V-CLS", "V-QA"))
    return TARGET_TEXT if target_instructions and applies else HARNESS_TEXT


def check_target_instructions(config, target_instructions):
    """--v2_target_instructions needs a checkpoint trained with target instructions
    (config "target_instructions"); ValueError naming the flag otherwise."""
    if target_instructions and not (config or {}).get("target_instructions"):
        raise ValueError("--v2_target_instructions: this checkpoint has no target instructions (its config's "
                         "target_instructions is not set), so there is none to put before MMEB-V2's candidates")


def visdoc_table(tasks=None):
    """The visdoc tasks to run: all 24 (None), the named ones (unknown names: KeyError), or
    a dict {name: (group, source, split, language)} of any tasks in the same layout (one
    outside the 24 is scored and listed, never in the leaderboard's means)."""
    if tasks is None:
        return dict(VISDOC_TASKS)
    if isinstance(tasks, dict):
        return dict(tasks)
    unknown = [t for t in tasks if t not in VISDOC_TASKS]
    if unknown:
        raise KeyError(f"unknown MMEB-V2 visdoc task(s) {unknown}; known: {list(VISDOC_TASKS)}")
    return {t: VISDOC_TASKS[t] for t in tasks}


def video_table(tasks=None):
    """The video tasks to run: all 18 (None) or the named ones ({name: its VIDEO_SOURCES
    entry}); unknown names: KeyError."""
    tasks = list(VIDEO_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in VIDEO_TASKS]
    if unknown:
        raise KeyError(f"unknown MMEB-V2 video task(s) {unknown}; known: {list(VIDEO_TASKS)}")
    return {t: VIDEO_SOURCES[t] for t in tasks}


def video_tasks_in(root):
    """The video task folders under root (each must be one of the 18: a video task's rows
    are read by its own reader); another folder: ValueError naming it."""
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    unknown = [n for n in names if n not in VIDEO_TASKS]
    if unknown:
        raise ValueError(f"{root}: folder(s) {unknown} are not MMEB-V2 video tasks (known: {list(VIDEO_TASKS)})")
    return names


def visdoc_tasks_in(root):
    """The task folders under root as a visdoc_table dict: the 24 by their entries, any
    other folder as ("other", root, "test", None)."""
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    return {n: VISDOC_TASKS.get(n, ("other", os.path.basename(os.path.normpath(root)), "test", None))
            for n in names}


def revision_of(folder):
    """The revision a task folder holds: the commit of a Hugging Face cache snapshot
    (…/snapshots/<commit>/…); else the commit(s) `hf download --local-dir` recorded in
    .cache/huggingface/download/*.metadata (first line of each; several joined by ","
    when files came from different commits); else None (a copy of unknown revision)."""
    parts = os.path.realpath(folder).split(os.sep)
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    meta = os.path.join(folder, ".cache", "huggingface", "download")
    commits = set()
    for d, _, files in os.walk(meta):
        for f in files:
            if f.endswith(".metadata"):
                with open(os.path.join(d, f)) as fh:
                    commits.add(fh.readline().strip())
    commits.discard("")
    return ",".join(sorted(commits)) or None


# What a task's score depends on besides the model, recorded with it and compared on resume
ANNOTATION_EXTS = (".parquet", ".jsonl", ".json", ".txt", ".csv", ".tsv")


def data_digest(folder):
    """(sha256 hex, number of files) of what a task folder holds, links followed (frames/ is
    one), in sorted order: each file's path relative to the folder, then the sha256 of its
    bytes for an annotation file (ANNOTATION_EXTS: rows, queries, qrels, the visdoc corpus
    of pages, a classes.txt), its size for any other file (frames, a hub repo's video
    archives). Hidden files and folders are left out (.cache: hf download's bookkeeping,
    "._*" AppleDouble files). Why: the rows are what a new revision changes, and they are
    read whole (a visdoc corpus, pages included, at disk speed); a video task's frames are
    thousands of JPEGs, where names and sizes catch a frame added, removed, renamed or
    re-extracted without reading gigabytes at every restart (a frame rewritten at the same
    size is the change it misses). Sizes, not modification times: a copied folder keeps its
    digest, on any machine."""
    h, n = hashlib.sha256(), 0
    for d, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(x for x in files if not x.startswith(".")):
            path = os.path.join(d, f)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            what = file_sha256(path) if f.lower().endswith(ANNOTATION_EXTS) else f"{os.path.getsize(path)} bytes"
            h.update(f"{rel}\0{what}\n".encode())
            n += 1
    return h.hexdigest(), n


def task_state(folder, task, kind):
    """What a task's score depends on in its folder: {revision (revision_of), data_sha256,
    data_files (data_digest)} and, for a video classification task ranked against a class
    list, {class_pool, class_pool_sha256} (tools/mmeb_v2_data.class_pool_record)."""
    digest, n = data_digest(folder)
    pool = class_pool_record(folder, task) if kind == "video" and task in V_CLS else {}
    return {"revision": revision_of(folder), "data_sha256": digest, "data_files": n, **pool}


def changes(saved, now):
    """Why a finished task's record does not hold for its data and candidate text now
    (task_state, with "candidate_text" added): a list of reasons, empty when it holds. A
    record without a data digest (written before they were kept) does not hold; one without
    candidate_text was written when V-CLS / V-QA candidates took the checkpoint's target
    instructions whenever its config had them (so that is what it used)."""
    if "data_sha256" not in saved:
        return ["its record has no data digest (written before digests were kept)"]
    why = text_change(saved, now.get("candidate_text"))
    if saved.get("revision") != now["revision"]:
        why.append(f"data revision {saved.get('revision')} → {now['revision']}")
    if saved["data_sha256"] != now["data_sha256"]:
        why.append(f"the task folder's files changed (data digest; {saved.get('data_files')} files then, "
                   f"{now['data_files']} now)")
    pool = [(r.get("class_pool"), (r.get("class_pool_sha256") or "")[:12]) for r in (saved, now)]
    if pool[0] != pool[1]:
        why.append("class pool {} (sha256 {}…) → {} (sha256 {}…)".format(*pool[0], *pool[1]))
    return why


def task_files(out_dir, task):
    """A task's files under out_dir/mmeb_v2/, named by util/run.safe_name: the score file,
    the ranking file and the record (written last: the marker of a finished task)."""
    name = os.path.join(out_dir, "mmeb_v2", safe_name(task))
    return f"{name}_score.json", f"{name}_pred.jsonl", result_path(out_dir, "mmeb_v2", task)


def check_file_names(tasks):
    """Two tasks (visdoc and video together) whose safe names are equal would write the same
    files: ValueError naming both."""
    seen = {}
    for t in tasks:
        if safe_name(t) in seen:
            first = seen[safe_name(t)]
            raise ValueError(f"MMEB-V2 tasks {first!r} and {t!r} would write the same files "
                             f"({safe_name(t)}_score.json ...): rename one task folder")
        seen[safe_name(t)] = t


def check_task_root(root, kind):
    """A folder of task folders, checked before a long run (train.py's --eval_visdoc_dir /
    --eval_video_dir at parse time): each task folder with what its reader looks for first
    (visdoc: queries, corpus and qrels parquet files of its split; video: one of the 18
    names and frames/). Returns the task names; FileNotFoundError / ValueError naming the
    folder otherwise."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no folder {root}")
    if kind == "video":
        names = video_tasks_in(root)
        for t in names:
            if not os.path.isdir(os.path.join(root, t, "frames")):
                raise FileNotFoundError(f"{t}: no frame folder {os.path.join(root, t, 'frames')}")
    else:
        table = visdoc_tasks_in(root)
        for t, spec in table.items():
            for part in ("queries", "corpus", "qrels"):
                find_parquet(os.path.join(root, t), part, spec[2])
        names = list(table)
    if not names:
        raise FileNotFoundError(f"no task folder in {root}")
    return names


# ----------------------------------------------------------------------------------
# Metrics beyond Eq. 1: graded NDCG of a global ranking, the harness's pairing and metric set

def graded_ranking(scores, grades, ks=(1, 5, 10), return_top=False):
    """
    MMEB-V2's visual-document metrics (not the paper's) of a global ranking: scores (Nq, Nd)
    against the whole corpus, grades (Nq, Nd) graded relevance (0 = not relevant, ≥ 1
    relevant document per row). Documents rank by score, and among equal scores the lower
    grade first (a tie never helps, as in hit_at_1; a NaN score counts against the query).
    Per query, with the reference harness's names: hit@1 (the first is relevant),
    recall@k (the share of the relevant documents in the top k), ndcg_linear@k
    (DCG@k = Σ_i g_i / log2(i + 2) over the top k, divided by the same sum over the grades
    sorted descending). Returns {name: mean over queries (float)}, and with return_top the
    ranked document indices (Nq, max k) the metrics read.
    """
    rel = grades > 0
    if not bool(rel.any(dim=1).all()):
        raise ValueError("graded_ranking: every query needs at least one relevant document")
    s = scores.float().masked_fill(scores.isnan() & rel, float("-inf"))
    s = s.masked_fill(s.isnan(), float("inf"))                               # (Nq, Nd)
    k_max = min(max(ks), s.shape[1])
    by_grade = torch.argsort(grades, dim=1, stable=True)                     # (Nq, Nd) grade ascending
    order = torch.argsort(-s.gather(1, by_grade), dim=1, stable=True)[:, :k_max]   # ties: grade asc
    top = by_grade.gather(1, order)                                          # (Nq, k) document indices
    g = grades.float().gather(1, top)                                        # (Nq, k) grades, ranked
    discount = 1 / torch.log2(torch.arange(k_max, dtype=torch.float32) + 2)  # (k,)
    ideal = grades.float().sort(dim=1, descending=True).values[:, :k_max]    # (Nq, k)
    out = {"hit@1": (g[:, 0] > 0).float().mean().item()}
    for k in ks:
        out[f"recall@{k}"] = ((g[:, :k] > 0).sum(1) / rel.sum(1)).mean().item()
        dcg, idcg = (g[:, :k] * discount[:k]).sum(1), (ideal[:, :k] * discount[:k]).sum(1)
        out[f"ndcg_linear@{k}"] = (dcg / idcg).mean().item()
    return (out, top) if return_top else out


HARNESS_NDCG = "ndcg_linear@5_harness_pairing"        # the harness's NDCG@5, its label/grade pairing


def harness_set_orders(label_lists):
    """list(set(labels)) of each list (ints or strs) as a CPython process with
    PYTHONHASHSEED=0 builds it: one subprocess, so that string ids get one fixed order."""
    code = "import json, sys; print(json.dumps([list(set(x)) for x in json.load(sys.stdin)]))"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(label_lists), capture_output=True,
                          text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode:
        raise RuntimeError(f"harness_set_orders: the subprocess failed: {done.stderr[-500:]}")
    return json.loads(done.stdout)


def harness_pairing_ndcg(ranking, ints, k=5):
    """
    NDCG@k (linear gain) as the harness computes it, from ranking lines ({"top": ids,
    "grades": {id: grade} in qrels order}, as <Task>_pred.jsonl holds them). Its metric
    (src/eval_utils/metrics.py: evaluate, ndcg_at_k) takes the labels through
    list(set(labels)) and then zips them with the grades in qrels order, so a page can
    be paired with another page's grade; here each page keeps its own (graded_ranking).
    ids: int when the task's corpus ids are ints (tools/mmeb_v2_data.visdoc_ids_are_ints: an
    int's set order is CPython's in any run, as in the harness's), else str, whose set order
    follows the string hash seed: the harness's own number varies between its runs; here the
    order of a process with PYTHONHASHSEED=0 (harness_set_orders), the same on every rank and
    run. The ideal DCG is the same either way (the same grades). None when no query has
    several relevant pages (the pairing cannot differ then).
    """
    if not any(len(r["grades"]) > 1 for r in ranking):
        return None
    cast, total = int if ints else str, 0.0
    orders = harness_set_orders([[cast(c) for c in r["grades"]] for r in ranking])   # qrels order in
    for r, order in zip(ranking, orders):
        paired = dict(zip(order, r["grades"].values()))                 # the harness's pairing
        gains = [paired.get(cast(c), 0) for c in r["top"][:k]]
        ideal = sorted(paired.values(), reverse=True)[:k]
        dcg, idcg = (sum(g / math.log2(i + 2) for i, g in enumerate(x)) for x in (gains, ideal))
        total += dcg / idcg if idcg > 0 else 0.0
    return total / len(ranking)


# The harness's metric names (src/eval_utils/metrics.py, RankingMetrics), each at KS
HARNESS_METRICS = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr")


def ranking_metrics(ranking, ks=KS):
    """
    The harness's metric set from ranking lines (as <Task>_pred.jsonl holds them): "top", the
    ranked ids (10 kept), and the relevant ids: "labels" (binary) or "grades" {id: grade}
    (relevant: grade > 0; NDCG with the grades). Per query, with n relevant ids and h_k of
    them in the top k: hit@k = [h_k > 0]; precision@k = h_k / k; recall@k = h_k / n; f1@k
    their harmonic mean (0 when both are 0); map@k = the sum of (hits so far / rank) at each
    relevant rank <= k, over min(n, k); mrr@k = 1 / the first relevant rank <= k, else 0;
    ndcg_linear@k / ndcg_exponential@k: gains g / 2^g - 1 discounted by log2(rank + 1), over
    the same sum of the grades sorted descending. Returns {name@k: mean over queries} in the
    harness's order, then num_pred and num_data. Each page keeps its own grade (not the
    harness's pairing: harness_pairing_ndcg).
    """
    acc = {f"{m}@{k}": 0.0 for m in HARNESS_METRICS for k in ks}
    for r in ranking:
        grade = {c: g for c, g in r["grades"].items() if g > 0} if "grades" in r else dict.fromkeys(r["labels"], 1)
        if not grade:
            raise ValueError(f"ranking_metrics: a line with no relevant id: {r}")
        gains = [grade.get(c, 0) for c in r["top"]]
        ideal = sorted(grade.values(), reverse=True)
        for k in ks:
            rel = [g > 0 for g in gains[:k]]
            h = sum(rel)
            p, rc = h / k, h / len(grade)
            ranks = [i + 1 for i, x in enumerate(rel) if x]
            hits_so_far = sum((j + 1) / i for j, i in enumerate(ranks))
            add = {"hit": float(h > 0), "precision": p, "recall": rc, "f1": 2 * p * rc / (p + rc) if h else 0.0,
                   "map": hits_so_far / min(len(grade), k), "mrr": 1 / ranks[0] if ranks else 0.0}
            for form, gain in (("linear", lambda g: g), ("exponential", lambda g: 2 ** g - 1)):
                dcg, idcg = (sum(gain(g) / math.log2(i + 2) for i, g in enumerate(x[:k])) for x in (gains, ideal))
                add[f"ndcg_{form}"] = dcg / idcg
            for m, v in add.items():
                acc[f"{m}@{k}"] += v
    n = len(ranking)
    return {**{m: v / n for m, v in acc.items()}, "num_pred": n, "num_data": n}


class HarnessImageMetrics:
    """The harness's metric set on an MMEB image task, as an evaluate.mmeb_report extra: each
    row's candidates ranked by score (column 0 the positive, one per row; a tie or a NaN
    ranks it behind, so hit@1 is mmeb_report's tie-safe Hit@1), then ranking_metrics."""
    name, settings, rows = "harness_metrics", 1, 0          # settings: kept in the record (a record without is redone)

    def run(self, model, processor, emb, task):
        s = emb.scores.float()                                            # (rows, max candidates), -inf padding
        rank = (~(s[:, 1:] < s[:, :1])).sum(1) + 1                         # (rows,) the positive's rank, 1-based
        rank = rank.masked_fill(s[:, 0].isnan(), max(KS) + 1)             # a NaN positive: a miss at every k
        return ranking_metrics([{"top": (["-"] * (r - 1) + ["+"])[:max(KS)], "labels": ["+"]}
                                for r in rank.tolist()])

    def line(self, r):
        return f"hit@5 {100 * r['hit@5']:.1f}, mrr@10 {100 * r['mrr@10']:.1f}"

    def columns(self, r, tasks):
        return None

    @staticmethod
    def table(r):
        return None


def eval_visdoc_task(model, processor, root, task, split="test", language=None, batch_size=16,
                     progress=False, max_text_tokens=ev.EVAL_MAX_TEXT_TOKENS):
    """One visual-document task: every query against the whole corpus (global ranking).
    Returns (scores {hit@1, recall@k, ndcg_linear@k, num_pred, num_data, num_docs,
    candidate_text, and where a query has several relevant pages HARNESS_NDCG (the
    harness's NDCG@5 from the ranking, harness_pairing_ndcg) with corpus_ids "int" / "str"},
    ranking [{query-id, top: [corpus-id] (10), grades: {corpus-id: grade} in qrels order}])."""
    queries, corpus, qrels = read_visdoc_task(root, task, split, language)
    inputs = [("q", VISDOC_QUERY.format(text), None) for _, text in queries] + \
             [("d", VISDOC_DOCUMENT, image) for _, image in corpus]
    E = ev.embed_inputs(model, processor, inputs, batch_size, progress, desc=task,
                        max_text_tokens=max_text_tokens)              # (nq + nd, d)
    Q, D = E[:len(queries)], E[len(queries):]
    scores = ev.cosine_scores(Q, D)                                   # (nq, nd)
    col = {cid: j for j, (cid, _) in enumerate(corpus)}
    grades = torch.zeros_like(scores)                                 # (nq, nd)
    for i, (qid, _) in enumerate(queries):
        for cid, g in qrels[qid].items():
            grades[i, col[cid]] = g
    out, top = graded_ranking(scores, grades, KS, return_top=True)   # top: (nq, 10) indices
    ranking = [{"query-id": qid, "top": [corpus[j][0] for j in t], "grades": qrels[qid]}
               for (qid, _), t in zip(queries, top.tolist())]
    ints = visdoc_ids_are_ints(root, task, split)
    theirs = harness_pairing_ndcg(ranking, ints)
    return {**out, "num_pred": len(queries), "num_data": len(queries), "num_docs": len(corpus),
            "candidate_text": HARNESS_TEXT,
            **({HARNESS_NDCG: theirs, "corpus_ids": "int" if ints else "str"} if theirs is not None else {})}, ranking


def eval_video_task(model, processor, root, task, config=None, batch_size=16, progress=False,
                    max_text_tokens=ev.EVAL_MAX_TEXT_TOKENS, target_instructions=False):
    """One video task (tools/mmeb_v2_data.read_video_task): every distinct query and candidate
    embedded once; each query ranked against its own candidates (local) or the task's whole
    pool (global). Hit@1 is tie-safe: a query is a hit iff some correct candidate scores
    strictly above every other one. Text-only candidates of V-CLS / V-QA are the harness's
    raw text; with target_instructions (--v2_target_instructions) the checkpoint's target
    instruction goes before them (check_target_instructions). Returns (scores {hit@1,
    num_pred, num_data, num_cands, candidate_text (candidate_text), and for K700 / UCF101 /
    HMDB51 / Breakfast class_pool and class_pool_sha256: the class list ranked against
    (tools/mmeb_v2_data.class_pool_record)}, ranking [{query, top: [name] (10), labels}])."""
    check_target_instructions(config, target_instructions)
    queries, cands, _ = read_video_task(root, task)
    pool = class_pool_record(os.path.join(root, task), task) if task in V_CLS else {}
    target = ev._target_instruction_fn(config) if target_instructions else None
    meta = {"V-CLS": "Classification", "V-QA": "VQA"}.get(VIDEO_TASKS.get(task))
    names = list(cands)
    inputs = [("q", text, visual) for text, visual, _, _ in queries] + \
             [("d", target(text, task, meta) if target and meta and visual is None else text, visual)
              for text, visual in cands.values()]
    E = ev.embed_inputs(model, processor, inputs, batch_size, progress, desc=task,
                        max_text_tokens=max_text_tokens)                  # (nq + nc, d)
    S = ev.cosine_scores(E[:len(queries)], E[len(queries):])             # (nq, nc)
    col = {n: j for j, n in enumerate(names)}
    hits, ranking = 0, []
    for i, (text, _, own, labels) in enumerate(queries):
        idx = torch.tensor([col[n] for n in own]) if own is not None else torch.arange(len(names))
        s = S[i, idx]                                                     # (n_own,)
        is_label = torch.tensor([names[j] in labels for j in idx.tolist()])
        hits += bool((s[~is_label] < s[is_label].max()).all()) if is_label.any() else 0
        sl, lab = s.tolist(), is_label.tolist()
        order = sorted(range(len(idx)), key=lambda j: (-sl[j], lab[j]))  # ties: label last
        ranking.append({"query": text, "top": [names[idx[j]] for j in order[:10]], "labels": list(labels)})
    return {"hit@1": hits / len(queries), "num_pred": len(queries), "num_data": len(queries),
            "num_cands": len(names), "candidate_text": candidate_text("video", task, target_instructions),
            **pool}, ranking


def text_change(saved, text):
    """[why] when a finished task's record used another candidate text than `text`, else [].
    A record without candidate_text used the checkpoint's target instructions on V-CLS /
    V-QA candidates whenever its config had them (the rule before the choice was kept)."""
    task = saved.get("task")
    kind = "video" if task in VIDEO_TASKS else "visdoc"          # names never shared (check_file_names)
    used = saved.get("candidate_text") or candidate_text(
        kind, task, bool((saved.get("config") or {}).get("target_instructions")))
    return [] if text is None or used == text else [f"candidate text {used} → {text} (--v2_target_instructions)"]


def _still_valid(kind, table, root, config, weights, out_dir, target_instructions=False):
    """The finished tasks of an earlier run (load_finished) whose data and candidate text are
    still the ones scored (task_state, changes); each other one is printed with why it is
    scored again. Without a root (no --visdoc_dir / --video_dir) a finished task is kept
    when its candidate text is the one asked for, its data unchecked."""
    finished = load_finished(out_dir, "mmeb_v2", table, config, weights)
    for task in list(finished):
        folder = os.path.join(root, task) if root else None
        text = candidate_text(kind, task, target_instructions)
        if folder is None:
            why = text_change(finished[task], text)
        else:
            why = changes(finished[task], {**task_state(folder, task, kind), "candidate_text": text}) \
                if os.path.isdir(folder) else [f"no folder {folder} to check it against"]
        if why:
            print0(f"{task}: finished earlier, scored again: {'; '.join(why)}")
            del finished[task]
    return finished


def _run_tasks(kind, table, root, run, model, config, out_dir, skip_missing, flag, say, target_instructions=False):
    """Run each task of `table` whose folder is under `root` (`run(task, spec)` → (scores,
    ranking)), reusing the ones finished earlier on the same data and candidate text
    (_still_valid); a missing folder is an error unless skip_missing. Returns ({task: scores
    or None}, {task: why missing})."""
    rank, _ = rank_world()
    weights = weights_fingerprint(model)
    finished = broadcast_object(_still_valid(kind, table, root, config, weights, out_dir, target_instructions)
                                if rank == 0 else None)              # every rank skips the same tasks
    results, missing = {}, {}
    for task, spec in table.items():
        folder = os.path.join(root, task) if root else None
        group, source = (spec[0], spec[1]) if kind == "visdoc" else (VIDEO_TASKS.get(task), spec[0])
        if task in finished:
            results[task] = finished[task]["scores"]
            print0(f"{task}: {say(results[task])} (finished earlier, skipped"
                   + (f"; its data not checked: no {flag})" if folder is None else ")")
                   + count_note(task, results[task]["num_data"]))
            continue
        if folder is None or not os.path.isdir(folder):
            why = f"no {flag}" if folder is None else f"no folder {folder} (a copy of {source})"
            if folder is not None and not skip_missing:
                raise FileNotFoundError(f"MMEB-V2 task {task}: {why}; pass --skip_missing to report it as missing")
            results[task], missing[task] = None, why
            continue
        state = {**task_state(folder, task, kind), "candidate_text": candidate_text(kind, task, target_instructions)} \
            if rank == 0 and out_dir else None                       # the data and candidate text scored
        results[task], ranking = run(task, spec)
        results[task] = {**ranking_metrics(ranking), **results[task]}    # the harness's set; own numbers kept
        n, want = results[task]["num_data"], EXPECTED_QUERIES.get(task)
        print0(f"{task}: {say(results[task])}{count_note(task, n)}")
        if rank == 0 and out_dir:
            score_file, pred_file, record_file = task_files(out_dir, task)
            write_json(score_file, results[task])
            write_atomic(pred_file, "".join(json.dumps(r) + "\n" for r in ranking))
            write_json(record_file, {"task": task, "group": group, "source": source, "split": spec[2],
                                     **state, "expected_num_data": want,       # the published count (or None)
                                     "num_data_matches": None if want is None else n == want,
                                     "scores": results[task], "config": config, "weights": weights})
    return results, missing


def mmeb_v2_report(model, processor, mmeb_dir=None, image_dir=None, visdoc_dir=None, config=None,
                   batch_size=16, out_dir=None, progress=True, name=None, image_tasks=None,
                   visdoc_tasks=None, skip_missing=False, data_revision=None,
                   max_text_tokens=ev.EVAL_MAX_TEXT_TOKENS, video_dir=None, video_tasks=None,
                   target_instructions=False):
    """
    {"image": {task: Hit@1 or None}, "visdoc": {task: scores or None}, "video": {task:
    scores or None}, "missing": {task: why}}. Image tasks through evaluate.mmeb_report (its
    resume and checks); visdoc tasks under visdoc_dir, video tasks under video_dir (a task
    folder that is absent is missing: an error unless skip_missing). out_dir: per-task
    files (reused on restart with the same config and weights), mmeb_v2_results.json / .md.
    Text candidates are the harness's unless target_instructions (candidate_text): the image
    tasks then run with the checkpoint's config as MMEB v1 does, else with its
    target_instructions off and "mmeb_v2_candidate_text" in the config they record (an
    MMEB v1 record in the same out_dir is not reused for them: mmeb_report refuses it).
    """
    check_target_instructions(config, target_instructions)
    config = dict(config or {}, **({"data_revision": data_revision} if data_revision else {}))
    rank, _ = rank_world()
    missing, image, counts = {}, {}, {}                     # counts: {image task: queries}, from the records
    image_metrics = {}                                      # {image task: the harness's metric set}
    itable = ev.task_table(image_tasks, MMEB_EVAL_TASKS)
    iconfig = config if target_instructions or not config.get("target_instructions") else \
        dict(config, target_instructions=False, mmeb_v2_candidate_text=HARNESS_TEXT)
    if mmeb_dir:
        report = ev.mmeb_report(model, processor, mmeb_dir, image_dir, itable, iconfig, batch_size, out_dir,
                                skip_missing, progress, name, data_revision=data_revision,
                                max_text_tokens=max_text_tokens, extras=[HarnessImageMetrics()])
        image, image_metrics = report["hit@1"], report.get(HarnessImageMetrics.name, {})
        for task in [t for t, v in image.items() if v is not None] if rank == 0 and out_dir else []:
            with open(result_path(out_dir, "mmeb", task)) as f:   # mmeb_report's record: its query count
                counts[task] = json.load(f)["num_queries"]
            if count_note(task, counts[task]):
                print0(f"{task}: Hit@1 {100 * image[task]:.1f}{count_note(task, counts[task])}")
    else:
        image = dict.fromkeys(itable)
    missing.update({t: "no --mmeb_dir" if not mmeb_dir else "missing (--skip_missing)"
                    for t, v in image.items() if v is None})
    vtable, ttable = visdoc_table(visdoc_tasks), video_table(video_tasks)
    check_file_names([*vtable, *ttable])
    visdoc, why = _run_tasks(
        "visdoc", vtable, visdoc_dir,
        lambda task, spec: eval_visdoc_task(model, processor, visdoc_dir, task, spec[2], spec[3], batch_size,
                                            progress, max_text_tokens),
        model, config, out_dir, skip_missing, "--visdoc_dir",
        lambda r: f"NDCG@5 (linear) {100 * r['ndcg_linear@5']:.1f}"
                  + (f" (the harness's label/grade pairing: {100 * r[HARNESS_NDCG]:.1f})" if HARNESS_NDCG in r else "")
                  + f", Hit@1 {100 * r['hit@1']:.1f} ({r['num_data']} queries, {r.get('num_docs', '?')} documents)")
    missing.update(why)
    video, why = _run_tasks(
        "video", ttable, video_dir,
        lambda task, spec: eval_video_task(model, processor, video_dir, task, config, batch_size, progress,
                                           max_text_tokens, target_instructions),
        model, config, out_dir, skip_missing, "--video_dir",
        lambda r: f"Hit@1 {100 * r['hit@1']:.1f} ({r['num_data']} queries, {r.get('num_cands', '?')} candidates)",
        target_instructions)
    missing.update(why)
    missing.update({t: "not requested (--tasks)" for t in [*MMEB_EVAL_TASKS, *VISDOC_TASKS, *VIDEO_TASKS]
                    if t not in itable and t not in vtable and t not in ttable})
    text = {t: candidate_text(kind, t, target_instructions)
            for kind, table in (("image", itable), ("visdoc", vtable), ("video", ttable)) for t in table}
    counts.update({t: v["num_data"] for r in (visdoc, video) for t, v in r.items() if v is not None})
    results = {"image": image, "visdoc": visdoc, "video": video, "missing": missing, "candidate_text": text,
               "num_data": {t: [n, EXPECTED_QUERIES.get(t)] for t, n in counts.items()}}   # [here, published]
    if image_metrics:
        results["image_metrics"] = image_metrics
    if rank == 0 and out_dir:
        write_json(os.path.join(out_dir, "mmeb_v2_results.json"), {
            "name": name or config.get("model"), "config": config, "summary": summarize_v2(results),
            "visdoc_sources": {t: {"dataset": v[1], "split": v[2], "language": v[3],
                                   "revision": revision_of(os.path.join(visdoc_dir, t)) if visdoc_dir else None,
                                   **({"vintage": VINTAGE[t]} if t in VINTAGE else {})}
                               for t, v in vtable.items()},
            "video_sources": {t: {"dataset": v[0], "subset": v[1], "split": v[2], "ranking": v[3],
                                  "revision": revision_of(os.path.join(video_dir, t)) if video_dir else None,
                                  **({"vintage": VINTAGE[t]} if t in VINTAGE else {})}
                              for t, v in ttable.items()},
            **results})
        write_atomic(os.path.join(out_dir, "mmeb_v2_results.md"), format_v2_table(results, name, markdown=True))
        write_harness_layout(out_dir, results)
        harness_submission(out_dir, name or config.get("model") or "model")
    return results


# The datasets the harness's report script reads per modality, in its order (TIGER-AI-Lab/VLM2Vec
# experiments/report_score_v2.py at 70ab41d, modality2dataset; an older version also listed the
# three English-only ViDoRe v2 sets): the 78 tasks here, under the same names.
HARNESS_DATASETS = {"image": list(MMEB_EVAL_TASKS), "video": list(VIDEO_TASKS), "visdoc": list(VISDOC_TASKS)}
HARNESS_FIELDS = (*(f"{m}@{k}" for m in HARNESS_METRICS for k in KS), "num_pred", "num_data")


def write_harness_layout(out_dir, results):
    """The harness's layout: <out_dir>/{image,video,visdoc}/<Task>_score.json with its field
    names (HARNESS_FIELDS, those the scores hold). Image tasks: the MMEB v1 path's Hit@1
    (evaluate.mmeb_report) and query count with results["image_metrics"] (HarnessImageMetrics);
    visdoc and video tasks: the score file's harness fields (a task finished before
    ranking_metrics holds fewer)."""
    for kind in ("image", "video", "visdoc"):
        for task, v in results[kind].items():
            if v is None:
                continue
            n = results.get("num_data", {}).get(task, [None])[0]
            if kind == "image":
                v = {**results.get("image_metrics", {}).get(task, {}), "hit@1": v, "num_pred": n, "num_data": n}
            score = {f: v[f] for f in HARNESS_FIELDS if f in v}
            write_json(os.path.join(out_dir, kind, f"{safe_name(task)}_score.json"), score)


# The leaderboard's names of two page sets: its generate_leaderboard.py (TIGER-AI-Lab/VLM2Vec,
# docs/mmebv2_reproduction/leaderboard/, NAME_FIXES) reads ViDoSeek-page_score.json and
# MMLongBench-page_score.json, as report_score_v2.py does, and renames them in its JSON.
LEADERBOARD_NAMES = {"ViDoSeek-page": "ViDoSeek-page-fixed", "MMLongBench-page": "MMLongBench-page-fixed"}


def harness_submission(out_dir, model_name, date=None):
    """
    The submission JSON as the harness's report script builds it (re-implemented from its
    description): {"metadata": {"model_name", "report_generated_date"}, "metrics": {"image",
    "video", "visdoc": {dataset: the score file's dict, or "DIR_N/A" (no modality folder),
    "FILE_N/A" (no <dataset>_score.json), "JSON_ERROR" (not JSON)}}}, every dataset of
    HARNESS_DATASETS in its order, the two page sets under the leaderboard's names
    (LEADERBOARD_NAMES: "ViDoSeek-page-fixed" ...). Written to <out_dir>/<model_name>.json.
    """
    from datetime import datetime
    metrics = {}
    for kind in ("image", "video", "visdoc"):
        folder = os.path.join(out_dir, kind)
        metrics[kind] = {}
        for task in HARNESS_DATASETS[kind]:
            path, name = os.path.join(folder, f"{task}_score.json"), LEADERBOARD_NAMES.get(task, task)
            if not os.path.isdir(folder):
                metrics[kind][name] = "DIR_N/A"
            elif not os.path.isfile(path):
                metrics[kind][name] = "FILE_N/A"
            else:
                try:
                    with open(path) as f:
                        metrics[kind][name] = json.load(f)
                except json.JSONDecodeError:
                    metrics[kind][name] = "JSON_ERROR"
    out = {"metadata": {"model_name": model_name, "report_generated_date": date or datetime.now().isoformat()},
           "metrics": metrics}
    write_json(os.path.join(out_dir, f"{safe_name(model_name)}.json"), out)
    return out


def add_flags(p):
    """This tool's flags beside evaluate.py's (its data; util/inputs.check_eval_flags)."""
    p.add_argument("--visdoc_dir", default=None, help="one folder per visual-document task, a copy of its "
                   "hub dataset in the BEIR layout (tools/mmeb_v2_data.py)")
    p.add_argument("--video_dir", default=None, help="one folder per video task, its hub dataset and "
                   "frames/ (its released frame folders; tools/mmeb_v2_data.py)")
    p.add_argument("--v2_target_instructions", action="store_true",
                   help="put the checkpoint's target instructions before MMEB-V2's text candidates (class "
                        "labels, QA options, image tasks' text targets), as its MMEB v1 evaluation does; "
                        "default: the harness's raw text. Recorded per task (candidate_text)")


def check_flags(args, error):
    """evaluate.py's checks with this tool's data flags; the image tasks are MMEB's 36."""
    if args.benchmark != "mmeb" or args.task_table:
        error("MMEB-V2's image tasks are MMEB's 36: no --benchmark / --task_table here (use evaluate.py)")
    check_eval_flags(args, error, data_flags=("visdoc_dir", "video_dir"))


def run_cli(args, model, processor, config, name):
    """evaluate.main's `benchmark` hook: mmeb_v2_report over the flags' folders, --tasks split
    by kind (a name that is neither an image nor a video task is a visdoc task); prints the
    table and returns ("mmeb_v2", results)."""
    tasks = args.tasks or []
    out = mmeb_v2_report(
        model, processor, args.mmeb_dir, args.image_dir, args.visdoc_dir, config, args.batch_size,
        args.out, not args.no_progress, name,
        image_tasks=[t for t in tasks if t in MMEB_EVAL_TASKS] if tasks else None,
        visdoc_tasks=[t for t in tasks if t not in MMEB_EVAL_TASKS and t not in VIDEO_TASKS] if tasks else None,
        video_tasks=[t for t in tasks if t in VIDEO_TASKS] if tasks else None,
        skip_missing=args.skip_missing, data_revision=args.data_revision,
        max_text_tokens=args.max_text_tokens, video_dir=args.video_dir,
        target_instructions=args.v2_target_instructions)
    print0("\n" + format_v2_table(out, name=name))
    return "mmeb_v2", out


# After training: train.py's flags and these two, through train.main's after_eval hook

def add_train_flags(p):
    p.add_argument("--eval_visdoc_dir", default=None, help="also MMEB-V2's visual-document tasks after "
                   "training (not the paper's): a folder of task folders in the BEIR layout; needs --eval_data")
    p.add_argument("--eval_video_dir", default=None, help="also MMEB-V2's video tasks after training: a "
                   "folder of video task folders (their names among the 18); needs --eval_data")


def check_train_flags(args, error):
    """The folders of --eval_visdoc_dir / --eval_video_dir, before training starts."""
    tasks = []
    for flag in ("eval_visdoc_dir", "eval_video_dir"):
        root = getattr(args, flag)
        if root and not args.eval_data and args.train_data is not None:     # the demo evaluates anyway
            error(f"--{flag} runs with the evaluation after training: it needs --eval_data")
        if root:
            try:
                tasks += check_task_root(root, flag[len("eval_"):-len("_dir")])
                check_file_names(tasks)
            except (OSError, ValueError) as e:
                error(f"--{flag} {root}: {e}")


def after_training(model, processor, args, eval_dir, results):
    """train.main's after_eval hook: the visdoc and video tasks of the flags' folders into the
    run's eval folder, the image column the run's own MMEB results; {"mmeb_v2": results}."""
    visdoc, video = args.eval_visdoc_dir, args.eval_video_dir
    if not (visdoc or video):
        return {}
    v2 = mmeb_v2_report(model, processor, visdoc_dir=visdoc, config=run_config(args), out_dir=eval_dir,
                        progress=sys.stderr.isatty(), image_tasks=[],
                        visdoc_tasks=visdoc_tasks_in(visdoc) if visdoc else [],
                        video_dir=video, video_tasks=video_tasks_in(video) if video else [])
    v2["image"] = {t: v for t, v in results.items() if t in MMEB_EVAL_TASKS}
    print0("\n" + format_v2_table(v2))
    return {"mmeb_v2": v2}


def train_main(argv=None):
    """python tools/mmeb_v2.py train ...: train.py's run, MMEB-V2 evaluated after it."""
    p = train.build_parser()
    p.description = "train.py, then MMEB-V2's visual-document and video tasks (tools/mmeb_v2.py)"
    add_train_flags(p)
    args = train.parse_args(argv, p)
    check_train_flags(args, p.error)
    return train.main(args=args, after_eval=after_training)


def _score(results, modality, task):
    """A task's leaderboard number: image Hit@1 (a float), video the score file's hit@1,
    visdoc its ndcg_linear@5 (None when it did not run)."""
    v = results[modality].get(task)
    return v if modality == "image" or v is None else v[MODALITIES[modality][0]]


def _groups_of(modality):
    if modality == "image":
        return {t: IMAGE_GROUP[m] for t, (m, _) in MMEB_EVAL_TASKS.items()}
    return {t: v[0] for t, v in VISDOC_TASKS.items()} if modality == "visdoc" else dict(VIDEO_TASKS)


def summarize_v2(results):
    """{group or modality or "Overall": (mean over the tasks that ran or None, tasks that ran,
    tasks of the group)}: each mean over its own tasks, the overall over all tasks that ran;
    "visdoc-22" the visdoc mean over VISDOC_22 (in no other mean)."""
    out, every = {}, []
    v22 = [v for t in VISDOC_22 if (v := _score(results, "visdoc", t)) is not None]
    out["visdoc-22"] = (sum(v22) / len(v22) if v22 else None, len(v22), len(VISDOC_22))
    for modality, (_, groups) in MODALITIES.items():
        of = _groups_of(modality)
        ran = {t: v for t in of if (v := _score(results, modality, t)) is not None}
        every += ran.values()
        for g in groups:
            vals = [v for t, v in ran.items() if of[t] == g]
            n = sum(1 for t in of if of[t] == g)
            out[g] = (sum(vals) / len(vals) if vals else None, len(vals), n)
        out[modality] = (sum(ran.values()) / len(ran) if ran else None, len(ran), len(of))
    n_all = sum(len(_groups_of(m)) for m in MODALITIES)
    out["Overall"] = (sum(every) / len(every) if every else None, len(every), n_all)
    return out


def format_v2_table(results, name=None, markdown=False):
    """The leaderboard's layout: overall, the three modalities and their groups (each with
    its metric and 'ran / total' tasks), then every task's score, then the missing tasks."""
    summary = summarize_v2(results)

    def cell(k):                      # a mean over fewer tasks than the group's is starred
        mean, ran, total = summary[k]
        return "-" if not ran else f"{100 * mean:.1f}" + ("*" if ran < total else "")
    head = ["model", "Overall"] + [c for m, (_, gs) in MODALITIES.items() for c in (m, *gs)]
    metric = ["metric", "mixed"] + [c for m, (mt, gs) in MODALITIES.items() for c in [mt] * (1 + len(gs))]
    count = ["tasks"] + [f"{summary[k][1]}/{summary[k][2]}" for k in head[1:]]
    rows = [head, [name or "model"] + [cell(k) for k in head[1:]], metric, count]
    lines = [ev.render_table(rows, markdown)]
    if any(summary[k][1] < summary[k][2] for k in head[1:]):
        lines.append("* over the tasks that ran only (count below): not comparable with the leaderboard's mean")
    if summary["visdoc-22"][1]:
        lines.append(f"visdoc over 22 sets (the 24 without ViDoSeek-page and MMLongBench-page, as the harness's "
                     f"newest visdoc comparisons): {cell('visdoc-22')} ({summary['visdoc-22'][1]}/22); "
                     f"over the 24: {cell('visdoc')} ({summary['visdoc'][1]}/24)")
    differ = {t: nw for t, nw in results.get("num_data", {}).items() if nw[1] is not None and nw[0] != nw[1]}
    if differ:
        lines.append("query counts that differ from the published score files (here / published): "
                     + ", ".join(f"{t} {n} / {w}" for t, (n, w) in differ.items()))
    lines.append("")
    task_rows = [["task", "group", "metric", "score"]]
    for modality, (mt, _) in MODALITIES.items():
        for task, group in _groups_of(modality).items():
            v = _score(results, modality, task)
            if v is not None:
                task_rows.append([task, group, mt, f"{100 * v:.1f}"])
    for task, v in results["visdoc"].items():
        if task not in VISDOC_TASKS and v is not None:
            task_rows.append([task, "other (not in the means)", "ndcg_linear@5", f"{100 * v['ndcg_linear@5']:.1f}"])
    lines.append(ev.render_table(task_rows, markdown))
    theirs = {t: v for t, v in results["visdoc"].items() if v is not None and HARNESS_NDCG in v}
    if theirs:                                       # where a page can take another page's grade there
        lines.append(f"{HARNESS_NDCG} (the harness's NDCG@5: labels through set(), then zipped with the grades; "
                     "here each page keeps its own): " + ", ".join(
                         f"{t} {100 * v[HARNESS_NDCG]:.1f} (here {100 * v['ndcg_linear@5']:.1f})"
                         for t, v in theirs.items()))
    if "candidate_text" in results:                  # which text the text candidates were
        target = sorted(t for t, v in results["candidate_text"].items() if v == TARGET_TEXT)
        lines += ["", f"text candidates: the checkpoint's target instructions (--v2_target_instructions) on "
                      f"{len(target)} task(s), not the harness's raw text: {', '.join(target)}"] if target else \
            ["", "text candidates: the harness's (raw labels, options and text targets)"]
    if results["missing"]:
        by_reason = {}
        for t, why in results["missing"].items():
            by_reason.setdefault(why, []).append(t)
        lines.append("")
        lines += [f"missing ({len(ts)}): {', '.join(ts)} — {why}" for why, ts in by_reason.items()]
    return "\n".join(lines)


def main(argv=None):
    """python tools/mmeb_v2.py: evaluate.py's flags and this tool's, the run of evaluate.main
    with MMEB-V2's task table (its `benchmark` hook); returns its results. `train` first:
    train.py's run with MMEB-V2 after it (train_main)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    p = ev.build_parser("MMEB-V2's 78 tasks (not the paper's protocol): image via --mmeb_dir, visual "
                        "documents via --visdoc_dir, video via --video_dir; with --out the harness's "
                        "layout and submission JSON. `tools/mmeb_v2.py train ...`: train.py's flags, "
                        "then --eval_visdoc_dir / --eval_video_dir after training")
    add_flags(p)
    args = p.parse_args(argv)
    check_flags(args, p.error)
    return ev.main(args=args, benchmark=run_cli)["mmeb_v2"]


if __name__ == "__main__":
    main()
