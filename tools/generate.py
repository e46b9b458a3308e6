"""
Does the embedding model still speak? Greedy generation (App. S9, Fig. 8–9) from any model
the repository takes: a raw backbone or tiny model, a train.py checkpoint (its LoRA
applied, or its fully fine-tuned backbone), a merged export (folder or hub id).

    python tools/generate.py --model tiny-qwen2-vl-chat --n 40
    python tools/generate.py --model runs/demo/checkpoint-2000 --n 40 --out runs/captions
    python tools/generate.py --model tiny-qwen2-vl-chat --model runs/demo/checkpoint-2000 --n 6 --out runs/s9
    python tools/generate.py --model Qwen/Qwen2-VL-2B-Instruct --image cat.jpg --prompt "Describe the image."

With --n, N held-out images of the demo's synthetic benchmark (--data, written if needed;
eval split only: two-object pair images of ShapesI2T and single objects of ShapesObjectT2I,
alternating) are captioned with CAPTION_PROMPT and scored against their reference captions.
The last line printed is one JSON object: exact, token_f1, distinct_2, repetition, mean_len
and n, overall and per image kind (pair, object); with several --model, one such object
per model under its name. --out writes captions.jsonl, table.md and table.png: one row
per image, the image, its reference and each model's caption side by side (Fig. 8–9).

Decoding: argmax, one token at a time, the whole sequence run again at each step (no KV
cache: the plain reference loop), stopping after <|im_end|> or the model's end token, at
most --max_new_tokens. tests/test_generate.py checks it equals transformers'
generate(do_sample=False) and the metrics against hand-worked cases.

Metrics (caption_metrics). exact and token_f1 (SQuAD's F1 of the word multisets) on words:
lower-cased, punctuation and the articles a / an / the removed (VQA's normalisation);
distinct_2 = distinct bigrams / all bigrams over all captions (Li et al. 2016) and
repetition = the share of generated tokens that lie inside a 3-gram occurring more than
once in its caption (degeneration, Holtzman et al. 2020), both on the model's generated
tokens (so "YesNoYesNo", one word, shows as repetition); mean_len in words.
"""
import argparse
import collections
import json
import os
import re
import string
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load_rematch  # noqa: E402
from util.chat_templates import QWEN2VL_CHAT_TEMPLATE, QWEN3VL_CHAT_TEMPLATE  # noqa: E402
from util.inputs import load_image  # noqa: E402

CAPTION_PROMPT = "Describe the image."
END_TOKEN = "<|im_end|>"

# ----------------------------------------------------------------------------------
# Decoding


def chat_prompt(tokenizer, prompt, has_image=True, family="qwen2_vl"):
    """The family's own chat template (util/chat_templates.py, as the hub checkpoints hold it;
    a merged export's tokenizer carries the embedding template instead) around one user turn
    (the image, then the prompt), with the assistant's turn opened."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    template = QWEN3VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2VL_CHAT_TEMPLATE
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, chat_template=template)


def model_inputs(processor, prompt, image, family="qwen2_vl"):
    """input_ids (1, T) and the processor's other tensors for one (image, prompt)."""
    text = chat_prompt(processor.tokenizer, prompt, image is not None, family)
    return dict(processor(text=[text], images=[image] if image is not None else None, return_tensors="pt"))


def stop_ids(backbone, tokenizer):
    """Token ids that end an answer: <|im_end|> and the generation config's end token(s)."""
    ids = {tokenizer.convert_tokens_to_ids(END_TOKEN)}
    eos = getattr(backbone.generation_config, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids


@torch.no_grad()
def greedy(backbone, processor, image, prompt, max_new_tokens=24):
    """The generated token ids (the end token included when reached) for one input."""
    family = backbone.config.model_type
    batch = {k: v.to(backbone.device) for k, v in model_inputs(processor, prompt, image, family).items()}
    ids = batch.pop("input_ids")                                          # (1, T)
    mm = batch.pop("mm_token_type_ids", None)                             # (1, T) or None
    batch.pop("attention_mask")
    stop, out = stop_ids(backbone, processor.tokenizer), []
    for _ in range(max_new_tokens):
        extra = {"mm_token_type_ids": mm} if mm is not None else {}
        logits = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, **batch).logits  # (1, T, V)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)                # (1, T + 1)
        if mm is not None:
            mm = torch.cat([mm, mm.new_zeros(1, 1)], dim=1)
    return out


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------
# Metrics

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def words(text):
    """Lower-cased words, punctuation removed."""
    return _PUNCT.sub(" ", text.lower()).split()


def answer_words(text):
    """words() without articles (VQA's normalisation), for exact and token_f1."""
    return [w for w in words(text) if w not in ("a", "an", "the")]


def token_f1(prediction, reference):
    """SQuAD's F1 of the two word multisets (1.0 when both are empty)."""
    p, r = answer_words(prediction), answer_words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def repeated_share(ws, n=3):
    """(words inside an n-gram that occurs more than once in ws, len(ws))."""
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    counts = collections.Counter(grams)
    inside = set()
    for i, g in enumerate(grams):
        if counts[g] > 1:
            inside.update(range(i, i + n))
    return len(inside), len(ws)


def caption_metrics(predictions, references, tokens=None):
    """{exact, token_f1, distinct_2, repetition, mean_len, n} of paired captions (module doc).
    tokens: the generated token ids of each caption (end token left out); given, distinct_2
    and repetition count model tokens (degeneration without spaces, "YesNoYesNo", shows),
    else words."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"caption_metrics: {len(predictions)} predictions for {len(references)} references")
    ws = [words(p) for p in predictions]
    units = ws if tokens is None else [list(t) for t in tokens]
    bigrams = [tuple(w[i:i + 2]) for w in units for i in range(len(w) - 1)]
    rep = [repeated_share(w) for w in units]
    n = len(predictions)
    return {"exact": sum(answer_words(p) == answer_words(r) for p, r in zip(predictions, references)) / n,
            "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "repetition": sum(a for a, _ in rep) / max(1, sum(b for _, b in rep)),
            "mean_len": sum(len(w) for w in ws) / n, "n": n}


# ----------------------------------------------------------------------------------
# Held-out demo images


def heldout_images(data_dir, n, seed=0):
    """[(image path, reference caption, kind)] of n held-out EVAL images of the synthetic
    benchmark under data_dir (written with make_synthetic(data_dir, seed) if missing):
    ShapesI2T's pair images (reference: the positive caption) and ShapesObjectT2I's target
    objects (reference: the query's phrase), alternating, each image once."""
    from demo.synthetic import T2I_QUERY, make_synthetic
    from util.inputs import read_rows
    paths = make_synthetic(data_dir, seed=seed)
    read = lambda task: read_rows([os.path.join(paths["eval"], task, "test-00000-of-00001.parquet")])  # noqa: E731
    pairs = [(r["qry_img_path"], r["tgt_text"][0], "pair") for r in read("ShapesI2T")]
    prefix = T2I_QUERY.format("")
    objects = [(r["tgt_img_path"][0], r["qry_text"][len(prefix):], "object") for r in read("ShapesObjectT2I")]
    out, seen = [], set()
    for k in range(max(len(pairs), len(objects))):
        for kind in (pairs, objects):
            if k < len(kind) and kind[k][0] not in seen:
                seen.add(kind[k][0])
                out.append((os.path.join(paths["image_dir"], kind[k][0]), *kind[k][1:]))
    if n > len(out):
        raise ValueError(f"--n {n}: the benchmark under {data_dir} holds {len(out)} distinct held-out images")
    return out[:n]


def score(captions, refs, kinds, tokens=None):
    """caption_metrics overall and per image kind."""
    out = caption_metrics(captions, refs, tokens)
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = caption_metrics([captions[i] for i in idx], [refs[i] for i in idx],
                                    None if tokens is None else [tokens[i] for i in idx])
    return out


def answers(backbone, processor, pictures, prompt=CAPTION_PROMPT, max_new_tokens=24):
    """(texts, token ids without the stop tokens): the backbone's greedy answers to `prompt`
    about each picture."""
    stop = stop_ids(backbone, processor.tokenizer)
    ids = [[t for t in greedy(backbone, processor, im, prompt, max_new_tokens) if t not in stop] for im in pictures]
    return [decode(processor.tokenizer, t) for t in ids], ids


def generate_all(name, pictures, prompt=CAPTION_PROMPT, max_new_tokens=24, device=None):
    """answers() of model `name` (anything load_rematch takes)."""
    model, processor, _ = load_rematch(name, device=device)
    return answers(model.backbone, processor, pictures, prompt, max_new_tokens)


def caption_heldout(name, data_dir, n, seed=0, device=None):
    """(score, captions, items): model `name` captions n held-out demo images (heldout_images)."""
    items = heldout_images(data_dir, n, seed)
    caps, ids = generate_all(name, [load_image(i) for i, _, _ in items], device=device)
    return score(caps, [r for _, r, _ in items], [k for _, _, k in items], ids), caps, items


# ----------------------------------------------------------------------------------
# Side-by-side output (Fig. 8–9)


def write_table(out_dir, images, refs, captions_by_model):
    """captions.jsonl, table.md and table.png: per image its reference and every model's caption."""
    from PIL import Image, ImageDraw
    os.makedirs(out_dir, exist_ok=True)
    names = list(captions_by_model)
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
        for i, (im, ref) in enumerate(zip(images, refs)):
            f.write(json.dumps({"image": os.path.basename(im), "reference": ref,
                                **{m: captions_by_model[m][i] for m in names}}) + "\n")
    flat = lambda s: str(s).replace("\n", " / ")                       # noqa: E731 (a line break: " / ")
    cell = lambda s: flat(s).replace("|", "\\|")                       # noqa: E731
    lines = ["| image | reference | " + " | ".join(cell(m) for m in names) + " |",
             "|---|---|" + "---|" * len(names)]
    lines += [f"| {os.path.basename(im)} | {cell(ref)} | " + " | ".join(cell(captions_by_model[m][i]) for m in names) + " |"
              for i, (im, ref) in enumerate(zip(images, refs))]
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    thumb, col, line_h = 112, 260, 12

    def wrap(text):
        """About 40 characters a line, a line break shown as " / " (drawn lines never overlap)."""
        text = flat(text)
        return [text[i:i + 40] for i in range(0, len(text), 40)] or [""]
    rows_h = [max(thumb, line_h * (1 + max(len(wrap(t)) for t in [refs[i]] + [captions_by_model[m][i] for m in names])))
              for i in range(len(images))]
    W, H = thumb + 8 + col * (1 + len(names)), line_h + 4 + sum(r + 6 for r in rows_h)
    sheet = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(sheet)
    for k, title in enumerate(["reference"] + names):
        draw.text((thumb + 8 + k * col, 2), title[-40:], fill="black")
    y = line_h + 4
    for i, im in enumerate(images):
        pic = load_image(im)
        pic.thumbnail((thumb, thumb))
        sheet.paste(pic, (0, y))
        for k, text in enumerate([refs[i]] + [captions_by_model[m][i] for m in names]):
            for j, piece in enumerate(wrap(text)):
                draw.text((thumb + 8 + k * col, y + j * line_h), piece, fill="black" if k else "gray")
        y += rows_h[i] + 6
    sheet.save(os.path.join(out_dir, "table.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="a raw backbone / tiny-* / train.py checkpoint / merged export (repeatable: side by side)")
    p.add_argument("--label", action="append", default=[],
                   help="a name for each --model, in order (the table's columns and the JSON's keys; default: the model)")
    p.add_argument("--n", type=int, default=None, help="caption N held-out demo images and score them")
    p.add_argument("--data", default="runs/demo_captions/demo_data",
                   help="the synthetic benchmark's folder (written if missing)")
    p.add_argument("--seed", type=int, default=0, help="the synthetic benchmark's seed (--n)")
    p.add_argument("--image", action="append", default=[], help="an image to answer about (repeatable)")
    p.add_argument("--prompt", default=CAPTION_PROMPT, help=f"the user prompt (default {CAPTION_PROMPT!r})")
    p.add_argument("--max_new_tokens", type=int, default=24, help="tokens generated at most")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="write captions.jsonl, table.md and table.png here")
    a = p.parse_args(argv)
    if (a.n is None) == (not a.image):
        p.error("give --n (held-out demo images) or --image (your own), not both")
    if a.label and len(a.label) != len(a.model):
        p.error(f"--label: give one per --model ({len(a.model)}), got {len(a.label)}")
    if len(set(a.label or a.model)) != len(a.model):
        p.error("each --model (or its --label) must be distinct: the table has a column per name")
    if a.n is not None and a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if a.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if a.n is not None:
        items = heldout_images(a.data, a.n, a.seed)
        images, refs, kinds = [i for i, _, _ in items], [r for _, r, _ in items], [k for _, _, k in items]
    else:
        images, refs, kinds = a.image, [""] * len(a.image), ["image"] * len(a.image)
    pictures = [load_image(im, where=f"--image {im}" if a.n is None else "held-out image") for im in images]
    captions, results = {}, {}
    for name, model in zip(a.label or a.model, a.model):
        captions[name], ids = generate_all(model, pictures, a.prompt, a.max_new_tokens, a.device)
        for im, ref, c in zip(images, refs, captions[name]):
            print(f"[{name}] {os.path.basename(im)}: {c}" + (f"   (reference: {ref})" if ref else ""))
        if a.n is not None:
            results[name] = score(captions[name], refs, kinds, ids)
    if a.out:
        write_table(a.out, images, refs, captions)
        print(f"wrote {a.out}/captions.jsonl, table.md, table.png")
    if a.n is not None:
        print(json.dumps(next(iter(results.values())) if len(a.model) == 1 else results))
        return results
    return captions


if __name__ == "__main__":
    main()
