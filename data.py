"""
Data: prompt templates (paper App. S7), item encoding, batch collation, training instances.

Read top to bottom:
  - templates: the MVQDM++ embedding chat template and the VLM2Vec "plain" layout
    (docs/readings.md §1); the 8-view matching prompt of App. S7, cut into the segments
    of the unified mask (P, Q, Zq, D1, Zd1, D2, Zd2, H, A_1..A_n; readings §3, masks.py);
  - MMEB's task tables and the per-meta-task target prompts (§4 "positive target prompts");
  - items (`encode_item`: one MMEB (text, image) → content token ids + pixel values, once);
  - `collate_embed`: items → a right-padded batch with K learnable-token positions (§3.2.1);
  - `collate_match`: (q, d⁺, d⁻) instances → packed matching rows, d⁺ in slot 1 or 2,
    feature-token and label positions (§3.2.3, Eq. 4);
  - `TrainDataset`: MMEB-train / mmE5 rows → (q, d⁺, d⁻) instances, encoded once;
  - `TrainBatchSampler`: global batches of one subset, sliced per rank, resumable.

Every item is encoded once; the embedding pass and the matching pass reuse the same
content ids and pixel values, so the raw query/document the matching pass reads is
exactly what was embedded. Files, images and their checks are util/inputs.py's (the rows
arrive here clean); the benchmark readers util/benchmarks.py's; the CPU demo's synthetic
benchmark lives in demo/.

Run the checks: `pytest tests/test_data.py tests/test_model.py tests/test_matching.py`.
"""
import collections
import os
import hashlib
import random
import weakref

import torch

from masks import answer_name, segments_used
from util.chat_templates import ANSWER_WORDS
from util.inputs import (IMAGE_PLACEHOLDER, TrainRows, check_item_text, check_text_length, check_text_tokens,
                         load_image)
from util.video import VIDEO_BLOCK, VIDEO_PLACEHOLDER, encode_video

# ----------------------------------------------------------------------------------
# Templates (App. S7). Marker strings such as <QUERY> are ordinary text, not new vocab.

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
# label l of Eq. 4: ANSWER_WORDS = ("Yes", "No"), "Yes" for d⁺, "No" for d⁻ (imported from
# util/chat_templates.py, where the loader's one-token check finds them too)

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


def doc_id(text, image_path):
    """Stable 63-bit id of a document (text as embedded, image path): equal documents get
    equal ids, which info_nce uses to mask duplicates (docs/readings.md §2)."""
    digest = hashlib.blake2b(f"{text}\x00{image_path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


# ----------------------------------------------------------------------------------
# Items: one (text, image) → content token ids (image pads expanded) + pixel values.

def content_text(text):
    """MMEB string → Qwen content string: <|image_1|> (<|video_1|>) becomes the Qwen vision block."""
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK).replace(VIDEO_PLACEHOLDER, VIDEO_BLOCK)


def encode_image(processor, image):
    """The image processor's output for one PIL image: {"pixel_values": (n_patch, C·p·p),
    "image_grid_thw": (1, 3)}. Fixed per image: TrainDataset keeps it per image file."""
    out = processor.image_processor(images=[image], return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def encode_item(processor, text, image=None, where="item", image_inputs=None, video=None):
    """
    Encode one query or document once. `text` is the MMEB string (instruction included,
    `<|image_1|>` where the image goes), `image` a PIL image or None, `where` names the
    item in error messages (e.g. "VisDial row 17 qry"); `image_inputs`: that image's
    encode_image output if already computed (it is then not processed again). `video`: a
    util.video.Clip, placed at `<|video_1|>` (MMEB-V2's video tasks; evaluation only).
    What processor(text=, images=) returns, computed in its two parts: the image processor
    (encode_image), and the tokenizer on the text whose image pad the processor's own
    replace_image_token has expanded to one pad per merged patch (tests/test_data.py
    checks equality with the processor call, for the tiny and the real Qwen tokenizer).
    Returns {"ids": list[int], "pixel_values": (n_patch, C·p·p) or None,
             "image_grid_thw": (1, 3) or None, and with a video "pixel_values_videos",
             "video_grid_thw" (1, 3), "second_per_grid_ts" (1,)}.
    """
    text = text or ""
    has_image = image is not None or image_inputs is not None
    check_item_text(text, has_image, where, processor.image_token, has_video=video is not None)  # util/inputs.py
    text = content_text(text)
    if has_image:
        image_inputs = image_inputs or encode_image(processor, image)
        pads = processor.replace_image_token(image_inputs, 0)              # n merged patches × pad
        text = text.replace(processor.image_token, pads)
    out = {}
    if video is not None:                                                  # util/video.py
        out = encode_video(processor, video, where)
        text = text.replace(VIDEO_BLOCK, out.pop("text"))
    ids = processor.tokenizer(text)["input_ids"]
    return {"ids": list(ids),
            "pixel_values": image_inputs["pixel_values"] if has_image else None,
            "image_grid_thw": image_inputs["image_grid_thw"] if has_image else None, **out}


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


def _stack_images(parts, keys=("pixel_values", "image_grid_thw")):
    """Concatenate the pixel values / grids (`keys`) of the items that have an image (a
    video), in order: (Σ n_patch, C·p·p), (n_img, 3), ..."""
    parts = [p for p in parts if p.get(keys[0]) is not None]
    return tuple(torch.cat([p[k] for p in parts]) if parts else None for k in keys)


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
    video = _stack_images(items, ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_idx": token_idx,
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
            **({} if video[0] is None else dict(zip(("pixel_values_videos", "video_grid_thw",
                                                      "second_per_grid_ts"), video)))}


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
# Training instances: one (q, d⁺, d⁻) per MMEB-train row (§4)

class TrainDataset(TrainRows, torch.utils.data.Dataset):
    """
    MMEB-train subsets (TIGER-Lab/MMEB-train, or mmE5's hard-negative files with the same
    columns, split "train") as (q, d⁺, d⁻) instances, one per row. The rows arrive read
    and checked (util/inputs.TrainRows: root, image_dir, subsets, split,
    max_rows_per_subset, skip_bad_rows, allow_outside_image_dir, revision; the skip policy
    and its report live there).

    Hard negative (§4, Table 3 row 3): the row's neg_text / neg_image_path — a plain
    string in MMEB-train; in mmE5's files a list, of which the first element is taken; a
    row without any has neg None (train.py then uses an in-batch negative).
    target_instructions (§4, Table 3 row 2): the subset's target prompt is prepended to
    text-only documents (with_target_instruction): `target_prompts` {subset or meta-task:
    prompt} from the user's file first, then MMEB's tables; `task_meta` maps subsets
    outside MMEB's table (the demo's) to their meta-task. A subset with no prompt anywhere
    trains without one and is listed in `no_target_prompt`.
    cache_items: keep up to this many encoded (text, image) sides, and as many processed
    images (an image recurs under other texts), in memory (LRU; 0 = off), for small data
    that repeats items (the demo); identical output, less processor work.
    max_text_tokens: a longer text is found when encoded, like a corrupt image.

    dataset[i] = {"q", "pos", "neg" (encode_item outputs; neg may be None), "pos_id",
    "neg_id" (doc_id; -1 without negative), "subset", "index": i, "row": the file row
    used, "skipped": rows passed over on the way (first_readable)}. Batches are lists of
    items: DataLoader(..., collate_fn=list).
    """

    def __init__(self, root, image_dir, processor, subsets=None, split="original",
                 max_rows_per_subset=None, target_instructions=True, skip_bad_rows=False,
                 cache_items=0, task_meta=None, max_text_tokens=None, allow_outside_image_dir=False,
                 target_prompts=None, revision=None):
        super().__init__(root, image_dir, subsets, split, max_rows_per_subset, skip_bad_rows,
                         allow_outside_image_dir, hub_subsets=MMEB_TRAIN_SUBSETS, revision=revision)
        self.processor, self.max_text_tokens = processor, max_text_tokens
        self._image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.task_meta, self.target_prompts = dict(task_meta or {}), dict(target_prompts or {})
        if target_instructions:                                 # documents only, not queries
            def target(s, side):
                return side and (with_target_instruction(side[0], s, self.task_meta.get(s),
                                                         self.target_prompts), side[1])
            self._reindex([(s, r, q, target(s, pos), target(s, neg)) for s, r, q, pos, neg in self.rows])
        self.no_target_prompt = [s for s in self.subsets if target_instructions and target_prompt(
            s, self.task_meta.get(s), self.target_prompts) is None]   # trained without one
        self.cache_items = cache_items # LRU of encoded (text, image) sides; 0 = off
        self._cache = collections.OrderedDict()
        self._images = collections.OrderedDict()   # LRU: image path → encode_image output

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
            check_text_length(self.processor.tokenizer, text, self.max_text_tokens, where)
            items.append(encode_item(self.processor, text, where=where, image_inputs=pixels))
            check_text_tokens(items[-1]["ids"], self._image_token_id, self.max_text_tokens, where, text)
            if self.cache_items:
                self._cache[side] = items[-1]
                if len(self._cache) > self.cache_items:
                    self._cache.popitem(last=False)
        return items

    def __getitem__(self, i):
        j, (q, pos, neg), skipped = self.first_readable(i, self._encode)   # util/inputs.py
        row = self.rows[j]
        return {"q": q, "pos": pos, "neg": neg, "pos_id": doc_id(*row[3]),
                "neg_id": doc_id(*row[4]) if row[4] else -1, "subset": row[0], "index": i, "row": row[1],
                "skipped": skipped}


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
