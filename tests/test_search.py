"""Corpus search through a real index (tools/search.py, faiss-cpu).

Run:  python -m pytest -q tests/test_search.py

- on a checkpoint trained on the demo's data: retrieval through the index over a demo
  eval task's candidates gives the same Hit@1 as evaluate.py's mmeb_report;
- a folder corpus: each document's vector equals Encoder.encode's, queries return them;
- resumable: finished shards are not embedded again; a missing one, or one without a
  manifest (written by the older version), is;
- never reused when it was encoded from something else, each case ending with vectors (and
  the index's own) equal to a fresh index's in a new folder: (a) the corpus changed (a file
  added and one removed: only the shards whose ids changed; every later one when ids
  shift; same ids with other content), (b) another model (other weights of the same base),
  (c) another --shard_size, (d) another --instruction (image vectors checked against
  Encoder.encode's); the weights hash tells weights, dtype and K apart;
- load_index refuses ids, vectors and an index of different lengths, naming the files; a
  failed final write leaves no index.json (an incomplete folder) and no temporary file;
- a text file that is not UTF-8 and a corrupt image stop naming their path;
- every index type builds streamed from an .npy file, saves, loads memory-mapped and finds
  each vector's own row first; flat's top 10 equals numpy's argsort;
- `query` reads index.faiss (memory-mapped) and never rebuilds it, answers as numpy does
  over Encoder.encode's query vector, and refuses a query model with other weights;
- 2 gloo ranks write the same embeddings as one process.
"""
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

faiss = pytest.importorskip("faiss")

import evaluate as ev  # noqa: E402
import train  # noqa: E402
from conftest import gloo_worker, run_processes, shape_image  # noqa: E402
from tools import search  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402
from util.inputs import BadImageError, BadItemError  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return ev.Encoder("tiny-qwen2-vl", device="cpu")


@pytest.fixture
def encodes(monkeypatch):
    """The number of documents of each embed_inputs call (one call per encoded shard)."""
    calls, real = [], ev.embed_inputs
    monkeypatch.setattr(ev, "embed_inputs", lambda m, p, inputs, *a, **k: calls.append(len(inputs))
                        or real(m, p, inputs, *a, **k))
    return calls


def write_texts(folder, names, text="document {}"):
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / f"{n}.txt").write_text(text.format(n))
    return str(folder)


def assert_equals_fresh(enc, docs, out, fresh, **kw):
    """The folder `out` holds what a first run into the new folder `fresh` writes: the same
    vectors (embeddings.npy and the index's own), ids and metadata."""
    want = search.encode_corpus(enc, docs, str(fresh), progress=False, **kw)
    index, ids, meta = search.load_index(str(out))
    _, ids_f, meta_f = search.load_index(str(fresh))
    np.testing.assert_array_equal(search.load_vectors(str(out)), want)
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), want)         # flat: the vectors themselves
    assert ids == ids_f == [d[0] for d in docs] and meta == meta_f


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory, demo_benchmark):
    """A few steps of training on the demo's data (no evaluation): checkpoint, eval dir, images."""
    root = tmp_path_factory.mktemp("demo")
    paths = demo_benchmark                  # make_synthetic(seed=0), the session's (conftest)
    out = str(root / "run")
    train.main(["--train_data", paths["train"], "--image_dir", paths["image_dir"], "--model", "tiny-qwen2-vl",
                "--steps", "3", "--batch_size", "8", "--num_tokens", "4", "--lr", "1e-3", "--warmup_steps", "1",
                "--num_workers", "0", "--out_dir", out, "--log_every", "10"])
    return os.path.join(out, "checkpoint-3"), paths["eval"], paths["image_dir"]


@pytest.mark.parametrize("task", ["ShapesColour", "ShapesShape"])
def test_index_retrieval_equals_evaluate_hit_at_1(demo_ckpt, tmp_path, task):
    """Every row of these tasks ranks the task's whole candidate set, so searching the index
    of the distinct candidates is evaluate.py's ranking: the same Hit@1."""
    ckpt, eval_dir, image_dir = demo_ckpt
    enc = ev.Encoder(ckpt, device="cpu")
    from demo import DEMO_EVAL_TASKS
    table = {task: DEMO_EVAL_TASKS[task]}
    want = ev.mmeb_report(enc.model, enc.processor, eval_dir, image_dir, table, enc.config, progress=False)["hit@1"][task]
    rows = read_eval_task(eval_dir, task)
    q_keys, d_keys, pairs = ev.task_items(rows, task, enc.config, meta=table[task][0])
    assert all(sorted(set(c)) == list(range(len(d_keys))) for _, c in pairs)     # the whole set each row
    pq.write_table(pa.Table.from_pylist([{"id": str(j), "text": t, "image": p} for j, (t, p) in enumerate(d_keys)]),
                   tmp_path / "corpus.parquet")
    docs = search.read_corpus(str(tmp_path / "corpus.parquet"), image_dir)
    E = search.encode_corpus(enc, [(i, t, im) for i, t, im in docs], str(tmp_path / "index"), instruction=None,
                             shard_size=4, progress=False)
    index, ids, meta = search.load_index(str(tmp_path / "index"))
    assert meta["count"] == len(d_keys) and E.shape == (len(d_keys), 64)
    Q = ev.embed_inputs(enc.model, enc.processor, [("q", t, os.path.join(image_dir, p) if p else None)
                                                   for t, p in q_keys], distributed=False)
    _, top = search.search(index, Q, 1)                                            # (nq, 1)
    got = sum(ids[top[qi][0]] == str(c[0]) for qi, c in pairs) / len(pairs)
    assert got == pytest.approx(want) and 0 < want


def test_a_folder_corpus_and_queries(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "img").mkdir(parents=True)
    shape_image("red").save(corpus / "img" / "red.png")
    shape_image("blue", shape="square").save(corpus / "img" / "blue.png")
    (corpus / "note.txt").write_text("a green triangle\n")
    docs = search.read_corpus(str(corpus))
    assert sorted(d[0] for d in docs) == ["img/blue.png", "img/red.png", "note.txt"]
    enc = ev.Encoder("tiny-qwen2-vl", device="cpu", num_tokens=2, embed_template="chat")
    E = search.encode_corpus(enc, docs, str(tmp_path / "idx"), shard_size=2, progress=False)
    for (name, text, image), e in zip(docs, E):
        want = enc.encode(texts=[text], side="d") if image is None else \
            enc.encode(images=[image], instruction=search.IMAGE_INSTRUCTION, side="d")
        np.testing.assert_allclose(e, want[0].numpy(), atol=1e-5)
    scores, found = search.main(["query", "--model", "tiny-qwen2-vl", "--num_tokens", "2", "--embed_template", "chat",
                                 "--index", str(tmp_path / "idx"), "--text", "a green triangle", "--k", "3"])
    assert sorted(found[0]) == sorted(d[0] for d in docs) and scores.shape == (1, 3)
    assert np.all(np.diff(scores[0]) <= 1e-6)                                  # best first


def test_encoding_resumes_from_finished_shards(tmp_path, enc, encodes, capsys):
    docs = search.read_corpus(write_texts(tmp_path / "corpus", range(5)))
    out = tmp_path / "idx"
    first = np.array(search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False))
    assert encodes == [2, 2, 1]
    encodes.clear()
    again = search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert encodes == [] and np.array_equal(first, again)
    os.remove(out / "shards" / "000001.npy")                                  # a killed job's missing shard
    os.remove(out / "shards" / "000002.json")                                 # a shard of the row-count version
    again = search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert encodes == [2, 1] and np.array_equal(first, again)
    assert "shard 1: not encoded yet; shard 2: no manifest" in capsys.readouterr().out
    assert json.loads((out / "ids.json").read_text()) == [d[0] for d in docs]


def test_a_changed_corpus_is_re_encoded_where_it_changed(tmp_path, enc, encodes, capsys):
    corpus = tmp_path / "corpus"
    write_texts(corpus, [f"a{i}" for i in range(6)])                           # shards [a0 a1] [a2 a3] [a4 a5]
    out = tmp_path / "idx"
    search.encode_corpus(enc, search.read_corpus(str(corpus)), str(out), shard_size=2, progress=False)
    os.remove(corpus / "a3.txt")                                                 # one removed, another added in its place
    write_texts(corpus, ["a3b"])
    encodes.clear()
    docs = search.read_corpus(str(corpus))
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert encodes == [2] and "2 shard(s) reused, 1 to encode (shard 1: ids changed)" in capsys.readouterr().out
    assert_equals_fresh(enc, docs, out, tmp_path / "fresh1", shard_size=2)
    os.remove(corpus / "a1.txt")                                                 # the case: every later id shifts
    write_texts(corpus, ["a6"])
    encodes.clear()
    docs = search.read_corpus(str(corpus))
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert encodes == [2, 2, 2]
    assert_equals_fresh(enc, docs, out, tmp_path / "fresh2", shard_size=2)
    (corpus / "a6.txt").write_text("other words under the same name")           # same ids, other content
    encodes.clear()
    docs = search.read_corpus(str(corpus))
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert encodes == [2] and "shard 2: document content changed" in capsys.readouterr().out
    assert_equals_fresh(enc, docs, out, tmp_path / "fresh3", shard_size=2)


def test_another_model_re_encodes_every_shard(tmp_path, enc, encodes, capsys):
    docs = search.read_corpus(write_texts(tmp_path / "corpus", range(5)))
    out = tmp_path / "idx"
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False, checkpoint="ckpt-a")
    other = ev.Encoder("tiny-qwen2-vl", device="cpu")
    with torch.no_grad():                                                        # another checkpoint of the same base
        other.model.backbone.get_input_embeddings().weight.mul_(1.5)
    encodes.clear()
    search.encode_corpus(other, docs, str(out), shard_size=2, progress=False, checkpoint="ckpt-b")
    assert encodes == [2, 2, 1] and "shard 0: weights changed" in capsys.readouterr().out
    assert_equals_fresh(other, docs, out, tmp_path / "fresh", shard_size=2, checkpoint="ckpt-b")
    meta = json.loads((out / "index.json").read_text())
    assert (meta["checkpoint"], meta["base_model"]) == ("ckpt-b", "tiny-qwen2-vl")
    assert meta["weights_sha256"] == search.weights_sha256(other.model) != search.weights_sha256(enc.model)


def test_weights_sha256_tells_weights_apart(enc):
    h = search.weights_sha256(enc.model)
    assert search.weights_sha256(ev.Encoder("tiny-qwen2-vl", device="cpu").model) == h           # same weights
    assert search.weights_sha256(ev.Encoder("tiny-qwen2-vl", device="cpu", num_tokens=2).model) != h   # + L_q, L_d
    nudged = ev.Encoder("tiny-qwen2-vl", device="cpu")
    with torch.no_grad():
        w = next(nudged.model.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(np.inf))                   # one ulp
    assert search.weights_sha256(nudged.model) != h
    assert search.weights_sha256(ev.Encoder("tiny-qwen2-vl", device="cpu").model.to(torch.bfloat16)) != h


def test_another_shard_size_re_encodes(tmp_path, enc, encodes, capsys):
    docs = search.read_corpus(write_texts(tmp_path / "corpus", range(5)))
    out = tmp_path / "idx"
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    encodes.clear()
    search.encode_corpus(enc, docs, str(out), shard_size=3, progress=False)
    assert encodes == [3, 2] and "shard 0: shard size 2 -> 3" in capsys.readouterr().out
    assert sorted(os.listdir(out / "shards")) == ["000000.json", "000000.npy", "000001.json", "000001.npy"]
    assert_equals_fresh(enc, docs, out, tmp_path / "fresh", shard_size=3)


def test_another_instruction_re_encodes(tmp_path, enc, encodes, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "img").mkdir(parents=True)
    shape_image("red").save(corpus / "img" / "red.png")
    shape_image("blue", shape="square").save(corpus / "img" / "blue.png")
    write_texts(corpus, ["note"])
    docs = search.read_corpus(str(corpus))
    out = tmp_path / "idx"
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    encodes.clear()
    E = search.encode_corpus(enc, docs, str(out), instruction="Find this picture.", shard_size=2, progress=False)
    assert encodes == [2, 1] and "shard 0: instruction 'Represent the given image.' -> 'Find this picture.'" \
        in capsys.readouterr().out
    i = next(i for i, (_, _, image) in enumerate(docs) if image)
    want = enc.encode(images=[docs[i][2]], instruction="Find this picture.", side="d")[0].numpy()
    np.testing.assert_allclose(E[i], want, atol=1e-5)
    assert_equals_fresh(enc, docs, out, tmp_path / "fresh", instruction="Find this picture.", shard_size=2)


def test_load_index_refuses_files_that_disagree(tmp_path, enc, monkeypatch):
    docs = search.read_corpus(write_texts(tmp_path / "corpus", range(5)))
    out = tmp_path / "idx"
    search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    ids_path = out / "ids.json"
    ids = json.loads(ids_path.read_text())
    ids_path.write_text(json.dumps(ids[:-1]))
    with pytest.raises(ValueError, match=rf"{re.escape(str(ids_path))} holds 4 ids but .*embeddings.npy 5 vectors"):
        search.load_index(str(out))
    ids_path.write_text(json.dumps(ids))
    small = faiss.IndexFlatIP(64)
    small.add(np.eye(3, 64, dtype=np.float32))
    faiss.write_index(small, str(out / "index.faiss"))
    with pytest.raises(ValueError, match=r"index.faiss holds 3 vectors of dim 64 but .*embeddings.npy 5"):
        search.load_index(str(out))
    monkeypatch.setattr(faiss, "write_index", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):                              # a failed final write
        search.encode_corpus(enc, docs, str(out), shard_size=2, progress=False)
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    with pytest.raises(FileNotFoundError, match="index.json: missing"):
        search.load_index(str(out))


def test_a_bad_corpus_file_names_its_path(tmp_path, enc):
    corpus = write_texts(tmp_path / "corpus", ["fine"])
    bad = tmp_path / "corpus" / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(BadItemError, match=rf"{re.escape(str(bad))}: cannot read it as UTF-8"):
        search.read_corpus(corpus)
    os.remove(bad)
    broken = tmp_path / "corpus" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a png")
    docs = search.read_corpus(corpus)
    with pytest.raises(BadImageError, match=rf"cannot read image {re.escape(str(broken))}"):
        search.encode_corpus(enc, docs, str(tmp_path / "idx"), progress=False)


def clustered(n, d, centres, spread=1.0, seed=0):
    """n unit vectors: random centres plus Gaussian noise of norm ~spread (cosine to the centre ~0.7)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((centres, d)) / np.sqrt(d)
    X = C[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)              # (n, d) unit rows


@pytest.mark.parametrize("kind", search.INDEX_TYPES)
def test_index_types_build_save_and_load_memory_mapped(tmp_path, kind, monkeypatch):
    X = clustered(3000, 64, 300)                                                           # 10 per cluster
    path = str(tmp_path / "vectors.npy")
    np.save(path, X)
    monkeypatch.setattr(search, "CHUNK_BYTES", 64 * 4 * 700)                    # streamed in 5 chunks
    index, p = search.build_index(path, kind)
    assert index.ntotal == len(X) and p["type"] == kind
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    back = faiss.read_index(str(tmp_path / "index.faiss"), search.mmap_flag(kind))
    search.set_search_params(back, p)
    Q = X[::60]                                                                            # 50 of the vectors
    scores, rows = search.search(back, Q, 10, np.load(path, mmap_mode="r"), p["rescore"])
    assert list(rows[:, 0]) == list(range(0, 3000, 60))                                    # each finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-2 if kind in ("ivfsq8",) else 1e-5)
    np.testing.assert_array_equal(rows, search.search(index, Q, 10, np.load(path, mmap_mode="r"), p["rescore"])[1])
    if kind == "flat":
        np.testing.assert_array_equal(rows, np.argsort(-(Q @ X.T), axis=1, kind="stable")[:, :10])   # (50, 3000)


def test_query_reads_the_index_it_wrote(tmp_path, monkeypatch):
    corpus = write_texts(tmp_path / "corpus", range(7))
    out = str(tmp_path / "idx")
    search.main(["index", "--model", "tiny-qwen2-vl", "--corpus", corpus, "--out", out, "--shard_size", "3",
                 "--index_type", "ivfpq"])
    meta = json.load(open(os.path.join(out, "index.json")))
    assert meta["checkpoint"] == "tiny-qwen2-vl" and meta["index"]["type"] == "ivfpq" and meta["count"] == 7
    reads, real = [], faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda path, flags=0: reads.append((path, flags)) or real(path, flags))
    monkeypatch.setattr(search, "build_index", lambda *a, **k: pytest.fail("query rebuilt the index"))
    scores, found = search.main(["query", "--model", "tiny-qwen2-vl", "--index", out, "--text", "document 3", "--k", "3"])
    assert reads == [(os.path.join(out, "index.faiss"), faiss.IO_FLAG_MMAP)]
    q = ev.Encoder("tiny-qwen2-vl", device="cpu").encode(texts=["document 3"])[0].numpy()          # (d,)
    s = np.load(os.path.join(out, "embeddings.npy")) @ q                                         # (7, d) @ (d,) → (7,)
    ids = json.load(open(os.path.join(out, "ids.json")))
    assert found[0] == [ids[j] for j in np.argsort(-s, kind="stable")[:3]]                       # rescored: exact
    with pytest.raises(ValueError, match="not comparable"):
        search.main(["query", "--model", "tiny-qwen2-vl", "--num_tokens", "2", "--index", out, "--text", "x"])
    with pytest.raises(SystemExit):
        search.main(["query", "--model", "tiny-qwen2-vl", "--index", out, "--text", "x", "--ef_search", "8"])


def _rank_worker(rank, world, rendezvous, corpus, out, err_dir):
    with gloo_worker(rank, world, rendezvous, err_dir):
        enc = ev.Encoder("tiny-qwen2-vl", device="cpu")
        search.encode_corpus(enc, search.read_corpus(corpus), out, shard_size=2, progress=False)


def test_two_ranks_write_what_one_process_writes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"document number {i}")
    one = search.encode_corpus(ev.Encoder("tiny-qwen2-vl", device="cpu"), search.read_corpus(str(corpus)),
                               str(tmp_path / "one"), shard_size=2, progress=False)
    err = tmp_path / "err"
    err.mkdir()
    run_processes(_rank_worker, [(r, 2, str(tmp_path / "rdv"), str(corpus), str(tmp_path / "two"), str(err))
                                 for r in range(2)], str(err), timeout=120)
    np.testing.assert_allclose(np.load(tmp_path / "two" / "embeddings.npy"), one, atol=1e-6)
