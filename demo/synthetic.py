"""
The built-in synthetic benchmark of the CPU demo: coloured shapes written in MMEB's own
parquet schema and folder layout, so the very readers that train on MMEB-train and score
MMEB-eval (data.py, evaluate.py) train and score the demo. Nothing here is ReMatch: it is
the test bench the tiny model learns on in minutes.

    root/train/<Subset>/original-00000-of-00001.parquet   MMEB-train columns + neg_*
    root/eval/<Task>/test-00000-of-00001.parquet          MMEB-eval columns
    root/images/{object,pair,scene}/*.png                 paths relative to root

Training subsets (DEMO_TRAIN_SUBSETS) and eval tasks (DEMO_EVAL_TASKS, name → (meta-task,
IND)) carry MMEB's four meta-tasks, so each gets the target prompt of its meta-task.

Run: `python -c "from demo import make_synthetic; print(make_synthetic('runs/shapes'))"`
(train.py does this itself when it gets no --train_data). Tests: pytest tests/test_demo.py
"""
import json
import os
import random

from data import IMAGE_PLACEHOLDER, with_target_instruction

# Training subsets, and eval tasks → (meta-task, IND). ShapesObjectT2I is out-of-domain:
# no training subset has its form (a one-object caption → single-object images).
DEMO_TRAIN_SUBSETS = ["ShapesColour", "ShapesShape", "ShapesCLS", "ShapesVQA", "ShapesT2I",
                      "ShapesI2T", "ShapesVG"]
DEMO_EVAL_TASKS = {
    "ShapesColour": ("Classification", True),
    "ShapesShape": ("Classification", True),
    "ShapesCLS": ("Classification", True),
    "ShapesVQA": ("VQA", True),
    "ShapesT2I": ("Retrieval", True),
    "ShapesI2T": ("Retrieval", True),
    "ShapesObjectT2I": ("Retrieval", False),
    "ShapesVG": ("Grounding", True),
}
DEMO_META = {t: meta for t, (meta, _) in DEMO_EVAL_TASKS.items()}   # subset/task → meta-task
# Binding tasks: their hardest candidates have the positive's very words, bound otherwise
# (which colour goes with which shape, which side). The embedding learns them; a 2-layer
# model's matching head does not within the demo's minutes (docs/demo.md §3), so the demo
# reports their matching accuracy apart from the other tasks' instead of averaging it in.
DEMO_BINDING_TASKS = ("ShapesT2I", "ShapesI2T")


def _with_target(text, task):
    """A demo document with its meta-task's target prompt (data.with_target_instruction)."""
    return with_target_instruction(text, task, DEMO_META[task])


# Rows of ShapesColour and ShapesShape as a multiple of make_synthetic's train_rows (the
# other subsets get train_rows; batches are drawn in proportion): colour is learnt early,
# shape is the judgment the matching head needs most steps for (docs/demo.md §3.4).
TRAIN_SHARE = {"ShapesColour": 0.5, "ShapesShape": 2.0}

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")   # 6 × 4 = 24 objects
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right")                                      # halves of a pair image

# Objects are "colour shape" (6 × 4 = 24), drawn large on white: single objects and crops
# 56×56 (4 image tokens with the tiny processor), pairs 112×56 (left/right, 8 tokens),
# scenes 112×112 (4 quadrants, 16 tokens). A crop of a scene quadrant is pixel-identical
# to the single-object render with the same jitter, so crops reuse the object files.
# Held out for eval: 20% of the ordered object pairs whose colours and shapes both differ
# (their captions and images never occur in training), and every eval
# image is rendered at object size 40 px, train images at 36 or 44 px.

COLOUR_RGB = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (40, 80, 220),
              "yellow": (235, 195, 0), "purple": (140, 40, 170), "orange": (250, 130, 10)}
CELL = 56
JITTER = [(size, dx, dy) for size in (36, 40, 44) for dx in (-4, 0, 4) for dy in (-4, 0, 4)]
TRAIN_JITTER = [j for j, (size, _, _) in enumerate(JITTER) if size != 40]   # 18 renders
EVAL_JITTER = [j for j, (size, _, _) in enumerate(JITTER) if size == 40]    # 9 renders

CLS_QUERY = IMAGE_PLACEHOLDER + "\nRepresent the given image for classification"
COLOUR_QUERY = IMAGE_PLACEHOLDER + "\nRepresent the given image for colour classification"
SHAPE_QUERY = IMAGE_PLACEHOLDER + "\nRepresent the given image for shape classification"
VQA_QUERY = IMAGE_PLACEHOLDER + "\nRepresent the given image with the following question: {}"
T2I_QUERY = "Retrieve an image that matches the given caption: {}"
I2T_QUERY = IMAGE_PLACEHOLDER + "\nFind a caption describing the given image."
VG_QUERY = IMAGE_PLACEHOLDER + "\nSelect the portion of the image that isolates the object labeled as '{}'"
IMAGE_DOC = IMAGE_PLACEHOLDER + "\nRepresent the given image."
CROP_DOC = IMAGE_PLACEHOLDER + "\nRepresent the given cropped image of the object"
PAIR_CAPTION = "{} on the left and {} on the right"      # e.g. "a red circle on the left and ..."
# VQA asks one attribute of a single object: a judgment a tiny model makes at one token.
VQA_QUESTIONS = {"colour": "What colour is the object?", "shape": "What shape is the object?"}
VQA_ANSWERS = COLOURS + SHAPES
SYNTHETIC_TEMPLATES = (CLS_QUERY, COLOUR_QUERY, SHAPE_QUERY, VQA_QUERY.format(""), T2I_QUERY.format(""),
                       I2T_QUERY, VG_QUERY.format(""), IMAGE_DOC, CROP_DOC)


def _objects():
    return [(c, s) for c in COLOURS for s in SHAPES]


def _pairs():
    """Ordered (left, right) pairs of two different objects (552)."""
    return [(a, b) for a in _objects() for b in _objects() if a != b]


def _label(obj):
    return f"{obj[0]} {obj[1]}"


def _phrase(obj):
    """"a red circle", "an orange square"."""
    return f"{'an' if obj[0][0] in 'aeiou' else 'a'} {obj[0]} {obj[1]}"


def _caption(pair):
    return PAIR_CAPTION.format(_phrase(pair[0]), _phrase(pair[1]))


def _twins(pair):
    """The attribute-swapped versions of a pair (same words, other binding): colours
    swapped, shapes swapped, sides swapped — those that differ from it."""
    (c1, s1), (c2, s2) = a, b = pair
    out = []
    for t in (((c2, s1), (c1, s2)), ((c1, s2), (c2, s1)), (b, a)):
        if t != pair and t[0] != t[1] and t not in out:
            out.append(t)
    return out


def _other(word, rng):
    """Another word of the same attribute (a colour for a colour, a shape for a shape)."""
    return rng.choice([w for w in (COLOURS if word in COLOURS else SHAPES) if w != word])


def synthetic_texts():
    """Every query/document string make_synthetic can write (documents with their
    target instruction), for the tiny tokenizer's corpus."""
    labels = [_label(o) for o in _objects()]
    captions = [_caption(p) for p in _pairs()]
    return ([CLS_QUERY, COLOUR_QUERY, SHAPE_QUERY, I2T_QUERY, IMAGE_DOC, CROP_DOC]
            + [VG_QUERY.format(x) for x in labels]
            + [T2I_QUERY.format(x) for x in [_phrase(o) for o in _objects()] + captions]
            + [VQA_QUERY.format(q) for q in VQA_QUESTIONS.values()]
            + [_with_target(x, "ShapesCLS") for x in labels + list(COLOURS + SHAPES)]
            + [_with_target(x, "ShapesVQA") for x in VQA_ANSWERS]
            + [_with_target(x, "ShapesI2T") for x in captions])


class _ImageWriter:
    """Renders and writes each image once (PNG, deterministic); returns relative paths."""

    def __init__(self, root):
        self.root, self.written = root, set()

    def _save(self, rel, render):
        if rel not in self.written:
            path = os.path.join(self.root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            render().save(path)
            self.written.add(rel)
        return rel

    @staticmethod
    def _cell(obj, j):
        from PIL import Image, ImageDraw
        (colour, shape), (size, dx, dy) = obj, JITTER[j]
        im = Image.new("RGB", (CELL, CELL), "white")
        draw, fill = ImageDraw.Draw(im), COLOUR_RGB[colour]
        x0, y0 = CELL // 2 + dx - size // 2, CELL // 2 + dy - size // 2
        x1, y1 = x0 + size - 1, y0 + size - 1
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0 + 3, y0 + 3, x1 - 3, y1 - 3), fill=fill)   # area ≈ the circle's
        elif shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:                                                            # cross
            w = size // 3
            draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
            draw.rectangle((x0, y0 + w, x1, y1 - w), fill=fill)
        return im

    @staticmethod
    def _name(cells):
        return "_".join(f"{c}-{s}-j{j:02d}" for (c, s), j in cells)

    def _grid(self, cells, cols, kind):
        from PIL import Image

        def render():
            rows = (len(cells) + cols - 1) // cols
            im = Image.new("RGB", (cols * CELL, rows * CELL), "white")
            for k, (obj, j) in enumerate(cells):
                im.paste(self._cell(obj, j), ((k % cols) * CELL, (k // cols) * CELL))
            return im
        return self._save(f"images/{kind}/{self._name(cells)}.png", render)

    def object(self, obj, j):
        """56×56 single object (also the crop of a scene quadrant)."""
        return self._grid([(obj, j)], 1, "object")

    def pair(self, left, right):
        """112×56: (obj, jitter) on the left and on the right."""
        return self._grid([left, right], 2, "pair")

    def scene(self, cells):
        """112×112: four (obj, jitter) in the quadrants TL, TR, BL, BR."""
        return self._grid(cells, 2, "scene")


def _train_row(qry, qry_image, pos, pos_image, neg, neg_image):
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image,
            "neg_text": neg, "neg_image_path": neg_image}


def _synthetic_train(rng, img, heldout, n):
    """DEMO_TRAIN_SUBSETS → n MMEB-train rows each, with one hard negative per row that
    differs from the positive in the binding or in one attribute (or, for a one-attribute
    answer, is another value of that attribute)."""
    objects = _objects()
    train_pairs = [p for p in _pairs() if p not in heldout]
    in_train = set(train_pairs)
    renders = {p: [(rng.choice(TRAIN_JITTER), rng.choice(TRAIN_JITTER)) for _ in range(4)]
               for p in train_pairs}                       # 4 renders per pair, reused

    def pair_image(p):
        jl, jr = rng.choice(renders[p])
        return img.pair((p[0], jl), (p[1], jr))

    def twin(p):                                           # hard negative of a pair
        twins = [t for t in _twins(p) if t in in_train]
        return rng.choice(twins or [t for t in train_pairs if t[0] == p[0] and t != p])

    def one_off(o):                                        # hard negative of an object
        return rng.choice([x for x in objects if (x[0] == o[0]) != (x[1] == o[1])])

    out = {s: [] for s in DEMO_TRAIN_SUBSETS}
    for _ in range(n):
        o = rng.choice(objects)
        out["ShapesCLS"].append(_train_row(CLS_QUERY, img.object(o, rng.choice(TRAIN_JITTER)),
                                           _label(o), "", _label(one_off(o)), ""))
        o, k = rng.choice(objects), rng.randrange(2)
        out["ShapesVQA"].append(_train_row(VQA_QUERY.format(VQA_QUESTIONS[("colour", "shape")[k]]),
                                           img.object(o, rng.choice(TRAIN_JITTER)),
                                           o[k], "", _other(o[k], rng), ""))
        p = rng.choice(train_pairs)                         # image-only negative (VisDial style)
        out["ShapesT2I"].append(_train_row(T2I_QUERY.format(_caption(p)), "",
                                           IMAGE_DOC, pair_image(p), "", pair_image(twin(p))))
        p = rng.choice(train_pairs)
        out["ShapesI2T"].append(_train_row(I2T_QUERY, pair_image(p), _caption(p), "",
                                           _caption(twin(p)), ""))
    for subset, query, k in (("ShapesColour", COLOUR_QUERY, 0), ("ShapesShape", SHAPE_QUERY, 1)):
        for _ in range(round(n * TRAIN_SHARE[subset])):
            o = rng.choice(objects)
            out[subset].append(_train_row(query, img.object(o, rng.choice(TRAIN_JITTER)),
                                          o[k], "", _other(o[k], rng), ""))
    scenes = [[(o, rng.choice(TRAIN_JITTER)) for o in rng.sample(objects, 4)]
              for _ in range((n + 3) // 4)]
    targets = [(s, t) for s in range(len(scenes)) for t in range(4)]
    rng.shuffle(targets)
    for s, t in targets[:n]:
        cells = scenes[s]
        other = rng.choice([k for k in range(4) if k != t])
        out["ShapesVG"].append(_train_row(VG_QUERY.format(_label(cells[t][0])), img.scene(cells),
                                          CROP_DOC, img.object(*cells[t]),
                                          "", img.object(*cells[other])))
    return out


def _synthetic_eval(rng, img, heldout, n):
    """DEMO_EVAL_TASKS → n MMEB-eval rows each (candidate 0 = the positive, all eval
    images rendered with EVAL_JITTER)."""
    objects, pairs = _objects(), _pairs()
    held = sorted(heldout)
    rng.shuffle(held)

    def ej():
        return rng.choice(EVAL_JITTER)

    def shuffled(xs):
        xs = list(xs)
        rng.shuffle(xs)
        return xs

    def row(qry, qry_image, texts, images):
        return {"qry_text": qry, "qry_img_path": qry_image, "tgt_text": texts, "tgt_img_path": images}

    def pair_candidates(p):                 # the positive, its 3 twins, 12 other pairs
        twins = _twins(p)
        rest = [x for x in pairs if x != p and x not in twins]
        return [p] + twins + rng.sample(rest, 16 - 1 - len(twins))

    def unique_rows(make):                  # n distinct rows from a row factory
        rows, seen, k = [], set(), 0
        while len(rows) < n:
            key, r = make(k)
            k += 1
            if key not in seen:
                seen.add(key)
                rows.append(r)
        return rows

    out = {t: [] for t in DEMO_EVAL_TASKS}
    labels = [_label(o) for o in objects]
    for o, j in rng.sample([(o, j) for o in objects for j in EVAL_JITTER], n):   # n <= 216
        others = shuffled(x for x in labels if x != _label(o))
        out["ShapesCLS"].append(
            row(CLS_QUERY, img.object(o, j), [_label(o)] + others, [""] * len(labels)))

    for task, k in (("ShapesColour", 0), ("ShapesShape", 1)):       # every value a candidate
        words = (COLOURS, SHAPES)[k]
        for o, j in rng.sample([(o, j) for o in objects for j in EVAL_JITTER], n):
            out[task].append(row((COLOUR_QUERY, SHAPE_QUERY)[k], img.object(o, j),
                                 [o[k]] + shuffled(w for w in words if w != o[k]), [""] * len(words)))

    def vqa(k):                             # one attribute of a single object; 10 answers
        o, j, a = rng.choice(objects), ej(), rng.randrange(2)
        words = [o[a]] + shuffled(w for w in VQA_ANSWERS if w != o[a])
        return (o, j, a), row(VQA_QUERY.format(VQA_QUESTIONS[("colour", "shape")[a]]),
                              img.object(o, j), words, [""] * len(words))
    out["ShapesVQA"] = unique_rows(vqa)

    def t2i(k):
        p, jl, jr = held[k % len(held)], ej(), ej()
        images = [img.pair((p[0], jl), (p[1], jr))] + \
                 [img.pair((x[0], ej()), (x[1], ej())) for x in pair_candidates(p)[1:]]
        return (p, jl, jr), row(T2I_QUERY.format(_caption(p)), "", [IMAGE_DOC] * 16, images)
    out["ShapesT2I"] = unique_rows(t2i)

    def i2t(k):
        p, jl, jr = held[k % len(held)], ej(), ej()
        return (p, jl, jr), row(I2T_QUERY, img.pair((p[0], jl), (p[1], jr)),
                                [_caption(x) for x in pair_candidates(p)], [""] * 16)
    out["ShapesI2T"] = unique_rows(i2t)

    def object_t2i(k):                      # OOD: one-object caption → single objects
        o, j = objects[k % len(objects)], ej()
        same_colour = [x for x in objects if x[0] == o[0] and x != o]          # 3
        same_shape = [x for x in objects if x[1] == o[1] and x != o]           # 5
        rest = [x for x in objects if x[0] != o[0] and x[1] != o[1]]
        cands = [o] + same_colour + same_shape + rng.sample(rest, 3)
        images = [img.object(o, j)] + [img.object(x, ej()) for x in cands[1:]]
        return (o, j), row(T2I_QUERY.format(_phrase(o)), "", [IMAGE_DOC] * len(cands), images)
    out["ShapesObjectT2I"] = unique_rows(object_t2i)

    def vg(k):
        cells = [(o, ej()) for o in rng.sample(objects, 4)]
        t = rng.randrange(4)
        target = cells[t][0]
        extra = []
        while len(extra) < 8:               # crops of other objects, never the named one
            c = (rng.choice(objects), ej())
            if c[0] != target and c not in cells and c not in extra:
                extra.append(c)
        crops = [cells[t]] + [c for k2, c in enumerate(cells) if k2 != t] + extra
        return tuple(cells) + (t,), row(VG_QUERY.format(_label(target)), img.scene(cells),
                                        [CROP_DOC] * len(crops), [img.object(*c) for c in crops])
    out["ShapesVG"] = unique_rows(vg)
    return {t: out[t] for t in DEMO_EVAL_TASKS}


SYNTHETIC_VERSION = 2


def make_synthetic(root, seed=0, train_rows=3000, eval_queries=150, heldout_fraction=0.2):
    """
    Write the built-in synthetic benchmark under `root` (deterministic in `seed`; all
    randomness from random.Random). Tasks (see DEMO_TRAIN_SUBSETS / DEMO_EVAL_TASKS):
      ShapesColour  object image → its colour among the 6 colours
      ShapesShape   object image → its shape among the 4 shapes
      ShapesCLS   object image → its "colour shape" label among all 24 labels
      ShapesVQA   object image + "What colour/shape is the object?" → word (10)
      ShapesT2I   caption → pair image, candidates incl. the 3 attribute-swapped images (16)
      ShapesI2T   pair image → caption, candidates incl. the 3 attribute-swapped captions (16)
      ShapesVG    4-object scene + "...labeled as 'red circle'" → its crop among crops (12)
      ShapesObjectT2I (eval only, OOD)  "a red circle" → single-object image (12)
    `train_rows` rows per training subset, `eval_queries` queries per eval task.
    If `root` already holds a benchmark written with the same arguments it is reused.
    Returns {"root", "train", "eval", "image_dir"} (image paths are relative to image_dir).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = {"root": root, "train": os.path.join(root, "train"), "eval": os.path.join(root, "eval"),
             "image_dir": root}
    params = dict(version=SYNTHETIC_VERSION, seed=seed, train_rows=train_rows,
                  eval_queries=eval_queries, heldout_fraction=heldout_fraction,
                  train_share=TRAIN_SHARE)
    marker = os.path.join(root, "synthetic.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return paths
        os.remove(marker)
    rng = random.Random(seed)
    distinct = [p for p in _pairs() if p[0][0] != p[1][0] and p[0][1] != p[1][1]]   # 360
    heldout = set(rng.sample(distinct, round(heldout_fraction * len(distinct))))
    img = _ImageWriter(root)
    train = _synthetic_train(random.Random(f"{seed}-train"), img, heldout, train_rows)
    evals = _synthetic_eval(random.Random(f"{seed}-eval"), img, heldout, eval_queries)

    def write(rows, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    for s, rows in train.items():
        write(rows, os.path.join(paths["train"], s, "original-00000-of-00001.parquet"))
    for t, rows in evals.items():
        write(rows, os.path.join(paths["eval"], t, "test-00000-of-00001.parquet"))
    with open(marker, "w") as f:                 # written last: marks a complete benchmark
        json.dump(params, f)
    return paths
