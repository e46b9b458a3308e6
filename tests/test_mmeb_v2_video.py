"""
MMEB-V2's video tasks (tools/mmeb_v2_data.read_video_task, tools/mmeb_v2.eval_video_task) on
fixture folders: the task's rows (jsonl or parquet) and frames/ of frame folders.

  - the readers build what the reference harness builds, hand-written per task kind:
    instructions, the QA prompt's options, candidate names and texts (letters stripped or
    kept), the correct names, local or global ranking, the class list of global CLS tasks
    (its shipped default and classes.txt: tests/test_mmeb_v2_classes.py);
  - frames and moments as the harness: a clip of fewer than 8 frames as it is,
    MomentSeeker's clips whole, every positive* folder of a moment video a label;
  - malformed rows and missing frame folders are named; a video id that leaves frames/
    (absolute, "..") is refused; hidden files of frame folders are left out and counted;
  - end to end through python tools/mmeb_v2.py --video_dir on synthetic clip tasks
    (coloured shapes per video): a global text-to-video task, a local classification task
    and a moment-retrieval task; each Hit@1 == a naive loop that embeds every item alone;
    the report's video group counts and a restart that reuses the finished tasks;
  - text candidates: the harness's raw text by default, the checkpoint's target
    instructions only with --v2_target_instructions (video and image tasks), recorded per
    task; a restart does not reuse a score of the other choice.

    pytest tests/test_mmeb_v2_video.py
"""
import json
import os
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import evaluate as ev
from conftest import shape_image
from tools import mmeb_v2
from tools.mmeb_v2_data import MVBENCH_SUBSETS, V_QA_PROMPT, V_TARGET, read_video_task
from util.video import Clip

COLOURS = ("red", "green", "blue", "yellow")


def frames(folder, colour="red", n=3):
    """n frames frame_0001.jpg.. of one colour, the shape alternating (a clip that moves)."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        shape_image(colour, 56, ("circle", "square")[i % 2]).save(os.path.join(folder, f"frame_{i + 1:04d}.jpg"))


def task_dir(root, task, rows, videos=(), subset=None):
    """<root>/<task>/ with rows (one .jsonl, or parquet under subset/) and frames/<video>/."""
    d = os.path.join(root, task)
    os.makedirs(d, exist_ok=True)
    if subset:
        os.makedirs(os.path.join(d, subset), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(d, subset, "test-00000-of-00001.parquet"))
    else:
        with open(os.path.join(d, "rows.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    for v, colour in videos:
        frames(os.path.join(d, "frames", v), colour)
    os.makedirs(os.path.join(d, "frames"), exist_ok=True)
    return d


def one(root, task, rows, videos, subset=None):
    task_dir(str(root), task, rows, videos, subset)
    queries, cands, ranking = read_video_task(str(root), task)
    return queries, cands, ranking


# ----------------------------------------------------------------------------------
# Readers: what the harness builds, by hand

def test_qa_readers_build_the_harness_prompts_and_candidates(tmp_path):
    q, c, r = one(tmp_path, "Video-MME", [{"question": "What is shown?", "videoID": "v1", "answer": "B",
                                           "options": ["A. A cat.", "B. A red ball.", "C. Nothing"]}], [("v1", "red")])
    assert r == "local" and q[0][0] == (f"<|video_1|> {V_QA_PROMPT} What is shown?\nA. A cat.\nB. A red ball.\n"
                                        "C. Nothing")
    assert "Question:  What" in q[0][0]                                 # the prompt's space + the harness's
    assert q[0][2] == ["A. A cat.", "B. A red ball.", "C. Nothing"] and q[0][3] == ["B. A red ball."]
    assert [c[n][0] for n in q[0][2]] == ["A cat", "A red ball", "Nothing"]   # letter and final '.' stripped
    assert isinstance(q[0][1], Clip) and len(q[0][1].frames) == 3           # 3 frames: passed as they are

    q, c, _ = one(tmp_path, "EgoSchema", [{"question": "Why?", "video_idx": "e1", "answer": "0",
                                           "option": ["A. to eat", "B. to sleep"]}], [("e1", "red")], "Subset")
    assert q[0][0] == f"<|video_1|> {V_QA_PROMPT} Why?A. to eat B. to sleep"   # no separator after the question
    assert q[0][3] == ["A. to eat"] and c["B. to sleep"][0] == "to sleep"

    q, c, _ = one(tmp_path, "NExTQA", [{"question": "who runs", "video": 7, "answer": 1, "qid": 0,
                                        **{f"a{j}": f"opt {j}" for j in range(5)}}], [("7", "red")], "MC")
    assert q[0][0] == (f"<|video_1|> {V_QA_PROMPT} who runs\nOptions:\n" +
                       "\n".join(f"({'ABCDE'[j]}) opt {j}" for j in range(5)))
    assert q[0][2] == [f"opt {j}" for j in range(5)] and q[0][3] == ["opt 1"] and c["opt 1"] == ("opt 1", None)

    q, c, _ = one(tmp_path, "ActivityNetQA", [{"question": "is it red", "video_name": "x9", "answer": "yes"}],
                  [("v_x9", "red")])
    assert q[0][0] == f"<|video_1|> {V_QA_PROMPT} is it red? (A) yes; (B) no." and q[0][2:] == (["yes", "no"], ["yes"])


def test_mvbench_reads_every_subset_and_keeps_the_letters(tmp_path):
    d = tmp_path / "MVBench"
    for sub in MVBENCH_SUBSETS[:2]:
        os.makedirs(d / sub)
        pq.write_table(pa.Table.from_pylist([{"question": f"q {sub}", "video": "a.mp4", "candidates": ["x", "y"],
                                              "answer": "y"}]), str(d / sub / "train-00000-of-00001.parquet"))
        frames(str(d / "frames" / sub / "a.mp4"))
    with pytest.raises(FileNotFoundError, match="MMEB-V2 MVBench: no 'train' parquet file in .*action_prediction"):
        read_video_task(str(tmp_path), "MVBench")
    for sub in MVBENCH_SUBSETS[2:]:
        os.makedirs(d / sub)
        pq.write_table(pa.Table.from_pylist([{"question": "q", "video": "b.mp4", "candidates": ["x", "y"],
                                              "answer": "x"}]), str(d / sub / "train-00000-of-00001.parquet"))
        frames(str(d / "frames" / sub / "b.mp4"))
    q, c, r = read_video_task(str(tmp_path), "MVBench")
    assert len(q) == 20 and q[0][0].endswith("q episodic_reasoning\nOptions:\n(A) x\n(B) y")
    assert q[0][2] == ["(A) x", "(B) y"] and q[0][3] == ["(B) y"] and c["(B) y"] == ("(B) y", None)
    assert q[0][1].frames[0].endswith("frames/episodic_reasoning/a.mp4/frame_0001.jpg")


def test_classification_and_retrieval_readers(tmp_path):
    rows = [{"video_id": "v1", "pos_text": "ride_bike"}, {"video_id": "v2", "pos_text": "fencing"}]
    q, c, r = one(tmp_path, "HMDB51", rows, [("v1", "red"), ("v2", "blue")])
    assert r == "global" and len(c) == 51 and list(c)[:3] == ["ride_bike", "fencing", "wave"]   # the shipped list
    (tmp_path / "HMDB51" / "classes.txt").write_text("fencing\nclimb\n\nride_bike\n")
    q, c, r = read_video_task(str(tmp_path), "HMDB51")
    assert r == "global" and list(c) == ["ride_bike", "fencing", "climb"]      # seen first, then the class list
    assert q[0][0] == "<|video_1|> What actions or objects interactions are the person in the video doing?"
    assert q[0][2] is None and q[1][3] == ["fencing"]

    q, c, r = one(tmp_path, "SmthSmthV2", [{"video_id": 3, "pos_text": "Pushing x", "neg_text": ["Pulling x", "Pushing x"]}],
                  [("3", "red")])
    assert r == "local" and q[0][2:] == (["Pulling x", "Pushing x"], ["Pushing x"])

    q, c, r = one(tmp_path, "MSVD", [{"video_id": "m1", "caption": ["a dog runs", "a dog"]},
                                     {"video_id": "m1", "caption": ["the dog again"]}], [("m1", "red")])
    assert r == "global" and q[0] == ("Find the video snippet that corresponds to the given summary: a dog runs",
                                      None, None, ["m1"])
    assert list(c) == ["m1"] and c["m1"][0] == "<|video_1|> Understand the content of the provided video."
    q, c, _ = one(tmp_path, "DiDeMo", [{"video": "videos/abc.mp4", "caption": "x"}], [("abc", "red")])
    assert list(c) == ["abc"]


def test_moment_retrieval_readers(tmp_path):
    d = task_dir(str(tmp_path), "QVHighlight", [{"query": "a man waves", "video_path": "vids/clipA.mp4"}])
    for sub, colour in (("query", "red"), ("positive", "red"), ("negative_1", "blue"), ("negative_2", "green")):
        frames(os.path.join(d, "frames", "clipA", sub), colour)
    q, c, r = read_video_task(str(tmp_path), "QVHighlight")
    assert r == "local" and q[0][2] == ["clipA/negative_1", "clipA/negative_2", "clipA/positive"]
    assert q[0][3] == ["clipA/positive"] and q[0][1].frames[0].endswith("clipA/query/frame_0001.jpg")
    assert q[0][0] == ("<|video_1|> Find the clip that corresponds to the described scene in the given video: "
                       "a man waves")

    rows = [{"query": "the cut", "input_frames": "shots/q.jpg", "positive_frames": [{"output_path": "a/p1.mp4"}],
             "negative_frames": [{"output_path": "a/n1.mp4"}]},
            {"query": "then", "input_frames": "", "positive_frames": [{"output_path": "a/p1.mp4"}],
             "negative_frames": [{"output_path": "a/n1.mp4"}]}]
    d = task_dir(str(tmp_path), "MomentSeeker", rows, [("video_frames/a_p1", "red"), ("video_frames/a_n1", "blue")])
    q, c, _ = read_video_task(str(tmp_path), "MomentSeeker")
    assert q[0][0] == "<|image_1|> Select the video clip that aligns with the given text and image: the cut"
    assert q[0][1].endswith(os.path.join("frames", "query_shots/q.jpg"))
    assert q[1][:2] == ("Find the clip that corresponds to the given text: then", None)
    assert q[0][2:] == (["video_frames/a_p1", "video_frames/a_n1"], ["video_frames/a_p1"])
    assert c["video_frames/a_n1"][0] == "<|video_1|> Understand the content of the provided video clip."


def test_moments_frames_and_labels_as_the_harness(tmp_path, capsys):
    """QVHighlight with two folders named positive*: both are labels (the harness's
    moment_retrieval_datasets.py warns, then keeps both), said once for the task; its
    clips of 10 frames give 8 (linspace), of 3 frames 3. MomentSeeker's clips and query
    video keep every frame (the harness's momentseeker_dataset.py: load_frames, no sampling)."""
    d = task_dir(str(tmp_path), "QVHighlight", [{"query": "a jump", "video_path": "v/clipB.mp4"}])
    for sub, colour, n in (("query", "red", 10), ("positive_1", "red", 3), ("positive_2", "red", 10),
                           ("negative_1", "blue", 3)):
        frames(os.path.join(d, "frames", "clipB", sub), colour, n)
    capsys.readouterr()
    q, c, _ = read_video_task(str(tmp_path), "QVHighlight")
    assert q[0][2] == ["clipB/negative_1", "clipB/positive_1", "clipB/positive_2"]
    assert q[0][3] == ["clipB/positive_1", "clipB/positive_2"]
    assert f"MMEB-V2 QVHighlight: 1 moment video(s) with several clip folders named positive*, each a label of " \
           f"its query (the harness keeps them all too), e.g. {d}/frames/clipB (positive_1, positive_2)" \
        in capsys.readouterr().out
    assert [len(x.frames) for x in (q[0][1], c["clipB/positive_1"][1], c["clipB/positive_2"][1])] == [8, 3, 8]
    rows = [{"query": "then", "input_frames": "a/q.mp4", "positive_frames": [{"output_path": "a/p1.mp4"}],
             "negative_frames": [{"output_path": "a/n1.mp4"}]}]
    d = task_dir(str(tmp_path), "MomentSeeker", rows)
    for name, n in (("a_q", 12), ("a_p1", 10), ("a_n1", 3)):
        frames(os.path.join(d, "frames", "video_frames", name), "red", n)
    q, c, _ = read_video_task(str(tmp_path), "MomentSeeker")
    assert (len(q[0][1].frames), len(c["video_frames/a_p1"][1].frames), len(c["video_frames/a_n1"][1].frames)) \
        == (12, 10, 3)


def test_bad_rows_and_missing_frames_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="MSR-VTT row 0: no frame folder .*frames/v404"):
        one(tmp_path, "MSR-VTT", [{"video_id": "v404", "caption": "x"}], [], "test_1k")
    with pytest.raises(ValueError, match="SmthSmthV2 row 0: pos_text 'a' is not among"):
        one(tmp_path, "SmthSmthV2", [{"video_id": "s", "pos_text": "a", "neg_text": ["b"]}], [("s", "red")])
    with pytest.raises(ValueError, match="Video-MME row 0 answer: 'E' names none of its 2 options"):
        one(tmp_path, "Video-MME", [{"question": "q", "videoID": "v", "answer": "E", "options": ["A. x", "B. y"]}],
            [("v", "red")])
    with pytest.raises(ValueError, match="VATEX row 0 enCap: expected a list"):
        one(tmp_path, "VATEX", [{"videoID": "v", "enCap": "one caption"}], [("v", "red")])
    (tmp_path / "VATEX" / "rows.jsonl").write_text('{"videoID": "v", "enCap": ["a"]}\n\n{"videoID": "w", \n')
    with pytest.raises(ValueError, match=r"VATEX: .*rows.jsonl line 3 is not JSON"):
        read_video_task(str(tmp_path), "VATEX")
    (tmp_path / "VATEX" / "rows.jsonl").write_text('["v", "a"]\n')
    with pytest.raises(ValueError, match=r"VATEX: .*rows.jsonl line 1 is not a JSON object"):
        read_video_task(str(tmp_path), "VATEX")
    with pytest.raises(FileNotFoundError, match="MMEB-V2 UCF101: no frame folder"):
        os.makedirs(tmp_path / "UCF101")
        read_video_task(str(tmp_path), "UCF101")
    assert mmeb_v2.video_tasks_in(str(tmp_path)) == ["MSR-VTT", "SmthSmthV2", "UCF101", "VATEX", "Video-MME"]
    (tmp_path / "MyClips").mkdir()
    with pytest.raises(ValueError, match=r"folder\(s\) \['MyClips'\] are not MMEB-V2 video tasks"):
        mmeb_v2.video_tasks_in(str(tmp_path))


@pytest.mark.parametrize("task, row, name", [
    ("MSR-VTT", {"video_id": "../../outside", "caption": "x"}, "../../outside"),
    ("MSR-VTT", {"video_id": "v/../../../outside", "caption": "x"}, "v/../../../outside"),
    ("MSR-VTT", {"video_id": "OUTSIDE", "caption": "x"}, "OUTSIDE"),               # absolute: filled in below
    ("QVHighlight", {"query": "q", "video_path": "vids/.."}, ".."),
    ("MomentSeeker", {"query": "q", "input_frames": "../../../outside/f.jpg",
                      "positive_frames": [{"output_path": "a/p1.mp4"}]}, "query_../../../outside/f.jpg"),
])
def test_a_video_id_stays_in_the_task_folder(tmp_path, task, row, name):
    """Frames outside the task's frames/ exist (tmp/outside, tmp/video/MSR-VTT/x); a row that
    names them is refused with its row and id, never read."""
    frames(str(tmp_path / "outside"))
    if name == "OUTSIDE":
        name = row["video_id"] = str(tmp_path / "outside")
    root = tmp_path / "video"
    d = task_dir(str(root), task, [row], [("video_frames/a_p1", "red")], "test_1k" if task == "MSR-VTT" else None)
    frames(os.path.join(d, "x"))
    with pytest.raises(ValueError) as e:
        read_video_task(str(root), task)
    assert str(e.value) == (f"MMEB-V2 {task} row 0: video id {name!r} leaves the task's frame folder "
                            f"{d}/frames (an absolute path, or '..')")


def test_hidden_files_of_frame_folders_are_left_out_and_counted(tmp_path, capsys):
    """A macOS copy: "._frame_0001.jpg" beside each frame (no image inside) and .DS_Store;
    the clips read the 3 real frames and the run says how many files it left out."""
    d = task_dir(str(tmp_path), "MSR-VTT", [{"video_id": v, "caption": v} for v in ("v1", "v2")],
                 [("v1", "red"), ("v2", "blue")], "test_1k")
    for v in ("v1", "v2"):
        for i in range(1, 4):
            open(os.path.join(d, "frames", v, f"._frame_{i:04d}.jpg"), "wb").write(b"\x00\x05\x16\x07")
    open(os.path.join(d, "frames", "v1", ".DS_Store"), "wb").write(b"Bud1")
    q, c, _ = read_video_task(str(tmp_path), "MSR-VTT")
    assert [os.path.basename(f) for f in c["v1"][1].frames] == \
        ["frame_0001.jpg", "frame_0002.jpg", "frame_0003.jpg"]         # 3 frames, as they are
    out = capsys.readouterr().out
    assert (f"MMEB-V2 MSR-VTT: left out 7 hidden file(s) of its frame folders (macOS '._*' AppleDouble files, "
            f"dotfiles: not frames), e.g. {d}/frames/v1/.DS_Store") in out
    open(os.path.join(d, "frames", "v2", "frame_0002.txt"), "w").write("not a frame")
    with pytest.raises(ValueError, match=f"MMEB-V2 MSR-VTT row 1: {d}/frames/v2/frame_0002.txt is not a frame image"):
        read_video_task(str(tmp_path), "MSR-VTT")


def test_the_data_digest_of_a_video_task_by_hand(tmp_path):
    """tools/mmeb_v2.data_digest: the rows by their bytes' sha256, each frame by its size, in
    os.walk's sorted order, paths relative to the task folder: the same through a frames/
    link (the released layout) and with hidden files added; a frame resized changes it."""
    import hashlib
    d = task_dir(str(tmp_path / "video"), "MSR-VTT", [{"video_id": "v1", "caption": "x"}], [("v1", "red")], "test_1k")
    rows = os.path.join(d, "test_1k", "test-00000-of-00001.parquet")
    size = [os.path.getsize(os.path.join(d, "frames", "v1", f"frame_000{i}.jpg")) for i in (1, 2, 3)]
    lines = [f"frames/v1/frame_000{i}.jpg\0{n} bytes\n" for i, n in zip((1, 2, 3), size)]
    lines.append(f"test_1k/test-00000-of-00001.parquet\0{hashlib.sha256(open(rows, 'rb').read()).hexdigest()}\n")
    want = (hashlib.sha256("".join(lines).encode()).hexdigest(), 4)
    assert mmeb_v2.data_digest(d) == want
    os.rename(os.path.join(d, "frames"), tmp_path / "released")
    os.symlink(tmp_path / "released", os.path.join(d, "frames"))
    open(tmp_path / "released" / "v1" / "._frame_0001.jpg", "wb").write(b"\x00\x05\x16\x07")
    assert mmeb_v2.data_digest(d) == want
    frames(str(tmp_path / "released" / "v1"), "blue", 2)                     # two frames rewritten
    assert mmeb_v2.data_digest(d)[0] != want[0]


# ----------------------------------------------------------------------------------
# End to end on synthetic clip tasks

def synthetic_clip_tasks(root):
    """MSR-VTT-shaped (global text → video, 4 videos), SmthSmthV2-shaped (local, 4 labels)
    and QVHighlight-shaped (local moment retrieval: a positive and two negative clips)."""
    task_dir(root, "MSR-VTT", [{"video_id": f"v{i}", "caption": f"a {c} shape"} for i, c in enumerate(COLOURS)],
             [(f"v{i}", c) for i, c in enumerate(COLOURS)], "test_1k")
    labels = [f"a {c} thing" for c in COLOURS]
    task_dir(root, "SmthSmthV2", [{"video_id": f"s{i}", "pos_text": labels[i], "neg_text": labels}
                                  for i in range(4)], [(f"s{i}", c) for i, c in enumerate(COLOURS)])
    d = task_dir(root, "QVHighlight", [{"query": f"the {c} part", "video_path": f"x/{c}.mp4"} for c in COLOURS[:2]])
    for c in COLOURS[:2]:
        for sub, colour in (("query", c), ("positive", c), ("negative_a", "yellow"), ("negative_b", "blue")):
            frames(os.path.join(d, "frames", c, sub), colour)


def naive_hit_at_1(model, processor, queries, cands):
    """Every item embedded alone (batch 1), each query's candidates scored in a loop; a hit
    iff a correct candidate scores strictly above every other one."""
    def emb(side, text, visual):
        return ev.embed_inputs(model, processor, [(side, text, visual)], batch_size=1)[0]
    pool = list(cands)
    hits = 0
    for text, visual, own, labels in queries:
        qv = emb("q", text, visual)
        scores = {n: torch.nn.functional.cosine_similarity(qv, emb("d", *cands[n]), dim=0).item()
                  for n in (own if own is not None else pool)}
        best = max(s for n, s in scores.items() if n in labels)
        hits += all(s < best for n, s in scores.items() if n not in labels)
    return hits / len(queries)


def test_evaluate_mmeb_v2_on_synthetic_clip_tasks(tmp_path):
    root = tmp_path / "video"
    synthetic_clip_tasks(str(root))
    out = tmp_path / "eval"
    args = ["--model", "tiny-qwen2.5-vl", "--num_tokens", "2", "--embed_template", "chat",
            "--video_dir", str(root), "--tasks", "MSR-VTT", "SmthSmthV2", "QVHighlight", "--out", str(out),
            "--no_progress", "--batch_size", "3"]
    res = mmeb_v2.main(args)
    from model import load_rematch
    model, processor, _ = load_rematch("tiny-qwen2.5-vl", device="cpu", num_tokens=2, embed_template="chat")
    for task, n_cands in (("MSR-VTT", 4), ("SmthSmthV2", 4), ("QVHighlight", 6)):
        score = json.loads((out / "mmeb_v2" / f"{task}_score.json").read_text())
        assert score["num_data"] == (2 if task == "QVHighlight" else 4) and score["num_cands"] == n_cands
        want = naive_hit_at_1(model, processor, *read_video_task(str(root), task)[:2])
        assert score["hit@1"] == pytest.approx(want), task
        assert res["video"][task] == score
        preds = [json.loads(line) for line in (out / "mmeb_v2" / f"{task}_pred.jsonl").read_text().splitlines()]
        assert sum(p["top"][0] in p["labels"] for p in preds) / len(preds) == pytest.approx(score["hit@1"])
        harness = json.loads((out / "video" / f"{task}_score.json").read_text())   # the harness's layout
        assert list(harness) == list(mmeb_v2.HARNESS_FIELDS) and harness["hit@1"] == score["hit@1"]
        assert harness["hit@10"] == harness["recall@10"] == 1.0         # <= 10 candidates: every label in the top 10
    summary = mmeb_v2.summarize_v2(res)
    assert summary["video"][1:] == (3, 18) and summary["V-RET"][1:] == (1, 5) and summary["V-MRET"][1:] == (1, 3)
    assert summary["Overall"][1:] == (3, 78)
    table = mmeb_v2.format_v2_table(res)
    assert "missing (75): " in table and "hit@1" in table
    results = json.loads((out / "mmeb_v2_results.json").read_text())
    assert results["video_sources"]["MSR-VTT"] == {"dataset": "VLM2Vec/MSR-VTT", "subset": "test_1k", "split": "test",
                                                   "ranking": "global", "revision": None}
    record = json.loads((out / "mmeb_v2" / "QVHighlight.json").read_text())   # what resume reads back
    assert (record["group"], record["source"], record["split"], record["revision"]) == \
        ("V-MRET", "VLM2Vec/QVHighlight", "test", None)
    again = mmeb_v2.main(args)                              # a restart reuses the finished tasks
    assert again["video"] == res["video"]


# ----------------------------------------------------------------------------------
# Text candidates: the harness's raw text unless --v2_target_instructions

def capture(monkeypatch):
    """ev.embed_inputs → a fixed random vector per input; `seen` collects every input."""
    seen = []

    def embed(model, processor, inputs, *a, **k):
        seen.extend(inputs)
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(
            zlib.crc32(repr(x).encode()))) for x in inputs])
    monkeypatch.setattr(mmeb_v2.ev, "embed_inputs", embed)
    return seen


def two_tasks(root):
    """SmthSmthV2 (V-CLS: label candidates) and ActivityNetQA (V-QA: yes / no) of one row
    each, MSR-VTT (V-RET: clip candidates)."""
    task_dir(root, "SmthSmthV2", [{"video_id": "s0", "pos_text": "a red thing",
                                   "neg_text": ["a red thing", "a blue thing"]}], [("s0", "red")])
    task_dir(root, "ActivityNetQA", [{"question": "is it red", "video_name": "a0", "answer": "yes"}], [("v_a0", "red")])
    task_dir(root, "MSR-VTT", [{"video_id": "v0", "caption": "a red shape"}, {"video_id": "v1", "caption": "blue"}],
             [("v0", "red"), ("v1", "blue")], "test_1k")


def test_text_candidates_are_the_harness_text_unless_asked(tmp_path, monkeypatch):
    """A checkpoint trained with target instructions: its V-CLS / V-QA candidates are embedded
    as the harness writes them (the label, "yes"); with target_instructions they get the
    checkpoint's instruction (data.with_target_instruction, by meta-task); clip candidates
    are the same either way. Each score names the text it used."""
    root = str(tmp_path)
    two_tasks(root)
    seen, config = capture(monkeypatch), {"target_instructions": True}
    want = {("SmthSmthV2", False): ["a red thing", "a blue thing"], ("ActivityNetQA", False): ["yes", "no"],
            ("SmthSmthV2", True): ["Represent the class label: a red thing", "Represent the class label: a blue thing"],
            ("ActivityNetQA", True): ["Represent the answer to a question about an image: yes",
                                      "Represent the answer to a question about an image: no"]}
    for (task, flag), texts in want.items():
        seen.clear()
        scores, _ = mmeb_v2.eval_video_task(None, None, root, task, config, target_instructions=flag)
        assert [t for side, t, _ in seen if side == "d"] == texts, (task, flag)
        assert scores["candidate_text"] == ("target_instructions" if flag else "harness")
    for flag in (False, True):
        seen.clear()
        scores, _ = mmeb_v2.eval_video_task(None, None, root, "MSR-VTT", config, target_instructions=flag)
        assert {t for side, t, _ in seen if side == "d"} == {V_TARGET}
        assert scores["candidate_text"] == "harness"
    with pytest.raises(ValueError, match="--v2_target_instructions: this checkpoint has no target instructions"):
        mmeb_v2.eval_video_task(None, None, root, "SmthSmthV2", {}, target_instructions=True)


def test_a_restart_does_not_reuse_a_score_of_the_other_candidate_text(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "video", tmp_path / "eval"
    two_tasks(str(root))
    capture(monkeypatch)
    model = torch.nn.Linear(2, 2)
    torch.nn.init.ones_(model.weight), torch.nn.init.zeros_(model.bias)
    config = {"target_instructions": True}

    def run(flag, tasks=("SmthSmthV2", "MSR-VTT")):
        capsys.readouterr()
        res = mmeb_v2.mmeb_v2_report(model, None, config=config, out_dir=str(out), progress=False, image_tasks=[],
                                     visdoc_tasks=[], video_dir=str(root), video_tasks=list(tasks),
                                     target_instructions=flag)
        return res, capsys.readouterr().out
    res, _ = run(False)
    record = json.loads((out / "mmeb_v2" / "SmthSmthV2.json").read_text())
    assert record["candidate_text"] == record["scores"]["candidate_text"] == "harness"
    results = json.loads((out / "mmeb_v2_results.json").read_text())
    assert results["candidate_text"] == {"SmthSmthV2": "harness", "MSR-VTT": "harness"}
    assert "text candidates: the harness's (raw labels, options and text targets)" in mmeb_v2.format_v2_table(res)
    res, said = run(True)
    assert "SmthSmthV2: finished earlier, scored again: candidate text harness → target_instructions " \
           "(--v2_target_instructions)" in said
    assert "MSR-VTT: Hit@1" in said and "MSR-VTT: finished earlier, scored again" not in said   # clips: same text
    assert "target instructions (--v2_target_instructions) on 1 task(s), not the harness's raw text: SmthSmthV2" \
        in mmeb_v2.format_v2_table(res)
    assert "(finished earlier, skipped)" in run(True)[1]
    path = out / "mmeb_v2" / "SmthSmthV2.json"
    old = json.loads(path.read_text())
    del old["candidate_text"], old["scores"]["candidate_text"]       # a record from before the choice was kept
    path.write_text(json.dumps(old))          # config target_instructions: the old rule used them
    said = run(True)[1]
    assert "SmthSmthV2: Hit@1" in said and "(finished earlier, skipped)" in said
    assert "SmthSmthV2: finished earlier, scored again: candidate text target_instructions → harness" in run(False)[1]


def test_image_tasks_take_the_harness_text_unless_asked(monkeypatch, capsys):
    """The image tasks run through evaluate.mmeb_report with the checkpoint's target
    instructions off (and the choice in the config they record) unless asked; a raw
    backbone's config is passed as it is. The flag is tools/mmeb_v2.py's, not evaluate.py's."""
    passed = []

    def fake(model, processor, mmeb_dir, image_dir, table, config, *a, **k):
        passed.append(config)
        return {"hit@1": dict.fromkeys(table, 0.5)}
    monkeypatch.setattr(mmeb_v2.ev, "mmeb_report", fake)
    model = torch.nn.Linear(2, 2)
    for config, flag, want in (({"target_instructions": True}, False,
                                {"target_instructions": False, "mmeb_v2_candidate_text": "harness"}),
                               ({"target_instructions": True}, True, {"target_instructions": True}),
                               ({}, False, {})):
        res = mmeb_v2.mmeb_v2_report(model, None, "mmeb", "images", config=config, progress=False,
                                     image_tasks=["ImageNet-1K"], visdoc_tasks=[], video_tasks=[],
                                     target_instructions=flag)
        assert passed.pop() == want and res["image"] == {"ImageNet-1K": 0.5}
        assert res["candidate_text"] == {"ImageNet-1K": "target_instructions" if flag else "harness"}
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "m", "--mmeb_dir", "d", "--image_dir", "i", "--v2_target_instructions"])
    assert "unrecognized arguments: --v2_target_instructions" in capsys.readouterr().err
    p = ev.build_parser()
    mmeb_v2.add_flags(p)
    args = p.parse_args(["--model", "m", "--video_dir", "v", "--v2_target_instructions"])
    mmeb_v2.check_flags(args, p.error)
    assert args.v2_target_instructions and args.video_dir == "v"
