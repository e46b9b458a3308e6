"""
tools/generate.py: greedy decoding == transformers' generate(do_sample=False) on the same
model (the three tiny families, a width-real Qwen2-VL-2B with Qwen's real tokenizer); a
LoRA checkpoint generates as its merged export (the adapter is applied); the caption
metrics against hand-worked cases; the CLI's last line, files and refusals. CPU.

    pytest tests/test_generate.py
"""
import json
import os

import pytest
import torch
from conftest import TINY_KINDS, shape_image

from tools import generate as G


# ----------------------------------------------------------------------------------
# Metrics, hand-worked


def test_token_f1_and_exact_by_hand():
    # "a red circle on the left" → red circle on left (articles dropped); "a red circle" → red circle:
    # 2 words in common, precision 2/4, recall 2/2 → F1 = 2·0.5·1 / 1.5 = 2/3
    assert G.token_f1("A red circle, on the left.", "a red circle") == pytest.approx(2 / 3)
    assert G.token_f1("red red", "red") == pytest.approx(2 * 0.5 * 1 / 1.5)   # multiset: one red in common
    assert G.token_f1("blue", "red") == 0.0 and G.token_f1("", "") == 1.0 and G.token_f1("", "red") == 0.0
    m = G.caption_metrics(["The red circle!", "a blue square"], ["a red circle", "a blue circle"])
    assert m["exact"] == 0.5                                       # punctuation, case and articles ignored
    assert m["token_f1"] == pytest.approx((1 + 0.5) / 2)          # blue square vs blue circle: P = R = 1/2


def test_distinct_repetition_and_length_by_hand():
    # captions: "a b a b" (bigrams ab ba ab) and "c d" (cd): 3 distinct of 4
    # repetition: "x y z x y z" has the 3-gram xyz twice (words 0-2 and 3-5): 6 of its 6 words;
    # "a b a b" has no repeated 3-gram (aba, bab): 0 of 4; "c d": 0 of 2 → 6 / 12
    m = G.caption_metrics(["a b a b", "c d", "x y z x y z"], ["", "", ""])
    assert m["distinct_2"] == pytest.approx(len({"ab", "ba", "cd", "xy", "yz", "zx"}) / (3 + 1 + 5))
    assert m["repetition"] == pytest.approx(6 / 12)
    assert m["mean_len"] == pytest.approx((4 + 2 + 6) / 3) and m["n"] == 3
    assert G.repeated_share("a b c d a b c".split()) == (6, 7)       # abc at 0 and 4: words 0-2, 4-6
    # on model tokens: "YesNoYesNo" is one word but tokens 7 8 7 8 7 8: 3-grams 787, 878, 787, 878 all
    # repeat → 6 of 6 tokens; bigrams 78 87 78 87 78: 2 distinct of 5
    m = G.caption_metrics(["YesNoYesNoYesNo"], [""], tokens=[[7, 8, 7, 8, 7, 8]])
    assert m["repetition"] == 1.0 and m["distinct_2"] == pytest.approx(2 / 5) and m["mean_len"] == 1
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        G.caption_metrics(["a", "b"], ["a"])


# ----------------------------------------------------------------------------------
# Decoding == transformers' generate


def _generate_ids(backbone, processor, image, prompt, n):
    batch = G.model_inputs(processor, prompt, image, backbone.config.model_type)
    out = backbone.generate(**batch, do_sample=False, max_new_tokens=n, eos_token_id=sorted(G.stop_ids(backbone, processor.tokenizer)),
                            pad_token_id=processor.tokenizer.pad_token_id)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_greedy_equals_transformers_generate(kind):
    from util.backbone import load_backbone
    backbone, processor = load_backbone(kind, device="cpu", seed=0)
    backbone.eval()
    for image, prompt in ((shape_image("red"), G.CAPTION_PROMPT), (shape_image("blue", (112, 56)), "What is shown?")):
        got = G.greedy(backbone, processor, image, prompt, max_new_tokens=10)
        assert got == _generate_ids(backbone, processor, image, prompt, 10)
        assert len(got) == 10 or got[-1] in G.stop_ids(backbone, processor.tokenizer)


@pytest.mark.slow
def test_greedy_at_real_width_with_the_real_tokenizer(width_real_checkpoint):
    """A width-real Qwen2-VL-2B (random weights, 1 decoder layer, the session's shared build)
    with Qwen's real tokenizer: runs, deterministic, equal to generate."""
    from util.backbone import load_backbone
    path = width_real_checkpoint("qwen2-vl-2b", num_layers=1, vision_depth=1)
    backbone, processor = load_backbone(str(path), device="cpu")
    image = shape_image("green", 56)
    a = G.greedy(backbone, processor, image, G.CAPTION_PROMPT, max_new_tokens=4)
    assert a == G.greedy(backbone, processor, image, G.CAPTION_PROMPT, max_new_tokens=4)
    assert a == _generate_ids(backbone, processor, image, G.CAPTION_PROMPT, 4)
    assert "<|im_start|>assistant\n" in G.chat_prompt(processor.tokenizer, G.CAPTION_PROMPT)


# ----------------------------------------------------------------------------------
# The CLI on every kind of model


@pytest.fixture(scope="module")
def lora_checkpoint_and_export(tmp_path_factory):
    import train
    from test_train import flags, write_train_fixture

    from tools.export_merged import export_merged
    root = tmp_path_factory.mktemp("generate")
    fx = write_train_fixture(str(root / "data"), n=6)
    train.main(flags(fx, str(root / "run"), "--steps", "2", "--lora", "--lora_r", "4", "--lora_alpha", "8",
                     "--lr", "5e-2"))
    ckpt = str(root / "run" / "checkpoint-2")
    export_merged(ckpt, str(root / "export"), dtype=torch.float32)
    return ckpt, str(root / "export")


def test_cli_captions_heldout_images_for_each_model_kind(lora_checkpoint_and_export, tmp_path, capsys):
    """--n: the last printed line is one JSON object with the metrics; a LoRA checkpoint
    captions exactly as its merged export (the adapter is applied, unlike the raw base);
    --out writes the captions, the markdown table and the picture; reruns are identical."""
    ckpt, export = lora_checkpoint_and_export
    data = str(tmp_path / "demo")
    common = ["--n", "4", "--data", data, "--max_new_tokens", "6"]
    res = G.main(["--model", "tiny-qwen2-vl", *common])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"exact", "token_f1", "distinct_2", "repetition", "mean_len", "n", "pair", "object"}
    assert last == json.loads(json.dumps(res["tiny-qwen2-vl"])) and last["n"] == 4
    out = str(tmp_path / "side")
    side = G.main(["--model", ckpt, "--model", export, "--model", "tiny-qwen2-vl", *common, "--out", out])
    lines = [json.loads(x) for x in open(os.path.join(out, "captions.jsonl"))]
    assert len(lines) == 4 and all(x[ckpt] == x[export] for x in lines)
    assert any(x[ckpt] != x["tiny-qwen2-vl"] for x in lines), "the LoRA adapter changed nothing"
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert len(table) == 2 + 4 and table[0].count("|") == 2 + 3 + 1
    from PIL import Image
    assert Image.open(os.path.join(out, "table.png")).size[1] > 4 * 100
    labelled = G.main(["--model", ckpt, "--label", "ReMatch", "--model", "tiny-qwen2-vl", "--label", "random",
                       *common, "--out", str(tmp_path / "labelled")])
    assert list(labelled) == ["ReMatch", "random"] and labelled["ReMatch"] == side[ckpt]
    assert [json.loads(x)["ReMatch"] for x in open(os.path.join(tmp_path, "labelled", "captions.jsonl"))] == \
        [x[ckpt] for x in lines]
    assert open(os.path.join(tmp_path, "labelled", "table.md")).readline().startswith("| image | reference | ReMatch | random |")
    again = G.main(["--model", ckpt, *common])
    assert again[ckpt]["token_f1"] == G.score([x[ckpt] for x in lines], [x["reference"] for x in lines],
                                              ["pair", "object"] * 2)["token_f1"]


def test_heldout_images_are_eval_images_only(demo_benchmark):
    """On the session's demo benchmark (seed 0; the CLI test writes its own)."""
    from util.inputs import read_rows
    paths = demo_benchmark
    items = G.heldout_images(paths["root"], 12)
    train_images = set()
    for sub in os.listdir(paths["train"]):
        for r in read_rows([os.path.join(paths["train"], sub, "original-00000-of-00001.parquet")]):
            train_images |= {r["qry_image_path"], r["pos_image_path"], r["neg_image_path"]}
    rel = [os.path.relpath(i, paths["image_dir"]) for i, _, _ in items]
    assert len(set(rel)) == 12 and not set(rel) & train_images
    assert [k for _, _, k in items] == ["pair", "object"] * 6
    assert all(" on the left and " in r for _, r, k in items if k == "pair")


def test_cli_refusals(tmp_path):
    with pytest.raises(SystemExit):
        G.main(["--model", "tiny-qwen2-vl"])                                   # neither --n nor --image
    with pytest.raises(SystemExit):
        G.main(["--model", "tiny-qwen2-vl", "--n", "0"])
    for labels in (["--label", "a", "--label", "b"], ["--label", "a", "--model", "tiny-qwen2-vl", "--label", "a"]):
        with pytest.raises(SystemExit):
            G.main(["--model", "tiny-qwen2-vl", *labels, "--n", "2"])
    with pytest.raises(Exception, match="nope.png"):
        G.main(["--model", "tiny-qwen2-vl", "--image", str(tmp_path / "nope.png")])


def test_write_table_shows_a_line_break_as_a_slash(tmp_path):
    """An answer with a line break ("red\\nYes": tiny-qwen2-vl-chat's verification) is one
    table cell "red / Yes" (the picture draws the same text), kept as is in captions.jsonl."""
    from PIL import Image
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    G.write_table(str(tmp_path / "t"), [str(tmp_path / "x.png")], ["a red circle"], {"m": ["red\nYes"]})
    assert open(tmp_path / "t" / "table.md").read().splitlines()[2] == "| x.png | a red circle | red / Yes |"
    assert json.loads(open(tmp_path / "t" / "captions.jsonl").readline())["m"] == "red\nYes"
