"""
MMEB-V2's readers (not the paper's protocol; tools/mmeb_v2.py scores what they read): the
visual-document tasks in the BEIR layout and the video tasks (annotation rows, frame
folders), behind the same door as every other benchmark file (util/inputs.py): each
malformed input raises an error naming the task, the file and the row.

  read_visdoc_task     one visual-document task: queries, a corpus of page images, graded qrels
  visdoc_ids_are_ints  whether a task's qrels store corpus ids as integers (the harness's pairing)
  read_video_task      one video task: queries and candidates, each clip a util.video.Clip
  read_class_pool      the class pool of a global video classification task: the list
                       shipped in tools/mmeb_v2_classes/, or <Task>/classes.txt
  class_pool_record    how a score names that pool on every machine, with its digest
  VIDEO_SOURCES        each video task's hub dataset, subset, split, ranking and row limit

Tests: pytest tests/test_mmeb_v2.py tests/test_mmeb_v2_video.py tests/test_mmeb_v2_classes.py
"""
import glob
import hashlib
import json
import os

from util.dist import print0
from util.inputs import find_parquet, leaves_image_dir, read_rows

# MMEB-V2 visual documents (docs/readings.md §10; not the paper's protocol). One folder per
# task, a local copy of the task's hub dataset in the BEIR layout:
#   <root>/<Task>/queries/<split>-*.parquet   query-id, query (, language)
#   <root>/<Task>/corpus/<split>-*.parquet    corpus-id, image ({"bytes", "path"} or bytes)
#   <root>/<Task>/qrels/<split>-*.parquet     query-id, corpus-id, score (graded relevance)
# (<config>/<split>/*.parquet too). As the reference harness: only qrels with score > 0
# count, a repeated (query, document) pair keeps its higher grade, the language filter
# applies to the queries.

def _ident(v, where):
    """A query or corpus id: a str or an int (kept as its str), else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v):
        raise ValueError(f"{where}: expected an id (a non-empty string or an integer), got {v!r:.80}")
    return str(v)


def _image_bytes(v, where):
    """The bytes of a parquet image cell (the datasets Image feature's {"bytes", "path"})."""
    if isinstance(v, dict):
        v = v.get("bytes")
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise ValueError(f"{where}: expected an image (bytes, or {{'bytes': ..., 'path': ...}} with "
                         f"bytes), got {type(v).__name__}")
    return bytes(v)


def _columns(rows, need, what):
    if not rows:
        raise ValueError(f"{what}: no rows")
    missing = sorted(set(need) - set(rows[0]))
    if missing:
        raise ValueError(f"{what}: columns {missing} missing (has {sorted(rows[0])})")


def read_visdoc_task(root, task, split="test", language=None):
    """
    One MMEB-V2 visual-document task → (queries [(query-id, text)], corpus [(corpus-id,
    image bytes)], qrels {query-id: {corpus-id: grade > 0}}). Every query keeps at least
    one relevant document; a malformed row (an id missing or not an id, a score not a
    finite number, an unknown query or corpus id, a repeated query or corpus id, an image
    cell without bytes, a query without a relevant document) raises ValueError naming the
    task, the file part and the row.
    """
    import math
    parts = {}
    for part in ("queries", "corpus", "qrels"):
        files = find_parquet(os.path.join(root, task), part, split)
        parts[part] = (read_rows(files), f"MMEB-V2 task {task} {part}")
    rows, what = parts["queries"]
    _columns(rows, ("query-id", "query") + (("language",) if language else ()), what)
    queries, every_qid, seen_q = [], {}, {}       # every_qid: id → row, the language filter's too
    for i, r in enumerate(rows):
        qid = _ident(r["query-id"], f"{what} row {i} query-id")
        key = (qid, r.get("language"))            # a translated query may share its id (and qrels)
        if key in seen_q:                         # qrels could not tell the two queries apart
            raise ValueError(f"{what} row {i}: query-id {qid!r} repeated (row {seen_q[key]})"
                             + (f" in language {key[1]!r}" if key[1] is not None else ""))
        seen_q[key] = every_qid[qid] = i
        if language and r["language"] != language:
            continue
        if not isinstance(r["query"], str) or not r["query"].strip():
            raise ValueError(f"{what} row {i}: query must be a non-empty string, got {r['query']!r:.80}")
        queries.append((qid, r["query"]))
    rows, what = parts["corpus"]
    _columns(rows, ("corpus-id", "image"), what)
    corpus, seen = [], set()
    for i, r in enumerate(rows):
        cid = _ident(r["corpus-id"], f"{what} row {i} corpus-id")
        if cid in seen:
            raise ValueError(f"{what} row {i}: corpus-id {cid!r} repeated")
        seen.add(cid)
        corpus.append((cid, _image_bytes(r["image"], f"{what} row {i} image")))
    rows, what = parts["qrels"]
    _columns(rows, ("query-id", "corpus-id", "score"), what)
    qids, qrels = {q for q, _ in queries}, {}
    for i, r in enumerate(rows):
        qid = _ident(r["query-id"], f"{what} row {i} query-id")
        cid = _ident(r["corpus-id"], f"{what} row {i} corpus-id")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{what} row {i}: score must be a finite number, got {score!r:.80}")
        if qid not in every_qid:
            raise ValueError(f"{what} row {i}: query-id {qid!r} is not in the queries")
        if cid not in seen:
            raise ValueError(f"{what} row {i}: corpus-id {cid!r} is not in the corpus")
        if qid in qids and score > 0:
            grades = qrels.setdefault(qid, {})
            grades[cid] = max(grades.get(cid, 0), score)
    lonely = [q for q, _ in queries if q not in qrels]
    if lonely:
        raise ValueError(f"MMEB-V2 task {task}: {len(lonely)} quer(ies) without a relevant document "
                         f"(qrels score > 0): {', '.join(map(repr, lonely[:5]))}")
    return queries, corpus, qrels


def visdoc_ids_are_ints(root, task, split="test"):
    """Whether the task's qrels store corpus ids as integers (the parquet column's type;
    ViDoRe's and ViDoSeek's are int64): read_visdoc_task keeps every id as a str, and the
    harness's NDCG pairing depends on the ids' set order (tools/mmeb_v2.harness_pairing_ndcg)."""
    import pyarrow.parquet as pq
    import pyarrow.types as pt
    return all(pt.is_integer(pq.read_schema(f).field("corpus-id").type)
               for f in find_parquet(os.path.join(root, task), "qrels", split))


# ----------------------------------------------------------------------------------
# MMEB-V2's 18 video tasks (not the paper's protocol; tools/mmeb_v2.py scores them).
# Layout: <root>/<Task>/ holds the task's hub dataset (parquet: <split>-*.parquet or
# <split>/*.parquet, under <subset>/ where the task has one; or one .jsonl) and frames/, the
# task's folder of the released MMEB-V2 frames (video-tasks/frames/<kind>/<Task>/: one folder
# of frame images per video; moment retrieval: <video>/{query, positive*, negatives}).
# What each task asks (instructions, candidates, local or global ranking) follows the
# reference harness; docs/readings.md §10 says where this differs.

V_QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided "
               "candidates. Return only the exact text of your chosen answer. Question: ")
V_TARGET = "<|video_1|> Understand the content of the provided video."
V_CLS = {"K700": "Recognize the category of the video content.",
         "UCF101": "What activities or sports are being performed by the person in the video?",
         "HMDB51": "What actions or objects interactions are the person in the video doing?",
         "Breakfast": "Recognize the breakfast type that the person is cooking in the video. "}
V_RET = {"MSR-VTT": "Find a video that contains the following visual content:",
         "MSVD": "Find the video snippet that corresponds to the given summary:",
         "DiDeMo": "Find a video that includes the following described scenes:",
         "VATEX": "Select a video that fits the description provided:",
         "YouCook2": "Find a video that demonstrates the following action while making a recipe:"}
MVBENCH_SUBSETS = ("episodic_reasoning", "action_sequence", "action_prediction", "action_antonym",
                   "fine_grained_action", "unexpected_action", "object_existence", "object_interaction",
                   "object_shuffle", "moving_direction", "action_localization", "scene_transition",
                   "action_count", "moving_count", "moving_attribute", "state_change", "fine_grained_pose",
                   "character_order", "egocentric_navigation", "counterfactual_inference")
# task → (hub dataset, subset, split, ranking, at most this many rows (the first ones)). The hub
# ids are the harness's current ones (src/constant/dataset_hf_path.py: the QA sets' VLM2Vec/*
# mirrors, which replaced OpenGVLab/MVBench, lmms-lab/Video-MME, lmms-lab/NExTQA and
# lmms-lab/egoschema; YouCook2 went the other way, VLM2Vec/YouCook2 → lmms-lab/YouCook2, "HF
# version compatibility issue"). The query counts of the published scores: tools/mmeb_v2.py.
VIDEO_SOURCES = {
    "K700": ("VLM2Vec/Kinetics-700", None, "test", "global", None),
    "SmthSmthV2": ("VLM2Vec/SmthSmthV2", None, "test", "local", 1000),
    "HMDB51": ("VLM2Vec/HMDB51", None, "test", "global", None),
    "UCF101": ("VLM2Vec/UCF101", None, "test", "global", None),
    "Breakfast": ("VLM2Vec/Breakfast", None, "test", "global", None),
    "MVBench": ("VLM2Vec/MVBench", MVBENCH_SUBSETS, "train", "local", None),
    "Video-MME": ("VLM2Vec/Video-MME", None, "test", "local", None),
    "NExTQA": ("VLM2Vec/NExTQA", "MC", "test", "local", None),
    "EgoSchema": ("VLM2Vec/EgoSchema", "Subset", "test", "local", None),
    "ActivityNetQA": ("VLM2Vec/ActivityNetQA", None, "test", "local", None),
    "DiDeMo": ("VLM2Vec/DiDeMo", None, "test", "global", None),
    "MSR-VTT": ("VLM2Vec/MSR-VTT", "test_1k", "test", "global", None),
    "MSVD": ("VLM2Vec/MSVD", None, "test", "global", None),
    "VATEX": ("VLM2Vec/VATEX", None, "test", "global", None),
    "YouCook2": ("lmms-lab/YouCook2", None, "val", "global", None),
    "QVHighlight": ("VLM2Vec/QVHighlight", None, "test", "local", None),
    "Charades-STA": ("VLM2Vec/Charades-STA", None, "test", "local", None),
    "MomentSeeker": ("VLM2Vec/MomentSeeker", None, "test", "local", None),
}


# The class lists of the four global classification tasks as the harness ships them, one
# file per task (tools/mmeb_v2_classes/README.md); a <Task>/classes.txt overrides one.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_LISTS = os.path.join(REPO, "tools", "mmeb_v2_classes")


def read_class_pool(folder, task):
    """
    The class pool of a global classification task (V_CLS) → (labels in file order, the
    file read): `<folder>/classes.txt` when it exists (an override), else the shipped
    CLASS_LISTS/<task>.txt. One label per line, spelled as the rows' pos_text (used as
    written, as the harness does); blank lines are skipped. A label with leading or
    trailing whitespace, a label used twice, or a file without labels raise ValueError
    naming the task, the file and the line.
    """
    path = os.path.join(folder, "classes.txt")
    if not os.path.isfile(path):
        path = os.path.join(CLASS_LISTS, f"{task}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MMEB-V2 {task}: no class list: neither {os.path.join(folder, 'classes.txt')} "
                                f"nor the shipped {path}")
    lines = {}                                                  # label → its line number
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            label = line.rstrip("\n")
            if not label.strip():
                continue
            if label != label.strip():
                raise ValueError(f"MMEB-V2 {task}: {path} line {n}: label {label!r} has leading or trailing "
                                 "whitespace (a label is compared with pos_text as written)")
            if label in lines:
                raise ValueError(f"MMEB-V2 {task}: {path} line {n}: label {label!r} repeats line {lines[label]}")
            lines[label] = n
    if not lines:
        raise ValueError(f"MMEB-V2 {task}: {path} holds no labels")
    return list(lines), path


def file_sha256(path):
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def class_pool_record(folder, task):
    """How a score names the class pool it ranked against, the same on every machine:
    {"class_pool": the shipped list as its path in the repository
    ("tools/mmeb_v2_classes/K700.txt") or the override as "<Task>/classes.txt",
    "class_pool_sha256": the file's sha256}. A resume compares both (tools/mmeb_v2.py)."""
    _, path = read_class_pool(folder, task)
    name = f"{task}/classes.txt" if path == os.path.join(folder, "classes.txt") else \
        os.path.relpath(path, REPO).replace(os.sep, "/")
    return {"class_pool": name, "class_pool_sha256": file_sha256(path)}


def _jsonl_row(path, n, line, task):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"MMEB-V2 {task}: {path} line {n} is not JSON ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"MMEB-V2 {task}: {path} line {n} is not a JSON object: {line[:80]!r}")
    return row


def _video_rows(folder, subset, split, limit, task):
    """The task's annotation rows: parquet of `split` (under `subset`/ when given; MVBench:
    each subset in turn, with a "subset" column), else the folder's .jsonl files."""
    rows = []
    for sub in (subset if isinstance(subset, tuple) else (subset,)):
        d = os.path.join(folder, sub) if sub else folder
        files = [f for base in (d, os.path.join(d, "data"))
                 for f in sorted(glob.glob(os.path.join(base, f"{split}-*.parquet"))) or
                 sorted(glob.glob(os.path.join(base, split, "*.parquet")))]
        if not files and not isinstance(subset, tuple):
            files = sorted(glob.glob(os.path.join(folder, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"MMEB-V2 {task}: no '{split}' parquet file in {d} (nor a .jsonl in {folder})")
        if files[0].endswith(".jsonl"):
            part = [_jsonl_row(f, n, line, task) for f in files for n, line in enumerate(open(f), 1) if line.strip()]
        else:
            part = read_rows(files)
        rows += [dict(r, subset=sub) if isinstance(subset, tuple) else r for r in part]
    if not rows:
        raise ValueError(f"MMEB-V2 {task}: no rows in {folder}")
    return rows[:limit] if limit else rows


def _str(r, key, where):
    v = r.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(int(v)) if float(v).is_integer() else str(v)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where} {key}: expected a non-empty string, got {v!r:.80}")
    return v


def _str_list(r, key, where, n=None):
    v = r.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v) \
            or (n is not None and len(v) != n):
        raise ValueError(f"{where} {key}: expected a list of {n or 'some'} non-empty strings, got {v!r:.80}")
    return v


def _strip_letter(option):
    """'A. Some text.' → 'Some text' (the harness's o[o.find('. '):].strip('. '))."""
    return option[option.find(". "):].strip(". ")


def read_video_task(root, task, num_frames=8):
    """
    One MMEB-V2 video task → (queries, candidates, ranking). queries: list of (text, visual,
    candidate names (local ranking: the row's own; global: None = the whole pool), labels
    (the correct names)); candidates: {name: (text, visual)} in first-seen order, each
    encoded once; visual: None, an image path, or a util.video.Clip of `num_frames` frames
    (a folder of fewer: all of them; MomentSeeker's clips and query videos: all of their
    frames, as the harness's momentseeker_dataset.py loads them). A moment video's clip
    folders named positive* are all labels of its query (the harness's
    moment_retrieval_datasets.py: several are reported, then all kept).
    Malformed rows, missing frame folders, a video id that leaves frames/ (absolute, or
    climbing out with ".."), a file in a frame folder that is not an image, and labels
    outside their candidates (a classification label outside the class pool of
    read_class_pool) raise errors naming the task and row. Hidden files in frame folders
    (macOS "._*" AppleDouble files, dotfiles) are left out, counted and reported.
    """
    from util.video import Clip
    folder = os.path.join(root, task)
    hub, subset, split, ranking, limit = VIDEO_SOURCES[task]
    frames = os.path.join(folder, "frames")
    if not os.path.isdir(frames):
        raise FileNotFoundError(f"MMEB-V2 {task}: no frame folder {frames} (the task's folder of the "
                                "released MMEB-V2 frames, video-tasks/frames/...)")
    rows = _video_rows(folder, subset, split, limit, task)
    queries, cands, skipped, several = [], {}, [], []   # hidden files of frame folders; moments, 2+ positives

    def inside(name, where):
        """frames/<name>: the path as written, checked lexically (frames/ itself may be a link)."""
        if leaves_image_dir(name):
            raise ValueError(f"{where}: video id {name!r} leaves the task's frame folder {frames} "
                             "(an absolute path, or '..')")
        return os.path.join(frames, name)

    def clip(name, where, k=num_frames):
        return Clip.from_folder(inside(name, where), k, where, skipped=skipped)

    def cand(name, text, visual=None):
        cands.setdefault(name, (text, visual))
        return name
    for i, r in enumerate(rows):
        w = f"MMEB-V2 {task} row {i}"
        if task in V_CLS:
            label = _str(r, "pos_text", w)
            queries.append((f"<|video_1|> {V_CLS[task]}", clip(_str(r, "video_id", w), w), None, [cand(label, label)]))
        elif task == "SmthSmthV2":
            label, options = _str(r, "pos_text", w), _str_list(r, "neg_text", w)
            if label not in options:
                raise ValueError(f"{w}: pos_text {label!r} is not among its neg_text candidates")
            queries.append(("<|video_1|> What actions or object interactions are being performed by the person in "
                            "the video?", clip(_str(r, "video_id", w), w), [cand(o, o) for o in options], [label]))
        elif task in V_RET:
            caption = {"MSVD": lambda: _str_list(r, "caption", w)[0], "VATEX": lambda: _str_list(r, "enCap", w)[0],
                       "YouCook2": lambda: _str(r, "sentence", w)}.get(task, lambda: _str(r, "caption", w))()
            name = {"DiDeMo": lambda: os.path.splitext(os.path.basename(_str(r, "video", w)))[0],
                    "VATEX": lambda: _str(r, "videoID", w), "YouCook2": lambda: _str(r, "id", w)}.get(
                task, lambda: _str(r, "video_id", w))()
            cand(name, V_TARGET, clip(name, w))
            queries.append((f"{V_RET[task]} {caption}", None, None, [name]))
        elif task in ("Video-MME", "EgoSchema"):
            q = _str(r, "question", w)
            options = _str_list(r, "options" if task == "Video-MME" else "option", w)
            a = _str(r, "answer", w)
            k = "ABCDE".find(a) if task == "Video-MME" else (int(a) if a.isdigit() else -1)
            if not 0 <= k < len(options):
                raise ValueError(f"{w} answer: {a!r} names none of its {len(options)} options")
            text = q + "\n" + "\n".join(options) if task == "Video-MME" else q + " ".join(options)
            vid = _str(r, "videoID" if task == "Video-MME" else "video_idx", w)
            queries.append((f"<|video_1|> {V_QA_PROMPT} {text}", clip(vid, w),
                            [cand(o, _strip_letter(o)) for o in options], [options[k]]))
        elif task in ("NExTQA", "MVBench"):
            q = _str(r, "question", w)
            if task == "NExTQA":
                options = [_str(r, f"a{j}", w) for j in range(5)]
                a = r.get("answer")
                k = int(a) if isinstance(a, int) or (isinstance(a, str) and a.isdigit()) else -1
                vid = _str(r, "video", w)
            else:
                options, a = _str_list(r, "candidates", w), _str(r, "answer", w)
                k = options.index(a) if a in options else -1
                vid = f"{r['subset']}/{_str(r, 'video', w)}"
            if not 0 <= k < len(options):
                raise ValueError(f"{w} answer: {r.get('answer')!r:.40} names none of its options")
            lettered = [f"({chr(65 + j)}) {o}" for j, o in enumerate(options)]
            names = [cand(o, o) for o in (options if task == "NExTQA" else lettered)]
            text = (q + "\nOptions:\n" + "\n".join(lettered)).rstrip()
            queries.append((f"<|video_1|> {V_QA_PROMPT} {text}", clip(vid, w), names, [names[k]]))
        elif task == "ActivityNetQA":
            a = _str(r, "answer", w)
            if a not in ("yes", "no"):
                raise ValueError(f"{w} answer: expected 'yes' or 'no', got {a!r:.40}")
            queries.append((f"<|video_1|> {V_QA_PROMPT} {_str(r, 'question', w)}? (A) yes; (B) no.",
                            clip(f"v_{_str(r, 'video_name', w)}", w), [cand("yes", "yes"), cand("no", "no")], [a]))
        elif task in ("QVHighlight", "Charades-STA"):
            video = os.path.splitext(os.path.basename(_str(r, "video_path", w)))[0]
            d = inside(video, w)
            entries = sorted(os.listdir(d)) if os.path.isdir(d) else []
            skipped += [os.path.join(d, s) for s in entries if s.startswith(".")]
            subs = [s for s in entries if s != "query" and not s.startswith(".") and os.path.isdir(os.path.join(d, s))]
            names = [cand(f"{video}/{s}", V_TARGET, clip(f"{video}/{s}", w)) for s in subs]
            labels = [f"{video}/{s}" for s in subs if s.startswith("positive")]
            if not labels:
                raise ValueError(f"{w}: no clip folder named positive* in {d}")
            if len(labels) > 1:
                several.append(f"{d} ({', '.join(s for s in subs if s.startswith('positive'))})")
            queries.append(("<|video_1|> Find the clip that corresponds to the described scene in the given video: "
                            + _str(r, "query", w), clip(f"{video}/query", w), names, labels))
        else:                                                       # MomentSeeker
            q, given = _str(r, "query", w), r.get("input_frames") or ""

            def clips(key):
                out = []
                for c in r.get(key) or []:
                    path = c.get("output_path") if isinstance(c, dict) else None
                    if not isinstance(path, str) or not path:
                        raise ValueError(f"{w} {key}: expected entries with an output_path, got {c!r:.80}")
                    name = "video_frames/" + path.replace("/", "_").split(".mp4")[0]
                    out.append(cand(name, V_TARGET.replace("video.", "video clip."), clip(name, w, None)))
                return out
            pos, neg = clips("positive_frames"), clips("negative_frames")
            if not pos:
                raise ValueError(f"{w} positive_frames: no positive clip")
            if given.endswith(".mp4"):
                query = (f"<|video_1|> Find the clip that corresponds to the given sentence and video segment: {q}",
                         clip("video_frames/" + given.replace(".mp4", "").replace("/", "_"), w, None))
            elif given.endswith(".jpg"):
                query = (f"<|image_1|> Select the video clip that aligns with the given text and image: {q}",
                         inside(f"query_{given}", w))
            else:
                query = (f"Find the clip that corresponds to the given text: {q}", None)
            queries.append((*query, pos + neg, pos))
    if ranking == "global" and task in V_CLS:          # the harness ranks against every class
        pool, source = read_class_pool(folder, task)
        known, outside = set(pool), {}                  # label → its first row (one query per row)
        for i, (_, _, _, labels) in enumerate(queries):
            if labels[0] not in known:
                outside.setdefault(labels[0], i)
        if outside:                         # the harness would add it to the pool and rank on
            (label, i), *more = outside.items()
            others = ", ".join(f"{m!r} (row {j})" for m, j in more[:5]) + \
                (f", {len(more) - 5} others" if len(more) > 5 else "")
            raise ValueError(f"MMEB-V2 {task} row {i}: label {label!r} is not in the class pool {source} "
                             f"({len(pool)} labels)" + (f"; {len(more)} more outside it: {others}" if more else "")
                             + f". Fix the rows, or list the task's labels in {os.path.join(folder, 'classes.txt')}")
        kind = "the task folder's override" if os.path.dirname(source) == folder else "shipped"
        print0(f"MMEB-V2 {task}: ranking against the {len(pool)} classes of {source} ({kind})")
        for label in pool:
            cand(label, label)
    if several:                                     # the harness warns, then keeps them all
        print0(f"MMEB-V2 {task}: {len(several)} moment video(s) with several clip folders named positive*, each "
               f"a label of its query (the harness keeps them all too), e.g. {several[0]}")
    if skipped:
        skipped = sorted(set(skipped))              # a clip read twice lists its files twice
        print0(f"MMEB-V2 {task}: left out {len(skipped)} hidden file(s) of its frame folders (macOS '._*' "
               f"AppleDouble files, dotfiles: not frames), e.g. {skipped[0]}")
    return queries, cands, ranking
