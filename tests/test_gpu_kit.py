"""
bench/gpu_kit.py: without CUDA it says so and exits 0; a CPU dry run of its code path on a
1-layer width-real Qwen2-VL-2B (real tokenizer, widths, processor) fills every column it can
and agrees with 8 separate passes (and, forward only, the flex path with the dense); the
separate-pass oracle itself == the unified pass on every tiny family (Qwen3-VL: DeepStack);
bench/tokens.py counts what collate builds.

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
@pytest.mark.parametrize("preset,vision_depth", [("qwen2-vl-2b", 1)])
def test_cpu_dry_run_of_the_kit(tmp_path, preset, vision_depth, width_real_checkpoint):
    """On the 2B preset it was first run with; the separate-pass oracle with Qwen3-VL's
    DeepStack is the tiny test below (a Qwen3-VL-2B dry run: --presets qwen3-vl-2b
    --vision_depth 3, measured to agree the same way; 20 s more, so not in the suite)."""
    out = tmp_path / "kit.json"
    # the kit writes <workdir>/<preset> with these settings, seed 0, fp32 on the CPU: the
    # session's shared build, reused (write_checkpoint checks the settings it was written with)
    ckpt = width_real_checkpoint(preset, num_layers=1, vision_depth=vision_depth)
    res = gpu_kit.main(["--device", "cpu", "--presets", preset, "--layers", "1",
                        "--vision_depth", str(vision_depth), "--batch", "2", "--chunk_sizes", "1",
                        "--image_size", "56", "--image_sizes", "56", "112", "--reps", "1", "--warmup", "0",
                        "--embed_modes", "index", "packed",
                        "--workdir", str(ckpt.parent), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    dense, packed, flex, flex_packed = saved["rows"]
    assert (dense["attention"], dense["embed"], dense["chunk_size"]) == ("sdpa", "index", 1)
    assert dense["step_s"] > 0 and dense["tokens_per_s"] > 0
    for row in (packed, flex, flex_packed):                   # no FlexAttention backward on the CPU
        assert row["error"] == "n/a" and "no backward on the CPU" in row["why"]
    assert "--pack" in packed["why"] and "--attn flex" in flex["why"]
    agree = saved[f"{preset}_bf16_agreement"]                 # fp32 on the CPU
    for what in ("unified_vs_separate", "flex_vs_dense"):      # flex's forward runs on the CPU
        assert agree[what]["max_abs_logit_diff"] < 1e-4 and agree[what]["yes_no_argmax_agreement"] == 1.0


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_bench_separate_passes_equal_the_unified_pass(name):
    """bench/matching.separate_logits (the kit's and bench/matching.py's oracle: one decoder
    pass per view, DeepStack included on Qwen3-VL) == ReMatch.match, images everywhere."""
    import random

    from matching import separate_logits, view_plans

    from common import make_item
    from data import collate_embed, collate_match
    from masks import VIEW_SETS
    from model import ReMatch
    from util.backbone import load_backbone
    backbone, processor = load_backbone(name, device="cpu", seed=0)
    model, tok = ReMatch(backbone.eval(), num_tokens=4), processor.tokenizer
    q = [make_item(processor, "query", i, 84) for i in range(2)]
    pos = [make_item(processor, "doc_image", 2 * i, 56) for i in range(2)]
    neg = [make_item(processor, "doc_image", 2 * i + 1, 112) for i in range(2)]
    with torch.no_grad():
        E = [model.embed(collate_embed(items, tok, 4), side)[0] for items, side in ((q, "q"), (pos, "d"), (neg, "d"))]
        mb = collate_match(q, pos, neg, tok, VIEW_SETS["all"], random.Random(0))
        unified, _ = model.match(mb, *E)
        separate = separate_logits(model, mb, E, view_plans(mb, torch.float32))
    torch.testing.assert_close(separate, unified, atol=1e-5, rtol=0)


def test_bench_tokens_counts_what_collate_builds():
    """bench/tokens.py's real and computed tokens of one step == the padded batches that
    data.collate_embed / collate_match build for the same chunks (numel vs attention_mask
    sum), in loader order and length-grouped; packed embedding passes compute only real
    tokens; the grouped order pads less than loader order on a mixed step."""
    import random

    import tokens
    import train
    from data import collate_embed, collate_match
    from masks import VIEW_SETS
    from real_widths import real_tokenizer
    tok = real_tokenizer("qwen2_vl")
    args = train.parse_args(["--preset", "qwen2-vl-2b", "--train_data", "-", "--image_dir", "-"])
    rng = random.Random(0)
    q, pos, neg = tokens.step_items(rng, "WebQA", 12, 28, args.max_pixels)   # text q, image + text d
    K = args.num_tokens
    embed = [[int(collate_embed([it], tok, K)["attention_mask"].sum()) for it in side] for side in (q, pos, neg)]
    match = [int(collate_match([a], [b], [c], tok, VIEW_SETS["all"], [1])["attention_mask"].sum())
             for a, b, c in zip(q, pos, neg)]
    L = (*embed, match)
    for mode in ("index", "length", "packed"):
        out, _ = tokens.step_costs(L, 12, 5, mode, "qwen2-vl-2b")
        order = list(range(12)) if mode == "index" else train.length_grouped_order(*embed, n_match=12)
        real = computed = m_real = m_computed = 0
        for lo in range(0, 12, 5):
            idx = order[lo:lo + 5]
            for b in (collate_embed([q[i] for i in idx], tok, K),
                      collate_embed([pos[i] for i in idx] + [neg[i] for i in idx], tok, K)):
                real += int(b["attention_mask"].sum())
                computed += b["attention_mask"].numel()
            mb = collate_match([q[i] for i in idx], [pos[i] for i in idx], [neg[i] for i in idx], tok,
                               VIEW_SETS["all"], [1] * len(idx))
            m_real += int(mb["attention_mask"].sum())
            m_computed += mb["attention_mask"].numel()
        assert out["embed"][:2] == [real, real if mode == "packed" else computed], mode
        assert out["match"][:2] == [m_real, m_computed], mode
    assert tokens.step_costs(L, 12, 5, "length", "qwen2-vl-2b")[0]["embed"][1] < \
        tokens.step_costs(L, 12, 5, "index", "qwen2-vl-2b")[0]["embed"][1]
