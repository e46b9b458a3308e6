"""
Corpus search with a trained ReMatch checkpoint through a vector index, as users do it
after training: encode a corpus once (sharded over ranks, resumable, never reusing a shard
that another corpus, model or setting produced), stream the vectors into one faiss index
(exact or approximate), write it once, and query it memory-mapped.

    python tools/search.py index --model CKPT --corpus photos/ --out runs/index
    python tools/search.py index --model CKPT --corpus corpus.parquet --image_dir imgs/ --out runs/index \\
        --index_type ivfpq
    torchrun --standalone --nproc_per_node=8 tools/search.py index --model CKPT --corpus ... --out ...
    python tools/search.py query --model CKPT --index runs/index --text "a dog on a beach" --k 5

Corpus: a folder (every *.jpg / *.jpeg / *.png / *.webp is an image document, every *.txt
a text document, named by its relative path), or a parquet file with a `text` and/or an
`image` column (an image path, relative to --image_dir) and an optional `id` column.
Documents are embedded with the document tokens L_d, as MMEB's candidates: an image with
`--instruction` (default "Represent the given image."), a text as it is (pass your target
prompt in it if the checkpoint was trained with target instructions). Files are read
through util/inputs.py: an unreadable text or image stops naming its path.

Shards. Encoding is cut into shards of --shard_size documents; shard s is rank s mod W's.
<out>/shards/<s>.npy holds its vectors and <s>.json (written after them, atomically) what
they were encoded from: the sha256 of its document ids and of their content (the texts;
each image file's size and mtime), the sha256 of every weight and buffer of the loaded
model (weights_sha256: backbone with its LoRA, L_q, L_d; dtype included), the instruction,
K, the embedding template, the processor's image size bounds, the shard size and the
dimension. A rerun reuses a shard only when all of these are equal and re-encodes it
otherwise, saying why ("shard 3: ids changed"); a shard without a manifest (written by the
row-count version of this file) is re-encoded.

Files. Rank 0 then streams the shards (one in RAM at a time) into <out>/embeddings.npy
(N, d) float32, L2-normalised, kept for exact rescoring and other tools (np.load(...,
mmap_mode="r")), and from it into the index (chunk by chunk: peak RAM is the index plus one
chunk), written once with faiss.write_index as <out>/index.faiss; then ids.json and
index.json (the checkpoint's published name and revision, its base model, weights_sha256,
instruction, K, template, count, dim, the index type and its parameters). Each file goes
through a temporary file and a rename; index.json is removed first and written last, so a
folder with an index.json is complete. `query` and load_index read index.faiss
memory-mapped (never rebuild it) and refuse files that disagree: ids vs vectors vs the
index's count, or a query model whose weights are not the index's.

Index types (--index_type; docs/search.md says which to pick at 1M and at 100M documents):
  flat    IndexFlatIP: exact cosine (Eq. 1's argmax), the reference the others are measured against
  hnsw    IndexHNSWFlat: a graph over the full vectors; fast queries, slow build, more RAM than flat
  ivfsq8  IVF + 8-bit scalar quantiser: a quarter of flat's memory, scans --nprobe of --nlist lists
  ivfpq   IVF + product quantiser (--pq_m bytes per vector: 64x smaller at d=1536), the top
          --rescore x k rescored exactly from embeddings.npy
bench/index_scale.py measures them against flat on 1M synthetic vectors. faiss: its flat
index is the reference the approximate ones are measured against, write_index / read_index
with mmap, one pip wheel. Tests: pytest tests/test_search.py
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.inputs import DOC_IMAGE_INSTRUCTION, BadItemError, read_rows  # noqa: E402

# torch and the model (evaluate.py) are imported where a model is used: the index half of
# this file (build_index, load_index, search) needs only numpy and faiss (bench/index_scale.py)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_INSTRUCTION = DOC_IMAGE_INSTRUCTION
FORMAT = 2          # layout of shard manifests and index.json (1: shards reused on their row count alone)
INDEX_TYPES = ("flat", "hnsw", "ivfsq8", "ivfpq")
CHUNK_BYTES = 1 << 26       # vectors read per step while streaming into an index (64 MiB)
PQ_TABLE_BYTES = 1 << 28    # PQ's distance tables while adding a sub-block (256 MiB: 2,730 rows at d=1536)

# ----------------------------------------------------------------------------------
# Corpus


def read_corpus(path, image_dir=None):
    """[(id, text or None, image path or None)] of a folder or a parquet file (module doc)."""
    if os.path.isdir(path):
        docs = []
        for d, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                full, rel = os.path.join(d, f), os.path.relpath(os.path.join(d, f), path)
                if f.lower().endswith(IMAGE_SUFFIXES):
                    docs.append((rel, None, full))
                elif f.endswith(".txt"):
                    docs.append((rel, _read_text(full), None))
        if not docs:
            raise FileNotFoundError(f"{path}: no image (*{', *'.join(IMAGE_SUFFIXES)}) or *.txt document")
        return docs
    rows = read_rows([path])                                       # util/inputs.py
    if not rows or not ({"text", "image"} & set(rows[0])):
        raise ValueError(f"{path}: expected a parquet file with a `text` and/or an `image` column")
    docs, seen = [], {}
    for i, r in enumerate(rows):
        text, image = r.get("text") or None, r.get("image") or None
        for col, v in (("text", text), ("image", image)):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{path} row {i}: `{col}` must be a string (an image: a path relative to "
                                 f"--image_dir), got {type(v).__name__}")
        if text is None and image is None:
            raise ValueError(f"{path} row {i}: neither text nor image")
        doc_id = str(r.get("id", i))
        if doc_id in seen:
            raise ValueError(f"{path} rows {seen[doc_id]} and {i}: the same id {doc_id!r} (ids name the results)")
        seen[doc_id] = i
        docs.append((doc_id, text, os.path.join(image_dir or "", image) if image else None))
    return docs


def _read_text(path):
    """A text document's content; one that cannot be read as UTF-8 text, or is empty, raises
    util.inputs.BadItemError naming its path."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BadItemError(f"corpus text {path}: cannot read it as UTF-8 text: {e}") from e
    if not text:
        raise BadItemError(f"corpus text {path}: empty")
    return text


# ----------------------------------------------------------------------------------
# What a shard was encoded from


def weights_sha256(model):
    """sha256 over every parameter and buffer of `model` (name, dtype, shape and bytes, in
    sorted name order; one tensor on the CPU at a time): what embeds, LoRA and L_q / L_d
    included. Equal weights in the same dtype give the same hash, whatever they were loaded
    from; any other weight or dtype gives another."""
    import torch
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _image_size(processor):
    """The processor's image size bounds (min/max pixels): they change an image's vector."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    return {k: v for k, v in dict(size).items() if v is not None}


def encoding_key(encoder, instruction):
    """What every shard's vectors depend on besides its documents (module doc)."""
    m = encoder.model
    return {"weights_sha256": weights_sha256(m), "instruction": instruction, "num_tokens": m.num_tokens,
            "embed_template": m.embed_template, "image_size": _image_size(encoder.processor),
            "dim": m.backbone.config.text_config.hidden_size}


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def _content(text, image):
    """What a document's vector is made of, cheaply: its text, its image file's size and mtime
    (a rewritten, replaced or copied image is re-encoded; a missing one gives None and the
    encoding names it)."""
    if image is None:
        return [text]
    try:
        st = os.stat(image)
        return [text, st.st_size, st.st_mtime_ns]
    except OSError:
        return [text, None]


def shard_manifest(key, s, part, shard_size):
    """The manifest of shard s, holding documents `part` (module doc), as JSON would read it back."""
    ids = [i for i, _, _ in part]
    manifest = {"format": FORMAT, "shard": s, "shard_size": shard_size, "count": len(part),
                "first_id": ids[0], "last_id": ids[-1], "ids_sha256": _sha256_json(ids),
                "content_sha256": _sha256_json([_content(t, im) for _, t, im in part]), **key}
    return json.loads(json.dumps(manifest))


# manifest key → how a difference reads; the first ones explain the later ones
DIFFERENCES = (("format", "written by another version"), ("shard_size", "shard size"),
               ("weights_sha256", "weights changed"), ("num_tokens", "K"), ("embed_template", "template"),
               ("instruction", "instruction"), ("image_size", "image size"), ("dim", "dim"),
               ("ids_sha256", "ids changed"), ("content_sha256", "document content changed"), ("count", "count"))


def shard_paths(shards_dir, s):
    return os.path.join(shards_dir, f"{s:06d}.npy"), os.path.join(shards_dir, f"{s:06d}.json")


def stale_reason(shards_dir, s, want):
    """None if shard s's files hold what manifest `want` describes, else why not (a phrase)."""
    npy, man = shard_paths(shards_dir, s)
    if not os.path.isfile(npy):
        return "not encoded yet"
    if not os.path.isfile(man):
        return "no manifest (written by an older tools/search.py)"
    try:
        with open(man) as f:
            have = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    if not isinstance(have, dict):
        return "unreadable manifest (not a JSON object)"
    why = []
    for key, label in DIFFERENCES:
        if have.get(key) == want.get(key) or (key == "content_sha256" and "ids changed" in why):
            continue
        if label.endswith(("changed", "version")):
            why.append(label)
        else:
            why.append(f"{label} {have.get(key)!r} -> {want.get(key)!r}")
    if why:
        return ", ".join(why)
    try:
        E = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"unreadable vectors ({e})"
    if E.shape != (want["count"], want["dim"]) or E.dtype != np.float32:
        return f"vectors of shape {E.shape} {E.dtype}, expected ({want['count']}, {want['dim']}) float32"
    return None


# ----------------------------------------------------------------------------------
# Encoding


def encode_corpus(encoder, docs, out_dir, instruction=IMAGE_INSTRUCTION, shard_size=1024, batch_size=32,
                  progress=True, index_type="flat", index_params=None, checkpoint=None, revision=None):
    """Embed `docs` (read_corpus) with L_d, shard by shard, reusing only the shards whose
    manifest says they hold exactly these vectors (module doc); rank 0 then writes
    <out_dir>/embeddings.npy (N, d) float32, L2-normalised, in order, index.faiss
    (`index_type`, build_index's `index_params`), ids.json and index.json (`checkpoint`:
    the published name of the model as given, and its `revision`). Returns embeddings.npy
    memory-mapped on rank 0, None on the others."""
    import torch
    from tqdm import tqdm

    from util.dist import rank_world
    rank, world = rank_world()
    shards = os.path.join(out_dir, "shards")
    os.makedirs(shards, exist_ok=True)
    key = encoding_key(encoder, instruction)
    n_shards = (len(docs) + shard_size - 1) // shard_size
    part = lambda s: docs[s * shard_size:(s + 1) * shard_size]            # noqa: E731
    mine = {s: shard_manifest(key, s, part(s), shard_size) for s in range(n_shards) if s % world == rank}
    why = {s: stale_reason(shards, s, m) for s, m in mine.items()}
    _report(why, rank if world > 1 else None)
    for s in tqdm([s for s in mine if why[s]], desc="encode shards", disable=not progress or rank != 0):
        _encode_shard(encoder, part(s), instruction, batch_size, shards, s, mine[s])
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    wants = [mine.get(s) or shard_manifest(key, s, part(s), shard_size) for s in range(n_shards)]   # every rank's
    for s, want in enumerate(wants):
        bad = stale_reason(shards, s, want)
        if bad:
            raise RuntimeError(f"{shard_paths(shards, s)[0]}: {bad} after encoding (did another job write "
                               f"into {out_dir}?); rerun the command")
    meta = {"format": FORMAT, "checkpoint": checkpoint, "revision": revision,
            "base_model": encoder.config.get("model"), **key,
            "target_instructions": bool(encoder.config.get("target_instructions", False)),
            "count": len(docs), "shard_size": shard_size, "ids_sha256": _sha256_json([i for i, _, _ in docs])}
    write_index_folder(out_dir, [shard_paths(shards, s)[0] for s in range(n_shards)], [i for i, _, _ in docs],
                       meta, index_type, index_params or {}, progress)
    _remove_shards_from(shards, n_shards)
    return np.load(os.path.join(out_dir, "embeddings.npy"), mmap_mode="r")


def _report(why, rank=None):
    """One line: how many shards are reused and re-encoded, and why (the first 10 reasons)."""
    todo = [(s, r) for s, r in why.items() if r]
    reasons = "; ".join(f"shard {s}: {r}" for s, r in todo[:10]) + (f"; and {len(todo) - 10} more" if len(todo) > 10 else "")
    who = f"rank {rank}: " if rank is not None else ""
    print(f"{who}{len(why) - len(todo)} shard(s) reused, {len(todo)} to encode" + (f" ({reasons})" if todo else ""),
          flush=True)


def _encode_shard(encoder, part, instruction, batch_size, shards, s, manifest):
    """Embed one shard and write its vectors, then its manifest (the old manifest goes first:
    vectors never sit beside a manifest that is not theirs)."""
    import torch

    import evaluate
    inputs = [("d", evaluate.format_input(t, im is not None, instruction if im is not None else None), im)
              for _, t, im in part]
    E = evaluate.embed_inputs(encoder.model, encoder.processor, inputs, batch_size, desc=f"shard {s}",
                              distributed=False)                              # (n, d)
    E = torch.nn.functional.normalize(E.float(), dim=-1).numpy()             # as Encoder.encode
    npy, man = shard_paths(shards, s)
    _remove(man)
    with _atomic(npy) as tmp, open(tmp, "wb") as f:
        np.save(f, E)
    _write_json(man, manifest)


def _remove_shards_from(shards, n_shards):
    """Remove shard files numbered n_shards and up (a corpus that shrank left them)."""
    for f in os.listdir(shards):
        m = re.fullmatch(r"(\d+)\.(npy|json)", f)
        if m and int(m.group(1)) >= n_shards:
            _remove(os.path.join(shards, f))


# ----------------------------------------------------------------------------------
# Writing the folder: streamed, atomic


class _atomic:
    """`with _atomic(path) as tmp:` write tmp; on success it is synced and renamed to path
    (a crash leaves the old file or the new one, never half of one)."""

    def __init__(self, path):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"

    def __enter__(self):
        return self.tmp

    def __exit__(self, kind, *_):
        if kind is not None:
            _remove(self.tmp)
            return False
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return False


def _write_json(path, obj):
    with _atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def _normalize(X):
    """Rows of X (n, d) L2-normalised as torch's F.normalize does (eps 1e-12), float32."""
    X = np.asarray(X, dtype=np.float32)
    return np.ascontiguousarray(X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12))


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_index_folder(out_dir, shard_files, ids, meta, index_type="flat", index_params=None, progress=True):
    """embeddings.npy streamed from `shard_files` (in order), index.faiss built from it,
    ids.json, then index.json (`meta` plus the index's type and parameters), each atomic;
    index.json is removed first, so a crash leaves no index.json (an incomplete folder)."""
    import faiss
    _remove(os.path.join(out_dir, "index.json"))
    emb = os.path.join(out_dir, "embeddings.npy")
    with _atomic(emb) as tmp:
        dim = _concat_npy(shard_files, tmp, len(ids))
        index, params = build_index(tmp, index_type, progress=progress, **(index_params or {}))
    with _atomic(os.path.join(out_dir, "index.faiss")) as tmp:
        faiss.write_index(index, tmp)
    del index
    with _atomic(os.path.join(out_dir, "ids.json")) as tmp, open(tmp, "w") as f:
        json.dump(ids, f)
    _write_json(os.path.join(out_dir, "index.json"), {**meta, "dim": dim, "index": params})


def _concat_npy(files, out, n):
    """Write the (n_i, d) float32 arrays of `files` one after another as one (n, d) .npy at
    `out`, one file in RAM at a time (no concatenation). Returns d."""
    dim = np.load(files[0], mmap_mode="r").shape[1] if files else 0
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        rows = 0
        for path in files:
            part = np.load(path)                                           # (n_i, d)
            if part.ndim != 2 or part.shape[1] != dim or part.dtype != np.float32:
                raise ValueError(f"{path}: vectors of shape {part.shape} {part.dtype}, expected (*, {dim}) float32")
            part.tofile(f)
            rows += len(part)
    if rows != n:
        raise ValueError(f"the shards hold {rows:,} vectors for {n:,} documents")
    return dim


# ----------------------------------------------------------------------------------
# Index types: built streamed from an .npy file, searched memory-mapped


def npy_layout(path):
    """(rows, d, byte offset of the data) of a C-order (N, d) float32 .npy file."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
        raise ValueError(f"{path}: expected a C-order (N, d) float32 array, got shape {shape} {dtype}"
                         f"{' (Fortran order)' if fortran else ''}")
    return shape[0], shape[1], offset


def iter_chunks(vectors, rows=None):
    """(start row, float32 (b, d) block) over an (N, d) array or .npy file, the file read with
    plain reads (not mapped: only one block is in RAM at a time)."""
    if not isinstance(vectors, (str, os.PathLike)):
        n, d = vectors.shape
        rows = rows or max(1, CHUNK_BYTES // (4 * d))
        for a in range(0, n, rows):
            yield a, np.ascontiguousarray(vectors[a:a + rows], dtype=np.float32)
        return
    n, d, offset = npy_layout(vectors)
    rows = rows or max(1, CHUNK_BYTES // (4 * d))
    with open(vectors, "rb") as f:
        f.seek(offset)
        for a in range(0, n, rows):
            want = min(rows, n - a)
            block = np.fromfile(f, dtype="<f4", count=want * d)                 # (b·d,)
            if block.size != want * d:
                raise ValueError(f"{vectors}: truncated: its header says {n:,} x {d}, the data ends "
                                 f"after {a + block.size // d:,} rows")
            yield a, block.reshape(want, d)


def vectors_shape(vectors):
    return npy_layout(vectors)[:2] if isinstance(vectors, (str, os.PathLike)) else tuple(vectors.shape)


def sample_rows(vectors, size, seed=0):
    """`size` rows drawn uniformly without replacement (in file order), read in one pass."""
    n, d = vectors_shape(vectors)
    if size >= n:
        return np.concatenate([b for _, b in iter_chunks(vectors)]) if n else np.zeros((0, d), np.float32)
    take = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = np.empty((size, d), np.float32)                                          # (size, d)
    got = 0
    for a, block in iter_chunks(vectors):
        sel = take[(take >= a) & (take < a + len(block))] - a
        out[got:got + len(sel)] = block[sel]
        got += len(sel)
    return out


# the flags (build_index's parameters) each index type takes
USES = {"flat": (), "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
        "ivfsq8": ("nlist", "nprobe", "train_size", "rescore"),
        "ivfpq": ("nlist", "nprobe", "train_size", "pq_m", "rescore")}


def check_index_flags(index_type, params):
    """ValueError naming the flag: an unknown index type, a parameter the type does not
    take, or one that is not an integer >= 1 (None: unset)."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"--index_type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    for k, v in params.items():
        if v is None:
            continue
        if k not in USES[index_type]:
            takes = ", ".join("--" + u for u in USES[index_type]) or "no parameter"
            raise ValueError(f"--{k} does not apply to --index_type {index_type} (it takes {takes})")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"--{k} must be an integer >= 1, got {v!r}")


def index_params(index_type, n, d, hnsw_m=None, ef_construction=None, ef_search=None, nlist=None, nprobe=None,
                 pq_m=None, train_size=None, rescore=None):
    """The parameters of an `index_type` index over n vectors of dimension d: the given
    ones, defaults for the others (HNSW: M 32, efConstruction 40, efSearch 64; IVF: nlist
    ~ sqrt(n) as a power of two, nprobe 64, trained on 64 x nlist sampled rows; PQ: d/16
    sub-quantisers of 8 bits, the top 4k rescored). check_index_flags first."""
    check_index_flags(index_type, dict(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                       nlist=nlist, nprobe=nprobe, pq_m=pq_m, train_size=train_size,
                                       rescore=rescore))
    p = {"type": index_type, "rescore": rescore or (4 if index_type == "ivfpq" else 1)}
    if index_type == "flat":
        p["factory"] = "Flat"
    elif index_type == "hnsw":
        p.update(hnsw_m=hnsw_m or 32, ef_construction=ef_construction or 40, ef_search=ef_search or 64)
        p["factory"] = f"HNSW{p['hnsw_m']},Flat"
    else:
        auto = 2 ** round(math.log2(max(1.0, math.sqrt(n))))                  # ~sqrt(n) lists
        p["nlist"] = nlist or max(1, min(auto, n // 39))                       # faiss: >= 39 points per list
        p["nprobe"] = min(nprobe or 64, p["nlist"])
        if index_type == "ivfsq8":
            p["factory"] = f"IVF{p['nlist']},SQ8"
        else:
            p["pq_m"] = pq_m or next(m for m in range(max(1, d // 16), 0, -1) if d % m == 0)
            if d % p["pq_m"]:
                raise ValueError(f"--pq_m {p['pq_m']} must divide the dimension {d}")
            p["pq_nbits"] = max(1, min(8, int(math.log2(max(2, n // 39)))))    # 8 bits; fewer below 39 x 256 vectors
            p["factory"] = f"IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_nbits']}"
        p["train_size"] = min(n, train_size or max(64 * p["nlist"], 64 * 2 ** p.get("pq_nbits", 0), 4096))
    return p


def build_index(vectors, index_type="flat", progress=False, **params):
    """(faiss index, its parameters) over L2-normalised float32 vectors: an (N, d) array or
    an .npy file, streamed in chunks (peak RAM: the index plus one chunk and, for IVF, the
    training sample). Inner product throughout (cosine on unit vectors); IVF lists are
    trained by spherical k-means on a uniform sample."""
    import faiss
    n, d = vectors_shape(vectors)
    p = index_params(index_type, n, d, **params)
    index = faiss.index_factory(d, p["factory"], faiss.METRIC_INNER_PRODUCT)
    if index_type == "hnsw":
        index.hnsw.efConstruction = p["ef_construction"]
    if index_type in ("flat", "hnsw"):
        _reserve(index, n)
    if not index.is_trained:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))          # IndexIVFPQ / IndexIVFScalarQuantizer
        ivf.cp.spherical = True                                     # unit centroids: cosine lists
        if index_type == "ivfpq":
            ivf.do_polysemous_training = False                      # for Hamming filtering, unused: slow
        index.train(sample_rows(vectors, p["train_size"]))
    # PQ encodes a batch through distance tables of rows x 2^nbits x pq_m floats: add in
    # sub-blocks that keep them at PQ_TABLE_BYTES (10k rows at once would ask 1 GB at d=1536)
    step = max(1, PQ_TABLE_BYTES // (4 * 2 ** p["pq_nbits"] * p["pq_m"])) if index_type == "ivfpq" else None
    for a, block in iter_chunks(vectors):
        for b in range(0, len(block), step or len(block)):
            index.add(block[b:b + (step or len(block))])
        if progress and n > len(block) and (10 * (a + len(block))) // n > (10 * a) // n:     # every 10 %
            print(f"  index: {a + len(block):,} / {n:,} vectors added", flush=True)
    set_search_params(index, p)
    return index, p


def _reserve(index, n):
    """Allocate the codes of a flat index (HNSW's storage) for n vectors at once. faiss grows
    them by doubling while adding, which holds up to two copies of the vectors; it has no
    reserve, but resizing the codes (a std::vector) up and back to 0 keeps the capacity, and
    the adds then fill it in place: peak RAM one copy."""
    import faiss
    codes = faiss.downcast_index(index.storage).codes if hasattr(index, "storage") else index.codes
    codes.resize(n * index.d * 4)                                                  # float32 codes: d x 4 bytes
    codes.resize(0)


def set_search_params(index, p):
    """nprobe (IVF) or efSearch (HNSW) of `p` on the index (kept with index.json, not in index.faiss)."""
    import faiss
    if p["type"] in ("ivfsq8", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = p["nprobe"]
    elif p["type"] == "hnsw":
        index.hnsw.efSearch = p["ef_search"]


def mmap_flag(index_type):
    """faiss.read_index's flag that maps the index's vectors or codes instead of copying them:
    IO_FLAG_MMAP for the IVF lists, IO_FLAG_MMAP_IFC for flat codes (flat, HNSW's storage;
    faiss >= 1.10, else 0: read into RAM)."""
    import faiss
    if index_type in ("ivfsq8", "ivfpq"):
        return faiss.IO_FLAG_MMAP
    return getattr(faiss, "IO_FLAG_MMAP_IFC", 0)


def search(index, Q, k, vectors=None, rescore=1):
    """Q (nq, d) → (scores (nq, k), row numbers (nq, k)), best first; Q is L2-normalised here.
    rescore r > 1 with `vectors` (embeddings.npy, memory-mapped): the index's top r·k rows are
    scored again exactly against the stored vectors and the best k kept. A row of -1 (score
    -inf) marks fewer than k found."""
    Q = _normalize(np.asarray(Q, dtype=np.float32))
    if vectors is None or rescore <= 1:
        return index.search(Q, k)
    _, cand = index.search(Q, min(k * rescore, index.ntotal))                        # (nq, r·k)
    scores, rows = np.full((len(Q), k), -np.inf, np.float32), np.full((len(Q), k), -1, np.int64)
    for i, (q, c) in enumerate(zip(Q, cand)):
        c = np.unique(c[c >= 0])                                                     # sorted: in-order reads
        s = np.asarray(vectors[c], dtype=np.float32) @ q                              # (|c|, d) @ (d,) → (|c|,)
        best = np.argsort(-s, kind="stable")[:k]
        scores[i, :len(best)], rows[i, :len(best)] = s[best], c[best]
    return scores, rows


# ----------------------------------------------------------------------------------
# Reading a folder back


def load_index(out_dir):
    """(faiss index, ids, metadata) of a folder written by encode_corpus, index.faiss read
    memory-mapped, its search parameters set from index.json. Refuses, naming the files, a
    folder whose ids, vectors and index disagree, or one an older version wrote."""
    import faiss
    paths = {f: os.path.join(out_dir, f) for f in ("index.json", "ids.json", "embeddings.npy", "index.faiss")}
    if not os.path.isfile(paths["index.json"]):
        raise FileNotFoundError(f"{paths['index.json']}: missing: not an index folder, or its `index` run "
                                "did not finish (rerun it: finished shards are reused)")
    with open(paths["index.json"]) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or not os.path.isfile(paths["index.faiss"]):
        raise ValueError(f"{out_dir}: written by an older tools/search.py (no index.faiss or shard "
                         "manifests); rerun `tools/search.py index` into it (its shards are re-encoded)")
    with open(paths["ids.json"]) as f:
        ids = json.load(f)
    n, d, _ = npy_layout(paths["embeddings.npy"])
    if len(ids) != n:
        raise ValueError(f"{paths['ids.json']} holds {len(ids):,} ids but {paths['embeddings.npy']} "
                         f"{n:,} vectors: the files are of different runs; rerun `index`")
    if (meta.get("count"), meta.get("dim"), meta.get("ids_sha256")) != (n, d, _sha256_json(ids)):
        raise ValueError(f"{paths['index.json']} describes {meta.get('count')} x {meta.get('dim')} vectors "
                         f"and other ids than {paths['ids.json']} / {paths['embeddings.npy']} ({n} x {d}); "
                         "rerun `index`")
    index = faiss.read_index(paths["index.faiss"], mmap_flag(meta["index"]["type"]))
    if (index.ntotal, index.d) != (n, d):
        raise ValueError(f"{paths['index.faiss']} holds {index.ntotal:,} vectors of dim {index.d} but "
                         f"{paths['embeddings.npy']} {n:,} of dim {d}; rerun `index`")
    set_search_params(index, meta["index"])
    return index, ids, meta


def load_vectors(out_dir):
    """embeddings.npy memory-mapped (N, d): exact rescoring reads only the rows it needs."""
    return np.load(os.path.join(out_dir, "embeddings.npy"), mmap_mode="r")


def check_same_model(meta, encoder, where):
    """Queries are comparable with the index's vectors only under the same weights and template."""
    have = (weights_sha256(encoder.model), encoder.model.embed_template)
    want = (meta.get("weights_sha256"), meta.get("embed_template"))
    if have != want:
        raise ValueError(f"{where}: the index was encoded by {meta.get('checkpoint') or meta.get('base_model')} "
                         f"(weights {str(want[0])[:12]}, template {want[1]}), the query model has weights "
                         f"{have[0][:12]}, template {have[1]}: its vectors are not comparable; query with the "
                         "index's model (and its --num_tokens / --embed_template) or index again")


# ----------------------------------------------------------------------------------
# CLI

BUILD_FLAGS = ("hnsw_m", "ef_construction", "nlist", "pq_m", "train_size")
SEARCH_FLAGS = ("ef_search", "nprobe", "rescore")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("index", "query"),
                   help="index: encode --corpus into --out; query: search --index with --text / --image")
    p.add_argument("--model", required=True, help="train.py checkpoint folder or its hub id (or a raw backbone)")
    p.add_argument("--revision", default=None, help="hub ids: the commit, branch or tag of --model")
    p.add_argument("--num_tokens", type=int, default=0, help="raw backbones only: K learnable tokens")
    p.add_argument("--embed_template", default="plain", choices=("plain", "chat"), help="raw backbones only")
    p.add_argument("--corpus", help="index: a folder of images / *.txt, or a parquet file (text, image[, id])")
    p.add_argument("--image_dir", default=None, help="index: root of a parquet corpus's image paths")
    p.add_argument("--out", "--index", dest="out", required=True, help="the index folder")
    p.add_argument("--instruction", default=IMAGE_INSTRUCTION, help="instruction of image documents")
    p.add_argument("--shard_size", type=int, default=1024, help="documents per shard file")
    p.add_argument("--batch_size", type=int, default=32, help="documents per forward")
    g = p.add_argument_group("index type (docs/search.md); unset: the defaults of index_params")
    g.add_argument("--index_type", default="flat", choices=INDEX_TYPES, help="index: flat (exact, default), "
                   "hnsw, ivfsq8, ivfpq")
    g.add_argument("--hnsw_m", type=int, help="hnsw: graph neighbours per vector (32)")
    g.add_argument("--ef_construction", type=int, help="hnsw: candidate list while building (40)")
    g.add_argument("--ef_search", type=int, help="hnsw: candidate list while searching (64; query may override)")
    g.add_argument("--nlist", type=int, help="ivf*: inverted lists (~sqrt(N), a power of two)")
    g.add_argument("--nprobe", type=int, help="ivf*: lists scanned per query (64; query may override)")
    g.add_argument("--pq_m", type=int, help="ivfpq: bytes per vector, a divisor of d (d/16)")
    g.add_argument("--train_size", type=int, help="ivf*: sampled vectors the lists are trained on (64 x nlist)")
    g.add_argument("--rescore", type=int, help="ivf*: rescore the top rescore x k exactly from embeddings.npy "
                   "(ivfpq: 4, ivfsq8: 1 = off; query may override)")
    p.add_argument("--text", action="append", default=[], help="query: a query text (repeatable)")
    p.add_argument("--image", action="append", default=[], help="query: a query image path (repeatable)")
    p.add_argument("--query_instruction", default=None, help="query: the instruction of the queries")
    p.add_argument("--k", type=int, default=10, help="query: documents returned per query")
    args = p.parse_args(argv)
    for flag in ("shard_size", "batch_size", "k") + BUILD_FLAGS + SEARCH_FLAGS:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.command == "index" and not args.corpus:
        p.error("index needs --corpus")
    if args.command == "query" and not (args.text or args.image):
        p.error("query needs --text and/or --image")
    if args.command == "query" and any(getattr(args, f) is not None for f in BUILD_FLAGS):
        p.error(f"{', '.join('--' + f for f in BUILD_FLAGS if getattr(args, f) is not None)}: "
                "index only (the index is built once)")
    flags = {f: getattr(args, f) for f in BUILD_FLAGS + SEARCH_FLAGS if getattr(args, f) is not None}
    if args.command == "query":                            # the index first: its flags checked before the model loads
        index, ids, meta = load_index(args.out)
        flags = {f: getattr(args, f) for f in SEARCH_FLAGS if getattr(args, f) is not None}
    try:
        check_index_flags(args.index_type if args.command == "index" else meta["index"]["type"], flags)
    except ValueError as e:
        p.error(f"{e}" + (f" (the index in {args.out} is {meta['index']['type']})" if args.command == "query" else ""))
    import torch

    from evaluate import Encoder
    from util.backbone import published_name
    from util.dist import print0, setup_distributed, teardown_distributed
    _, _, _, device = setup_distributed()
    encoder = Encoder(args.model, device=device, num_tokens=args.num_tokens, embed_template=args.embed_template,
                      revision=args.revision)
    if args.command == "index":
        docs = read_corpus(args.corpus, args.image_dir)
        E = encode_corpus(encoder, docs, args.out, args.instruction, args.shard_size, args.batch_size,
                          index_type=args.index_type, index_params=flags,
                          checkpoint=published_name(args.model), revision=args.revision)
        print0(f"{len(docs):,} documents → {args.out} ({E.shape[1] if E is not None else '?'} dims, "
               f"{args.index_type} index)")
        teardown_distributed()
        return E
    check_same_model(meta, encoder, os.path.join(args.out, "index.json"))
    searching = dict(meta["index"], **flags)
    set_search_params(index, searching)
    Q = torch.cat([encoder.encode(texts=args.text, instruction=args.query_instruction)] * bool(args.text)
                  + [encoder.encode(images=args.image, instruction=args.query_instruction)] * bool(args.image))
    scores, rows = search(index, Q, min(args.k, len(ids)), load_vectors(args.out), searching["rescore"])
    found = [[ids[j] for j in r if j >= 0] for r in rows]
    for q, s, names in zip(args.text + args.image, scores, found):
        print(q)
        for score, name in zip(s, names):
            print(f"  {score:.4f}  {name}")
    teardown_distributed()
    return scores, found


if __name__ == "__main__":
    main()
