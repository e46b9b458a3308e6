"""
tiny-qwen2-vl-chat (demo/pretrain.py): the pretraining conversations come from the TRAIN
split only (no eval image, no held-out caption), batches equal the processor's own, two
builds give identical weights, the cache is rebuilt under a fresh HF_HOME and reused
otherwise, and the built model speaks: held-out captions with token F1 >= 0.6, and held-out
colour claims verified (the final Yes/No of its answer; slow: the one full build, shared
through HF_HOME by every test that names the model). A checkpoint names the build its
LoRA sits on, and another build is refused.

    pytest tests/test_pretrain.py
"""
import json
import os
import random

import pytest
import torch

from demo import pretrain as P


@pytest.fixture(scope="module")
def bench(demo_benchmark):
    """The demo's benchmark (seed 0, default size: the build's), the session's shared copy."""
    return demo_benchmark


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
    kinds = {q for _, q, _ in convs}
    assert {P.DESCRIBE, P.WHAT, P.COUNT, "What colour is the object?", "What shape is the object?"} <= kinds
    assert not any(q.startswith("Does the image show") for q in kinds)     # verification: verifications()
    ver = P.verifications(bench["train"])
    assert ver and not {i for i, _, _ in ver} & eval_images


def test_verifications_state_the_colour_then_decide(bench):
    """Each answer is the image's own colour (read here off the parquet's positive, not the
    file name the code reads), a new line, then Yes when the claim is that colour; both
    answers equally often, every claim a colour."""
    from demo.synthetic import COLOURS
    from util.inputs import read_rows
    truth = {r["qry_image_path"]: r["pos_text"]
             for r in read_rows([os.path.join(bench["train"], "ShapesColour", "original-00000-of-00001.parquet")])}
    ver = P.verifications(bench["train"])
    for image, prompt, answer in ver:
        claim = prompt[len("Does the image show "):-len("? Answer Yes or No.")]
        assert prompt == P.VERIFY.format(claim) and claim in COLOURS
        assert answer == truth[image] + "\n" + ("Yes" if claim == truth[image] else "No")
    answers = [a.split("\n")[1] for _, _, a in ver]
    assert answers.count("Yes") == answers.count("No") > 100


def test_final_yes_no():
    assert P.final_yes_no("blue\nNo") == "No" and P.final_yes_no("Yes") == "Yes"
    assert P.final_yes_no("No, it is blue. Yes") == "Yes"
    assert P.final_yes_no("Nobody says Yesterday") is None and P.final_yes_no("") is None


def test_yes_no_accuracy_counts_by_hand(bench, monkeypatch):
    """yes_no_accuracy against answers scripted per (image, claim): an oracle that reads the
    truth off the file name (the colour) and the parquet (the pair's caption) scores 1, its
    negation 0, a constant answer 0.5 (balanced), and one that says Yes to colours only
    scores 1 on colours and 0.5 on pairs."""
    import tools.generate as G
    import util.inputs
    from util.inputs import read_rows
    pair_caption = {r["qry_img_path"]: r["tgt_text"][0] for r in
                    read_rows([os.path.join(bench["eval"], "ShapesI2T", "test-00000-of-00001.parquet")])}
    def run(rule):
        def fake_greedy(model, processor, image, prompt, max_new_tokens=24):
            path = os.path.relpath(image, bench["image_dir"])                 # load_image: the path
            claim = prompt[len("Does the image show "):-len("? Answer Yes or No.")]
            truth = pair_caption[path] if path in pair_caption else os.path.basename(path).split("-")[0]
            return [rule(claim == truth)]
        monkeypatch.setattr(G, "greedy", fake_greedy)
        monkeypatch.setattr(G, "decode", lambda _, ids: ids[0])
        monkeypatch.setattr(util.inputs, "load_image", lambda path: path)
        return P.yes_no_accuracy(None, type("Proc", (), {"tokenizer": None})(), bench["root"], n=10)
    oracle = run(lambda true: "red\nYes" if true else "red\nNo")
    assert oracle == {"yes_no": 1.0, "yes_rate_on_true_colours": 1.0, "yes_no_pairs": 1.0, "yes_no_binding": 1.0}
    assert run(lambda true: "No" if true else "Yes")["yes_no"] == 0.0
    assert run(lambda true: "Yes") == {"yes_no": 0.5, "yes_rate_on_true_colours": 1.0, "yes_no_pairs": 0.5,
                                       "yes_no_binding": 0.5}
    assert run(lambda true: "maybe")["yes_no"] == 0.0                         # no decision counts as wrong


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
    cfg = dict(P.PRETRAIN, steps=3, verify_steps=2, batch_size=4)
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
    base = P.pretrain(bench["root"], dict(cfg, steps=0, verify_steps=0), progress=False)[0].state_dict()
    assert any(not torch.equal(sa[k], base[k]) for k in sa)                  # and the steps changed it
    c = P.pretrain(bench["root"], dict(cfg, verify_steps=0), progress=False)[0].state_dict()
    assert any(not torch.equal(sa[k], c[k]) for k in sa)                     # both stages count


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
def test_tiny_qwen2_vl_chat_speaks_about_heldout_images(bench, chat_model):
    """The real build (cached under HF_HOME): held-out captions with token F1 >= 0.6 (the
    random tiny-qwen2-vl: about 0), its figures recorded in build.json."""
    from tools.generate import CAPTION_PROMPT, answers, decode, greedy, heldout_images, score
    from util.backbone import load_backbone
    from util.inputs import load_image
    model, processor = load_backbone("tiny-qwen2-vl-chat", device="cpu")
    build = json.load(open(os.path.join(P.cache_dir(), "build.json")))
    assert build["settings"] == P.PRETRAIN and build["seconds"] > 0
    assert build["heldout"]["captions"]["n"] == 60 and 0 <= build["heldout"]["yes_no"] <= 1
    items = heldout_images(bench["root"], 20)
    caps, ids = answers(model.eval(), processor, [load_image(i) for i, _, _ in items])
    figures = score(caps, [r for _, r, _ in items], [k for _, _, k in items], ids)
    assert figures["token_f1"] >= 0.6, figures
    assert figures["object"]["token_f1"] >= 0.6 and figures["pair"]["token_f1"] >= 0.6
    random_init, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    caps = [decode(processor.tokenizer, greedy(random_init.eval(), processor, load_image(i), CAPTION_PROMPT))
            for i, _, _ in items[:6]]
    assert score(caps, [r for _, r, _ in items[:6]], [k for _, _, k in items[:6]])["token_f1"] < 0.2


@pytest.mark.slow
def test_tiny_qwen2_vl_chat_verifies_heldout_colour_claims(bench, chat_model):
    """Held-out verification prompts about 40 single EVAL objects (never trained on), the
    object's colour against another: balanced accuracy of the final Yes/No in its answer at
    least 0.9 (chance 0.5; it says Yes to the true colour, not Yes to everything), and the
    answer states the image's colour first, as taught."""
    from tools.generate import decode, greedy
    from util.backbone import load_backbone
    from util.inputs import load_image
    model, processor = load_backbone("tiny-qwen2-vl-chat", device="cpu")
    acc = P.yes_no_accuracy(model.eval(), processor, bench["root"])
    assert acc["yes_no"] >= 0.9, acc
    assert 0.8 <= acc["yes_rate_on_true_colours"] <= 1.0
    from util.inputs import read_rows
    image = read_rows([os.path.join(bench["eval"], "ShapesCLS", "test-00000-of-00001.parquet")])[0]["qry_img_path"]
    colour = os.path.basename(image).split("-")[0]                     # images/object/<colour>-<shape>-j<render>.png
    other = "green" if colour != "green" else "red"
    said = decode(processor.tokenizer, greedy(model, processor, load_image(os.path.join(bench["image_dir"], image)),
                                              P.VERIFY.format(other), max_new_tokens=8))
    assert said.split()[0] == colour and P.final_yes_no(said) == "No", (image, said)


@pytest.mark.slow
def test_the_chat_model_trains_evaluates_and_exports_like_the_other_tiny_models(tmp_path, chat_model):
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


def test_a_checkpoint_names_the_build_its_adapter_sits_on(tmp_path, capsys):
    """train.py records the build (--model_revision v<version>); loading asks for it, and
    another build, or a LoRA checkpoint that names none, is refused before anything is
    built: an adapter on other weights would embed silently wrong."""
    import train
    from util.backbone import check_config, load_backbone, pretrained_build
    build = f"v{P.PRETRAIN['version']}"
    assert pretrained_build(P.CHAT_MODEL) == build and pretrained_build("tiny-qwen2-vl") is None
    assert train.parse_args(["--model", P.CHAT_MODEL, "--data_seed", "0"]).model_revision == build
    assert train.parse_args(["--model", "tiny-qwen2-vl"]).model_revision is None
    with pytest.raises(SystemExit):
        train.parse_args(["--model", P.CHAT_MODEL, "--data_seed", "0", "--model_revision", "v1"])
    assert "builds tiny-qwen2-vl-chat " + build in capsys.readouterr().err
    with pytest.raises(ValueError, match="build v1 was asked for"):
        load_backbone(P.CHAT_MODEL, device="cpu", revision="v1")
    cfg = {"model": P.CHAT_MODEL, "num_tokens": 4, "embed_template": "chat", "lora": True}
    with pytest.raises(ValueError, match="records no build"):
        check_config(dict(cfg), "ckpt/rematch_config.json")
    assert check_config(dict(cfg, model_revision=build), "x")["model_revision"] == build
    assert check_config(dict(cfg, lora=False), "x")                      # full fine-tuning saves the backbone
