"""
The one door for untrusted input — behind the paper files, none of it in the paper.

Everything from outside (files, flags, API arguments) is checked here and reaches
data.py, train.py and evaluate.py as clean rows and arguments; every refusal names the
file, row, column, flag or argument, and is a ValueError (TypeError for a wrong type),
FileNotFoundError for what is missing, or BadItemError for what is found bad only when it
is loaded. Handling the next bad-input case changes this file, not a paper file.

  images        load_image: decode guards (unreadable, missing, decompression bomb);
                upscale_small: a side below 28 px is upscaled for the Qwen processor
  items         check_item_text (placeholders), check_text_tokens (--max_text_tokens)
  hub and dirs  resolve_dir (a local dir or a hub id, rank 0 downloads first),
                find_parquet, find_subsets, read_rows, leaves_image_dir
  training rows TrainRows: MMEB-train / mmE5 rows read and checked, the skip policy
                (--skip_bad_rows) that counts and reports what it drops, --check_images;
                mmE5's list cells (list_columns, first_negative: never eval)
  JSON files    read_target_prompts (--target_prompts), read_task_table (--task_table)
  flags         FLAG_RANGES, one table of every numeric flag's range; check_train_flags,
                check_eval_flags
  API arguments check_encode_args, split_input, check_side, check_batch_size (Encoder)

The benchmark files (MMEB-eval, the zero-shot sets of Table 2) are read, and an MMEB run's
files and images checked before the long part (mmeb_preflight), in util/benchmarks.py.
Tests: pytest tests/test_inputs.py
"""
import ast
import collections
import glob
import json
import os

IMAGE_PLACEHOLDER = "<|image_1|>"      # MMEB's (Phi-3.5-V) image placeholder in its text columns
VIDEO_PLACEHOLDER = "<|video_1|>"      # where a video goes (util/video.py; MMEB-V2's video tasks)
VIDEO_TOKEN = "<|video_pad|>"          # Qwen's video pad token, one per merged video patch
# The instruction of an image document given bare (no text): MMEB's image candidates
# ("<|image_1|>\nRepresent the given image."), tools/search.py's corpus images and the
# export's encode_document(image) all use this one string.
DOC_IMAGE_INSTRUCTION = "Represent the given image."
MAX_PIXELS = 16384 * 32 * 32           # Qwen3-VL's own upper bound of an image's size (Qwen2-VL's: 16384 · 28²)
MAX_MIN_PIXELS = 1280 * 32 * 32        # the paper presets' max_pixels: no image forced above it

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
    `where` and `path`. `path` may also be the encoded image's bytes (a parquet cell)."""
    import io
    import warnings

    from PIL import Image
    source = path
    if isinstance(path, (bytes, bytearray)):
        source, path = io.BytesIO(path), f"({len(path):,} embedded bytes)"
    try:
        with warnings.catch_warnings():             # PIL's bomb warning: refused below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
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
# Items: an MMEB string and its image; the text cap

def check_item_text(text, has_image, where, image_token="<|image_pad|>", has_video=False):
    """An item's MMEB string fits its image (video): not empty without one, exactly one
    <|image_1|> (<|video_1|>) with one and none without, no raw Qwen image or video token
    of its own. ValueError naming `where`."""
    if not has_image and not has_video and not text.strip():
        raise ValueError(f"{where}: empty text and no image")
    for kind, mark, given in (("an image", IMAGE_PLACEHOLDER, has_image), ("a video", VIDEO_PLACEHOLDER, has_video)):
        n_placeholders = text.count(mark)
        if not given and n_placeholders:
            raise ValueError(f"{where}: text has {mark} but no {kind.split()[1]} was given")
        if given and n_placeholders != 1:
            raise ValueError(f"{where}: {kind} was given but the text has {n_placeholders} "
                             f"{mark} placeholders (expected exactly 1): {text[:80]!r}")
    for token in (image_token, VIDEO_TOKEN):
        if token in text:
            raise ValueError(f"{where}: the text holds {token} itself: {text[:80]!r}")


def check_text_length(tokenizer, text, limit, where):
    """Before a text is tokenized whole: a text of more than 64·limit characters whose first
    64·limit characters already hold more than limit + 16 tokens (a token may straddle the
    cut, <|image_1|> is a few) is refused, BadItemError naming `where`: a 100-MB cell costs
    no tokenizer pass. Shorter texts are capped after encoding (check_text_tokens)."""
    if limit and len(text) > 64 * limit:
        n = len(tokenizer(text[:64 * limit], add_special_tokens=False)["input_ids"])
        if n > limit + 16:
            raise BadItemError(f"{where}: the text is {len(text):,} characters, over --max_text_tokens "
                               f"{limit} tokens in its first {64 * limit:,} already: {text[:60]!r}...")


def check_text_tokens(ids, image_token_id, limit, where, text):
    """An encoded item's text (its ids less the image pads; image_token_id may be a tuple
    of pad ids, e.g. image and video) is at most `limit` tokens (--max_text_tokens; None =
    no cap): a 20k-word text would ask for gigabytes.
    BadItemError naming `where` (train.py's --skip_bad_rows can then drop its row)."""
    if limit and len(ids) > limit:
        pads = image_token_id if isinstance(image_token_id, tuple) else (image_token_id,)
        n_text = len(ids) - sum(ids.count(p) for p in pads)
        if n_text > limit:
            raise BadItemError(f"{where}: the text is {n_text} tokens, more than "
                               f"--max_text_tokens {limit}: {text[:60]!r}...")


# ----------------------------------------------------------------------------------
# Local directories and hub ids; MMEB's parquet layout
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
        if revision:
            raise ValueError(f"revision {revision}: {name_or_dir} is a local directory, not a hub id")
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


# ----------------------------------------------------------------------------------
# Training rows: MMEB-train and mmE5 hard-negative files, checked; the skip policy
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


class TrainRows:
    """
    MMEB-train subsets (parquet) read and checked, one (q, d⁺, d⁻) row each: what
    data.TrainDataset builds its instances from.

    root: local dir or hub id (only the `split` files of `subsets`, else of `hub_subsets`,
      are fetched; `revision` pins the hub dataset's commit); image_dir: the root the image paths are relative to; subsets: names
      (default: every subset under root with `split` files); max_rows_per_subset: the head.
    rows: (subset, file row, q, pos, neg), each side (text, image path or ""); neg None
      without a hard negative (counted in no_negative[subset]). mmE5's neg_* list cells
      give their first element (list_columns, first_negative); an image negative with
      empty text takes the positive's text.

    Checked at construction (cheap): columns, types (a number or NaN as text), every side
    has text or an image, one <|image_1|> exactly when there is an image, image files
    exist and stay under image_dir (unless allow_outside_image_dir), list cells parse. A
    bad row raises ValueError naming subset, row, column and path, or with skip_bad_rows
    is dropped and recorded in skipped[subset] as (row, reason). What is found only when
    loading (an undecodable image, a text over the cap) raises BadItemError from the
    caller's loader; first_readable then applies the same policy, replacing the row by
    the next readable one of its subset. check_images() decodes every image up front;
    report() lists rows, rows without negative and skips per subset.
    """

    def __init__(self, root, image_dir, subsets=None, split="original", max_rows_per_subset=None,
                 skip_bad_rows=False, allow_outside_image_dir=False, hub_subsets=(), revision=None):
        patterns = [p for s in (subsets or hub_subsets)
                    for p in (f"{s}/{split}-*.parquet", f"{s}/{split}/*.parquet")]
        self.root = resolve_dir(root, patterns, revision=revision)
        self.image_dir, self.split = image_dir, split
        self.skip_bad_rows, self.allow_outside_image_dir = skip_bad_rows, allow_outside_image_dir
        self.subsets = list(subsets) if subsets else find_subsets(self.root, split)
        if not self.subsets:
            raise FileNotFoundError(f"no subset with '{split}' parquet files in {self.root}")
        self.rows, self.skipped = [], {s: [] for s in self.subsets}
        self._exists = {}              # image path → bool, each path stat-ed once
        for s in self.subsets:
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
        self._reindex(self.rows)
        self._bad = set()              # dataset indices found unreadable at load time

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
        return subset, r, q, pos, neg

    def _reindex(self, rows):
        """The per-subset indices, after reading or after dropping rows."""
        self.rows, self.indices_by_subset, self.no_negative = rows, {}, {}
        for s in self.subsets:
            self.indices_by_subset[s] = [i for i, row in enumerate(rows) if row[0] == s]
            self.no_negative[s] = sum(rows[i][4] is None for i in self.indices_by_subset[s])
        self._subset_start = {s: ix[0] for s, ix in self.indices_by_subset.items() if ix}

    def first_readable(self, i, load):
        """(j, load(j), skips found now) for dataset index i: j = i, or, when load raises
        BadItemError and skip_bad_rows, the next readable row of the same subset
        (cyclically, in file order: deterministic, and the batch keeps its size and its
        single subset). The skips travel with the example as (subset, row, reason):
        a DataLoader worker's own records would stay in the worker (record_skipped)."""
        subset, j = self.rows[i][0], i
        start, n = self._subset_start[subset], len(self.indices_by_subset[subset])
        skipped = []
        for _ in range(n):
            if j not in self._bad:
                try:
                    return j, load(j), skipped
                except BadItemError as e:
                    if not self.skip_bad_rows:
                        raise
                    self._bad.add(j)
                    skipped.append((subset, self.rows[j][1], str(e)))
            j = start + (j - start + 1) % n            # next row of the same subset
        raise BadItemError(f"{subset}: no readable row left (all {n} skipped)")

    def record_skipped(self, examples):
        """Count the load-time skips that came with a batch (each example's "skipped")."""
        for ex in examples:
            for subset, r, reason in ex["skipped"]:
                self.skipped[subset].append((r, reason))

    def gather_skipped(self, world):
        """Every rank's skip records into this rank's `skipped`, so rank 0 reports them
        all: rows dropped at load time are the same on every rank, but a bad image found
        while reading a batch is known only to the rank that read it."""
        if world == 1:
            return
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, self.skipped)                   # W × {subset: [(row, reason)]}
        for s, records in self.skipped.items():
            seen = set(records)
            for part in parts:
                for rec in map(tuple, part.get(s, [])):
                    if rec not in seen:
                        seen.add(rec)
                        records.append(rec)

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
            self._reindex([row for i, row in enumerate(self.rows) if i not in bad])
        return len(uses)

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
# JSON files given by flags
def read_target_prompts(path):
    """--target_prompts FILE.json → {subset, task or meta-task: prompt}; ValueError naming
    the file on a bad file or entry."""
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


def read_task_table(path, flag="--task_table"):
    """--task_table FILE.json → {task: (meta_task, is_ind)}; ValueError naming the flag, the
    file (and the entry) on a missing file, bad JSON or a bad entry."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{flag} {path}: expected an object {{task: [meta_task, is_ind]}}, "
                         f"got {type(raw).__name__}")
    for t, v in raw.items():
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], bool)):
            raise ValueError(f"{flag} {path}: entry {t!r} must be [meta_task, true/false], got {v!r}")
    return {t: tuple(v) for t, v in raw.items()}


# ----------------------------------------------------------------------------------
# Flags: every numeric range in one table; the rules between flags

PIXELS = f"[{28 * 28}, {{}}]"
FLAG_RANGES = {   # flag: ">= 1" / ">= 0" / "> 0", or (low, high, how the range reads); unset (None) passes
    **dict.fromkeys(("steps", "batch_size", "save_every", "log_every", "keep_checkpoints", "max_text_tokens",
                     "chunk_size", "match_instances", "max_rows_per_subset", "stop_after_steps"), ">= 1"),
    **dict.fromkeys(("eval_match_queries", "match_queries", "num_workers", "cache_items", "warmup_steps",
                     "num_tokens", "weight_decay", "grad_clip", "w_orth", "w_qdm"), ">= 0"),
    **dict.fromkeys(("lr", "max_minutes", "dist_timeout_minutes"), "> 0"),
    "min_pixels": (28 * 28, MAX_MIN_PIXELS, PIXELS.format(MAX_MIN_PIXELS)),    # as check_config (load_rematch)
    "max_pixels": (28 * 28, MAX_PIXELS, PIXELS.format(MAX_PIXELS)),
    "tau": (1e-3, 10, "[1e-3, 10] (the paper uses 0.02)"),   # logits are cos/τ: τ = 1e-12 gives losses of 1e10
}


def check_ranges(args, error):
    """error("--flag must be ..., got v") for the first flag of `args` outside FLAG_RANGES
    (flags the namespace lacks, or left None, pass)."""
    for name, rule in FLAG_RANGES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if isinstance(rule, str):
            op, bound = rule.split()
            if not (v > float(bound) if op == ">" else v >= float(bound)):
                error(f"--{name} must be {rule}, got {v}")
        elif not rule[0] <= v <= rule[1]:
            error(f"--{name} must be in {rule[2]}, got {v}")


def check_train_flags(args, error):
    """train.py's flags after its presets: the ranges, the rules between flags, and the
    files they name (--target_prompts is read into args.target_prompt_table, which the
    checkpoint keeps); error(message) stops argparse with the message."""
    import torch

    from util.speed import flex_unavailable
    check_ranges(args, error)
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        error(f"--min_pixels {args.min_pixels} > --max_pixels {args.max_pixels}")
    if args.resume_revision and not args.resume_from:
        error("--resume_revision pins the hub id given as --resume_from; there is none")
    if args.resume and args.overwrite:
        error("--resume and --overwrite contradict each other: pick one")
    for flag, on in (("--attn flex", args.attn == "flex"), ("--pack", args.pack)):   # before any loading
        why = on and flex_unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                      training=True, flag=flag)
        if why:
            error(why)
    args.target_prompt_table = None
    try:
        if args.target_prompts:
            args.target_prompt_table = read_target_prompts(args.target_prompts)
        if args.eval_task_table:
            read_task_table(args.eval_task_table, "--eval_task_table")
    except ValueError as e:
        error(str(e))
    if args.train_data is not None and args.image_dir is None:
        error("--train_data needs --image_dir (the root of the rows' relative image paths)")


def check_eval_flags(args, error, data_flags=()):
    """evaluate.py's (and its extensions') flags: something to do, with its data, the
    ranges, the --task_table file (read into args.task_table_entries). data_flags: the names
    of the data flags an extension adds (tools/mmeb_v2.py: visdoc_dir, video_dir)."""
    if not args.mmeb_dir and not args.zeroshot and not any(getattr(args, f) for f in data_flags):
        error("nothing to do: give --mmeb_dir (with --image_dir) and/or --zeroshot (with --data_dir)"
              + "".join(f" or --{f}" for f in data_flags))
    if args.mmeb_dir and not args.image_dir:
        error("--mmeb_dir needs --image_dir")
    if args.zeroshot and not args.data_dir:
        error("--zeroshot needs --data_dir")
    check_ranges(args, error)
    if args.task_table:
        try:
            args.task_table_entries = read_task_table(args.task_table)
        except ValueError as err:
            error(str(err))


# ----------------------------------------------------------------------------------
# API arguments (evaluate.Encoder, tools/rerank.py's rerank)

def check_encode_args(texts, images, side, batch_size, where="encode"):
    """Encoder.encode's arguments: lists (not one str or image), str texts, images as PIL
    or paths, equal lengths, a side and a batch size; each refusal names the argument."""
    check_side(side, where)
    check_batch_size(batch_size, where)
    if texts is None and images is None:
        raise ValueError(f"{where}: give texts, images, or both (pairs)")
    if texts is not None:
        check_list(texts, "texts", where)
        for i, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise TypeError(f"{where}: texts[{i}] is a {type(t).__name__}; each text must be a "
                                "str (or None)")
    if images is not None:
        check_list(images, "images", where)
        for i, im in enumerate(images):
            check_image(im, f"{where}: images[{i}]")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"{where}: {len(texts)} texts but {len(images)} images")


def split_input(x, where):
    """A text (str), an image (PIL image or pathlib.Path), or an (image, text) pair whose
    image may also be a str path → (text, image); anything else is refused, named."""
    if isinstance(x, tuple):
        if len(x) != 2 or not isinstance(x[1], str):
            raise TypeError(f"{where}: a pair must be (image, text) with text a str, got "
                            f"({', '.join(type(v).__name__ for v in x)})")
        check_image(x[0], where)
        return x[1], x[0]
    if isinstance(x, str):
        return x, None
    if isinstance(x, os.PathLike) or _is_pil(x):
        return None, x
    raise TypeError(f"{where}: expected a text (str), an image (PIL image or pathlib.Path) or an "
                    f"(image, text) pair, got {type(x).__name__}")


def _is_pil(x):
    from PIL import Image
    return isinstance(x, Image.Image)


def check_image(im, where):
    """None, a PIL image, or a path (str / os.PathLike); anything else names the types."""
    if im is not None and not (isinstance(im, (str, os.PathLike)) or _is_pil(im)):
        raise TypeError(f"{where}: an image must be a PIL image or a path (str or os.PathLike), "
                        f"got {type(im).__name__} (convert arrays with PIL.Image.fromarray)")


def check_list(xs, name, where):
    """A list/tuple of inputs, not one input: a str or an image would be iterated piecewise."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"{where}: {name} must be a list, got {type(xs).__name__}"
                        + (f" (for one, pass [{name[:-1]}])" if isinstance(xs, str) or _is_pil(xs) else ""))


def check_side(side, where):
    if side not in ("q", "d"):
        raise ValueError(f"{where}: side must be 'q' (queries, embedded with L_q) or 'd' (documents, "
                         f"with L_d), got {side!r}")


def check_batch_size(batch_size, where):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be an int >= 1, got {batch_size!r}")
