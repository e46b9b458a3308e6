"""
bench/gpu_kit.py: without CUDA it says so and exits 0; a CPU dry run of its code path on a
1-layer width-real Qwen2-VL-2B (real tokenizer, widths and processor) fills every column
it can and agrees with 8 separate passes (and, forward only, the flex path with the dense).

    pytest tests/test_gpu_kit.py
"""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import gpu_kit  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_says_so(capsys):
    assert gpu_kit.main(["--out", "unused.json"]) is None
    assert "no CUDA device here" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("preset,vision_depth", [("qwen2-vl-2b", 1), ("qwen3-vl-2b", 3)])
def test_cpu_dry_run_of_the_kit(tmp_path, preset, vision_depth):
    """Qwen3-VL (three DeepStack blocks): the kit's separate-pass oracle adds DeepStack too."""
    out = tmp_path / "kit.json"
    res = gpu_kit.main(["--device", "cpu", "--presets", preset, "--layers", "1",
                        "--vision_depth", str(vision_depth), "--batch", "2", "--chunk_sizes", "1",
                        "--image_size", "56", "--reps", "1", "--warmup", "0",
                        "--workdir", str(tmp_path / "ckpt"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    dense, flex = saved["rows"]
    assert dense["attention"] == "sdpa" and dense["chunk_size"] == 1
    assert dense["step_s"] > 0 and dense["tokens_per_s"] > 0
    assert flex["attention"] == "flex" and flex["error"] == "n/a" and "no backward on the CPU" in flex["why"]
    agree = saved[f"{preset}_bf16_agreement"]                 # fp32 on the CPU
    for what in ("unified_vs_separate", "flex_vs_dense"):      # flex's forward runs on the CPU
        assert agree[what]["max_abs_logit_diff"] < 1e-4 and agree[what]["yes_no_argmax_agreement"] == 1.0
