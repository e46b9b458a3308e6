"""
Benchmark files read into clean rows — behind evaluate.py, none of it in the paper: MMEB's
eval tasks (Table 1) and the zero-shot sets of Table 2, in the layouts their sources ship.
Every malformed input raises an error naming the file (or task), the entry or row.

  read_eval_task                 one MMEB-eval task (parquet): query, candidates (positive first)
  read_flickr30k, read_coco      Karpathy "test" split json, the first 5 captions per image
  read_sharegpt4v                the first 1000 entries of ShareGPT4V's caption file
  read_urban1k, read_sugarcrepe  Urban1k's caption/image folders; SugarCrepe's 7 json files
  mmeb_preflight                 every MMEB task's files and images, before the long part

MMEB-V2's readers (not the paper's protocol) are its extension's: tools/mmeb_v2_data.py.

The protocol (which split, which captions, which prompts) is stated where a paper reader
looks: evaluate.py's MMEB and zero-shot sections. Tests: pytest tests/test_inputs.py
"""
import glob
import json
import os

from util.dist import print0
from util.inputs import find_parquet, leaves_image_dir, read_rows


def read_eval_task(root, task, split="test", max_rows=None):
    """
    One MMEB-eval task → rows {"qry_text", "qry_img_path", "tgt_text": list[str],
    "tgt_img_path": list[str]}: candidate 0 is the positive, "" = no image (a null image
    column becomes "" / a list of ""). Missing columns, or candidate lists that are empty
    or of unequal length, raise ValueError naming the task and row; so does a task whose
    rows all have a single candidate (a row alone with one is named, and counts as a hit).
    """
    files = find_parquet(root, task, split)
    rows = read_rows(files, max_rows)
    if not rows:
        raise ValueError(f"MMEB task {task}: no rows in {', '.join(files)}")
    missing = {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"} - set(rows[0])
    if missing:
        raise ValueError(f"{task}: MMEB-eval columns {sorted(missing)} missing in {root}")
    for i, r in enumerate(rows):
        if not isinstance(r["tgt_text"], list) or not all(isinstance(t, str) for t in r["tgt_text"]):
            raise ValueError(f"MMEB task {task} row {i} tgt_text: expected a list of strings, "
                             f"got {r['tgt_text']!r:.80}")
        if not isinstance(r["qry_text"], str):
            raise ValueError(f"MMEB task {task} row {i} qry_text: expected a string, got {r['qry_text']!r:.80}")
        if r["qry_img_path"] is not None and not isinstance(r["qry_img_path"], str):
            raise ValueError(f"MMEB task {task} row {i} qry_img_path: expected a string (a path or "
                             f"\"\"), got {r['qry_img_path']!r:.80}")
        if r["tgt_img_path"] is not None and not (isinstance(r["tgt_img_path"], list) and all(
                p is None or isinstance(p, str) for p in r["tgt_img_path"])):   # a str would be read per character
            raise ValueError(f"MMEB task {task} row {i} tgt_img_path: expected a list of strings, "
                             f"got {r['tgt_img_path']!r:.80}")
        r["qry_img_path"] = r["qry_img_path"] or ""
        r["tgt_img_path"] = [p or "" for p in (r["tgt_img_path"] or [""] * len(r["tgt_text"]))]
        if len(r["tgt_text"]) != len(r["tgt_img_path"]) or not r["tgt_text"]:
            raise ValueError(f"MMEB task {task} row {i}: tgt_text and tgt_img_path must be "
                             "non-empty lists of the same length")
        candidates = list(zip(r["tgt_text"], r["tgt_img_path"]))
        if len(candidates) > 1 and all(c == candidates[0] for c in candidates):
            raise ValueError(f"MMEB task {task} row {i}: every candidate equals the positive, so no "
                             "negative is left to rank against (it would count as a hit)")
    single = [i for i, r in enumerate(rows) if len(r["tgt_text"]) == 1]
    if len(single) == len(rows):
        raise ValueError(f"MMEB task {task}: every row has a single candidate, nothing to rank against "
                         "(its Hit@1 would be 100)")
    if single:
        print0(f"MMEB task {task}: {len(single)} of {len(rows)} rows have a single candidate (rows "
              f"{', '.join(map(str, single[:5]))}{' ...' if len(single) > 5 else ''}): each counts as a hit")
    return rows



def mmeb_preflight(root, tasks, image_dir, allow_outside_image_dir=False, skip_missing=False):
    """{task: why it is missing} for the MMEB-format tasks under `root` whose files or
    images are missing; FileNotFoundError naming them all unless skip_missing. An image
    path that is absolute or leaves image_dir with ".." is refused (ValueError naming the
    task) unless allow_outside_image_dir."""
    problems = {}
    for task in tasks:
        try:
            rows = read_eval_task(root, task)
        except FileNotFoundError as err:
            problems[task] = str(err)
            continue
        paths = ({r["qry_img_path"] for r in rows} | {p for r in rows for p in r["tgt_img_path"]}) - {""}
        outside = sorted(p for p in paths if leaves_image_dir(p))
        if outside and not allow_outside_image_dir:
            raise ValueError(f"MMEB task {task}: image path(s) leave --image_dir {image_dir}: "
                             + ", ".join(map(repr, outside[:5])) + " (allow with --allow_outside_image_dir)")
        lost = sorted(p for p in paths if not os.path.isfile(os.path.join(image_dir, p)))
        if lost:
            problems[task] = (f"MMEB task {task}: {len(lost)} image(s) missing under {image_dir}: "
                              + ", ".join(os.path.join(image_dir, p) for p in lost[:5])
                              + (" ..." if len(lost) > 5 else ""))
    if problems and not skip_missing:
        raise FileNotFoundError("missing MMEB data (pass skip_missing / --skip_missing to skip "
                                "these tasks):\n" + "\n".join(problems.values()))
    return problems

# ----------------------------------------------------------------------------------
# Zero-shot datasets (Table 2). One folder --data_dir, laid out as the sources ship it
# (docs/readings.md §5):
#   flickr30k/dataset_flickr30k.json     Karpathy split json (split "test": 1000 images ×
#   flickr30k/flickr30k-images/<file>      5 captions; images from the Flickr30K request form)
#   coco/dataset_coco.json               Karpathy split json (split "test": 5000 images, the
#   coco/<filepath>/<filename>             first 5 captions each; images coco/val2014/*.jpg)
#   sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json   first 1000 entries (hub
#   sharegpt4v/<entry["image"]>            Lin-Chen/ShareGPT4V; images as in its data/ folder)
#   Urban1k/image/<name>.jpg, Urban1k/caption/<name>.txt    (hub BeichenZhang/Urban1k; first line)
#   sugarcrepe/{add_obj,...,swap_att}.json {id: {filename, caption, negative_caption}}
#                                          (github RAIVNLab/sugar-crepe data/), images coco/val2017/

SUGARCREPE_SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel",
                      "swap_obj", "swap_att")


SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"


def _require(paths, what):
    lost = [p for p in paths if not os.path.isfile(p)]
    if lost:
        raise FileNotFoundError(f"{what}: {len(lost)} file(s) missing: " + ", ".join(lost[:5])
                                + (" ..." if len(lost) > 5 else ""))


def _load_json(path, what):
    _require([path], what)
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def _each(entries, path, what, parse):
    """parse(entry) for each (key, entry); a malformed entry (a missing key, a null or
    non-string caption, a short list) raises ValueError naming the file and the entry."""
    out = []
    for key, entry in entries:
        try:
            value = parse(entry)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"{what}: {path} entry {key}: malformed ({type(e).__name__}: {e})") from None
        out.extend(value if isinstance(value, list) else [value])
    if not out:
        raise ValueError(f"{what}: {path} holds no usable entry")
    return out


def _text(x):
    if not isinstance(x, str):
        raise TypeError(f"expected a caption string, got {type(x).__name__}")
    return x


def _confine(paths, data_dir, what, allow_outside):
    """Every image path stays under --data_dir (an entry's "../x" or "/x" would open any file
    of the machine), unless allow_outside (--allow_outside_image_dir); ValueError naming them."""
    root = os.path.abspath(data_dir)
    outside = sorted({p for p in paths if os.path.relpath(os.path.abspath(p), root).split(os.sep)[0] == ".."})
    if outside and not allow_outside:
        raise ValueError(f"{what}: image path(s) leave --data_dir {data_dir}: " + ", ".join(map(repr, outside[:5]))
                         + " (allow with --allow_outside_image_dir)")


def _karpathy(json_path, image_dir_of, what, data_dir, allow_outside):
    """(image path, caption) positive pairs of the Karpathy "test" split, the first 5 captions each."""
    data = _load_json(json_path, what)
    images = _each(enumerate(data["images"] if isinstance(data, dict) and "images" in data else []),
                   json_path, what, lambda im: [im] if im["split"] == "test" else [])
    positives = _each(((im.get("filename", i), im) for i, im in enumerate(images)), json_path, what,
                      lambda im: [(os.path.join(image_dir_of(im), _text(im["filename"])), _text(s["raw"]).strip())
                                  for s in im["sentences"][:5]])
    _confine([p for p, _ in positives], data_dir, what, allow_outside)
    _require(sorted({p for p, _ in positives}), what)
    return positives


def read_flickr30k(data_dir, allow_outside=False):
    """Flickr30K 1k test: 1000 images × 5 captions (flickr30k/dataset_flickr30k.json)."""
    root = os.path.join(data_dir, "flickr30k")
    return _karpathy(os.path.join(root, "dataset_flickr30k.json"),
                     lambda im: os.path.join(root, "flickr30k-images"), "Flickr30K", data_dir, allow_outside)


def read_coco(data_dir, allow_outside=False):
    """COCO 5k test: 5000 images, first 5 captions each (coco/dataset_coco.json)."""
    root = os.path.join(data_dir, "coco")
    return _karpathy(os.path.join(root, "dataset_coco.json"),
                     lambda im: os.path.join(root, im.get("filepath", "val2014")), "COCO", data_dir, allow_outside)


def read_sharegpt4v(data_dir, limit=1000, allow_outside=False):
    """ShareGPT4V-1k: the first `limit` entries; caption = the answer, newlines → spaces."""
    root = os.path.join(data_dir, "sharegpt4v")
    path = os.path.join(root, SHAREGPT4V_JSON)
    _require([path], "ShareGPT4V")
    entries = _load_json(path, "ShareGPT4V")
    if not isinstance(entries, list):
        raise ValueError(f"ShareGPT4V: {path}: expected a list of entries, got {type(entries).__name__}")
    positives = _each(enumerate(entries[:limit]), path, "ShareGPT4V", lambda e: (
        os.path.join(root, _text(e["image"])), _text(e["conversations"][1]["value"]).replace("\n", " ")))
    _confine([p for p, _ in positives], data_dir, "ShareGPT4V", allow_outside)
    _require([p for p, _ in positives], "ShareGPT4V")
    return positives


def read_urban1k(data_dir, allow_outside=False):
    """Urban1k: Urban1k/caption/<name>.txt (first line) ↔ Urban1k/image/<name>.jpg."""
    root = os.path.join(data_dir, "Urban1k")
    captions = sorted(glob.glob(os.path.join(root, "caption", "*.txt")))
    if not captions:
        raise FileNotFoundError(f"Urban1k: no captions in {os.path.join(root, 'caption')}")
    positives = []
    for c in captions:
        with open(c) as f:
            first = f.readline().strip()
        stem = os.path.splitext(os.path.basename(c))[0]
        positives.append((os.path.join(root, "image", stem + ".jpg"), first))
    _require([p for p, _ in positives], "Urban1k")
    return positives


def read_sugarcrepe(data_dir, allow_outside=False):
    """{subset: [(image path, caption, negative caption)]} for the 7 SugarCrepe subsets
    (sugarcrepe/<subset>.json, images in coco/val2017/)."""
    paths = {s: os.path.join(data_dir, "sugarcrepe", f"{s}.json") for s in SUGARCREPE_SUBSETS}
    _require(list(paths.values()), "SugarCrepe")
    image_dir = os.path.join(data_dir, "coco", "val2017")
    out = {}
    for sub, path in paths.items():
        data = _load_json(path, "SugarCrepe")
        if not isinstance(data, dict):
            raise ValueError(f"SugarCrepe: {path}: expected an object {{id: entry}}, got {type(data).__name__}")
        out[sub] = _each(data.items(), path, "SugarCrepe", lambda v: (
            os.path.join(image_dir, _text(v["filename"])), _text(v["caption"]), _text(v["negative_caption"])))
    _confine([p for rows in out.values() for p, _, _ in rows], data_dir, "SugarCrepe", allow_outside)
    _require(sorted({p for rows in out.values() for p, _, _ in rows}), "SugarCrepe")
    return out
