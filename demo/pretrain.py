r"""
`tiny-qwen2-vl-chat`: the demo's tiny backbone taught to speak about the demo's images
before ReMatch sees it — demo machinery, not part of ReMatch.

The paper starts from an instruction-tuned MLLM: its matching stage (Eq. 4) "leverages the
generative strength" of the backbone, and App. S9 checks that the embedding model still
captions. The random `tiny-qwen2-vl` has no generative strength to leverage or lose. This
file gives it some, offline and deterministically: next-token training (loss on the
answer only) of `tiny-qwen2-vl` (seed 0, full fine-tuning) on chat-template conversations
about the synthetic benchmark's TRAIN split — never an eval image — in two stages:

  1. verification (PRETRAIN["verify_steps"] steps at verify_lr): colour claims about single
     objects, answered by first saying what the image shows, then deciding:
       "Does the image show red? Answer Yes or No." → "red\nYes"   /   "blue\nNo"
     (both answers equally often: the row's positive and its hard negative). A bare
     "Yes"/"No" stays at chance on this 2-layer model (docs/demo.md §6.1): stating the
     colour first reduces the comparison to token equality, which it learns.
  2. the mix (PRETRAIN["steps"] steps at lr), each batch item drawn from the verification
     conversations with probability verify_share, else from
       object images     "Describe the image." → "a red circle"; "What is shown?" → "red circle"
       pair images       "Describe the image." → "a red circle on the left and a blue square on the right"
       the VQA questions "What colour is the object?" → "red"  (and shape)
       counting          "How many objects are in the image?" → "one" / "two" / "four"
     so that the verification of stage 1 is kept while the model learns to caption.

Each stage: AdamW (weight decay 0.01, a fresh optimiser), batch 32, 50 warm-up steps then
cosine to 0.1×, grad norm clipped at 1.0. Built on first use by
util.backbone.load_backbone("tiny-qwen2-vl-chat") and cached under $HF_HOME/rematch/
(a fresh HF_HOME rebuilds it; under torchrun rank 0 builds, the others wait), with
build.json: the settings and the held-out figures measured right after the build
(tools/generate.py's caption metrics on held-out EVAL images; balanced Yes/No accuracy of
the generated answer on held-out colour claims about single objects — what it was taught —
and on held-out pair captions, which it was not).

    python -m demo.pretrain                  # build (or reuse) and print build.json
Tests: pytest tests/test_pretrain.py
"""
import functools
import json
import math
import os
import random
import re
import shutil

import torch

CHAT_MODEL = "tiny-qwen2-vl-chat"
BASE_MODEL = "tiny-qwen2-vl"
PRETRAIN = {"version": 3, "base": BASE_MODEL, "seed": 0, "steps": 1000, "batch_size": 32, "lr": 1e-3,
            "weight_decay": 0.01, "warmup_steps": 50, "min_lr_ratio": 0.1, "clip": 1.0, "data_seed": 0,
            "verify_steps": 300, "verify_lr": 3e-3, "verify_share": 0.25}
DESCRIBE, WHAT, COUNT = "Describe the image.", "What is shown?", "How many objects are in the image?"
VERIFY = "Does the image show {}? Answer Yes or No."
COUNT_WORDS = {"object": "one", "pair": "two", "scene": "four"}
BUILD_THREADS = 2       # the build's torch threads, whatever the caller set (the weights depend on it)


# ----------------------------------------------------------------------------------
# Conversations about the TRAIN split


def _phrase(label):
    """"red circle" → "a red circle", "orange square" → "an orange square"."""
    return ("an " if label[0] in "aeiou" else "a ") + label


def _label(image_path):
    """An object image's "colour shape", read off its file name (images/object/red-circle-j03.png)."""
    colour, shape, _ = os.path.basename(image_path).split("-", 2)
    return f"{colour} {shape}"


def conversations(train_dir):
    """[(image path relative to the benchmark root, prompt, answer)]: the mix's chat
    conversations from the synthetic benchmark's TRAIN parquet files (demo.synthetic), in a
    fixed order. The verification prompts are verifications()'s."""
    from demo.synthetic import DEMO_TRAIN_SUBSETS, T2I_QUERY
    from util.inputs import read_rows
    out = []

    def about(image, kind):
        """What any training image teaches: its count, and for a single object its caption."""
        out.append((image, COUNT, COUNT_WORDS[kind]))
        if kind == "object":
            out.append((image, DESCRIBE, _phrase(_label(image))))
            out.append((image, WHAT, _label(image)))

    for subset in DEMO_TRAIN_SUBSETS:
        for r in read_rows([os.path.join(train_dir, subset, "original-00000-of-00001.parquet")]):
            q, qi, pos, pi, ni = r["qry"], r["qry_image_path"], r["pos_text"], r["pos_image_path"], r["neg_image_path"]
            if subset in ("ShapesCLS", "ShapesColour", "ShapesShape"):
                about(qi, "object")
            elif subset == "ShapesVQA":
                out.append((qi, q.split(": ", 1)[1], pos))                  # the question → its answer
            elif subset == "ShapesI2T":
                about(qi, "pair")
                out.append((qi, DESCRIBE, pos))
            elif subset == "ShapesT2I":
                about(pi, "pair")
                out.append((pi, DESCRIBE, q[len(T2I_QUERY.format("")):]))
            elif subset == "ShapesVG":
                about(qi, "scene")
                about(pi, "object")
                about(ni, "object")
    return out


def verifications(train_dir):
    """[(image, VERIFY about a colour, "<the image's colour>\\n<Yes|No>")] from ShapesColour's
    TRAIN rows: the row's positive colour (Yes) and its hard negative (No), each answer
    first stating the colour the image shows."""
    from util.inputs import read_rows
    out = []
    for r in read_rows([os.path.join(train_dir, "ShapesColour", "original-00000-of-00001.parquet")]):
        shown = _label(r["qry_image_path"]).split()[0]
        out.append((r["qry_image_path"], VERIFY.format(r["pos_text"]), f"{shown}\nYes"))
        out.append((r["qry_image_path"], VERIFY.format(r["neg_text"]), f"{shown}\nNo"))
    return out


# ----------------------------------------------------------------------------------
# Next-token training on the answers


class ChatBatches:
    """Batches of full conversations for next-token training, each image run through the
    image processor and each conversation through the chat template and the tokenizer once
    (cached: about a sixth of a build's time otherwise): input_ids (N, T) right padded, attention_mask,
    mm_token_type_ids (1 at image tokens), pixel_values, image_grid_thw, and labels (N, T)
    = the answer tokens and <|im_end|>, -100 elsewhere. Equal to the processor's own batch
    of the same texts and images (tests/test_pretrain.py)."""

    def __init__(self, processor, images):
        self.processor, self.tok, self.images, self.pixels = processor, processor.tokenizer, images, {}
        self.tokens = {}                                                    # conversation → (ids, answer length)
        self.pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.merge = processor.image_processor.merge_size ** 2

    def image(self, path):
        if path not in self.pixels:
            out = self.processor.image_processor(images=[self.images[path]], return_tensors="pt")
            self.pixels[path] = (out["pixel_values"], out["image_grid_thw"])   # (n, C·P²), (1, 3)
        return self.pixels[path]

    def ids(self, conv, grid):
        if conv not in self.tokens:
            from tools.generate import END_TOKEN, chat_prompt
            path, prompt, answer = conv
            n = int(grid.prod()) // self.merge                                  # merged image tokens
            text = chat_prompt(self.tok, prompt).replace("<|image_pad|>", "<|image_pad|>" * n, 1)
            a = self.tok(answer + END_TOKEN, add_special_tokens=False)["input_ids"]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + a      # the answer tokenised alone
            self.tokens[conv] = (ids, len(a))
        return self.tokens[conv]

    def __call__(self, convs):
        rows, answers, pixels, grids = [], [], [], []
        for conv in convs:
            pv, grid = self.image(conv[0])
            ids, k = self.ids(conv, grid)
            rows.append(ids)
            answers.append(k)
            pixels.append(pv)
            grids.append(grid)
        T = max(map(len, rows))
        input_ids = torch.full((len(rows), T), self.tok.pad_token_id)         # (N, T)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), -100)
        for r, (ids, k) in enumerate(zip(rows, answers)):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention_mask[r, :len(ids)] = 1
            labels[r, len(ids) - k:len(ids)] = input_ids[r, len(ids) - k:len(ids)]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "mm_token_type_ids": (input_ids == self.pad).long(),
                 "pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
        return batch, labels


def lr_at(step, cfg):
    """Linear warm-up, then cosine from lr to min_lr_ratio · lr."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    t = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(data_root, cfg=None, progress=True):
    """(model, processor) of BASE_MODEL after the two stages of cfg (default: PRETRAIN) on
    the conversations of the benchmark under data_root (written if missing). Deterministic in cfg."""
    cfg = cfg or PRETRAIN
    from demo.synthetic import make_synthetic
    from util.backbone import load_backbone
    from util.inputs import load_image
    paths = make_synthetic(data_root, seed=cfg["data_seed"])
    chat, verify = conversations(paths["train"]), verifications(paths["train"])
    images = {i: load_image(os.path.join(paths["image_dir"], i)) for i in sorted({c[0] for c in chat + verify})}
    model, processor = load_backbone(cfg["base"], device="cpu", dtype=torch.float32, seed=cfg["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)          # float sums split by thread: one count, one set of weights
    try:
        stage1 = dict(cfg, steps=cfg["verify_steps"], lr=cfg["verify_lr"])
        _train(model, processor, [(verify, 1.0)], images, stage1, progress, "1 verification")
        share = cfg["verify_share"]
        return _train(model, processor, [(verify, share), (chat, 1 - share)], images, cfg, progress, "2 the mix")
    finally:
        torch.set_num_threads(threads)


def _train(model, processor, pools, images, cfg, progress, stage):
    """cfg["steps"] steps of next-token training, each batch item drawn from the pools
    [(conversations, probability)]: a pool by its probability, then a conversation of it."""
    from tqdm import tqdm
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    rng = random.Random(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    batches = ChatBatches(processor, images)

    def draw():
        u = rng.random()
        for convs, p in pools:
            if u < p:
                break
            u -= p
        return convs[rng.randrange(len(convs))]
    for step in tqdm(range(cfg["steps"]), desc=f"pretrain {CHAT_MODEL}: stage {stage}", disable=not progress):
        batch, labels = batches([draw() for _ in range(cfg["batch_size"])])
        logits = model(**batch).logits                                          # (N, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain {CHAT_MODEL}: non-finite loss at step {step} of stage {stage}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
    return model.eval(), processor


# ----------------------------------------------------------------------------------
# Held-out figures


def final_yes_no(text):
    """The last "Yes" or "No" word of a generated answer ("blue\\nNo" → "No"), or None."""
    found = re.findall(r"\b(Yes|No)\b", text)
    return found[-1] if found else None


@torch.no_grad()
def yes_no_accuracy(model, processor, data_root, n=40, max_new_tokens=24):
    """Balanced accuracies (the mean of the Yes rate on true claims and the No rate on false
    ones; chance 0.5 whatever the model's bias) of the final Yes/No in the greedy answer to
    held-out verification prompts about the seed's EVAL images:
      "yes_no": colour claims about n single objects of ShapesCLS (the object's colour
        against another colour, drawn with seed 0) — what the build teaches;
      "yes_no_pairs": n pair images of ShapesI2T, their caption against another pair's
        (candidate 15, no twin), and "yes_no_binding": against the attribute-swapped twin
        (candidate 1) — never taught."""
    from demo.synthetic import COLOURS, make_synthetic
    from tools.generate import decode, greedy
    from util.inputs import load_image, read_rows
    paths = make_synthetic(data_root, seed=PRETRAIN["data_seed"])
    read = lambda task: read_rows([os.path.join(paths["eval"], task, "test-00000-of-00001.parquet")])  # noqa: E731

    @functools.cache
    def says(image_path, claim):
        image = load_image(os.path.join(paths["image_dir"], image_path))
        ids = greedy(model, processor, image, VERIFY.format(claim), max_new_tokens=max_new_tokens)
        return final_yes_no(decode(processor.tokenizer, ids))

    def balanced(cases):                                      # [(image, true claim, false claim)]
        yes = sum(says(i, t) == "Yes" for i, t, _ in cases) / len(cases)
        return (yes + sum(says(i, f) == "No" for i, _, f in cases) / len(cases)) / 2, yes
    objects = sorted({r["qry_img_path"] for r in read("ShapesCLS")})[:n]
    rng = random.Random(0)
    colours = [_label(i).split()[0] for i in objects]
    on_colours, yes_rate = balanced([(i, c, rng.choice([x for x in COLOURS if x != c])) for i, c in zip(objects, colours)])
    pairs = read("ShapesI2T")[:n]
    return {"yes_no": on_colours, "yes_rate_on_true_colours": yes_rate,
            "yes_no_pairs": balanced([(r["qry_img_path"], r["tgt_text"][0], r["tgt_text"][-1]) for r in pairs])[0],
            "yes_no_binding": balanced([(r["qry_img_path"], r["tgt_text"][0], r["tgt_text"][1]) for r in pairs])[0]}


def heldout_figures(model, processor, data_root, n_captions=60):
    """{"captions": tools/generate.py's metrics on n held-out images, and yes_no_accuracy's}."""
    from tools.generate import answers, heldout_images, score
    from util.inputs import load_image
    items = heldout_images(data_root, n_captions, PRETRAIN["data_seed"])
    caps, ids = answers(model, processor, [load_image(i) for i, _, _ in items])
    return {"captions": score(caps, [r for _, r, _ in items], [k for _, _, k in items], ids),
            **yes_no_accuracy(model, processor, data_root)}


# ----------------------------------------------------------------------------------
# The cache


def cache_dir():
    """$HF_HOME/rematch/tiny-qwen2-vl-chat-v<version>: where the built backbone lives."""
    from huggingface_hub import constants
    return os.path.join(constants.HF_HOME, "rematch", f"{CHAT_MODEL}-v{PRETRAIN['version']}")


def chat_backbone(progress=True):
    """The folder of the built tiny-qwen2-vl-chat (a plain Qwen2-VL checkpoint), built now if
    the cache holds none for these settings (rank 0 builds, then the others read it)."""
    from util.inputs import rank0_first
    return rank0_first(lambda: _build_once(progress))


def _build_once(progress):
    """Under a file lock beside the cache folder: two processes of one machine (two runs,
    two test workers) never build at once, and the second reads what the first built."""
    from filelock import FileLock
    path = cache_dir()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):
        return _build_locked(path, progress)


def built(path):
    """`path` holds a complete build of these settings (build.json, written last, names them)."""
    marker = os.path.join(path, "build.json")
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return json.load(f).get("settings") == PRETRAIN


def _build_locked(path, progress):
    import time

    from util.backbone import save_backbone
    from util.dist import print0
    if built(path):
        return path
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print0(f"building {CHAT_MODEL} (once, cached in {path}): {PRETRAIN['steps']} steps of generative "
           f"pretraining on the demo's TRAIN conversations")
    t0 = time.time()
    model, processor = pretrain(os.path.join(tmp, "demo_data"), PRETRAIN, progress=progress)
    seconds = time.time() - t0
    figures = heldout_figures(model, processor, os.path.join(tmp, "demo_data"))
    save_backbone(model, processor, os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", "build.json"), "w") as f:      # written last: a complete build
        json.dump({"settings": PRETRAIN, "seconds": round(seconds, 1), "heldout": figures}, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(os.path.join(tmp, "model"), path)
    shutil.rmtree(tmp, ignore_errors=True)
    print0(f"{CHAT_MODEL}: built in {seconds:.0f} s; held-out caption token F1 "
           f"{figures['captions']['token_f1']:.3f}, Yes/No on colour claims {figures['yes_no']:.3f}")
    return path


if __name__ == "__main__":
    p = chat_backbone()
    print(open(os.path.join(p, "build.json")).read())
