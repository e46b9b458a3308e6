"""bench/index_scale.py at a tiny size (2,000 x 64), run as a user runs it: one table with a
row per index type and each measure beside its ratio to flat; flat's recall@10 against
numpy's exact top 10 is 1.0; every index holds all the vectors; the compressed ones are
smaller on disk than flat.

Run:  python -m pytest -q tests/test_index_scale.py     (about 10 s on 2 cores)
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("faiss")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_bench_prints_one_table_of_ratios_to_flat(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "index_scale.py"), "--n", "2000", "--d", "64",
                        "--queries", "40", "--centres", "40", "--intrinsic", "16", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out.read_text())["results"]
    assert [x["index"] for x in results] == ["flat", "hnsw", "ivfsq8", "ivfpq"]
    flat = results[0]
    assert flat["recall@10"] == 1.0                               # faiss flat == numpy's exact top 10
    for x in results:
        assert 0 < x["recall@10"] <= 1 and x["qps"] > 0 and x["build_s"] > 0 and x["disk_mib"] > 0
    assert all(x["disk_mib"] < flat["disk_mib"] for x in results if x["index"] in ("ivfsq8", "ivfpq"))
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:4] == ["index", "recall@10", "QPS", "x flat"] and header.count("x flat") == 6
    assert len(table) == 2 + len(results)                         # header, rule, one row per index
    flat_row = [c.strip() for c in table[2].strip("|").split("|")]
    assert flat_row[0] == "Flat" and flat_row[1] == "1.000"
    assert [flat_row[i] for i in range(3, len(header), 2)] == ["1.00"] * 6
