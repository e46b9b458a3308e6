"""
Data: prompt templates (paper App. S7), item encoding and batch collation.

What lives here
  - the MVQDM++ embedding chat template (SPEC §1) and the VLM2Vec "plain" layout;
  - the 8-view matching prompt of App. S7, cut into the segments of the unified mask
    (P, Q, Zq, D1, Zd1, D2, Zd2, H, A_1..A_n; SPEC §3, masks.py);
  - `encode_item`: one MMEB (text, image) → content token ids + pixel values, once;
  - `collate_embed`: items → a right-padded batch with K learnable-token slots (§3.2.1);
  - `collate_match`: (q, d⁺, d⁻) instances → packed matching rows with random slot
    placement, feature-token slots and label positions (§3.2.3, Eq. 4);
  - the built-in corpus the tiny offline tokenizer is trained on (model.py).

Every item is encoded once; the embedding pass and the matching pass reuse the same
content ids and pixel values, so the raw query/document the matching pass reads is
exactly what was embedded.

Run the checks: `pytest tests/test_model.py tests/test_matching.py`.
"""
import torch

from masks import answer_name, segments_used

# ----------------------------------------------------------------------------------
# Templates (App. S7). Marker strings such as <QUERY> are ordinary text, not new vocab.

IMAGE_PLACEHOLDER = "<|image_1|>"                                  # MMEB (Phi-3.5-V) placeholder
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"       # Qwen2-VL vision block
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER = "<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"

# Embedding input (SPEC §1): "USER: {image} {text} {task instruction} ASSISTANT:" + L_1..L_K
EMBED_TEMPLATES = {
    "chat": (SYSTEM + USER, ASSISTANT),   # MVQDM++ (default)
    "plain": ("", ""),                    # VLM2Vec layout: the MMEB string alone (Table 3, MVQDM)
}

# Matching prompt (App. S7, eight views), one string per segment of SPEC §3.
MATCH_INSTRUCTION = (
    'Compare the content inside <QUERY> and <DOC>. Determine whether the information in <DOC> '
    'is relevant to the query in <QUERY>. Answer only with "Yes" or "No", and wrap your answer '
    'in <ANSWER></ANSWER> tags.\n'
)
MATCH_P = SYSTEM + USER + MATCH_INSTRUCTION
MATCH_RAW = {"Q": ("<QUERY> ", " </QUERY>\n"), "D": ("<DOC> ", " </DOC>\n")}
MATCH_FEAT = {"Q": ("<QUERY> <feat_start>", "<feat_end> </QUERY>\n"),
              "D": ("<DOC> <feat_start>", "<feat_end> </DOC>\n")}
MATCH_H = ASSISTANT
MATCH_ANSWER = ("<ANSWER>", "</ANSWER>")
ANSWER_WORDS = ("Yes", "No")   # label l of Eq. 4: "Yes" for d⁺, "No" for d⁻

# ----------------------------------------------------------------------------------
# Built-in corpus for the tiny offline tokenizer (model.py trains a small byte-level BPE
# on it). It holds every template above, MMEB-style instructions and the vocabulary of
# the built-in synthetic data, so those texts tokenize into short sequences.

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
POSITIONS = ("left", "right", "top", "bottom", "center")
INSTRUCTIONS = (
    "Represent the given image for classification",
    "Represent the given image with the following question:",
    "Represent the given image.",
    "Represent the given image",
    "Represent the given text.",
    "Retrieve an image that matches the given caption:",
    "Find a caption describing the given image.",
    "Find an image caption describing the given image.",
    "Select the portion of the image that isolates the object labeled as",
    "Represent the given cropped image of the object",
    "Represent the answer to the question",
    "Represent the class label",
    "What colour is the", "What shape is on the", "How many objects are in the image?",
    "a picture of a", "on the", "and", "with", "is", "the", "of", "an", "image",
)


def tokenizer_corpus():
    """Deterministic list of strings the tiny BPE tokenizer is trained on."""
    templates = [MATCH_P, *MATCH_RAW["Q"], *MATCH_RAW["D"], *MATCH_FEAT["Q"], *MATCH_FEAT["D"],
                 MATCH_H, "".join((MATCH_ANSWER[0], "Yes", MATCH_ANSWER[1])),
                 "".join((MATCH_ANSWER[0], "No", MATCH_ANSWER[1])), *INSTRUCTIONS]
    lines = templates * 20          # as frequent as the data words, so templates get merges
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"a {c} {s}")
            for p in POSITIONS:
                lines.append(f"What colour is the {s} on the {p}? {c}")
                lines.append(f"a {c} {s} on the {p}")
    lines += [" ".join(str(i) for i in range(10)), "Yes No yes no"]
    return lines


# ----------------------------------------------------------------------------------
# Items: one (text, image) → content token ids (image pads expanded) + pixel values.

def content_text(text):
    """MMEB string → Qwen content string: <|image_1|> becomes the Qwen vision block."""
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_BLOCK)


def encode_item(processor, text, image=None, where="item"):
    """
    Encode one query or document once. `text` is the MMEB string (instruction included,
    `<|image_1|>` where the image goes), `image` a PIL image or None, `where` names the
    item in error messages (e.g. "VisDial row 17 qry").
    Returns {"ids": list[int], "pixel_values": (n_patch, C·p·p) or None,
             "image_grid_thw": (1, 3) or None}.
    """
    text = text or ""
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if image is None and not text.strip():
        raise ValueError(f"{where}: empty text and no image")
    if image is None and n_placeholders:
        raise ValueError(f"{where}: text has {IMAGE_PLACEHOLDER} but no image was given")
    if image is not None and n_placeholders != 1:
        raise ValueError(f"{where}: an image was given but the text has {n_placeholders} "
                         f"{IMAGE_PLACEHOLDER} placeholders (expected exactly 1): {text[:80]!r}")
    out = processor(text=[content_text(text)], images=[image] if image is not None else None,
                    return_tensors="pt")
    has_image = image is not None
    return {"ids": out["input_ids"][0].tolist(),
            "pixel_values": out["pixel_values"] if has_image else None,
            "image_grid_thw": out["image_grid_thw"] if has_image else None}


def _ids(tokenizer, s):
    return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []


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
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for n, r in enumerate(rows):
        input_ids[n, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[n, :len(r)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------
# Embedding batch (§3.2.1, SPEC §1)

def collate_embed(items, tokenizer, num_tokens, template="chat"):
    """
    items: encoded items (encode_item) of one side (queries or documents).
    Row n = template prefix + content + template suffix + K slots for the learnable
    tokens (filled with the pad id here; model.py overwrites their input embeddings).
    Right padding: a row's real tokens never see padding, so an item's embedding does
    not depend on the rest of the batch.
    Returns input_ids (N, T), attention_mask (N, T), slots (N, max(K,1)) = positions of
    the K learnable tokens (K = 0: the last real token, last-token pooling),
    pixel_values, image_grid_thw.
    """
    prefix, suffix = (_ids(tokenizer, s) for s in EMBED_TEMPLATES[template])
    pad_id = tokenizer.pad_token_id
    rows = [prefix + it["ids"] + suffix + [pad_id] * num_tokens for it in items]
    input_ids, attention_mask = _pad_right(rows, pad_id)
    lengths = torch.tensor([len(r) for r in rows])                          # (N,)
    K = max(num_tokens, 1)
    slots = lengths[:, None] - K + torch.arange(K)[None, :]                 # (N, K)
    pixel_values, image_grid_thw = _stack_images(items)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "slots": slots,
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw}


# ----------------------------------------------------------------------------------
# Matching batch (§3.2.3, Fig. 3, App. S7, SPEC §3)

def collate_match(q_items, pos_items, neg_items, tokenizer, views, rng):
    """
    One packed row per instance (q, d⁺, d⁻): segments P, Q, Zq, D1, Zd1, D2, Zd2, H,
    A_1..A_V (those the view set uses; masks.segments_used), d⁺ put in slot 1 or 2 by
    `rng` (a random.Random, seeded by the caller), the other slot gets d⁻.
    Feature segments hold one placeholder token whose input embedding model.py replaces
    by Z = MLP(E). Answer A_v = "<ANSWER>{label}</ANSWER>"; the logits at the position
    just before the label token predict it (Eq. 4).

    Returns
      input_ids (M, L) right-padded, attention_mask (M, L) (1 = real token),
      segments: per row a list of (name, length) in sequence order (masks.unified_mask),
      feat_pos (M, 3): positions of the Zq, Zd1, Zd2 feature tokens (-1 if absent),
      pos_slot (M,): 1 or 2, the slot holding d⁺,
      label_pos (M, V), labels (M, V): label-predicting positions and label token ids,
      pixel_values, image_grid_thw: the raw segments' images in sequence order,
      views: the view set (masks.VIEW_SETS), for the mask.
    """
    pad_id = tokenizer.pad_token_id
    feat_id = pad_id                                   # placeholder, overwritten by Z
    yes_id, no_id = (_ids(tokenizer, w)[0] for w in ANSWER_WORDS)
    used = segments_used(views)
    P = _ids(tokenizer, MATCH_P)
    H = _ids(tokenizer, MATCH_H)
    ans_open, ans_close = (_ids(tokenizer, s) for s in MATCH_ANSWER)
    raw_wrap = {k: tuple(_ids(tokenizer, s) for s in v) for k, v in MATCH_RAW.items()}
    feat_wrap = {k: tuple(_ids(tokenizer, s) for s in v) for k, v in MATCH_FEAT.items()}

    rows, segments, feat_pos, pos_slot, label_pos, labels, images = [], [], [], [], [], [], []
    for q, dp, dn in zip(q_items, pos_items, neg_items):
        slot = 1 if rng.random() < 0.5 else 2
        docs = {1: dp, 2: dn} if slot == 1 else {1: dn, 2: dp}
        content = {"Q": ("Q", q), "D1": ("D", docs[1]), "D2": ("D", docs[2])}
        ids, segs, fpos = [], [], {"Zq": -1, "Zd1": -1, "Zd2": -1}
        for name in used:
            if name == "P":
                seg = P
            elif name == "H":
                seg = H
            elif name in content:                       # raw view: wrapper + item content
                kind, item = content[name]
                seg = raw_wrap[kind][0] + item["ids"] + raw_wrap[kind][1]
                images.append(item)
            else:                                       # feature view: one token for Z
                kind = "Q" if name == "Zq" else "D"
                fpos[name] = len(ids) + len(feat_wrap[kind][0])
                seg = feat_wrap[kind][0] + [feat_id] + feat_wrap[kind][1]
            segs.append((name, len(seg)))
            ids += seg
        lpos, lab = [], []
        for v, (_, doc_seg) in enumerate(views):
            label = yes_id if doc_seg[-1] == str(slot) else no_id   # D1/Zd1 → slot 1
            lpos.append(len(ids) + len(ans_open) - 1)
            lab.append(label)
            seg = ans_open + [label] + ans_close
            segs.append((answer_name(v), len(seg)))
            ids += seg
        rows.append(ids)
        segments.append(segs)
        feat_pos.append([fpos["Zq"], fpos["Zd1"], fpos["Zd2"]])
        pos_slot.append(slot)
        label_pos.append(lpos)
        labels.append(lab)

    input_ids, attention_mask = _pad_right(rows, pad_id)
    pixel_values, image_grid_thw = _stack_images(images)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segments": segments,
            "feat_pos": torch.tensor(feat_pos), "pos_slot": torch.tensor(pos_slot),
            "label_pos": torch.tensor(label_pos), "labels": torch.tensor(labels),
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw, "views": tuple(views)}
