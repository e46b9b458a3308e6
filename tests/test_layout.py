"""
bench/layout.py, section 2 (the paper's share of each paper file): every line's owner, the
innermost def/class or module-level assignment, checked line by line on a hand-classified
made-up module (tests/fixtures/layout/sample.py.txt); code added to or moved inside a class
counts by where it is, not by the class's name; and data.py's share agrees within 5 points
with a hand count of it (tests/fixtures/layout/hand_count.json, skipped once data.py changed).
Not in the two-minute proof of the paper: a measurement tool's test (pure ast, < 2 s).
Run: pytest tests/test_layout.py
"""
import hashlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "layout")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import layout  # noqa: E402


def read(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


SAMPLE = read(FIXTURES, "sample.py.txt")
# By hand, from the rule (docstring of bench/layout.py): (first line, last line, owner)
SAMPLE_OWNERS = [
    (1, 7, None),                    # docstring (its "# ..." and blank lines too), imports
    (8, 10, "TAU"),                  # blank and comment before it
    (11, 11, "CACHE_DIR"),
    (12, 12, "first"),               # first, second = 1, 2
    (13, 18, "cosine"),
    (19, 23, "Model"),               # the class's own lines: header, docstring, attribute
    (24, 26, "Model.__init__"),
    (27, 32, "Model.fuse"),          # its comment and both decorators
    (33, 35, "Model.fuse.mean"),     # a blank line inside it
    (36, 37, "Model.fuse"),          # back in fuse, its comment with it
    (38, 45, "Model.save"),          # a string's "#" and blank lines are the string's
    (46, 50, "load"),                # the comment closing the class goes to the next code
    (51, 52, "load.parse"),          # nested in an `if`
    (53, 53, "load"),
    (54, 59, None),                  # `if __name__ ...`, then lines after the last code
]
SAMPLE_TABLE = {"TAU", "cosine", "Model", "Model.fuse", "load.parse"}
SAMPLE_PAPER = [*range(8, 11), *range(13, 24), *range(27, 33), 36, 37, 51, 52]   # mean: not listed


def test_every_line_of_the_sample_has_its_hand_written_owner():
    expected = [owner for a, b, owner in SAMPLE_OWNERS for _ in range(a, b + 1)]
    assert len(expected) == SAMPLE.count("\n") == 59
    assert layout.owners(SAMPLE) == expected


def test_paper_lines_of_the_sample():
    assert layout.paper_lines(SAMPLE, SAMPLE_TABLE) == SAMPLE_PAPER
    assert layout.paper_lines(SAMPLE, "*") == [*range(8, 54)]
    assert layout.paper_lines(SAMPLE, {"Model"}) == [*range(19, 24)]           # not its methods


def test_code_added_in_a_paper_class_counts_only_once_listed():
    lines = SAMPLE.split("\n")
    video = ["", "    def video(self, frames):", "        return [self.fuse(f) for f in frames]"]
    grown = "\n".join(lines[:26] + video + lines[26:])                          # after __init__
    assert layout.owners(grown)[26:29] == ["Model.video"] * 3
    assert len(layout.paper_lines(grown, SAMPLE_TABLE)) == len(SAMPLE_PAPER)
    assert len(layout.paper_lines(grown, SAMPLE_TABLE | {"Model.video"})) == len(SAMPLE_PAPER) + 3


def test_the_count_follows_the_lines_when_a_method_moves():
    lines = SAMPLE.split("\n")
    fuse, save = lines[26:37], lines[37:45]                                     # lines 27-37, 38-45
    moved = "\n".join(lines[:26] + save + fuse + lines[45:])
    paper = layout.paper_lines(moved, SAMPLE_TABLE)
    assert len(paper) == len(SAMPLE_PAPER)
    assert [i for i in paper if 27 <= i <= 45] == [*range(35, 41), 44, 45]     # fuse, now after save


def test_data_py_agrees_with_its_hand_count():
    hand = json.loads(read(FIXTURES, "hand_count.json"))["data.py"]
    text = read(ROOT, "data.py")
    if hashlib.sha256(text.encode()).hexdigest() != hand["sha256"]:
        pytest.skip("data.py changed since its hand count (tests/fixtures/layout/hand_count.json, "
                    f"{hand['made_on']}): count it again by hand and store the new sha256")
    n = text.count("\n")
    assert n == hand["lines"]
    hand_paper = sum(b - a + 1 for a, b, _ in hand["paper"])
    tool = 100 * layout.paper_share("data.py", text) / n
    assert abs(tool - 100 * hand_paper / n) <= 5, (tool, 100 * hand_paper / n)


def test_the_report_keeps_its_json_keys(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "layout.py"), "--json",
                          str(tmp_path / "layout.json")], capture_output=True, text=True, check=True).stdout
    assert "rule: " + layout.RULE in out
    report = json.loads((tmp_path / "layout.json").read_text())
    assert set(report["paper_share"]) == {*layout.PAPER_FILES, "total"}
    for f, s in report["paper_share"].items():
        assert set(s) == {"lines", "paper", "share_pct"} and 0 <= s["paper"] <= s["lines"]
    assert report["paper_share"]["total"]["lines"] == report["lines_total"]
