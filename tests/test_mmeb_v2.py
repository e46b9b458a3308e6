"""
MMEB-V2 beside the paper's MMEB (tools/mmeb_v2.py, tools/mmeb_v2_data.read_visdoc_task,
tools/mmeb_v2.graded_ranking): visual-document retrieval in the BEIR layout, ranked against the
whole corpus, NDCG@5 with graded relevance (linear gain), Hit@1, Recall@k.

  - NDCG@5 by hand: one query, two relevant documents of different grades, score ties;
  - the global ranking's metrics == a naive per-query loop (random scores with ties);
  - the reader: graded qrels, the language filter, each malformed row named (a query id
    used twice among them);
  - end to end on a synthetic page task (coloured shapes on pages, graded qrels) through
    python tools/mmeb_v2.py: the score file == the metrics of Encoder's vectors, the report
    lists what is missing and never averages it; tools/mmeb_v2.py train --eval_visdoc_dir,
    its folders (and --eval_video_dir's) checked before training;
  - the harness's NDCG pairing (list(set(labels)) zipped with the grades): a case worked
    by hand where it differs, and its number recomputed from the saved ranking;
  - the published query counts, a count that differs said and recorded, the visdoc mean
    over 22 and 24 sets;
  - resume (embeddings stubbed): a finished task is reused only on the data it was scored
    on (revision, digest of the folder's files: a hand-computed digest), else scored again
    with the reason printed; the record is written last; file names made safe.
  - the harness's metric set (ranking_metrics) on two queries worked by hand; its layout
    (<out>/{image,video,visdoc}/<Task>_score.json) and its report script's JSON, field by field.
  - python tools/mmeb_v2.py: evaluate.py's flags and its own, through evaluate.main's hook;
    the one way in: no paper file imports tools/, evaluate.py has no MMEB-V2 flag.

    pytest tests/test_mmeb_v2.py
"""
import hashlib
import io
import json
import math
import os
import shutil
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluate as ev
from conftest import gloo_worker, shape_image
from tools import mmeb_v2
from tools.mmeb_v2_data import read_visdoc_task

COLOURS = ("red", "green", "blue", "yellow")


def png(image):
    b = io.BytesIO()
    image.save(b, format="PNG")
    return b.getvalue()


def write_visdoc(root, task, queries, corpus, qrels, split="test"):
    """A task in the BEIR layout: <root>/<task>/{queries,corpus,qrels}/<split>-00000-of-00001.parquet."""
    for part, rows in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        os.makedirs(os.path.join(root, task, part), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(root, task, part, f"{split}-00000-of-00001.parquet"))
    return os.path.join(root, task)


def synthetic_pages(root, task="ShapesPages"):
    """Eight pages (a shape of one colour, or of two colours: the second one smaller), one
    query per colour: grade 2 for the page of that colour alone, 1 for a page that also
    has it; queries carry a language (one in German, filtered out in a test)."""
    corpus, qrels, queries = [], [], []
    for i, c in enumerate(COLOURS):
        corpus.append({"corpus-id": f"p{i}", "image": {"bytes": png(shape_image(c, 84)), "path": None}})
        other = COLOURS[(i + 1) % 4]
        im = shape_image(c, 84, "square")
        im.paste(shape_image(other, 28), (56, 56))
        corpus.append({"corpus-id": f"m{i}", "image": {"bytes": png(im), "path": None}})
        queries.append({"query-id": f"q{i}", "query": f"a page with a {c} shape", "language": "english"})
        qrels += [{"query-id": f"q{i}", "corpus-id": f"p{i}", "score": 2},
                  {"query-id": f"q{i}", "corpus-id": f"m{i}", "score": 1},
                  {"query-id": f"q{i}", "corpus-id": f"p{(i + 2) % 4}", "score": 0}]   # judged, not relevant
    queries.append({"query-id": "q-de", "query": "eine Seite mit einer roten Form", "language": "german"})
    qrels.append({"query-id": "q-de", "corpus-id": "p0", "score": 1})
    return write_visdoc(root, task, queries, corpus, qrels)


# ----------------------------------------------------------------------------------
# Metrics

def test_ndcg_at_5_by_hand_with_grades_and_ties():
    """Scores d0 .9 (grade 0), d1 .8 (grade 1), d2 .8 (grade 0), d3 .7 (grade 2), d4 .1, d5 .5:
    the tie d1 = d2 ranks the non-relevant d2 first, so the top 5 is d0 d2 d1 d3 d5 with
    gains 0 0 1 2 0; the ideal order has gains 2 1."""
    scores = torch.tensor([[0.9, 0.8, 0.8, 0.7, 0.1, 0.5]])
    grades = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 0.0]])
    got = mmeb_v2.graded_ranking(scores, grades, ks=(1, 5))
    dcg = 1 / math.log2(2 + 2) + 2 / math.log2(3 + 2)          # d1 at rank 2, d3 at rank 3 (0-based)
    idcg = 2 / math.log2(0 + 2) + 1 / math.log2(1 + 2)
    assert got["ndcg_linear@5"] == pytest.approx(dcg / idcg, abs=1e-6)
    assert got["ndcg_linear@5"] == pytest.approx(0.517442, abs=1e-6)
    assert (got["hit@1"], got["recall@1"], got["recall@5"]) == (0.0, 0.0, 1.0)
    # each document keeps its own grade: swapping the grades of d1 and d3 changes the score
    swapped = mmeb_v2.graded_ranking(scores, torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0]]), ks=(5,))
    assert swapped["ndcg_linear@5"] == pytest.approx((2 / math.log2(4) + 1 / math.log2(5)) / idcg, abs=1e-6)


def naive(scores, grades, k):
    """One query at a time: sort by (-score, grade), then the definitions."""
    out = {"hit@1": 0.0, f"recall@{k}": 0.0, f"ndcg_linear@{k}": 0.0}
    for s, g in zip(scores.tolist(), grades.tolist()):
        order = sorted(range(len(s)), key=lambda j: (-s[j], g[j]))
        top = [g[j] for j in order[:k]]
        ideal = sorted(g, reverse=True)[:k]
        out["hit@1"] += float(top[0] > 0)
        out[f"recall@{k}"] += sum(x > 0 for x in top) / sum(x > 0 for x in g)
        out[f"ndcg_linear@{k}"] += sum(x / math.log2(i + 2) for i, x in enumerate(top)) / \
            sum(x / math.log2(i + 2) for i, x in enumerate(ideal))
    return {name: v / len(scores) for name, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_ranking_equals_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    nq, nd = 7, 40
    scores = (torch.rand(nq, nd, generator=g) * 4).round() / 4         # many ties
    grades = (torch.rand(nq, nd, generator=g) < 0.15).float() * torch.randint(1, 4, (nq, nd), generator=g)
    grades[:, 0] = grades[:, 0].clamp(min=1)                           # ≥ 1 relevant per query
    got = mmeb_v2.graded_ranking(scores, grades, ks=(1, 5, 10))
    for k in (5, 10):
        want = naive(scores, grades, k)
        for name, v in want.items():
            assert got[name] == pytest.approx(v, abs=1e-6), (name, k)


# ----------------------------------------------------------------------------------
# The reader

def test_reader_grades_language_and_named_errors(tmp_path):
    synthetic_pages(str(tmp_path))
    queries, corpus, qrels = read_visdoc_task(str(tmp_path), "ShapesPages")
    assert len(queries) == 5 and len(corpus) == 8
    assert qrels["q0"] == {"p0": 2, "m0": 1}                          # grade 0 is not relevant
    queries, _, qrels = read_visdoc_task(str(tmp_path), "ShapesPages", language="english")
    assert [q for q, _ in queries] == ["q0", "q1", "q2", "q3"] and "q-de" not in qrels

    def broken(name, **change):
        q = [{"query-id": "a", "query": "x"}]
        c = [{"corpus-id": "d", "image": {"bytes": png(shape_image("red")), "path": None}}]
        r = [{"query-id": "a", "corpus-id": "d", "score": 1}]
        parts = {"queries": q, "corpus": c, "qrels": r}
        for part, rows in change.items():
            parts[part] = rows
        write_visdoc(str(tmp_path), name, parts["queries"], parts["corpus"], parts["qrels"])
        return name
    cases = [(dict(qrels=[{"query-id": "a", "corpus-id": "d", "score": "high"}]), "qrels row 0: score"),
             (dict(qrels=[{"query-id": "a", "corpus-id": "zz", "score": 1}]), "qrels row 0: corpus-id 'zz'"),
             (dict(qrels=[{"query-id": "b", "corpus-id": "d", "score": 1}]), "qrels row 0: query-id 'b'"),
             (dict(qrels=[{"query-id": "a", "corpus-id": "d", "score": 0}]), "without a relevant document"),
             (dict(corpus=[{"corpus-id": "d", "image": {"bytes": None, "path": "x.png"}}]), "corpus row 0 image"),
             (dict(queries=[{"query-id": "a", "query": ""}]), "queries row 0: query"),
             (dict(queries=[{"query-id": "a", "query": "x"}, {"query-id": "b", "query": "y"},
                            {"query-id": "a", "query": "z"}]),
              r"MMEB-V2 task bad6 queries row 2: query-id 'a' repeated \(row 0\)")]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            read_visdoc_task(str(tmp_path), broken(f"bad{i}", **change))
    translated = broken("translated", queries=[{"query-id": "a", "query": "x", "language": "english"},
                                               {"query-id": "a", "query": "x-de", "language": "german"}])
    assert read_visdoc_task(str(tmp_path), translated, language="german")[0] == [("a", "x-de")]
    with pytest.raises(ValueError, match="query-id 'a' repeated \\(row 0\\) in language 'english'"):
        read_visdoc_task(str(tmp_path), broken("twice", queries=[{"query-id": "a", "query": "x", "language": "english"},
                                                                {"query-id": "a", "query": "y", "language": "english"}]))
    with pytest.raises(ValueError, match=r"qrels: columns \['score'\] missing"):
        read_visdoc_task(str(tmp_path), broken("bad_cols", qrels=[{"query-id": "a", "corpus-id": "d"}]))
    with pytest.raises(FileNotFoundError, match="corpus"):
        os.remove(os.path.join(tmp_path, "bad0", "corpus", "test-00000-of-00001.parquet"))
        read_visdoc_task(str(tmp_path), "bad0")


# ----------------------------------------------------------------------------------
# End to end

def test_evaluate_mmeb_v2_on_a_synthetic_page_task(tmp_path):
    """python tools/mmeb_v2.py on one synthetic visdoc task (tiny-qwen2-vl, K = 2):
    the score file holds the reference harness's names and equals graded_ranking of
    Encoder's vectors with the same instructions; the other 77 tasks are listed as
    missing (not requested), and no mean includes them."""
    root = tmp_path / "visdoc"
    synthetic_pages(str(root), "ViDoRe_arxivqa")                # a name of the 24: the leaderboard path
    out = tmp_path / "eval"
    res = mmeb_v2.main(["--model", "tiny-qwen2-vl", "--num_tokens", "2", "--embed_template", "chat",
                        "--visdoc_dir", str(root), "--tasks", "ViDoRe_arxivqa", "--out", str(out), "--no_progress"])
    score = json.loads((out / "mmeb_v2" / "ViDoRe_arxivqa_score.json").read_text())
    assert {"hit@1", "ndcg_linear@5", "recall@5", "ndcg_linear@10", "num_pred", "num_data"} <= set(score)
    harness = json.loads((out / "visdoc" / "ViDoRe_arxivqa_score.json").read_text())   # the harness's layout
    assert list(harness) == list(mmeb_v2.HARNESS_FIELDS) and all(harness[f] == score[f] for f in harness)
    sub = json.loads((out / "tiny-qwen2-vl.json").read_text())              # the report script's JSON
    assert sub["metrics"]["visdoc"]["ViDoRe_arxivqa"] == harness and sub["metrics"]["image"]["N24News"] == "DIR_N/A"

    enc = ev.Encoder("tiny-qwen2-vl", device="cpu", num_tokens=2, embed_template="chat")
    queries, corpus, qrels = read_visdoc_task(str(root), "ViDoRe_arxivqa")
    Q = enc.encode(texts=[mmeb_v2.VISDOC_QUERY.format(t) for _, t in queries], side="q")
    from PIL import Image
    D = enc.encode(texts=[mmeb_v2.VISDOC_DOCUMENT] * len(corpus), side="d",
                   images=[Image.open(io.BytesIO(b)) for _, b in corpus])
    grades = torch.tensor([[qrels[q].get(c, 0) for c, _ in corpus] for q, _ in queries], dtype=torch.float)
    want = naive(Q @ D.T, grades, 5)
    for name, v in want.items():
        assert score[name] == pytest.approx(v, abs=1e-5), name
    assert len(res["missing"]) == 36 + 23 + 18                    # listed with their reasons
    summary = mmeb_v2.summarize_v2(res)
    assert summary["visdoc"][1:] == (1, 24) and summary["image"] == (None, 0, 36)
    assert summary["Overall"][0] == pytest.approx(score["ndcg_linear@5"]) and summary["Overall"][1:] == (1, 78)
    table = mmeb_v2.format_v2_table(res)
    assert "ndcg_linear@5" in table and "missing (77): " in table and "not requested (--tasks)" in table
    preds = [json.loads(line) for line in (out / "mmeb_v2" / "ViDoRe_arxivqa_pred.jsonl").read_text().splitlines()]
    assert len(preds) == 5 and all(len(p["top"]) == 8 for p in preds)
    # the ranking file is the ranking the metrics read: its first documents give Hit@1
    assert sum(p["top"][0] in p["grades"] for p in preds) / len(preds) == pytest.approx(score["hit@1"])
    # a restart reuses the finished task
    again = mmeb_v2.main(["--model", "tiny-qwen2-vl", "--num_tokens", "2", "--embed_template", "chat",
                          "--visdoc_dir", str(root), "--tasks", "ViDoRe_arxivqa", "--out", str(out), "--no_progress"])
    assert again["visdoc"]["ViDoRe_arxivqa"] == res["visdoc"]["ViDoRe_arxivqa"]


def test_a_missing_task_folder_is_named_or_listed(tmp_path):
    (tmp_path / "visdoc").mkdir()
    args = ["--model", "tiny-qwen2-vl", "--visdoc_dir", str(tmp_path / "visdoc"),
            "--tasks", "VisRAG_ChartQA", "--no_progress"]
    with pytest.raises(FileNotFoundError, match="VisRAG_ChartQA.*openbmb/VisRAG-Ret-Test-ChartQA"):
        mmeb_v2.main(args)
    res = mmeb_v2.main(args + ["--skip_missing"])
    assert res["visdoc"]["VisRAG_ChartQA"] is None and "VisRAG_ChartQA" in res["missing"]
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "tiny-qwen2-vl", "--visdoc_dir", str(tmp_path)])   # tools/mmeb_v2.py's flag


def test_revision_of_a_cache_snapshot_and_a_local_download(tmp_path):
    """The data revision each result records: the snapshot folder's commit in the hub cache;
    the commits `hf download --local-dir` wrote in its .metadata files (first line); None
    for a plain copy."""
    snap = tmp_path / "hub" / "datasets--vidore--x" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "linked").symlink_to(snap)
    assert mmeb_v2.revision_of(str(snap)) == mmeb_v2.revision_of(str(tmp_path / "linked")) == "a" * 40
    local = tmp_path / "local"
    meta = local / ".cache" / "huggingface" / "download" / "corpus"
    meta.mkdir(parents=True)
    (meta / "test-0.parquet.metadata").write_text("b" * 40 + "\netag\n1712656091.1\n")
    (meta.parent / "queries.parquet.metadata").write_text("b" * 40 + "\netag\n1712656091.1\n")
    assert mmeb_v2.revision_of(str(local)) == "b" * 40
    (meta.parent / "qrels.parquet.metadata").write_text("c" * 40 + "\netag\n1712656091.1\n")
    assert mmeb_v2.revision_of(str(local)) == "b" * 40 + "," + "c" * 40
    (tmp_path / "plain").mkdir()
    assert mmeb_v2.revision_of(str(tmp_path / "plain")) is None


def test_train_eval_visdoc_dir(tmp_path, demo_benchmark):
    """tools/mmeb_v2.py train: train.py's evaluation after training, then (its after_eval hook)
    the synthetic page task and the synthetic clip tasks (tests/test_mmeb_v2_video.py)."""
    from test_mmeb_v2_video import synthetic_clip_tasks
    paths = demo_benchmark                  # make_synthetic(seed=0), the session's (conftest)
    synthetic_pages(str(tmp_path / "visdoc"))
    synthetic_clip_tasks(str(tmp_path / "video"))
    res = mmeb_v2.main(["train", "--train_data", paths["train"], "--image_dir", paths["image_dir"],
                      "--eval_data", paths["eval"], "--eval_image_dir", paths["image_dir"],
                      "--eval_tasks", "ShapesColour", "--eval_visdoc_dir", str(tmp_path / "visdoc"),
                      "--eval_video_dir", str(tmp_path / "video"),
                      "--model", "tiny-qwen2-vl", "--steps", "2", "--batch_size", "8", "--num_tokens", "2",
                      "--num_workers", "0", "--out_dir", str(tmp_path / "run"), "--log_every", "10"])
    v2 = res["mmeb_v2"]
    assert 0 <= v2["visdoc"]["ShapesPages"]["ndcg_linear@5"] <= 1
    assert mmeb_v2.summarize_v2(v2)["visdoc"][1] == 0          # a task outside the 24: in no mean
    assert "other (not in the means)" in mmeb_v2.format_v2_table(v2)
    assert mmeb_v2.summarize_v2(v2)["video"][1:] == (3, 18)
    assert all(0 <= v2["video"][t]["hit@1"] <= 1 for t in ("MSR-VTT", "SmthSmthV2", "QVHighlight"))
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "rematch_config.json").read_text())
    assert (saved["eval_visdoc_dir"], saved["eval_video_dir"]) == ("visdoc", "video")   # names, not local paths


def test_image_tasks_through_the_mmeb_reader_equal_the_v1_path(tmp_path):
    """Two image tasks in MMEB's file layouts (tests/test_evaluate.write_mmeb, named as two of
    the 36): python tools/mmeb_v2.py scores them through the MMEB reader with the numbers of
    evaluate.py's v1 path, and writes them to the harness's layout and submission JSON."""
    from test_evaluate import write_mmeb
    mmeb, img = write_mmeb(str(tmp_path))
    os.rename(os.path.join(mmeb, "TaskA"), os.path.join(mmeb, "N24News"))     # the test-*.parquet layout
    os.rename(os.path.join(mmeb, "TaskB"), os.path.join(mmeb, "VOC2007"))     # the test/*.parquet layout
    flags = ["--model", "tiny-qwen2-vl", "--num_tokens", "2", "--embed_template", "chat", "--mmeb_dir", mmeb,
             "--image_dir", img, "--tasks", "N24News", "VOC2007", "--batch_size", "4", "--no_progress"]
    v1 = ev.main(flags + ["--out", str(tmp_path / "v1")])["mmeb"]
    v2 = mmeb_v2.main(flags + ["--out", str(tmp_path / "v2")])
    assert v2["image"] == v1 and set(v1) == {"N24News", "VOC2007"}
    for task, rows in (("N24News", 5), ("VOC2007", 4)):
        score = json.loads((tmp_path / "v2" / "image" / f"{task}_score.json").read_text())
        assert score["hit@1"] == v1[task] and score["num_data"] == rows and list(score) == list(mmeb_v2.HARNESS_FIELDS)
    sub = json.loads((tmp_path / "v2" / "tiny-qwen2-vl.json").read_text())
    assert sub["metrics"]["image"]["VOC2007"]["hit@1"] == v1["VOC2007"]
    assert sub["metrics"]["image"]["ImageNet-1K"] == "FILE_N/A"


def test_mmeb_v2_comes_in_one_way():
    """The extension rule, on the import graph bench/layout.py draws (lazy imports included):
    no paper file and nothing under util/ imports tools/mmeb_v2*, and the graph has no circle."""
    from bench.layout import circles, import_graph
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rooms, edges = import_graph(repo)
    inward = [(a, b) for a, b in edges if b.startswith("tools.mmeb_v2") and rooms[a] in ("paper", "util")]
    assert inward == [] and circles(rooms, list(edges)) == []
    assert {("tools.mmeb_v2", "evaluate"), ("tools.mmeb_v2", "train"), ("tools.mmeb_v2", "tools.mmeb_v2_data")} <= set(edges)


def _rank_worker(rank, world, rendezvous, visdoc, out, err_dir):
    with gloo_worker(rank, world, rendezvous, err_dir):
        from model import load_rematch
        model, processor, config = load_rematch("tiny-qwen2-vl", device="cpu", num_tokens=2)
        for _ in range(2):                      # the second run finds the task finished, on every rank
            res = mmeb_v2.mmeb_v2_report(model, processor, visdoc_dir=visdoc, config=config, out_dir=out,
                                         progress=False, image_tasks=[], visdoc_tasks=["ViDoRe_arxivqa"])
        if rank == 1:
            with open(os.path.join(out, "rank1.json"), "w") as f:
                json.dump(res["visdoc"], f)


def test_two_ranks_score_what_one_process_scores(tmp_path):
    """Queries and pages sharded over 2 gloo ranks: the same scores as one process; a restart
    skips the finished task on both ranks (decided on rank 0, broadcast: no rank waits)."""
    from conftest import run_processes
    from model import load_rematch
    synthetic_pages(str(tmp_path / "visdoc"), "ViDoRe_arxivqa")
    model, processor, config = load_rematch("tiny-qwen2-vl", device="cpu", num_tokens=2)
    one = mmeb_v2.mmeb_v2_report(model, processor, visdoc_dir=str(tmp_path / "visdoc"), config=config,
                                 progress=False, image_tasks=[], visdoc_tasks=["ViDoRe_arxivqa"])["visdoc"]
    err = tmp_path / "err"
    err.mkdir()
    (tmp_path / "out").mkdir()
    run_processes(_rank_worker, [(r, 2, str(tmp_path / "rdv"), str(tmp_path / "visdoc"), str(tmp_path / "out"),
                                  str(err)) for r in range(2)], str(err), timeout=180)
    two = json.loads((tmp_path / "out" / "rank1.json").read_text())
    for name, v in one["ViDoRe_arxivqa"].items():
        assert two["ViDoRe_arxivqa"][name] == pytest.approx(v, abs=1e-5), name


def test_train_checks_its_mmeb_v2_folders_before_training(tmp_path, capsys):
    """tools/mmeb_v2.py train's --eval_visdoc_dir / --eval_video_dir are read after training;
    their folders are checked when the flags are parsed: it stops before train.main builds
    anything (no --out_dir), naming the flag and the folder. train.py alone has no such flag."""
    import train
    from test_mmeb_v2_video import synthetic_clip_tasks
    (tmp_path / "empty").mkdir()
    synthetic_pages(str(tmp_path / "visdoc"))
    synthetic_clip_tasks(str(tmp_path / "video"))
    run = tmp_path / "run"

    def refused(flag, folder):
        with pytest.raises(SystemExit):
            mmeb_v2.main(["train", f"--{flag}", str(folder), "--out_dir", str(run)])
        assert not run.exists()
        return capsys.readouterr().err.strip().splitlines()[-1]
    assert refused("eval_visdoc_dir", tmp_path / "nope").endswith(
        f"error: --eval_visdoc_dir {tmp_path}/nope: no folder {tmp_path}/nope")
    assert refused("eval_video_dir", tmp_path / "empty").endswith(
        f"error: --eval_video_dir {tmp_path}/empty: no task folder in {tmp_path}/empty")
    os.remove(tmp_path / "visdoc" / "ShapesPages" / "qrels" / "test-00000-of-00001.parquet")
    assert refused("eval_visdoc_dir", tmp_path / "visdoc").endswith(
        f"error: --eval_visdoc_dir {tmp_path}/visdoc: qrels: no 'test' parquet file in "
        f"{tmp_path}/visdoc/ShapesPages/qrels (looked for test-*.parquet and test/*.parquet)")
    shutil.rmtree(tmp_path / "video" / "MSR-VTT" / "frames")
    assert refused("eval_video_dir", tmp_path / "video").endswith(
        f"error: --eval_video_dir {tmp_path}/video: MSR-VTT: no frame folder {tmp_path}/video/MSR-VTT/frames")
    (tmp_path / "video" / "MSR-VTT").rename(tmp_path / "video" / "MSRVTT")
    assert "['MSRVTT'] are not MMEB-V2 video tasks" in refused("eval_video_dir", tmp_path / "video")
    shutil.rmtree(tmp_path / "video" / "MSRVTT")
    p = train.build_parser()
    mmeb_v2.add_train_flags(p)
    args = train.parse_args(["--eval_video_dir", str(tmp_path / "video")], p)
    mmeb_v2.check_train_flags(args, p.error)                      # passes: the folder is fine now
    assert args.eval_video_dir == str(tmp_path / "video")
    with pytest.raises(SystemExit):
        train.parse_args(["--eval_video_dir", str(tmp_path / "video")])   # not a train.py flag
    shutil.rmtree(tmp_path / "visdoc" / "ShapesPages")
    synthetic_pages(str(tmp_path / "visdoc"), "QVHighlight")     # a page task named as a video task
    with pytest.raises(SystemExit):
        mmeb_v2.main(["train", "--eval_visdoc_dir", str(tmp_path / "visdoc"), "--eval_video_dir",
                      str(tmp_path / "video"), "--out_dir", str(run)])
    assert capsys.readouterr().err.strip().endswith(
        "MMEB-V2 tasks 'QVHighlight' and 'QVHighlight' would write the same files (QVHighlight_score.json ...): "
        "rename one task folder")


# ----------------------------------------------------------------------------------
# Resume, with the embeddings stubbed (a fixed random vector per input)

@pytest.fixture
def stubbed(monkeypatch):
    """ev.embed_inputs → one vector per input seeded by its text and picture (the same input,
    the same vector, in any run); `calls` counts the tasks embedded."""
    calls = []

    def embed(model, processor, inputs, *a, **k):
        calls.append(k.get("desc"))
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(
            zlib.crc32(repr((side, text, visual)).encode()))) for side, text, visual in inputs])
    monkeypatch.setattr(mmeb_v2.ev, "embed_inputs", embed)
    return calls


def report(root, out, tasks, calls, **kw):
    """mmeb_v2_report on visdoc tasks under root → (results, the tasks it embedded)."""
    calls.clear()
    kw.setdefault("video_tasks", [])
    model = torch.nn.Linear(2, 2)
    torch.nn.init.ones_(model.weight), torch.nn.init.zeros_(model.bias)      # the same weights every run
    res = mmeb_v2.mmeb_v2_report(model, None, visdoc_dir=root and str(root), config={"m": 1},
                                 out_dir=str(out), progress=False, image_tasks=[], visdoc_tasks=tasks, **kw)
    return res, list(calls)


def test_a_finished_task_is_reused_only_on_the_same_data(tmp_path, stubbed, capsys):
    root, out = tmp_path / "visdoc", tmp_path / "eval"
    task = synthetic_pages(str(root), "ViDoRe_arxivqa")
    first, scored = report(root, out, ["ViDoRe_arxivqa"], stubbed)
    assert scored == ["ViDoRe_arxivqa"]
    record = json.loads((out / "mmeb_v2" / "ViDoRe_arxivqa.json").read_text())
    parts = ("corpus", "qrels", "queries")                  # os.walk's sorted order; each file's bytes
    want = hashlib.sha256("".join(
        f"{p}/test-00000-of-00001.parquet\0"
        f"{hashlib.sha256(open(os.path.join(task, p, 'test-00000-of-00001.parquet'), 'rb').read()).hexdigest()}\n"
        for p in parts).encode()).hexdigest()
    assert (record["revision"], record["data_sha256"], record["data_files"]) == (None, want, 3)
    capsys.readouterr()

    def again(rootdir=root, **kw):
        res, scored = report(rootdir, out, ["ViDoRe_arxivqa"], stubbed, **kw)
        return scored, capsys.readouterr().out
    scored, said = again()
    assert scored == [] and "(finished earlier, skipped)" in said
    qrels = os.path.join(task, "qrels", "test-00000-of-00001.parquet")
    os.utime(qrels, (1, 1))                                  # touched: same bytes
    (tmp_path / "visdoc" / "ViDoRe_arxivqa" / ".DS_Store").write_bytes(b"Bud1")   # hidden: not data
    assert again()[0] == []
    shutil.copytree(root, tmp_path / "copy")                 # another folder (machine): same digest
    assert again(tmp_path / "copy")[0] == []
    assert again(None)[1].count("(finished earlier, skipped; its data not checked: no --visdoc_dir)") == 1

    rows = pq.read_table(qrels).to_pylist()
    rows[1]["score"] = 2                                     # one grade changed
    pq.write_table(pa.Table.from_pylist(rows), qrels)
    scored, said = again()
    assert scored == ["ViDoRe_arxivqa"]
    assert "ViDoRe_arxivqa: finished earlier, scored again: the task folder's files changed (data digest; " \
           "3 files then, 3 now)" in said
    meta = root / "ViDoRe_arxivqa" / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "qrels.metadata").write_text("b" * 40 + "\netag\n1712656091.1\n")
    scored, said = again()
    assert scored == ["ViDoRe_arxivqa"] and f"scored again: data revision None → {'b' * 40}\n" in said
    path = out / "mmeb_v2" / "ViDoRe_arxivqa.json"
    old = json.loads(path.read_text())
    del old["data_sha256"]                                   # a record of the run before digests
    path.write_text(json.dumps(old))
    scored, said = again()
    assert scored == ["ViDoRe_arxivqa"] and "no data digest (written before digests were kept)" in said
    shutil.move(str(root / "ViDoRe_arxivqa"), str(tmp_path / "away"))
    res, scored = report(root, out, ["ViDoRe_arxivqa"], stubbed, skip_missing=True)
    assert scored == [] and res["visdoc"]["ViDoRe_arxivqa"] is None
    assert f"scored again: no folder {root}/ViDoRe_arxivqa to check it against" in capsys.readouterr().out


def test_the_record_is_written_last(tmp_path, stubbed, monkeypatch):
    """The score file, the ranking file, then the record a restart reads: a crash before the
    record leaves the task unfinished, scored again on restart."""
    root, out = tmp_path / "visdoc", tmp_path / "eval"
    synthetic_pages(str(root), "ViDoRe_arxivqa")
    written, real = [], (mmeb_v2.write_json, mmeb_v2.write_atomic)

    def log(i):
        def write(path, obj):
            written.append(os.path.basename(path))
            if os.path.basename(path).endswith("_pred.jsonl") and crash:
                raise OSError("disk full")
            return real[i](path, obj)
        return write
    monkeypatch.setattr(mmeb_v2, "write_json", log(0))
    monkeypatch.setattr(mmeb_v2, "write_atomic", log(1))
    crash = True
    with pytest.raises(OSError, match="disk full"):
        report(root, out, ["ViDoRe_arxivqa"], stubbed)
    assert sorted(os.listdir(out / "mmeb_v2")) == ["ViDoRe_arxivqa_score.json"]
    crash, written[:] = False, []
    assert report(root, out, ["ViDoRe_arxivqa"], stubbed)[1] == ["ViDoRe_arxivqa"]
    assert written[:3] == ["ViDoRe_arxivqa_score.json", "ViDoRe_arxivqa_pred.jsonl", "ViDoRe_arxivqa.json"]


def test_task_names_make_safe_file_names(tmp_path, stubbed):
    """A task name with '/' or '..' (a visdoc_table dict may hold any) writes inside
    <out>/mmeb_v2/ only; two names that become one file name are refused."""
    from util.run import safe_name
    assert [safe_name(n) for n in ("MSR-VTT", "ViDoRe_arxivqa", "a/b", "../../x", "..", ".hidden", "", "a b:c")] == \
        ["MSR-VTT", "ViDoRe_arxivqa", "a_b", "_.._.._x", "_..", "_.hidden", "_", "a_b_c"]
    synthetic_pages(str(tmp_path), "escape")                 # tmp/escape, beside the root tmp/visdoc
    (tmp_path / "visdoc").mkdir()
    out = tmp_path / "eval"
    res, _ = report(tmp_path / "visdoc", out, {"../escape": ("other", "x", "test", None)}, stubbed)
    assert 0 <= res["visdoc"]["../escape"]["hit@1"] <= 1
    assert sorted(os.listdir(out / "mmeb_v2")) == ["_.._escape.json", "_.._escape_pred.jsonl",
                                                   "_.._escape_score.json"]
    assert sorted(os.listdir(tmp_path)) == ["escape", "eval", "visdoc"]        # nothing written beside out
    assert report(tmp_path / "visdoc", out, {"../escape": ("other", "x", "test", None)}, stubbed)[1] == []
    with pytest.raises(ValueError, match=r"MMEB-V2 tasks 'a/b' and 'a_b' would write the same files "
                                         r"\(a_b_score.json ...\): rename one task folder"):
        report(tmp_path, out, {"a/b": ("other", "x", "test", None), "a_b": ("other", "x", "test", None)}, stubbed)
    with pytest.raises(ValueError, match="MMEB-V2 tasks 'MSR-VTT' and 'MSR-VTT' would write the same files"):
        report(tmp_path, out, {"MSR-VTT": ("other", "x", "test", None)}, stubbed, video_tasks=["MSR-VTT"])


# ----------------------------------------------------------------------------------
# The data vintage on record

def test_the_published_query_counts_and_hub_ids_on_record():
    """The counts (num_data) of the harness's published score files (EXPECTED_QUERIES), a
    few read by hand, every one of the 78 tasks with one; the video hub ids are the
    harness's current ones (src/constant/dataset_hf_path.py)."""
    from tools.mmeb_v2_data import VIDEO_SOURCES
    want = {"MVBench": 4000, "NExTQA": 8564, "YouCook2": 3179, "MomentSeeker": 1602, "Video-MME": 2700,
            "Breakfast": 433, "ViDoSeek-page": 1142, "MMLongBench-page": 838, "ViDoRe_esg_reports_human_labeled_v2": 52,
            "VisRAG_ChartQA": 63, "ImageNet-1K": 1000}
    assert {t: mmeb_v2.EXPECTED_QUERIES[t] for t in want} == want
    assert set(mmeb_v2.EXPECTED_QUERIES) == {*mmeb_v2.MMEB_EVAL_TASKS, *mmeb_v2.VISDOC_TASKS, *mmeb_v2.VIDEO_TASKS}
    assert all(isinstance(n, int) and n > 0 for n in mmeb_v2.EXPECTED_QUERIES.values())
    assert {t: VIDEO_SOURCES[t][:3] for t in ("MVBench", "Video-MME", "NExTQA", "EgoSchema", "YouCook2")} == {
        "MVBench": ("VLM2Vec/MVBench", VIDEO_SOURCES["MVBench"][1], "train"),
        "Video-MME": ("VLM2Vec/Video-MME", None, "test"), "NExTQA": ("VLM2Vec/NExTQA", "MC", "test"),
        "EgoSchema": ("VLM2Vec/EgoSchema", "Subset", "test"), "YouCook2": ("lmms-lab/YouCook2", None, "val")}
    assert mmeb_v2.VISDOC_TASKS["ViDoSeek-page"][1] == "VLM2Vec/ViDoSeek-page-fixed"
    assert len(mmeb_v2.VISDOC_22) == 22 and "MMLongBench-page" not in mmeb_v2.VISDOC_22
    assert mmeb_v2.count_note("MomentSeeker", 1602) == ""
    assert mmeb_v2.count_note("MomentSeeker", 1800) == \
        " [1800 queries here, 1602 in the published score files: another data vintage?]"


def test_a_query_count_unlike_the_published_one_is_said_and_recorded(tmp_path, stubbed, capsys):
    """ViDoRe_arxivqa with 5 queries (500 published): the note beside the score, the record's
    expected_num_data / num_data_matches, the results' num_data, the table's line; on
    restart too. A task outside the 78 has no count on record: no note."""
    root, out = tmp_path / "visdoc", tmp_path / "eval"
    synthetic_pages(str(root), "ViDoRe_arxivqa")
    synthetic_pages(str(root), "ShapesPages")
    table = {"ViDoRe_arxivqa": mmeb_v2.VISDOC_TASKS["ViDoRe_arxivqa"], "ShapesPages": ("other", "x", "test", None)}
    res, _ = report(root, out, table, stubbed)
    said = capsys.readouterr().out
    note = " [5 queries here, 500 in the published score files: another data vintage?]"
    assert f"(5 queries, 8 documents){note}\n" in said and "ShapesPages: NDCG@5" in said
    assert said.count("another data vintage") == 1
    record = json.loads((out / "mmeb_v2" / "ViDoRe_arxivqa.json").read_text())
    assert (record["expected_num_data"], record["num_data_matches"], record["scores"]["num_data"]) == (500, False, 5)
    other = json.loads((out / "mmeb_v2" / "ShapesPages.json").read_text())
    assert (other["expected_num_data"], other["num_data_matches"]) == (None, None)
    assert res["num_data"] == {"ViDoRe_arxivqa": [5, 500], "ShapesPages": [5, None]}
    assert "query counts that differ from the published score files (here / published): ViDoRe_arxivqa 5 / 500" \
        in mmeb_v2.format_v2_table(res)
    res, _ = report(root, out, table, stubbed)
    assert f"(finished earlier, skipped){note}" in capsys.readouterr().out


def test_the_visdoc_mean_over_22_and_over_24():
    """Visdoc scores: 0.5 on the 22, 1.0 on the two page sets → 24-set mean (22·0.5 + 2)/24 =
    13/24, 22-set mean 0.5; both printed. With one of the 22 missing: 21 of 22."""
    vis = {t: {"ndcg_linear@5": 1.0 if t in ("ViDoSeek-page", "MMLongBench-page") else 0.5}
           for t in mmeb_v2.VISDOC_TASKS}
    res = {"image": {}, "visdoc": vis, "video": {}, "missing": {}}
    s = mmeb_v2.summarize_v2(res)
    assert s["visdoc"] == (pytest.approx(13 / 24), 24, 24) and s["visdoc-22"] == (pytest.approx(0.5), 22, 22)
    assert "visdoc over 22 sets (the 24 without ViDoSeek-page and MMLongBench-page, as the harness's newest " \
           "visdoc comparisons): 50.0 (22/22); over the 24: 54.2 (24/24)" in mmeb_v2.format_v2_table(res)
    vis["ViDoRe_arxivqa"] = None
    s = mmeb_v2.summarize_v2(res)
    assert s["visdoc-22"] == (pytest.approx(0.5), 21, 22) and s["visdoc"][1:] == (23, 24)
    assert "50.0* (21/22)" in mmeb_v2.format_v2_table(res)


# ----------------------------------------------------------------------------------
# The harness's NDCG pairing (list(set(labels)) zipped with the grades in qrels order)

def test_the_harness_pairing_by_hand():
    """One query, pages 2 (grade 2) and 9 (grade 1) in qrels order, ranked 2, 9, 5.
    Here: DCG = 2 + 1/log2(3) = IDCG → 1. The harness: list(set([2, 9])) is [9, 2] in
    CPython (an int hashes to itself: 9 sits in slot 9 & 7 = 1, 2 in slot 2), zipped with
    the grades [2, 1]: page 9 gets 2, page 2 gets 1 → DCG = 1 + 2/log2(3), the same IDCG."""
    assert list(set([2, 9])) == [9, 2]
    ranking = [{"query-id": "q", "top": ["2", "9", "5"], "grades": {"2": 2, "9": 1}}]
    ours = mmeb_v2.graded_ranking(torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[2.0, 1.0, 0.0]]), (5,))
    assert ours["ndcg_linear@5"] == pytest.approx(1.0)
    theirs = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))             # 0.8597
    assert mmeb_v2.harness_pairing_ndcg(ranking, ints=True) == pytest.approx(theirs)
    as_str = mmeb_v2.harness_pairing_ndcg(ranking, ints=False)    # set order of "2", "9": PYTHONHASHSEED=0's
    assert as_str in (pytest.approx(1.0), pytest.approx(theirs))
    assert mmeb_v2.harness_set_orders([["2", "9"]] * 3) == [mmeb_v2.harness_set_orders([["2", "9"]])[0]] * 3
    ranking.append({"query-id": "r", "top": ["5", "2"], "grades": {"2": 1}})       # one page: pairs right
    assert mmeb_v2.harness_pairing_ndcg(ranking, ints=True) == pytest.approx((theirs + 1 / math.log2(3)) / 2)
    same = [{"query-id": "q", "top": ["2", "9"], "grades": {"2": 1, "9": 1}}]      # equal grades: no difference
    assert mmeb_v2.harness_pairing_ndcg(same, ints=True) == pytest.approx(1.0)
    assert mmeb_v2.harness_pairing_ndcg(ranking[1:], ints=True) is None           # no query with several pages


def test_the_harness_pairing_is_scored_from_the_saved_ranking(tmp_path, monkeypatch, capsys):
    """A page task with int ids ranked 2, 9, 5 by stubbed vectors: the score file keeps both
    NDCG@5s under their own names, recomputed from <Task>_pred.jsonl; the line and the
    table print both."""
    root, out = tmp_path / "visdoc", tmp_path / "eval"
    write_visdoc(str(root), "ViDoRe_esg_reports_v2_multilingual",
                 [{"query-id": 0, "query": "q"}],
                 [{"corpus-id": c, "image": {"bytes": png(shape_image(k, 28)), "path": None}}
                  for c, k in ((2, "red"), (9, "green"), (5, "blue"))],
                 [{"query-id": 0, "corpus-id": 2, "score": 2}, {"query-id": 0, "corpus-id": 9, "score": 1}])
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])     # the query, pages 2, 9, 5
    monkeypatch.setattr(mmeb_v2.ev, "embed_inputs", lambda model, processor, inputs, *a, **k: vectors)
    res, _ = report(root, out, ["ViDoRe_esg_reports_v2_multilingual"], [])
    score = json.loads((out / "mmeb_v2" / "ViDoRe_esg_reports_v2_multilingual_score.json").read_text())
    theirs = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert score["ndcg_linear@5"] == pytest.approx(1.0) and score["corpus_ids"] == "int"
    assert score["ndcg_linear@5_harness_pairing"] == pytest.approx(theirs)
    lines = [json.loads(x) for x in
             (out / "mmeb_v2" / "ViDoRe_esg_reports_v2_multilingual_pred.jsonl").read_text().splitlines()]
    assert lines == [{"query-id": "0", "top": ["2", "9", "5"], "grades": {"2": 2, "9": 1}}]
    assert mmeb_v2.harness_pairing_ndcg(lines, ints=True) == pytest.approx(score["ndcg_linear@5_harness_pairing"])
    assert "NDCG@5 (linear) 100.0 (the harness's label/grade pairing: 86.0), Hit@1 100.0" in capsys.readouterr().out
    assert "ViDoRe_esg_reports_v2_multilingual 86.0 (here 100.0)" in mmeb_v2.format_v2_table(res)


def test_the_harness_metric_set_by_hand():
    """ranking_metrics on two queries worked by hand, k = 1 and 5. A: labels {a, b, c},
    ranked x a y b z: at 5 two hits at ranks 2 and 4. B: grades {q: 2, p: 1, r: 0} (r not
    relevant), ranked p q: at 1 the grade-1 page first."""
    lines = [{"top": ["x", "a", "y", "b", "z"], "labels": ["a", "b", "c"]},
             {"top": ["p", "q"], "grades": {"q": 2, "p": 1, "r": 0}}]
    got = mmeb_v2.ranking_metrics(lines, ks=(1, 5))
    d = lambda i: 1 / math.log2(i + 1)                                 # noqa: E731  the discount of rank i
    want_a = {"hit@1": 0, "precision@1": 0, "recall@1": 0, "f1@1": 0, "map@1": 0, "mrr@1": 0,
              "ndcg_linear@1": 0, "ndcg_exponential@1": 0,
              "hit@5": 1, "precision@5": 2 / 5, "recall@5": 2 / 3, "f1@5": 0.5,
              "map@5": (1 / 2 + 2 / 4) / 3, "mrr@5": 1 / 2,
              "ndcg_linear@5": (d(2) + d(4)) / (1 + d(2) + d(3)),
              "ndcg_exponential@5": (d(2) + d(4)) / (1 + d(2) + d(3))}              # binary: 2^1 - 1 = 1
    want_b = {"hit@1": 1, "precision@1": 1, "recall@1": 1 / 2, "f1@1": 2 / 3, "map@1": 1, "mrr@1": 1,
              "ndcg_linear@1": 1 / 2, "ndcg_exponential@1": 1 / 3,
              "hit@5": 1, "precision@5": 2 / 5, "recall@5": 1, "f1@5": 2 * 0.4 / 1.4, "map@5": 1, "mrr@5": 1,
              "ndcg_linear@5": (1 + 2 * d(2)) / (2 + d(2)), "ndcg_exponential@5": (1 + 3 * d(2)) / (3 + d(2))}
    assert list(got) == [f"{m}@{k}" for m in mmeb_v2.HARNESS_METRICS for k in (1, 5)] + ["num_pred", "num_data"]
    for name in want_a:
        assert got[name] == pytest.approx((want_a[name] + want_b[name]) / 2), name
    assert got["num_pred"] == got["num_data"] == 2
    with pytest.raises(ValueError, match="no relevant id"):
        mmeb_v2.ranking_metrics([{"top": ["p"], "grades": {"p": 0}}])


def test_the_harness_layout_and_submission_field_by_field(tmp_path):
    """write_harness_layout + harness_submission on a hand-made result: image/visdoc/video
    folders of <Task>_score.json with only the harness's fields, and the report script's
    JSON: every dataset of its lists, in its order, a score dict or FILE_N/A / DIR_N/A, the
    two page sets renamed -page-fixed as the leaderboard's script renames them."""
    full = {**{f: 0.5 for f in mmeb_v2.HARNESS_FIELDS}, "num_pred": 3, "num_data": 3}
    results = {"image": {"N24News": 0.25, "VOC2007": None},
               "visdoc": {"ViDoSeek-page": {**full, "num_docs": 9, "candidate_text": "harness"}},
               "video": {}, "num_data": {"N24News": [4, 1000], "ViDoSeek-page": [3, 1142]}}
    mmeb_v2.write_harness_layout(str(tmp_path), results)
    assert sorted(os.listdir(tmp_path)) == ["image", "visdoc"]           # no video ran: no folder
    assert json.loads((tmp_path / "image" / "N24News_score.json").read_text()) == \
        {"hit@1": 0.25, "num_pred": 4, "num_data": 4}
    assert json.loads((tmp_path / "visdoc" / "ViDoSeek-page_score.json").read_text()) == full
    (tmp_path / "image" / "VizWiz_score.json").write_text("{not json")
    sub = mmeb_v2.harness_submission(str(tmp_path), "m/1", date="2026-01-01T00:00:00")
    assert json.loads((tmp_path / "m_1.json").read_text()) == sub
    assert sub["metadata"] == {"model_name": "m/1", "report_generated_date": "2026-01-01T00:00:00"}
    assert list(sub["metrics"]) == ["image", "video", "visdoc"]
    assert [len(sub["metrics"][k]) for k in sub["metrics"]] == [36, 18, 24]
    assert list(sub["metrics"]["video"])[:3] == ["K700", "SmthSmthV2", "HMDB51"]
    assert list(sub["metrics"]["visdoc"])[10:12] == ["ViDoRe_esg_reports_human_labeled_v2",
                                                     "ViDoRe_biomedical_lectures_v2_multilingual"]
    assert sub["metrics"]["image"]["N24News"] == {"hit@1": 0.25, "num_pred": 4, "num_data": 4}
    assert sub["metrics"]["image"]["VizWiz"] == "JSON_ERROR"
    assert sub["metrics"]["image"]["VOC2007"] == "FILE_N/A"
    assert sub["metrics"]["visdoc"]["ViDoSeek-page-fixed"] == full and "ViDoSeek-page" not in sub["metrics"]["visdoc"]
    assert sub["metrics"]["visdoc"]["MMLongBench-page-fixed"] == "FILE_N/A"      # the leaderboard's names
    assert sub["metrics"]["visdoc"]["MMLongBench-doc"] == "FILE_N/A"
    assert set(sub["metrics"]["video"].values()) == {"DIR_N/A"}


def test_the_one_command(tmp_path, monkeypatch, capsys):
    """python tools/mmeb_v2.py: evaluate.py's flags and its own, handed to evaluate.main with
    its `benchmark` hook; another benchmark refused naming the flag; it runs as a script."""
    import subprocess
    import sys
    seen = {}
    monkeypatch.setattr(ev, "main", lambda args, benchmark: seen.update(args=args, hook=benchmark) or {"mmeb_v2": "ran"})
    root = tmp_path / "visdoc"
    synthetic_pages(str(root), "ViDoRe_arxivqa")
    assert mmeb_v2.main(["--model", "tiny-qwen2-vl", "--visdoc_dir", str(root), "--skip_missing",
                         "--out", str(tmp_path / "eval")]) == "ran"
    args = seen["args"]
    assert (args.benchmark, args.visdoc_dir, args.skip_missing, seen["hook"]) == ("mmeb", str(root), True,
                                                                                  mmeb_v2.run_cli)
    with pytest.raises(SystemExit):
        mmeb_v2.main(["--model", "tiny-qwen2-vl", "--benchmark", "synthetic", "--mmeb_dir", str(tmp_path)])
    assert "MMEB-V2's image tasks are MMEB's 36: no --benchmark / --task_table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mmeb_v2.main(["--model", "tiny-qwen2-vl"])
    assert "nothing to do: give --mmeb_dir (with --image_dir) and/or --zeroshot (with --data_dir) or " \
           "--visdoc_dir or --video_dir" in capsys.readouterr().err
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "tools", "mmeb_v2.py"), "--help"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0 and "--visdoc_dir" in done.stdout and "--skip_missing" in done.stdout


def test_the_harness_metric_set_of_an_image_task(tmp_path, monkeypatch):
    """HarnessImageMetrics on hand-made scores (column 0 the positive, -inf padding): ranks 1,
    3 (a tie counts against it) and a NaN positive (a miss at every k); hit@1 is mmeb_report's
    Hit@1. mmeb_v2_report passes it to mmeb_report and writes its numbers to image/."""
    from types import SimpleNamespace
    from util.run import result_path, write_json
    scores = torch.tensor([[0.9, 0.1, 0.5, float("-inf")], [0.2, 0.5, 0.2, float("-inf")],
                           [float("nan"), 0.1, float("-inf"), float("-inf")]])
    got = mmeb_v2.HarnessImageMetrics().run(None, None, SimpleNamespace(scores=scores), "T")
    assert got["hit@1"] == pytest.approx(ev.hit_at_1(scores)) == pytest.approx(1 / 3)
    assert got["hit@5"] == pytest.approx(2 / 3) and got["mrr@5"] == pytest.approx((1 + 1 / 3) / 3)
    assert got["precision@5"] == pytest.approx(2 / 5 / 3) and got["map@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert got["ndcg_linear@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3) and got["num_data"] == 3

    def fake(model, processor, mmeb_dir, image_dir, table, config, batch_size, out_dir, *a, extras=(), **k):
        assert [x.name for x in extras] == ["harness_metrics"]
        write_json(result_path(out_dir, "mmeb", "N24News"), {"num_queries": 3})
        return {"hit@1": {"N24News": 1 / 3}, "harness_metrics": {"N24News": got}}
    monkeypatch.setattr(mmeb_v2.ev, "mmeb_report", fake)
    res = mmeb_v2.mmeb_v2_report(torch.nn.Linear(2, 2), None, "mmeb", "images", out_dir=str(tmp_path),
                                 progress=False, image_tasks=["N24News"], visdoc_tasks=[], video_tasks=[])
    assert res["image_metrics"] == {"N24News": got}
    score = json.loads((tmp_path / "image" / "N24News_score.json").read_text())
    assert list(score) == list(mmeb_v2.HARNESS_FIELDS) and score == {**got, "hit@1": 1 / 3}
    assert json.loads((tmp_path / "model.json").read_text())["metrics"]["image"]["N24News"] == score
