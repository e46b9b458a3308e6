"""
The vision tower's per-image index work at the paper's batch size: transformers'
per-image loops against util.speed.vision_position_ids / util.speed.vision_window_index, which run
them once per distinct image size (the indices depend on the size alone). Both are host
work that runs before the tower's first kernel, at every step.

  position ids   the rotary (h, w) index of every patch (both families):
                 transformers.vision_utils.get_vision_position_ids vs vision_position_ids
  window index   Qwen2.5-VL's windowed-attention order and window lengths:
                 transformers.vision_utils.get_vision_window_index vs vision_window_index

The grid is what one rank's step sees at the paper preset: 128 queries with an image
and 256 documents (positive and hard negative) of which `--doc_image_share` have one,
each image resized to one of `--sizes` (pixels per side, cycled). The outputs are
checked equal before timing. No model is built.

    python bench/vision_indices.py                          # 384 images of 448² and 224²
    python bench/vision_indices.py --sizes 448 --device cuda
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_config, print_table, ratio, time_variants  # noqa: E402
from util.speed import vision_position_ids, vision_window_index  # noqa: E402
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Per-image vision index loops vs once per size.")
    p.add_argument("--queries", type=int, default=128, help="queries per rank (all with an image)")
    p.add_argument("--doc_image_share", type=float, default=1.0,
                   help="share of the 2 × queries documents that carry an image")
    p.add_argument("--sizes", type=int, nargs="+", default=[448, 224],
                   help="image sides in pixels (multiples of 28), cycled over the images")
    p.add_argument("--device", default="cpu", help="where grid_thw lives (cpu or cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    bad = [s for s in a.sizes if s % 28]
    if bad:
        raise SystemExit(f"--sizes {bad}: each side must be a multiple of 28 (patch 14 × merge 2)")
    n = a.queries + round(2 * a.queries * a.doc_image_share)
    grid = torch.tensor([[1, s // 14, s // 14] for s in (a.sizes * n)[:n]],
                        device=a.device)                                      # (n, 3) patches
    win = dict(spatial_merge_size=2, window_size=112, patch_size=14)          # Qwen2.5-VL's
    variants = {
        "position ids, per image": lambda: get_vision_position_ids(grid, 2),
        "position ids, per size": lambda: vision_position_ids(grid, 2),
        "window index, per image": lambda: get_vision_window_index(grid, **win),
        "window index, per size": lambda: vision_window_index(grid, 2, 112, 14),
    }
    names = list(variants)
    for per_image, per_size in (names[0:2], names[2:4]):                     # same outputs
        ref, ours = variants[per_image](), variants[per_size]()
        ref, ours = (ref, ours) if isinstance(ref, tuple) else ((ref,), (ours,))
        assert all(torch.equal(r.to(o.device), o) for r, o in zip(ref, ours)), per_size
    t = time_variants(variants, a.reps, a.warmup, a.device)
    print_config(a, images=n, patches=int(grid.prod(-1).sum()))
    print_table(["index", "per image (ms)", "per size (ms)", "speed-up"],
                [[k.split(",")[0], f"{1e3 * t[names[i]]:.2f}", f"{1e3 * t[names[i + 1]]:.2f}",
                  ratio(t[names[i]], t[names[i + 1]], ".1f")] for i, k in ((0, names[0]), (2, names[2]))])


if __name__ == "__main__":
    main()
