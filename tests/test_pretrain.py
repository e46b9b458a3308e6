"""
tiny-qwen2-vl-chat (demo/pretrain.py): the pretraining conversations come from the TRAIN
split only (no eval image, no held-out caption), batches equal the processor's own, two
builds give identical weights, the cache is rebuilt under a fresh HF_HOME and reused
otherwise, and the built model speaks: held-out captions with token F1 >= 0.6; its held-out
Yes/No, at chance, is a strict xfail (slow: the one full build, shared through HF_HOME by
every test that names the model).

    pytest tests/test_pretrain.py
"""
import json
import os
import random

import pytest
import torch

from demo import pretrain as P


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from demo.synthetic import make_synthetic
    return make_synthetic(str(tmp_path_factory.mktemp("pretrain") / "demo_data"))


def test_conversations_hold_no_eval_image_nor_heldout_caption(bench):
    from util.inputs import read_rows
    convs = P.conversations(bench["train"])
    eval_images, eval_captions = set(), set()
    for task in os.listdir(bench["eval"]):
        for r in read_rows([os.path.join(bench["eval"], task, "test-00000-of-00001.parquet")]):
            eval_images |= {r["qry_img_path"], *r["tgt_img_path"]} - {""}
            if task == "ShapesI2T":
                eval_captions.add(r["tgt_text"][0])                        # held-out pairs' captions
    images = {i for i, _, _ in convs}
    assert images and not images & eval_images
    assert not {a for _, _, a in convs} & eval_captions
    assert not any(c in q for _, q, _ in convs for c in list(eval_captions)[:20])
    answers = [a for _, _, a in convs]
    assert answers.count("Yes") == answers.count("No") > 1000             # both answers, equally often
    kinds = {q for _, q, _ in convs}
    assert {P.DESCRIBE, P.WHAT, P.COUNT, "What colour is the object?", "What shape is the object?"} <= kinds


def test_batches_equal_the_processors_own(bench):
    from tools.generate import END_TOKEN, chat_prompt
    from util.backbone import load_backbone
    from util.inputs import load_image
    _, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    convs = random.Random(1).sample(P.conversations(bench["train"]), 12)
    images = {i: load_image(os.path.join(bench["image_dir"], i)) for i, _, _ in convs}
    batch, labels = P.ChatBatches(processor, images)(convs)
    processor.tokenizer.padding_side = "right"
    ref = processor(text=[chat_prompt(processor.tokenizer, q) + a + END_TOKEN for _, q, a in convs],
                    images=[images[i] for i, _, _ in convs], padding=True, return_tensors="pt")
    for k in ref:
        assert torch.equal(batch[k], ref[k]), k
    for r, (_, _, a) in enumerate(convs):                                  # labels: the answer and <|im_end|>
        want = processor.tokenizer(a + END_TOKEN, add_special_tokens=False)["input_ids"]
        assert labels[r][labels[r] != -100].tolist() == want


def test_two_builds_give_identical_weights(bench):
    cfg = dict(P.PRETRAIN, steps=3, batch_size=4)
    a, _ = P.pretrain(bench["root"], cfg, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # the caller's thread count does not reach the build
    try:
        b, _ = P.pretrain(bench["root"], cfg, progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    base = P.pretrain(bench["root"], dict(cfg, steps=0), progress=False)[0].state_dict()
    assert any(not torch.equal(sa[k], base[k]) for k in sa)                  # and the steps changed it


def test_lr_schedule():
    cfg = dict(P.PRETRAIN, steps=150, warmup_steps=50)
    assert P.lr_at(0, cfg) == pytest.approx(cfg["lr"] / 50) and P.lr_at(49, cfg) == pytest.approx(cfg["lr"])
    assert P.lr_at(50, cfg) == pytest.approx(cfg["lr"])
    assert P.lr_at(150, cfg) == pytest.approx(cfg["lr"] * cfg["min_lr_ratio"])


def test_the_cache_is_built_once_per_hf_home(monkeypatch, tmp_path):
    """A fresh HF_HOME builds (the pretraining stood in for by the untrained base), a second
    call reuses the folder, other settings rebuild."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(P, "PRETRAIN", dict(P.PRETRAIN, steps=2, batch_size=2))
    monkeypatch.setattr(P, "heldout_figures", lambda *a: {"captions": {"token_f1": 0.0}, "yes_no": 0.5})
    from util.backbone import load_backbone
    built = []
    monkeypatch.setattr(P, "pretrain", lambda *a, **k: built.append(1) or load_backbone(P.BASE_MODEL, device="cpu"))
    path = P.chat_backbone(progress=False)
    assert path.startswith(str(tmp_path / "hf")) and built == [1]
    assert P.chat_backbone(progress=False) == path and built == [1]
    assert json.load(open(os.path.join(path, "build.json")))["settings"] == P.PRETRAIN
    monkeypatch.setattr(P, "PRETRAIN", dict(P.PRETRAIN, steps=3))
    assert P.chat_backbone(progress=False) == path and built == [1, 1]


@pytest.mark.slow
def test_tiny_qwen2_vl_chat_speaks_about_heldout_images(tmp_path):
    """The real build (cached under HF_HOME): held-out captions with token F1 >= 0.6 (the
    random tiny-qwen2-vl: about 0), its figures recorded in build.json. Its held-out Yes/No
    answers are measured and recorded, not asserted: at 1,000 steps the tiny model answers
    verification prompts at chance (docs/demo.md)."""
    from util.backbone import load_backbone
    model, processor = load_backbone("tiny-qwen2-vl-chat", device="cpu")
    build = json.load(open(os.path.join(P.cache_dir(), "build.json")))
    assert build["settings"] == P.PRETRAIN and build["seconds"] > 0
    figures = P.heldout_figures(model.eval(), processor, str(tmp_path / "demo_data"), n_captions=20)
    assert figures["captions"]["token_f1"] >= 0.6, figures
    assert figures["captions"]["object"]["token_f1"] >= 0.6 and figures["captions"]["pair"]["token_f1"] >= 0.6
    assert 0 <= figures["yes_no"] <= 1 and 0 <= figures["yes_no_binding"] <= 1
    random_init, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    from tools.generate import CAPTION_PROMPT, decode, greedy, heldout_images, score
    from util.inputs import load_image
    items = heldout_images(str(tmp_path / "demo_data"), 6)
    caps = [decode(processor.tokenizer, greedy(random_init.eval(), processor, load_image(i), CAPTION_PROMPT))
            for i, _, _ in items]
    assert score(caps, [r for _, r, _ in items], [k for _, _, k in items])["token_f1"] < 0.2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured at chance: next-token pretraining of the 2-layer model does "
                   "not learn image-text verification within the build's budget (docs/demo.md §6.1)")
def test_tiny_qwen2_vl_chat_answers_heldout_yes_no_above_chance(tmp_path):
    """Held-out verification prompts (a pair's caption against another pair's): balanced
    accuracy of the greedy Yes/No at least 0.75 (chance 0.5). A known gap, kept strict: the
    day the build learns to verify, this test passes and must lose its xfail mark."""
    from util.backbone import load_backbone
    model, processor = load_backbone("tiny-qwen2-vl-chat", device="cpu")
    assert P.yes_no_accuracy(model.eval(), processor, str(tmp_path / "demo_data"))["yes_no"] >= 0.75


@pytest.mark.slow
def test_the_chat_model_trains_evaluates_and_exports_like_the_other_tiny_models(tmp_path):
    """--model tiny-qwen2-vl-chat through train.py (LoRA: the checkpoint names the base by
    this name and reloads it from the cache), Encoder, tools/rerank.py and the export."""
    import train
    from test_train import flags, write_train_fixture

    from evaluate import Encoder
    from tools.export_merged import export_merged
    from tools.rerank import rerank
    fx = write_train_fixture(str(tmp_path / "data"), n=6)
    train.main(flags(fx, str(tmp_path / "run"), "--steps", "2", "--model", P.CHAT_MODEL, "--lora",
                     "--lora_r", "4", "--lora_alpha", "8"))
    ckpt = str(tmp_path / "run" / "checkpoint-2")
    assert json.load(open(os.path.join(ckpt, "rematch_config.json")))["model"] == P.CHAT_MODEL
    export_merged(ckpt, str(tmp_path / "export"), dtype=torch.float32)
    a, b = Encoder(ckpt), Encoder(str(tmp_path / "export"))
    texts = ["a red circle", "a blue square"]
    torch.testing.assert_close(b.encode(texts=texts, side="q"), a.encode(texts=texts, side="q"), rtol=0, atol=1e-5)
    assert rerank(a, texts[0], texts).shape == (2,)
