"""
Corpus search with a trained ReMatch checkpoint through a real vector index, as users do it
after training: encode a corpus once, build an exact inner-product index (faiss-cpu
IndexFlatIP on L2-normalised vectors: cosine, Eq. 1's argmax), query it.

    python tools/search.py index --model CKPT --corpus photos/ --out runs/index
    python tools/search.py index --model CKPT --corpus corpus.parquet --out runs/index
    torchrun --standalone --nproc_per_node=8 tools/search.py index --model CKPT --corpus ... --out ...
    python tools/search.py query --model CKPT --index runs/index --text "a dog on a beach" --k 5

Corpus: a folder (every *.jpg / *.jpeg / *.png / *.webp is an image document, every *.txt
a text document, named by its relative path), or a parquet file with a `text` and/or an
`image` column (an image path, relative to --image_dir) and an optional `id` column.
Documents are embedded with the document tokens L_d, as MMEB's candidates: an image with
`--instruction` (default "Represent the given image."), a text as it is (pass your
target prompt in it if the checkpoint was trained with target instructions).

Encoding is cut into shards of --shard_size documents; shard s is rank s mod W's, written
as <out>/shards/<s>.npy when finished (atomically), so a rerun skips finished shards and a
killed job resumes; rank 0 then writes <out>/embeddings.npy, ids.json and index.json
(model, instruction, count). Why faiss: its exact flat index is the reference the
approximate ones are measured against, one pip wheel with no other dependency (usearch
would do as well; the test pins the exact search). Tests: pytest tests/test_search.py
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import Encoder, embed_inputs, format_input  # noqa: E402
from util.dist import print0, rank_world, setup_distributed, teardown_distributed  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_INSTRUCTION = "Represent the given image."


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
                    with open(full, encoding="utf-8") as fh:
                        docs.append((rel, fh.read().strip(), None))
        if not docs:
            raise FileNotFoundError(f"{path}: no image (*{', *'.join(IMAGE_SUFFIXES)}) or *.txt document")
        return docs
    from util.inputs import read_rows
    rows = read_rows([path])
    if not rows or not ({"text", "image"} & set(rows[0])):
        raise ValueError(f"{path}: expected a parquet file with a `text` and/or an `image` column")
    docs = []
    for i, r in enumerate(rows):
        text, image = r.get("text") or None, r.get("image") or None
        if text is None and image is None:
            raise ValueError(f"{path} row {i}: neither text nor image")
        docs.append((str(r.get("id", i)), text, os.path.join(image_dir or "", image) if image else None))
    return docs


def encode_corpus(encoder, docs, out_dir, instruction=IMAGE_INSTRUCTION, shard_size=1024, batch_size=32,
                  progress=True):
    """Embed `docs` (read_corpus) with L_d into <out_dir>/embeddings.npy (N, d) float32, L2-
    normalised, in order; resumable and sharded over ranks (module doc). Returns the array
    on rank 0 (None on the others)."""
    from tqdm import tqdm
    rank, world = rank_world()
    shards = os.path.join(out_dir, "shards")
    os.makedirs(shards, exist_ok=True)
    n_shards = (len(docs) + shard_size - 1) // shard_size
    mine = [s for s in range(n_shards) if s % world == rank]
    for s in tqdm(mine, desc="encode shards", disable=not progress or rank != 0):
        path = os.path.join(shards, f"{s:06d}.npy")
        part = docs[s * shard_size:(s + 1) * shard_size]
        if os.path.isfile(path) and np.load(path, mmap_mode="r").shape[0] == len(part):
            continue                                        # finished by an earlier run
        inputs = [("d", format_input(t, im is not None, instruction if im is not None else None), im)
                  for _, t, im in part]
        E = embed_inputs(encoder.model, encoder.processor, inputs, batch_size, desc=f"shard {s}",
                         distributed=False)                                  # (n, d)
        E = torch.nn.functional.normalize(E.float(), dim=-1).numpy()
        with open(path + ".tmp", "wb") as f:
            np.save(f, E)
        os.replace(path + ".tmp", path)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    E = np.concatenate([np.load(os.path.join(shards, f"{s:06d}.npy")) for s in range(n_shards)])   # (N, d)
    np.save(os.path.join(out_dir, "embeddings.npy"), E)
    with open(os.path.join(out_dir, "ids.json"), "w") as f:
        json.dump([i for i, _, _ in docs], f)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump({"model": encoder.config.get("model"), "instruction": instruction, "count": len(docs),
                   "dim": int(E.shape[1])}, f, indent=2)
    return E


def build_index(E):
    """faiss.IndexFlatIP over L2-normalised float32 vectors E (N, d): exact cosine search."""
    import faiss
    index = faiss.IndexFlatIP(E.shape[1])
    index.add(np.ascontiguousarray(E, dtype=np.float32))
    return index


def search(index, Q, k):
    """Q (nq, d) → (scores (nq, k), row numbers (nq, k)), best first; Q is L2-normalised here."""
    Q = np.ascontiguousarray(torch.nn.functional.normalize(torch.as_tensor(Q).float(), dim=-1).numpy())
    return index.search(Q, k)


def load_index(out_dir):
    """(faiss index, ids, metadata) of an index folder written by encode_corpus."""
    with open(os.path.join(out_dir, "index.json")) as f:
        meta = json.load(f)
    with open(os.path.join(out_dir, "ids.json")) as f:
        ids = json.load(f)
    return build_index(np.load(os.path.join(out_dir, "embeddings.npy"))), ids, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("index", "query"))
    p.add_argument("--model", required=True, help="train.py checkpoint folder or its hub id")
    p.add_argument("--corpus", help="index: a folder of images / *.txt, or a parquet file (text, image[, id])")
    p.add_argument("--image_dir", default=None, help="index: root of a parquet corpus's image paths")
    p.add_argument("--out", "--index", dest="out", required=True, help="the index folder")
    p.add_argument("--instruction", default=IMAGE_INSTRUCTION, help="instruction of image documents")
    p.add_argument("--shard_size", type=int, default=1024, help="documents per shard file")
    p.add_argument("--batch_size", type=int, default=32, help="documents per forward")
    p.add_argument("--text", action="append", default=[], help="query: a query text (repeatable)")
    p.add_argument("--image", action="append", default=[], help="query: a query image path (repeatable)")
    p.add_argument("--query_instruction", default=None, help="query: the instruction of the queries")
    p.add_argument("--k", type=int, default=10, help="query: documents returned per query")
    args = p.parse_args(argv)
    for flag in ("shard_size", "batch_size", "k"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.command == "index" and not args.corpus:
        p.error("index needs --corpus")
    if args.command == "query" and not (args.text or args.image):
        p.error("query needs --text and/or --image")
    _, _, _, device = setup_distributed()
    encoder = Encoder(args.model, device=device)
    if args.command == "index":
        docs = read_corpus(args.corpus, args.image_dir)
        E = encode_corpus(encoder, docs, args.out, args.instruction, args.shard_size, args.batch_size)
        print0(f"{len(docs):,} documents → {args.out} ({E.shape[1] if E is not None else '?'} dims)")
        teardown_distributed()
        return E
    index, ids, _ = load_index(args.out)
    Q = torch.cat([encoder.encode(texts=args.text, instruction=args.query_instruction)] * bool(args.text)
                  + [encoder.encode(images=args.image, instruction=args.query_instruction)] * bool(args.image))
    scores, rows = search(index, Q, min(args.k, len(ids)))
    for q, s, r in zip(args.text + args.image, scores, rows):
        print(q)
        for score, row in zip(s, r):
            print(f"  {score:.4f}  {ids[row]}")
    teardown_distributed()
    return scores, [[ids[j] for j in r] for r in rows]


if __name__ == "__main__":
    main()
