"""Corpus search through a real index (tools/search.py, faiss-cpu).

Run:  python -m pytest -q tests/test_search.py

- on a checkpoint trained on the demo's data: retrieval through the index over a demo
  eval task's candidates gives the same Hit@1 as evaluate.py's mmeb_report;
- a folder corpus: each document's vector equals Encoder.encode's, queries return them;
- resumable: finished shards are not embedded again, a missing one is;
- 2 gloo ranks write the same embeddings as one process.
"""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("faiss")

import evaluate as ev  # noqa: E402
import train  # noqa: E402
from conftest import gloo_worker, run_processes, shape_image  # noqa: E402
from tools import search  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """A few steps of training on the demo's data (no evaluation): checkpoint, eval dir, images."""
    from demo import make_synthetic
    root = tmp_path_factory.mktemp("demo")
    paths = make_synthetic(str(root / "data"), seed=0)
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
    scores, found = search.main(["query", "--model", "tiny-qwen2-vl", "--index", str(tmp_path / "idx"),
                                 "--text", "a green triangle", "--k", "3"])
    assert sorted(found[0]) == sorted(d[0] for d in docs) and scores.shape == (1, 3)
    assert np.all(np.diff(scores[0]) <= 1e-6)                                  # best first


def test_encoding_resumes_from_finished_shards(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"document number {i}")
    docs = search.read_corpus(str(corpus))
    enc = ev.Encoder("tiny-qwen2-vl", device="cpu")
    first = search.encode_corpus(enc, docs, str(tmp_path / "idx"), shard_size=2, progress=False)
    calls, real = [], search.embed_inputs
    monkeypatch.setattr(search, "embed_inputs", lambda m, p, inputs, *a, **k: calls.append(len(inputs)) or real(m, p, inputs, *a, **k))
    again = search.encode_corpus(enc, docs, str(tmp_path / "idx"), shard_size=2, progress=False)
    assert calls == [] and np.array_equal(first, again)
    os.remove(tmp_path / "idx" / "shards" / "000001.npy")                       # a killed job's missing shard
    again = search.encode_corpus(enc, docs, str(tmp_path / "idx"), shard_size=2, progress=False)
    assert calls == [2] and np.array_equal(first, again)
    assert json.loads((tmp_path / "idx" / "ids.json").read_text()) == [d[0] for d in docs]


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
