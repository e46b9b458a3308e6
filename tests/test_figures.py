"""
tools/figures.py: the numbers behind the pictures (moving average, t-SNE, the learnable
tokens' attention over the image), the clear message without matplotlib, and the three
PNGs of a short run when matplotlib is installed (an optional dependency).

    pytest tests/test_figures.py
"""
import json
import os
import sys

import pytest
import torch

from conftest import shape_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tools import figures  # noqa: E402


def test_moving_average_against_a_naive_window():
    x = [float((7 * i) % 5) for i in range(23)]
    for w in (1, 4, 50):
        naive = [sum(x[max(0, i - w + 1):i + 1]) / len(x[max(0, i - w + 1):i + 1]) for i in range(len(x))]
        assert figures.moving_average(x, w) == pytest.approx(naive)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tsne_keeps_clusters_apart(seed):
    """Three well-separated Gaussian clusters in 16-D stay apart in 2-D: at least 95% of
    the points have their nearest 2-D neighbour in their own cluster, and points of
    different clusters are on average 3× farther apart than points of one cluster."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g) * 10
    X = torch.cat([c + torch.randn(20, 16, generator=g) for c in centres])          # (60, 16)
    label = torch.arange(3).repeat_interleave(20)
    Y = figures.tsne(X, perplexity=10, steps=400, seed=seed)
    assert Y.shape == (60, 2) and torch.isfinite(Y).all()
    D = torch.cdist(Y, Y)
    same = label[:, None] == label[None, :]
    assert D[~same].mean() > 3 * D[same & ~torch.eye(60, dtype=torch.bool)].mean()
    D.fill_diagonal_(float("inf"))
    assert (label[D.argmin(1)] == label).float().mean() >= 0.95


def test_token_attention_is_a_distribution_over_the_patch_grid():
    """(h, w) = the merged grid of the image; the K tokens' attention to the image tokens
    is part of a softmax row (in [0, 1], summing to at most 1), and the eager switch
    leaves the model's attention implementation as it was."""
    from model import ReMatch
    from util.backbone import load_backbone
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu", seed=0)
    model = ReMatch(backbone, num_tokens=3).eval()
    before = backbone.model.language_model.config._attn_implementation
    a = figures.token_attention(model, processor, "<|image_1|>\nWhat colour is the circle?",
                                shape_image("red", (112, 56)))
    assert a.shape == (2, 4)                           # 112×56 px → 8×4 patches → 4×2 merged (w × h)
    assert (a >= 0).all() and 0 < a.sum() <= 1 + 1e-6
    assert backbone.model.language_model.config._attn_implementation == before


def test_missing_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        figures.pyplot()


def test_three_pngs_of_a_short_demo_run(tmp_path):
    pytest.importorskip("matplotlib")              # optional dependency: the PNG step only
    import train
    out = str(tmp_path / "demo")
    train.main(["--out_dir", out, "--steps", "30", "--save_every", "30", "--eval_tasks", "ShapesCLS",
                "--eval_match_queries", "0"])
    figures.main([out, "--points", "12", "--attention_queries", "2"])
    for name in ("curves.png", "attention.png", "embeddings.png"):
        path = os.path.join(out, "figures", name)
        assert os.path.getsize(path) > 5000 and open(path, "rb").read(4) == b"\x89PNG", name
    with open(os.path.join(out, "log.jsonl")) as f:
        assert len([json.loads(line) for line in f]) == 30
