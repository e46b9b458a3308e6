"""
Data: prompt templates (paper App. S7), MMEB files, item encoding and batch collation.

Read top to bottom:
  - templates: the MVQDM++ embedding chat template and the VLM2Vec "plain" layout
    (docs/readings.md §1); the 8-view matching prompt of App. S7, cut into the segments
    of the unified mask (P, Q, Zq, D1, Zd1, D2, Zd2, H, A_1..A_n; readings §3, masks.py);
  - MMEB's task tables and the per-meta-task target prompts (§4 "positive target prompts");
  - images (`load_image`) and items (`encode_item`: one MMEB (text, image) → content
    token ids + pixel values, once);
  - `collate_embed`: items → a right-padded batch with K learnable-token positions (§3.2.1);
  - `collate_match`: (q, d⁺, d⁻) instances → packed matching rows, d⁺ in slot 1 or 2,
    feature-token and label positions (§3.2.3, Eq. 4);
  - MMEB files in the hub layout (local dir or hub id): `read_eval_task` (MMEB-eval),
    `TrainDataset` (MMEB-train / mmE5 hard-negative rows → (q, d⁺, d⁻) items, with
    validation and a skip-and-report policy for bad rows);
  - the zero-shot datasets of Table 2 (`read_flickr30k`, `read_coco`, `read_sharegpt4v`,
    `read_urban1k`, `read_sugarcrepe`) in the layouts their sources ship;
  - `TrainBatchSampler`: global batches of one subset, sliced per rank, resumable.

Every item is encoded once; the embedding pass and the matching pass reuse the same
content ids and pixel values, so the raw query/document the matching pass reads is
exactly what was embedded. The CPU demo's synthetic benchmark lives in demo/.

Run the checks: `pytest tests/test_data.py tests/test_model.py tests/test_matching.py`.
"""
import ast
import collections
import glob
import hashlib
import json
import os
import random
import weakref

import torch

from masks import answer_name, segments_used

# ----------------------------------------------------------------------------------
# Templates (App. S7). Marker strings such as <QUERY> are ordinary text, not new vocab.

IMAGE_PLACEHOLDER = "<|image_1|>"                                  # MMEB (Phi-3.5-V) placeholder
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"       # Qwen2-VL vision block
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"

# Embedding input (docs/readings.md §1): "USER: {image} {text} {task instruction} ASSISTANT:" + L_1..L_K
EMBED_TEMPLATES = {
    "chat": (SYSTEM + USER, ASSISTANT),   # MVQDM++ (default)
    "plain": ("", ""),                    # VLM2Vec layout: the MMEB string alone (Table 3, MVQDM)
}

# Matching prompt (App. S7, eight views), one string per segment (docs/readings.md §3).
MATCH_INSTRUCTION = (
    'Compare the content inside <QUERY> and <DOC>. Determine whether the information in <DOC> '
    'is relevant to the query in <QUERY>. Answer only with "Yes" or "No", and wrap your answer '
    'in <ANSWER></ANSWER> tags.\n'
)
MATCH_P = SYSTEM + USER + MATCH_INSTRUCTION
# An item is tokenized once, on its own, so each wrapper must end (and the next begin) at
# a pre-token boundary of Qwen's BPE for the packed row to have exactly the ids that
# tokenizing the whole prompt gives: an opening marker ends with "\n" ("<QUERY> a" would be
# '>', 'Ġ', 'a' here but '>', 'Ġa' there), a closing one starts with a space ("?\n</"
# would merge into '?Ċ'). tests/test_width_real.py checks this with Qwen's tokenizer.
MATCH_RAW = {"Q": ("<QUERY>\n", " </QUERY>\n"), "D": ("<DOC>\n", " </DOC>\n")}
MATCH_FEAT = {"Q": ("<QUERY>\n<feat_start>", "<feat_end> </QUERY>\n"),
              "D": ("<DOC>\n<feat_start>", "<feat_end> </DOC>\n")}
MATCH_H = ASSISTANT
# segment P by name (train.py --match_prompt, saved in the checkpoint's config): "paper" is
# App. S7's; "header" the bare user header, for tiny random models (docs/demo.md §3)
MATCH_PROMPTS = {"paper": MATCH_P, "header": USER}
MATCH_ANSWER = ("<ANSWER>", "</ANSWER>")
ANSWER_WORDS = ("Yes", "No")   # label l of Eq. 4: "Yes" for d⁺, "No" for d⁻

# ----------------------------------------------------------------------------------
# MMEB task tables and the target-side instructions (paper §4: "positive target prompts
# to disentangle different tasks"; Table 3, "task-specific target instructions").

# The 20 MMEB-train subsets (exact hub config names) → meta-task.
MMEB_TRAIN_SUBSETS = {
    "ImageNet_1K": "Classification", "N24News": "Classification",
    "HatefulMemes": "Classification", "VOC2007": "Classification", "SUN397": "Classification",
    "OK-VQA": "VQA", "A-OKVQA": "VQA", "DocVQA": "VQA", "InfographicsVQA": "VQA",
    "ChartQA": "VQA", "Visual7W": "VQA",
    "VisDial": "Retrieval", "CIRR": "Retrieval", "VisualNews_t2i": "Retrieval",
    "VisualNews_i2t": "Retrieval", "MSCOCO_t2i": "Retrieval", "MSCOCO_i2t": "Retrieval",
    "NIGHTS": "Retrieval", "WebQA": "Retrieval",
    "MSCOCO": "Grounding",
}

# The 36 MMEB-eval tasks → (meta-task, IND = the task is one of the 20 training sets).
MMEB_EVAL_TASKS = {
    **{t: ("Classification", True) for t in
       ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{t: ("Classification", False) for t in
       ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{t: ("VQA", True) for t in
       ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{t: ("VQA", False) for t in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{t: ("Retrieval", True) for t in
       ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA")},
    **{t: ("Retrieval", False) for t in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", True),
    **{t: ("Grounding", False) for t in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}

# One wording per meta-task. It is prepended to *text-only* documents (class labels,
# answers, captions), which carry no instruction in MMEB; image documents already carry
# their own ("<|image_1|>\nRepresent the given image.") and are left as they are. In
# MMEB the text documents of retrieval are captions (i2t tasks; t2i/VisDial/CIRR/...
# have image documents) and grounding documents are crops, so one wording each suffices.
TARGET_BY_META = {
    "Classification": "Represent the class label: ",
    "VQA": "Represent the answer to a question about an image: ",
    "Retrieval": "Represent the caption of an image: ",
    "Grounding": "Represent the description of an image region: ",
}

# MMEB subset / eval task → target instruction (the wording of its meta-task)
TARGET_INSTRUCTIONS = {
    **{s: TARGET_BY_META[meta] for s, meta in MMEB_TRAIN_SUBSETS.items()},
    **{t: TARGET_BY_META[meta] for t, (meta, _) in MMEB_EVAL_TASKS.items()},
}


def target_prompt(task, meta=None, prompts=None):
    """The target instruction of a task, or None if it has none. Looked up in order:
    `prompts` (the user's --target_prompts file: {subset or task: prompt} and/or
    {meta-task: prompt}) by task name, MMEB's TARGET_INSTRUCTIONS, `prompts` by meta-task,
    then the built-in wording of the meta-task (TARGET_BY_META)."""
    prompts = prompts or {}
    for table, key in ((prompts, task), (TARGET_INSTRUCTIONS, task), (prompts, meta), (TARGET_BY_META, meta)):
        if key in table:
            return table[key]
    return None


def with_target_instruction(text, task, meta=None, prompts=None):
    """
    The document string with its task's target instruction (target_prompt): instruction
    + text for a text-only document; `text` unchanged when it holds an image
    (`<|image_1|>`), already starts with the instruction, or the task has none.
    """
    instruction = target_prompt(task, meta, prompts)
    if instruction is None or IMAGE_PLACEHOLDER in text or text.startswith(instruction):
        return text
    return instruction + text


def read_target_prompts(path):
    """--target_prompts FILE.json → {subset, task or meta-task: prompt}; ValueError naming
    the file on a bad file or entry."""
    import json
    try:
        with open(path) as f:
            prompts = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--target_prompts {path}: cannot read it as JSON ({e})") from None
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                for k, v in prompts.items()):
        raise ValueError(f"--target_prompts {path}: expected {{\"subset, task or meta-task\": "
                         f"\"prompt\"}} with non-empty strings, got {str(prompts)[:80]}")
    return prompts


def doc_id(text, image_path):
    """Stable 63-bit id of a document (text as embedded, image path): equal documents get
    equal ids, which info_nce uses to mask duplicates (docs/readings.md §2)."""
    digest = hashlib.blake2b(f"{text}\x00{image_path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ----------------------------------------------------------------------------------
# Images

MIN_IMAGE_SIDE = 28     # the Qwen2-VL processor needs at least one 28×28 merged patch


class BadItemError(ValueError):
    """An item found bad only when it is loaded (named by subset/row/column or path)."""


class BadImageError(BadItemError):
    """An image file that PIL cannot read, or too large to decode safely."""


MAX_DECODE_PIXELS = 89_478_485     # PIL's own warning threshold (MAX_IMAGE_PIXELS), enforced


def load_image(path, where="image"):
    """PIL RGB image; a side below 28 px is upscaled (aspect kept, shortest side → 28).
    An unreadable or missing file, or one of more than MAX_DECODE_PIXELS pixels (PIL only
    warns below twice that; such an image takes seconds and gigabytes to decode and is
    resized to at most the processor's max_pixels anyway), raises BadImageError naming
    `where` and `path`."""
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():             # PIL's bomb warning: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:           # the header, before decoding
                raise BadImageError(f"{where}: image {path} is {im.size[0]} × {im.size[1]} = "
                                    f"{im.size[0] * im.size[1]:,} pixels, more than {MAX_DECODE_PIXELS:,}: "
                                    "too large to decode safely")
            im = im.convert("RGB")
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:      # a header claiming e.g. 20000 × 20000
        raise BadImageError(f"{where}: image {path} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{where}: cannot read image {path}: {e}") from e
    return upscale_small(im)


def upscale_small(image):
    """A PIL image as RGB, upscaled (aspect kept, shortest side → 28) if a side is below
    28 px; other images unchanged."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) >= MIN_IMAGE_SIDE:
        return image
    s = MIN_IMAGE_SIDE / min(w, h)
    return image.resize((max(MIN_IMAGE_SIDE, round(w * s)), max(MIN_IMAGE_SIDE, round(h * s))),
                        Image.BICUBIC)


# ----------------------------------------------------------------------------------
# Items: one (text, image) → content token ids (image pads expanded) + pixel values.

def content_text(text):
    """MMEB string → Qwen content string: <|image_1|> becomes the Qwen vision block."""
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK)


def encode_image(processor, image):
    """The image processor's output for one PIL image: {"pixel_values": (n_patch, C·p·p),
    "image_grid_thw": (1, 3)}. Fixed per image: TrainDataset keeps it per image file."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def encode_item(processor, text, image=None, where="item", image_inputs=None):
    """
    Encode one query or document once. `text` is the MMEB string (instruction included,
    `<|image_1|>` where the image goes), `image` a PIL image or None, `where` names the
    item in error messages (e.g. "VisDial row 17 qry"); `image_inputs`: that image's
    encode_image output if already computed (it is then not processed again).
    What processor(text=, images=) returns, computed in its two parts: the image processor
    (encode_image), and the tokenizer on the text whose image pad the processor's own
    replace_image_token has expanded to one pad per merged patch (tests/test_data.py
    checks equality with the processor call, for the tiny and the real Qwen tokenizer).
    Returns {"ids": list[int], "pixel_values": (n_patch, C·p·p) or None,
             "image_grid_thw": (1, 3) or None}.
    """
    text = text or ""
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if image is None and image_inputs is None and not text.strip():
        raise ValueError(f"{where}: empty text and no image")
    has_image = image is not None or image_inputs is not None
    if not has_image and n_placeholders:
        raise ValueError(f"{where}: text has {IMAGE_PLACEHOLDER} but no image was given")
    if has_image and n_placeholders != 1:
        raise ValueError(f"{where}: an image was given but the text has {n_placeholders} "
                         f"{IMAGE_PLACEHOLDER} placeholders (expected exactly 1): {text[:80]!r}")
    text = content_text(text)
    if text.count(processor.image_token) != int(has_image):
        raise ValueError(f"{where}: the text holds {processor.image_token} itself: {text[:80]!r}")
    if has_image:
        image_inputs = image_inputs or encode_image(processor, image)
        pads = processor.replace_image_token(image_inputs, 0)              # n merged patches × pad
        text = text.replace(processor.image_token, pads)
    ids = processor.tokenizer(text)["input_ids"]
    return {"ids": list(ids),
            "pixel_values": image_inputs["pixel_values"] if has_image else None,
            "image_grid_thw": image_inputs["image_grid_thw"] if has_image else None}


_TEMPLATE_IDS = weakref.WeakKeyDictionary()      # tokenizer → {template string: ids}


def _ids(tokenizer, s):
    """Token ids of a fixed template string (no special tokens added), tokenised once per
    tokenizer: collation asks for the same few strings every step. A copy is returned."""
    if not s:
        return []
    known = _TEMPLATE_IDS.setdefault(tokenizer, {})
    if s not in known:
        known[s] = tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
    return list(known[s])


def _stack_images(parts):
    """Concatenate the pixel values / grids of the items that have an image, in order."""
    parts = [p for p in parts if p["pixel_values"] is not None]
    if not parts:
        return None, None
    return (torch.cat([p["pixel_values"] for p in parts]),        # (Σ n_patch, C·p·p)
            torch.cat([p["image_grid_thw"] for p in parts]))      # (n_img, 3)


def _pad_right(rows, pad_id):
    """list of id lists → input_ids (N, T) right-padded, attention_mask (N, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])                          # (N,)
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (N, T)
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------
# Embedding batch (§3.2.1; docs/readings.md §1)

def collate_embed(items, tokenizer, num_tokens, template="chat"):
    """
    items: encoded items (encode_item) of one side (queries or documents).
    Row n = template prefix + content + template suffix + K positions for the learnable
    tokens (filled with the pad id here; model.py overwrites their input embeddings).
    Right padding: a row's real tokens never see padding, so an item's embedding does
    not depend on the rest of the batch.
    Returns input_ids (N, T), attention_mask (N, T), token_idx (N, max(K,1)) = positions
    of the K learnable tokens (K = 0: the last real token, last-token pooling),
    pixel_values, image_grid_thw.
    """
    prefix, suffix = (_ids(tokenizer, s) for s in EMBED_TEMPLATES[template])
    pad_id = tokenizer.pad_token_id
    rows = [prefix + it["ids"] + suffix + [pad_id] * num_tokens for it in items]
    input_ids, attention_mask = _pad_right(rows, pad_id)
    lengths = torch.tensor([len(r) for r in rows])                          # (N,)
    K = max(num_tokens, 1)
    token_idx = lengths[:, None] - K + torch.arange(K)[None, :]             # (N, K)
    pixel_values, image_grid_thw = _stack_images(items)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_idx": token_idx,
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


# ----------------------------------------------------------------------------------
# Matching batch (§3.2.3, Fig. 3, App. S7; docs/readings.md §3)

def draw_pos_slot(rng):
    """The slot (1 or 2) of d⁺ in a matching row, each with probability 1/2, from `rng`
    (a random.Random); the other slot gets d⁻."""
    return 1 if rng.random() < 0.5 else 2


def pos_slot_of(*key):
    """d⁺'s slot for the instance named by `key` (e.g. seed, step, row index), seeded by the
    key alone: the placement does not depend on how instances are split over ranks or
    chunks, or on what else was drawn."""
    return draw_pos_slot(random.Random("-".join(map(str, key))))


def collate_match(q_items, pos_items, neg_items, tokenizer, views, pos_slot, prompt=MATCH_P):
    """
    One packed row per instance (q, d⁺, d⁻): segments P, Q, Zq, D1, Zd1, D2, Zd2, H,
    A_1..A_V (those the view set uses; masks.segments_used), d⁺ put in slot 1 or 2 at
    random, the other slot gets d⁻. `pos_slot`: the slot (1 or 2) of d⁺ per instance,
    chosen by the caller (pos_slot_of: train.py seeds each instance by its key), or a
    seeded random.Random to draw them (draw_pos_slot).
    Naming: "pos" is always the positive d⁺; positions in the row are "*_idx".
    `prompt`: the text of segment P (default MATCH_P: system + user header + App. S7's
    instruction; tests/test_learnability.py uses a bare user header, see there).
    Feature segments hold one placeholder token whose input embedding model.py replaces
    by Z = MLP(E). Answer A_v = "<ANSWER>{label}</ANSWER>"; the logits at the position
    just before the label token predict it (Eq. 4).

    Returns
      input_ids (M, L) right-padded, attention_mask (M, L) (1 = real token),
      segments: per row a list of (name, length) in sequence order (masks.unified_mask),
      feat_idx (M, 3): positions of the Zq, Zd1, Zd2 feature tokens (-1 if absent),
      pos_slot (M,): 1 or 2, the slot holding d⁺,
      label_idx (M, V), labels (M, V): label-predicting positions and label token ids,
      pixel_values, image_grid_thw: the raw segments' images in sequence order,
      image_src: per image, (part, m): the image of instance m's "q", "pos" or "neg" item
        (ReMatch.forward reuses that item's vision features from the embedding pass),
      views: the view set (masks.VIEW_SETS), for the mask.
    """
    pad_id = tokenizer.pad_token_id
    feat_id = pad_id                                   # placeholder, overwritten by Z
    yes_id, no_id = (_ids(tokenizer, w)[0] for w in ANSWER_WORDS)
    used = segments_used(views)
    P = _ids(tokenizer, prompt)
    H = _ids(tokenizer, MATCH_H)
    ans_open, ans_close = (_ids(tokenizer, s) for s in MATCH_ANSWER)
    raw_wrap = {k: tuple(_ids(tokenizer, s) for s in v) for k, v in MATCH_RAW.items()}
    feat_wrap = {k: tuple(_ids(tokenizer, s) for s in v) for k, v in MATCH_FEAT.items()}

    if not isinstance(pos_slot, (list, tuple)):                    # a random.Random: draw
        pos_slot = [draw_pos_slot(pos_slot) for _ in q_items]
    rows, segments, feat_idx, label_idx, labels, images, image_src = [], [], [], [], [], [], []
    for m, (q, dp, dn, slot) in enumerate(zip(q_items, pos_items, neg_items, pos_slot)):
        docs = {1: (dp, "pos"), 2: (dn, "neg")} if slot == 1 else {1: (dn, "neg"), 2: (dp, "pos")}
        content = {"Q": ("Q", q, "q"), "D1": ("D", *docs[1]), "D2": ("D", *docs[2])}
        ids, segs, fidx = [], [], {"Zq": -1, "Zd1": -1, "Zd2": -1}
        for name in used:
            if name == "P":
                seg = P
            elif name == "H":
                seg = H
            elif name in content:                       # raw view: wrapper + item content
                kind, item, part = content[name]
                seg = raw_wrap[kind][0] + item["ids"] + raw_wrap[kind][1]
                images.append(item)
                if item["pixel_values"] is not None:
                    image_src.append((part, m))
            else:                                       # feature view: one token for Z
                kind = "Q" if name == "Zq" else "D"
                fidx[name] = len(ids) + len(feat_wrap[kind][0])
                seg = feat_wrap[kind][0] + [feat_id] + feat_wrap[kind][1]
            segs.append((name, len(seg)))
            ids += seg
        lidx, lab = [], []
        for v, (_, doc_seg) in enumerate(views):
            label = yes_id if doc_seg[-1] == str(slot) else no_id   # D1/Zd1 → slot 1
            lidx.append(len(ids) + len(ans_open) - 1)
            lab.append(label)
            seg = ans_open + [label] + ans_close
            segs.append((answer_name(v), len(seg)))
            ids += seg
        rows.append(ids)
        segments.append(segs)
        feat_idx.append([fidx["Zq"], fidx["Zd1"], fidx["Zd2"]])
        label_idx.append(lidx)
        labels.append(lab)

    input_ids, attention_mask = _pad_right(rows, pad_id)
    pixel_values, image_grid_thw = _stack_images(images)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segments": segments,
            "feat_idx": torch.tensor(feat_idx), "pos_slot": torch.tensor(list(pos_slot)),
            "label_idx": torch.tensor(label_idx), "labels": torch.tensor(labels),
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "views": tuple(views),
            "image_src": image_src}


# ----------------------------------------------------------------------------------
# Parquet reading (MMEB's hub layout)
#   MMEB-train: <root>/<Subset>/<split>-00000-of-00001.parquet   (split "original", ...)
#   MMEB-eval:  <root>/<Task>/test-00000-of-00001.parquet
# both also as <root>/<name>/<split>/*.parquet (the hub's parquet-converter layout).

def looks_like_hub_id(name):
    """owner/name, not a path (no leading . or /, exactly one /)."""
    name = str(name)
    return not name.startswith((".", os.sep, "~")) and name.count("/") == 1


def rank0_first(fn):
    """fn() on rank 0 first, then on the other ranks (which reuse its download cache);
    just fn() without torch.distributed."""
    import torch.distributed as dist
    ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if ranks and dist.get_rank() != 0:
        dist.barrier()
    try:
        return fn()
    finally:
        if ranks and dist.get_rank() == 0:
            dist.barrier()


def resolve_dir(name_or_dir, allow_patterns=None, repo_type="dataset", revision=None):
    """
    A local directory as is; otherwise a Hugging Face repo id (e.g. "TIGER-Lab/MMEB-train"),
    downloaded with `huggingface_hub.snapshot_download(repo_type=...)`, only the files
    matching `allow_patterns` (e.g. ["VisDial/original-*.parquet"]); under torch.distributed
    rank 0 downloads first and the other ranks then reuse its cache. Returns the local dir.
    """
    name_or_dir = os.path.expanduser(str(name_or_dir))
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if not looks_like_hub_id(name_or_dir):
        raise FileNotFoundError(f"{name_or_dir}: no such directory (and not a hub id owner/name)")
    from huggingface_hub import snapshot_download
    return rank0_first(lambda: snapshot_download(name_or_dir, repo_type=repo_type,
                                                 allow_patterns=allow_patterns, revision=revision))


def find_parquet(root, name, split):
    """The parquet files of subset/task `name`, split `split`, under `root` (sorted)."""
    d = os.path.join(root, name)
    files = sorted(glob.glob(os.path.join(d, f"{split}-*.parquet"))) or \
        sorted(glob.glob(os.path.join(d, split, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"{name}: no '{split}' parquet file in {d} (looked for "
                                f"{split}-*.parquet and {split}/*.parquet)")
    return files


def find_subsets(root, split):
    """Names of the subdirectories of `root` that hold `split` parquet files (sorted)."""
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
    return [n for n in names if glob.glob(os.path.join(root, n, f"{split}-*.parquet"))
            or glob.glob(os.path.join(root, n, split, "*.parquet"))]


def read_rows(parquet_files, max_rows=None):
    """Parquet files (read in order) → list of row dicts; at most `max_rows` (the head)."""
    import pyarrow.parquet as pq
    rows = []
    for f in parquet_files:
        if max_rows is not None and len(rows) >= max_rows:
            break
        table = pq.read_table(f)
        if max_rows is not None:
            table = table.slice(0, max_rows - len(rows))
        rows += table.to_pylist()
    return rows


def leaves_image_dir(path):
    """An image path that is absolute or climbs out with "..": read as given, it would open
    a file outside --image_dir (refused unless --allow_outside_image_dir)."""
    return os.path.isabs(path) or os.path.normpath(path).split(os.sep)[0] == ".."


def read_eval_task(root, task, split="test", max_rows=None):
    """
    One MMEB-eval task → rows {"qry_text", "qry_img_path", "tgt_text": list[str],
    "tgt_img_path": list[str]}: candidate 0 is the positive, "" = no image (a null image
    column becomes "" / a list of ""). Missing columns, or candidate lists that are empty
    or of unequal length, raise ValueError naming the task and row.
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
    return rows


# ----------------------------------------------------------------------------------
# MMEB-train (and mmE5 hard-negative files): one (q, d⁺, d⁻) instance per row

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


MAX_LIST_CELL = 100_000        # characters of an mmE5 list cell (a few negatives, not megabytes)
# what ast.literal_eval raises on crafted input: bad syntax, unhashable set members, deep
# nesting, huge literals
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, RecursionError, MemoryError)


def _is_list_literal(v):
    """A parquet list, or a string that is (or starts like) a Python list of strings."""
    if isinstance(v, (list, tuple)):
        return True
    if not isinstance(v, str) or not v.lstrip().startswith("["):
        return False
    if v.lstrip()[1:2] in ("'", '"'):
        return True
    if len(v) > MAX_LIST_CELL:
        return False                                   # not parsed here; first_negative refuses it
    try:
        parsed = ast.literal_eval(v.strip())
    except _LITERAL_ERRORS:
        return False
    return isinstance(parsed, list) and bool(parsed) and all(isinstance(x, str) for x in parsed)


def list_columns(rows):
    """The neg_* columns of a subset that hold mmE5 lists: some value is a parquet list or
    a string list literal of strings ("['a', 'b']"). In such a column every value is read
    on its own (first_negative: a list gives its first element, a plain string is
    itself); in the other columns (MMEB-train's plain strings) nothing is parsed, so an
    answer like "[2019, 2020]" stays as it is."""
    return {col for col in ("neg_text", "neg_image_path")
            if any(_is_list_literal(r.get(col)) for r in rows if r.get(col))}


def first_negative(value, where):
    """
    One mmE5 hard-negative field → its first element: a string holding a Python list
    literal ("['a', 'b']"), parsed with ast.literal_eval (never eval), or a parquet list;
    a plain string (one negative, not a list) is returned as it is. None, "" and [] → "".
    A "[...]" that does not parse, or a list of anything but strings, raises ValueError
    naming `where`.
    """
    if not value:
        return ""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return value                                   # one plain negative among lists
    if isinstance(value, str):
        if len(value) > MAX_LIST_CELL:
            raise ValueError(f"{where}: a list cell of {len(value):,} characters (at most "
                             f"{MAX_LIST_CELL:,}): {value[:80]!r}...")
        try:
            value = ast.literal_eval(value.strip())
        except _LITERAL_ERRORS as e:
            raise ValueError(f"{where}: cannot parse the list literal {value[:80]!r} "
                             f"({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings (mmE5 format), got {str(value)[:80]!r}")
    return value[0] if value else ""


class TrainDataset(torch.utils.data.Dataset):
    """
    MMEB-train subsets (parquet) as (q, d⁺, d⁻) instances, one per row.

    root: local dir or hub id (e.g. TIGER-Lab/MMEB-train, or mmE5 hard-negative files with
      the same columns, split "train"); image_dir: the root the image paths are relative to.
    subsets: names (default: every subset under root that has `split` files; for a hub id,
      the 20 of MMEB_TRAIN_SUBSETS). max_rows_per_subset: head slice (VLM2Vec's cap).
    target_instructions: prepend the subset's target prompt to text-only documents
      (with_target_instruction): `target_prompts` {subset or meta-task: prompt} from the
      user's file first, then MMEB's tables; `task_meta` maps subsets outside MMEB's
      table (the demo's) to their meta-task. A subset with no prompt anywhere trains
      without one and is listed in `no_target_prompt`.
    cache_items: keep up to this many encoded (text, image) sides, and as many processed
      images (an image recurs under other texts), in memory (LRU; 0 = off), for small data
      that repeats items (the demo); identical output, less processor work.

    Hard negative: the row's neg_text/neg_image_path — plain strings (MMEB-train), or, in
    mmE5's hard-negative files, list literals of which element 0 is taken (list_columns,
    first_negative); an image negative with empty text takes the positive's text; a row
    without any → neg None (counted in `no_negative`; train.py then uses an in-batch
    negative). Batches are lists of items: DataLoader(..., collate_fn=list).

    Bad data. At construction every row is checked cheaply (image files exist, every side
    has text or an image, one <|image_1|> exactly when there is an image, negative lists
    parse): a bad row raises ValueError naming subset, row, column and path, or with
    skip_bad_rows=True is dropped and recorded in `skipped[subset]` as (row, reason).
    An image PIL cannot decode is only found at load time: it raises BadImageError, or
    with skip_bad_rows the row is recorded in `skipped` and the item is replaced by the
    next readable row of the same subset (cyclically, in file order) — deterministic, and
    the batch keeps its size and its single subset. Load-time records travel with the
    example (its "skipped"), and train.py adds them up in the main process with
    record_skipped, so DataLoader workers lose none. check_images() decodes every image
    up front. Also refused by name: a text column holding a number or NaN, an image path
    leaving image_dir (absolute or with "..", unless allow_outside_image_dir), a text
    longer than max_text_tokens tokens (found when encoded, like a corrupt image).

    dataset[i] = {"q", "pos", "neg" (encode_item outputs; neg may be None), "pos_id",
    "neg_id" (doc_id; -1 without negative), "subset", "index": i, "row": the file row used}.
    """

    def __init__(self, root, image_dir, processor, subsets=None, split="original",
                 max_rows_per_subset=None, target_instructions=True, skip_bad_rows=False,
                 cache_items=0, task_meta=None, max_text_tokens=None, allow_outside_image_dir=False,
                 target_prompts=None):
        patterns = [p for s in (subsets or MMEB_TRAIN_SUBSETS)
                    for p in (f"{s}/{split}-*.parquet", f"{s}/{split}/*.parquet")]
        self.root = resolve_dir(root, patterns)
        self.image_dir, self.processor, self.split = image_dir, processor, split
        self.target_instructions, self.skip_bad_rows = target_instructions, skip_bad_rows
        self.max_text_tokens, self.allow_outside_image_dir = max_text_tokens, allow_outside_image_dir
        self._image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.task_meta, self.target_prompts = dict(task_meta or {}), dict(target_prompts or {})
        self.subsets = list(subsets) if subsets else find_subsets(self.root, split)
        if not self.subsets:
            raise FileNotFoundError(f"no subset with '{split}' parquet files in {self.root}")
        self.rows = []                 # (subset, file row, q, pos, neg); sides = (text, image path)
        self.indices_by_subset, self.no_negative = {}, {}
        self.skipped = {s: [] for s in self.subsets}
        self._exists = {}              # image path → bool, each path stat-ed once
        for s in self.subsets:
            start = len(self.rows)
            rows = read_rows(find_parquet(self.root, s, split), max_rows_per_subset)
            missing = set(TRAIN_COLUMNS) - set(rows[0] if rows else TRAIN_COLUMNS)
            if missing:
                raise ValueError(f"{s}: columns {sorted(missing)} missing (has {sorted(rows[0])})")
            lists = list_columns(rows)
            for r, row in enumerate(rows):
                try:
                    self.rows.append(self._check_row(s, r, row, lists))
                except ValueError as e:
                    if not skip_bad_rows:
                        raise ValueError(f"{e} (skip_bad_rows=True drops such rows)") from None
                    self.skipped[s].append((r, str(e)))
            self.indices_by_subset[s] = list(range(start, len(self.rows)))
            self.no_negative[s] = sum(row[4] is None for row in self.rows[start:])
        self._subset_start = {s: ix[0] for s, ix in self.indices_by_subset.items() if ix}
        self.no_target_prompt = [s for s in self.subsets if target_instructions and target_prompt(
            s, self.task_meta.get(s), self.target_prompts) is None]   # trained without one
        self.pos_ids = [doc_id(*row[3]) for row in self.rows]
        self.neg_ids = [doc_id(*row[4]) if row[4] else -1 for row in self.rows]
        self._bad = set()              # dataset indices found unreadable at load time
        self.cache_items = cache_items # LRU of encoded (text, image) sides; 0 = off
        self._cache = collections.OrderedDict()
        self._images = collections.OrderedDict()   # LRU: image path → encode_image output

    def _check_row(self, subset, r, row, lists):
        """Row dict → (subset, r, q, pos, neg); ValueError naming the first problem.
        `lists`: the neg_* columns holding mmE5 list literals (list_columns)."""
        where = f"{subset} row {r}"
        for col in TRAIN_COLUMNS + ("neg_text", "neg_image_path"):
            v = row.get(col)
            if not (v is None or isinstance(v, str) or (col in lists and isinstance(v, (list, tuple)))):
                raise ValueError(f"{where} {col}: expected text or null, got {type(v).__name__} {v!r:.60}")
        q = (row["qry"] or "", row["qry_image_path"] or "")
        pos = (row["pos_text"] or "", row["pos_image_path"] or "")
        neg_text, neg_image = (first_negative(row.get(c), f"{where} {c}") if c in lists
                               else row.get(c) or "" for c in ("neg_text", "neg_image_path"))
        neg = (neg_text or pos[0], neg_image) if (neg_text or neg_image) else None
        sides = [("qry", "qry_image_path", q), ("pos_text", "pos_image_path", pos)]
        if neg is not None:
            sides.append(("neg_text", "neg_image_path", neg))
        for text_col, image_col, (text, image) in sides:
            if not text.strip() and not image:
                raise ValueError(f"{where} {text_col}: no text and no image")
            if image:
                if not self.allow_outside_image_dir and leaves_image_dir(image):
                    raise ValueError(f"{where} {image_col}: image path {image!r} leaves --image_dir "
                                     f"{self.image_dir} (allow with --allow_outside_image_dir)")
                path = os.path.join(self.image_dir, image)
                if path not in self._exists:
                    self._exists[path] = os.path.exists(path)
                if not self._exists[path]:
                    raise ValueError(f"{where} {image_col}: missing image {path}")
            n = text.count(IMAGE_PLACEHOLDER)
            if n != (1 if image else 0):
                raise ValueError(f"{where} {text_col}: {n} {IMAGE_PLACEHOLDER} placeholders "
                                 f"but {'an' if image else 'no'} image: {text[:60]!r}")
        if self.target_instructions:
            meta = self.task_meta.get(subset)
            pos = (with_target_instruction(pos[0], subset, meta, self.target_prompts), pos[1])
            if neg is not None:
                neg = (with_target_instruction(neg[0], subset, meta, self.target_prompts), neg[1])
        return subset, r, q, pos, neg

    def __len__(self):
        return len(self.rows)

    def subset_of(self, i):
        return self.rows[i][0]

    def _encode(self, j):
        subset, r, *sides = self.rows[j]
        items = []
        for name, side in zip(("qry", "pos", "neg"), sides):
            if side is None:
                items.append(None)
                continue
            text, image = side
            if side in self._cache:                    # small data (the demo) repeats items
                self._cache.move_to_end(side)
                items.append(self._cache[side])
                continue
            where = f"{subset} row {r} {name}"
            pixels = None
            if image and image in self._images:         # the same image under another text
                self._images.move_to_end(image)
                pixels = self._images[image]
            elif image:
                im = load_image(os.path.join(self.image_dir, image), where)
                pixels = encode_image(self.processor, im)
                if self.cache_items:
                    self._images[image] = pixels
                    if len(self._images) > self.cache_items:
                        self._images.popitem(last=False)
            items.append(encode_item(self.processor, text, where=where, image_inputs=pixels))
            if self.max_text_tokens and len(items[-1]["ids"]) > self.max_text_tokens:
                n_text = sum(t != self._image_token_id for t in items[-1]["ids"])
                if n_text > self.max_text_tokens:
                    raise BadItemError(f"{where}: the text is {n_text} tokens, more than "
                                       f"--max_text_tokens {self.max_text_tokens}: {text[:60]!r}...")
            if self.cache_items:
                self._cache[side] = items[-1]
                if len(self._cache) > self.cache_items:
                    self._cache.popitem(last=False)
        return items

    def __getitem__(self, i):
        subset, j = self.rows[i][0], i
        start, n = self._subset_start[subset], len(self.indices_by_subset[subset])
        skipped = []                                   # (subset, row, reason) found now
        for _ in range(n):
            if j not in self._bad:
                try:
                    q, pos, neg = self._encode(j)
                    break
                except BadItemError as e:
                    if not self.skip_bad_rows:
                        raise
                    self._bad.add(j)
                    skipped.append((subset, self.rows[j][1], str(e)))
            j = start + (j - start + 1) % n            # next row of the same subset
        else:
            raise BadItemError(f"{subset}: no readable row left (all {n} skipped)")
        return {"q": q, "pos": pos, "neg": neg, "pos_id": self.pos_ids[j],
                "neg_id": self.neg_ids[j], "subset": subset, "index": i, "row": self.rows[j][1],
                "skipped": skipped}

    def record_skipped(self, examples):
        """Count the load-time skips that came with a batch. They travel in the examples
        because a DataLoader worker's own records would stay in the worker process."""
        for ex in examples:
            for subset, r, reason in ex["skipped"]:
                self.skipped[subset].append((r, reason))

    def check_images(self, progress=False):
        """Decode every image the rows name, once each, before training (--check_images):
        a bad one raises BadImageError naming subset, row, column and path, or with
        skip_bad_rows its rows are dropped and recorded. Returns the number checked."""
        from tqdm import tqdm
        uses = collections.defaultdict(list)           # path → [(dataset index, column)]
        for i, (subset, r, *sides) in enumerate(self.rows):
            for col, side in zip(("qry_image_path", "pos_image_path", "neg_image_path"), sides):
                if side is not None and side[1]:
                    uses[os.path.join(self.image_dir, side[1])].append((i, col))
        bad = set()
        for path, at in tqdm(uses.items(), desc="checking images", disable=not progress):
            i, col = at[0]
            subset, r = self.rows[i][:2]
            try:
                load_image(path, f"{subset} row {r} {col}")
            except BadImageError as e:
                if not self.skip_bad_rows:
                    raise
                for i, _ in at:
                    if i not in bad:
                        bad.add(i)
                        self.skipped[self.rows[i][0]].append((self.rows[i][1], str(e)))
        if bad:
            keep = [row for i, row in enumerate(self.rows) if i not in bad]
            self._reindex(keep)
        return len(uses)

    def _reindex(self, rows):
        """Rebuild the per-subset indices and document ids after dropping rows."""
        self.rows, self.indices_by_subset = rows, {}
        for s in self.subsets:
            self.indices_by_subset[s] = [i for i, row in enumerate(rows) if row[0] == s]
            self.no_negative[s] = sum(rows[i][4] is None for i in self.indices_by_subset[s])
        self._subset_start = {s: ix[0] for s, ix in self.indices_by_subset.items() if ix}
        self.pos_ids = [doc_id(*row[3]) for row in rows]
        self.neg_ids = [doc_id(*row[4]) if row[4] else -1 for row in rows]

    def report(self):
        """Human-readable summary: rows, rows without a hard negative and skipped rows
        (with the first reasons) per subset."""
        lines = [f"training data {self.root} ({self.split}): {len(self.rows):,} rows in "
                 f"{len(self.subsets)} subsets",
                 f"  {'subset':<20} {'rows':>8} {'no neg':>8} {'skipped':>8}"]
        for s in self.subsets:
            lines.append(f"  {s:<20} {len(self.indices_by_subset[s]):>8,} "
                         f"{self.no_negative[s]:>8,} {len(self.skipped[s]):>8,}")
        for s in self.subsets:
            for r, reason in self.skipped[s][:5]:
                lines.append(f"  skipped {s} row {r}: {reason}")
            if len(self.skipped[s]) > 5:
                lines.append(f"  ... and {len(self.skipped[s]) - 5} more in {s}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Zero-shot datasets (Table 2; evaluate.py scores them). One folder --data_dir, laid out
# as the sources ship it (docs/readings.md §5):
#   flickr30k/dataset_flickr30k.json     Karpathy split json (split "test": 1000 images ×
#   flickr30k/flickr30k-images/<file>      5 captions; images from the Flickr30K request form)
#   coco/dataset_coco.json               Karpathy split json (split "test": 5000 images, the
#   coco/<filepath>/<filename>             first 5 captions each; images coco/val2014/*.jpg)
#   sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json   first 1000 entries (hub
#   sharegpt4v/<entry["image"]>            Lin-Chen/ShareGPT4V; images as in its data/ folder)
#   Urban1k/image/<name>.jpg, Urban1k/caption/<name>.txt    (hub BeichenZhang/Urban1k; first line)
#   sugarcrepe/{add_obj,...,swap_att}.json {id: {filename, caption, negative_caption}}
#                                          (github RAIVNLab/sugar-crepe data/), images coco/val2017/
# Every malformed input raises an error naming the file and the entry.

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


def _karpathy(json_path, image_dir_of, what):
    """(image path, caption) positive pairs of the Karpathy "test" split, the first 5 captions each."""
    data = _load_json(json_path, what)
    images = _each(enumerate(data["images"] if isinstance(data, dict) and "images" in data else []),
                   json_path, what, lambda im: [im] if im["split"] == "test" else [])
    positives = _each(((im.get("filename", i), im) for i, im in enumerate(images)), json_path, what,
                      lambda im: [(os.path.join(image_dir_of(im), _text(im["filename"])), _text(s["raw"]).strip())
                                  for s in im["sentences"][:5]])
    _require(sorted({p for p, _ in positives}), what)
    return positives


def read_flickr30k(data_dir):
    """Flickr30K 1k test: 1000 images × 5 captions (flickr30k/dataset_flickr30k.json)."""
    root = os.path.join(data_dir, "flickr30k")
    return _karpathy(os.path.join(root, "dataset_flickr30k.json"),
                     lambda im: os.path.join(root, "flickr30k-images"), "Flickr30K")


def read_coco(data_dir):
    """COCO 5k test: 5000 images, first 5 captions each (coco/dataset_coco.json)."""
    root = os.path.join(data_dir, "coco")
    return _karpathy(os.path.join(root, "dataset_coco.json"),
                     lambda im: os.path.join(root, im.get("filepath", "val2014")), "COCO")


def read_sharegpt4v(data_dir, limit=1000):
    """ShareGPT4V-1k: the first `limit` entries; caption = the answer, newlines → spaces."""
    root = os.path.join(data_dir, "sharegpt4v")
    path = os.path.join(root, SHAREGPT4V_JSON)
    _require([path], "ShareGPT4V")
    entries = _load_json(path, "ShareGPT4V")
    if not isinstance(entries, list):
        raise ValueError(f"ShareGPT4V: {path}: expected a list of entries, got {type(entries).__name__}")
    positives = _each(enumerate(entries[:limit]), path, "ShareGPT4V", lambda e: (
        os.path.join(root, _text(e["image"])), _text(e["conversations"][1]["value"]).replace("\n", " ")))
    _require([p for p, _ in positives], "ShareGPT4V")
    return positives


def read_urban1k(data_dir):
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


def read_sugarcrepe(data_dir):
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
    _require(sorted({p for rows in out.values() for p, _, _ in rows}), "SugarCrepe")
    return out


# ----------------------------------------------------------------------------------
# Batch sampler: global batches of one subset (VLM2Vec-HEAD style), sliced per rank

class TrainBatchSampler:
    """
    An infinite iterable over training steps; each step yields this rank's `batch_size`
    dataset indices (use as DataLoader(batch_sampler=...)).

    A global step takes G = world_size·batch_size rows — all from ONE subset when
    `homogeneous` (the global batch is the set of in-batch negatives, so they come from
    one task), else from all subsets mixed. Rank r takes the contiguous slice
    [r·B, (r+1)·B) of it, so ranks see disjoint rows. Epoch e: shuffle each subset's
    indices with random.Random(seed + e), cut into global batches (a final partial one
    is dropped), shuffle the batch order with the same generator; subsets are thus drawn
    in proportion to their size. Every rank must use the same seed. `start_step` skips
    that many global steps (resume) without touching the data.

    dataset: anything with `indices_by_subset` (TrainDataset), or a dict subset → indices.
    """

    def __init__(self, dataset, batch_size, world_size=1, rank=0, seed=0, homogeneous=True,
                 start_step=0):
        groups = getattr(dataset, "indices_by_subset", dataset)
        self.groups = {s: list(ix) for s, ix in groups.items()}
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.homogeneous, self.start_step = seed, homogeneous, start_step
        G = self.global_batch = world_size * batch_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if homogeneous:
            small = [f"{s} ({len(ix)} rows)" for s, ix in self.groups.items() if len(ix) < G]
            if small:
                raise ValueError(f"homogeneous batches need >= {G} rows (global batch) per "
                                 f"subset; too small: {', '.join(small)}. Drop those subsets, "
                                 "lower the batch size or use mixed batches")
            self.steps_per_epoch = sum(len(ix) // G for ix in self.groups.values())
        else:
            self.steps_per_epoch = sum(len(ix) for ix in self.groups.values()) // G
            if self.steps_per_epoch == 0:
                raise ValueError(f"fewer rows than one global batch ({G})")

    def epoch_batches(self, epoch):
        """The global batches (lists of G indices) of one epoch, in order."""
        G, rng = self.global_batch, random.Random(self.seed + epoch)
        pools = list(self.groups.values()) if self.homogeneous else \
            [[i for ix in self.groups.values() for i in ix]]
        batches = []
        for ix in pools:
            ix = list(ix)
            rng.shuffle(ix)
            batches += [ix[k:k + G] for k in range(0, len(ix) - G + 1, G)]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        B, r = self.batch_size, self.rank
        while True:
            for batch in self.epoch_batches(epoch)[skip:]:
                yield batch[r * B:(r + 1) * B]
            epoch, skip = epoch + 1, 0
