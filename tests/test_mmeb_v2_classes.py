"""
The class pools of MMEB-V2's global video classification tasks (K700, UCF101, HMDB51,
Breakfast): the lists shipped in tools/mmeb_v2_classes/ (the reference harness's), read by
tools/mmeb_v2_data.read_class_pool, and the <Task>/classes.txt that overrides one.

  - the shipped lists: 700 / 101 / 51 / 10 labels, none twice, spelled as the harness
    writes them (underscores, CamelCase kept); SmthSmthV2 has none (it ranks locally);
  - without classes.txt a task ranks against its shipped list, with it against the file;
    the score names the file ranked against the same on every machine (the shipped list
    by its path in the repository, an override as <Task>/classes.txt) and its sha256;
  - a restart reuses a finished task only while its pool's file is unchanged (and the
    task folder's files: an override is one of them), else scores it again, saying why;
  - a row label outside the pool (a trailing space, spaces for underscores, a class the
    override lacks) stops the task, naming the row, the label and the pool's file;
  - a pool file with a label twice, a label padded with whitespace, or no label is refused.

Fixture tasks: the real datasets' columns (video_id, pos_text) with synthetic clips.

    pytest tests/test_mmeb_v2_classes.py
"""
import hashlib
import json
import os

import pytest
import torch

from test_mmeb_v2_video import task_dir
from tools import mmeb_v2
from tools import mmeb_v2_data
from tools.mmeb_v2_data import CLASS_LISTS, V_CLS, read_class_pool, read_video_task


def shipped(task):
    return os.path.join(CLASS_LISTS, f"{task}.txt")


def cls_task(root, task, labels):
    """<root>/<task>/ with one row per label (video_id c0, c1, ...) and a clip for each."""
    task_dir(str(root), task, [{"video_id": f"c{i}", "pos_text": label} for i, label in enumerate(labels)],
             [(f"c{i}", ("red", "blue", "green")[i % 3]) for i in range(len(labels))])
    return os.path.join(str(root), task)


# ----------------------------------------------------------------------------------
# The shipped lists

def test_shipped_lists_hold_the_harness_classes(tmp_path):
    counts = {}
    for task in V_CLS:
        labels, path = read_class_pool(str(tmp_path), task)       # no classes.txt there: the shipped one
        assert path == shipped(task)
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        assert lines[-1] == "" and lines[:-1] == labels           # one label a line, no blank line
        assert len(set(labels)) == len(labels)
        assert all(s == s.strip() and s for s in labels)
        counts[task] = len(labels)
    assert counts == {"K700": 700, "UCF101": 101, "HMDB51": 51, "Breakfast": 10}
    assert sorted(os.listdir(CLASS_LISTS)) == ["Breakfast.txt", "HMDB51.txt", "K700.txt", "README.md", "UCF101.txt"]
    k700 = read_class_pool(str(tmp_path), "K700")[0]
    assert k700[:3] == ["waiting_in_line", "fly_tying", "breakdancing"] and k700[-1] == "clay_pottery_making"
    assert {"massaging_person's_head", "passing_American_football_(in_game)", "hugging_(not_baby)"} <= set(k700)
    assert not any(" " in s for s in k700)                          # underscores, as the rows spell them
    assert read_class_pool(str(tmp_path), "UCF101")[0][:3] == ["Kayaking", "PlayingDaf", "BoxingSpeedBag"]
    assert read_class_pool(str(tmp_path), "HMDB51")[0][-3:] == ["pick", "shoot_bow", "fall_floor"]
    assert read_class_pool(str(tmp_path), "Breakfast")[0] == [
        "pancake", "cereal", "sandwich", "scrambledegg", "friedegg", "coffee", "milk", "tea", "juice", "salad"]


# ----------------------------------------------------------------------------------
# Default pool and override

def test_default_pool_without_classes_txt(tmp_path, capsys):
    cls_task(tmp_path, "K700", ["fly_tying", "waiting_in_line", "fly_tying"])
    q, c, r = read_video_task(str(tmp_path), "K700")
    assert r == "global" and len(c) == 700
    assert list(c)[:3] == ["fly_tying", "waiting_in_line", "breakdancing"]   # seen first, then the list's order
    assert c["waiting_in_line"] == ("waiting_in_line", None)                  # the label itself is the text
    assert [x[2:] for x in q] == [(None, ["fly_tying"]), (None, ["waiting_in_line"]), (None, ["fly_tying"])]
    assert f"MMEB-V2 K700: ranking against the 700 classes of {shipped('K700')} (shipped)" in capsys.readouterr().out


def test_classes_txt_overrides_the_shipped_list(tmp_path, capsys):
    d = cls_task(tmp_path, "Breakfast", ["tea", "pancake"])
    with open(os.path.join(d, "classes.txt"), "w") as f:
        f.write("pancake\r\ntea\r\n\r\nporridge\r\n")               # Windows line ends, a blank line
    assert read_class_pool(d, "Breakfast") == (["pancake", "tea", "porridge"], os.path.join(d, "classes.txt"))
    q, c, _ = read_video_task(str(tmp_path), "Breakfast")
    assert list(c) == ["tea", "pancake", "porridge"]                # 'porridge' is in no shipped list
    out = capsys.readouterr().out
    assert f"MMEB-V2 Breakfast: ranking against the 3 classes of {d}/classes.txt (the task folder's override)" in out


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_the_score_names_the_pool_ranked_against(tmp_path, monkeypatch):
    """eval_video_task's scores (the score file and the task's record) carry class_pool,
    the same on every machine, and class_pool_sha256.
    Embeddings stubbed, one-hot: 'tea' e0, 'pancake' e1, every other label e2; the clips
    c0 (tea) e0, c1 (pancake) e1, c2 (pancake, but looks like tea) e0 → Hit@1 = 2/3."""
    d = cls_task(tmp_path, "Breakfast", ["tea", "pancake", "pancake"])
    axis = {"tea": 0, "pancake": 1, "c0": 0, "c1": 1, "c2": 0, "s": 0}

    def embed(model, processor, inputs, *a, **k):
        out = torch.zeros(len(inputs), 3)
        for i, (side, text, visual) in enumerate(inputs):
            out[i, axis[os.path.basename(os.path.dirname(visual.frames[0]))] if side == "q" else axis.get(text, 2)] = 1
        return out
    monkeypatch.setattr(mmeb_v2.ev, "embed_inputs", embed)
    scores, ranking = mmeb_v2.eval_video_task(None, None, str(tmp_path), "Breakfast")
    assert scores == {"hit@1": pytest.approx(2 / 3), "num_pred": 3, "num_data": 3, "num_cands": 10,
                      "candidate_text": "harness", "class_pool": "tools/mmeb_v2_classes/Breakfast.txt",
                      "class_pool_sha256": sha256(shipped("Breakfast"))}
    assert [p["top"][0] for p in ranking] == ["tea", "pancake", "tea"]
    with open(os.path.join(d, "classes.txt"), "w") as f:
        f.write("tea\npancake\nporridge\n")
    scores, _ = mmeb_v2.eval_video_task(None, None, str(tmp_path), "Breakfast")
    assert (scores["num_cands"], scores["class_pool"], scores["class_pool_sha256"]) == \
        (3, "Breakfast/classes.txt", hashlib.sha256(b"tea\npancake\nporridge\n").hexdigest())
    task_dir(str(tmp_path), "SmthSmthV2", [{"video_id": "s", "pos_text": "tea", "neg_text": ["tea", "pancake"]}],
             [("s", "red")])
    assert "class_pool" not in mmeb_v2.eval_video_task(None, None, str(tmp_path), "SmthSmthV2")[0]   # local ranking


def test_a_restart_scores_again_when_the_pool_changed(tmp_path, monkeypatch, capsys):
    """mmeb_v2_report on Breakfast twice per step (embeddings stubbed): reused while the pool
    file and the task folder are unchanged; the shipped list edited (a copy of the
    repository's, monkeypatched) or an override added: scored again, the reason printed."""
    repo = tmp_path / "repo"
    os.makedirs(repo / "tools" / "mmeb_v2_classes")
    with open(shipped("Breakfast")) as f:
        labels = f.read()
    (repo / "tools" / "mmeb_v2_classes" / "Breakfast.txt").write_text(labels)
    monkeypatch.setattr(mmeb_v2_data, "REPO", str(repo))
    monkeypatch.setattr(mmeb_v2_data, "CLASS_LISTS", str(repo / "tools" / "mmeb_v2_classes"))
    d = cls_task(tmp_path / "video", "Breakfast", ["tea", "pancake"])
    embedded = []

    def embed(model, processor, inputs, *a, **k):
        embedded.append(k.get("desc"))
        return torch.eye(len(inputs), 4)
    monkeypatch.setattr(mmeb_v2.ev, "embed_inputs", embed)
    model = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(model.weight)

    def run():
        embedded.clear()
        capsys.readouterr()
        res = mmeb_v2.mmeb_v2_report(model, None, video_dir=str(tmp_path / "video"), out_dir=str(tmp_path / "eval"),
                                     progress=False, image_tasks=[], visdoc_tasks=[], video_tasks=["Breakfast"])
        return embedded == ["Breakfast"], res["video"]["Breakfast"], capsys.readouterr().out
    scored, score, _ = run()
    was = sha256(repo / "tools" / "mmeb_v2_classes" / "Breakfast.txt")
    assert scored and (score["class_pool"], score["class_pool_sha256"]) == ("tools/mmeb_v2_classes/Breakfast.txt", was)
    record = json.loads((tmp_path / "eval" / "mmeb_v2" / "Breakfast.json").read_text())
    assert (record["class_pool"], record["class_pool_sha256"]) == (score["class_pool"], was)
    assert not run()[0]                                           # unchanged: reused
    (repo / "tools" / "mmeb_v2_classes" / "Breakfast.txt").write_text(labels + "porridge\n")
    now = sha256(repo / "tools" / "mmeb_v2_classes" / "Breakfast.txt")
    scored, score, said = run()
    assert scored and score["num_cands"] == 11
    assert (f"Breakfast: finished earlier, scored again: class pool tools/mmeb_v2_classes/Breakfast.txt "
            f"(sha256 {was[:12]}…) → tools/mmeb_v2_classes/Breakfast.txt (sha256 {now[:12]}…)\n") in said
    assert not run()[0]
    with open(os.path.join(d, "classes.txt"), "w") as f:
        f.write("tea\npancake\n")
    scored, score, said = run()
    assert scored and score["num_cands"] == 2
    over = hashlib.sha256(b"tea\npancake\n").hexdigest()
    assert ("Breakfast: finished earlier, scored again: the task folder's files changed (data digest; "
            "7 files then, 8 now); class pool tools/mmeb_v2_classes/Breakfast.txt "
            f"(sha256 {now[:12]}…) → Breakfast/classes.txt (sha256 {over[:12]}…)\n") in said
    assert not run()[0]


# ----------------------------------------------------------------------------------
# Labels outside the pool, bad pool files

@pytest.mark.parametrize("label", ["waiting_in_line ", "waiting in line", "Waiting_in_line"])
def test_a_label_outside_the_pool_stops_the_task(tmp_path, label):
    cls_task(tmp_path, "K700", ["fly_tying", label])
    want = f"MMEB-V2 K700 row 1: label {label!r} is not in the class pool {shipped('K700')} (700 labels)"
    with pytest.raises(ValueError) as e:
        read_video_task(str(tmp_path), "K700")
    assert str(e.value).startswith(want)


def test_every_label_outside_the_pool_is_counted(tmp_path):
    d = cls_task(tmp_path, "UCF101", ["Fencing", "fencing", "Surfing", "Apply Eye Makeup", "fencing"])
    with pytest.raises(ValueError, match=r"UCF101 row 1: label 'fencing' is not in the class pool .*UCF101.txt "
                                         r"\(101 labels\); 1 more outside it: 'Apply Eye Makeup' \(row 3\)\. "
                                         r"Fix the rows, or list the task's labels in .*UCF101/classes.txt"):
        read_video_task(str(tmp_path), "UCF101")
    with open(os.path.join(d, "classes.txt"), "w") as f:                # an override lacking 'Surfing'
        f.write("Fencing\nfencing\nApply Eye Makeup\n")
    with pytest.raises(ValueError, match=r"UCF101 row 2: label 'Surfing' is not in the class pool "
                                         r".*UCF101/classes.txt \(3 labels\)\. Fix"):
        read_video_task(str(tmp_path), "UCF101")


@pytest.mark.parametrize("text, error", [
    ("ride_bike\nwave\nride_bike\n", r"classes.txt line 3: label 'ride_bike' repeats line 1"),
    ("ride_bike\nwave \n", r"classes.txt line 2: label 'wave ' has leading or trailing whitespace"),
    ("\tride_bike\n", r"classes.txt line 1: label '\\tride_bike' has leading or trailing whitespace"),
    ("\n \n", r"classes.txt holds no labels"),
])
def test_bad_pool_files_are_refused(tmp_path, text, error):
    d = cls_task(tmp_path, "HMDB51", ["ride_bike"])
    with open(os.path.join(d, "classes.txt"), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="MMEB-V2 HMDB51: .*" + error):
        read_video_task(str(tmp_path), "HMDB51")
