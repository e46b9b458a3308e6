"""
A merged export (tools/export_merged.py) wherever the repository takes a model: load_rematch
(and so Encoder, evaluate.py, tools/search.py, tools/rerank.py, bench/serving.py) reads it
back as the ReMatch model it was exported from (util/backbone.py: export_config, load_export_heads), never as a K = 0,
plain-template baseline; the speed benches refuse it by name.

Oracles: the training checkpoint the export came from (Encoder on it, tools/rerank.rerank
on it), and SentenceTransformer(export) — the export's own template and pooling — to 1e-5.
A LoRA checkpoint of tiny-qwen2-vl, K = 3, chat template, trained 2 steps with matching.
CPU, fp32 export (bf16 rounding is tests/test_st_export.py's concern).

    pytest tests/test_export_load.py
"""
import json
import os
import shutil

import pytest
import torch
from conftest import shape_image
from test_train import fake_hub, flags, write_train_fixture

TEXTS = ["a red circle", "Represent the class label: a green square on a white background"]
IMAGES = [shape_image("blue", 84, "square"), shape_image("red", (56, 112))]


@pytest.fixture(scope="module")
def checkpoint_and_export(tmp_path_factory):
    """(checkpoint dir, fp32 export dir) of a 2-step LoRA run with K = 3 and the chat template."""
    import train
    from tools.export_merged import export_merged
    root = tmp_path_factory.mktemp("export_load")
    fx = write_train_fixture(str(root / "data"), n=6)
    train.main(flags(fx, str(root / "run"), "--steps", "2", "--num_tokens", "3", "--embed_template", "chat",
                     "--lora", "--lora_r", "4", "--lora_alpha", "8", "--w_qdm", "0.1"))
    ckpt = str(root / "run" / "checkpoint-2")
    export_merged(ckpt, str(root / "export"), dtype=torch.float32)
    return ckpt, str(root / "export")


def encode_both_sides(enc):
    """Texts and instructed images on each side: (2 · 4, d)."""
    return torch.cat([torch.cat([enc.encode(texts=TEXTS, side=side),
                                 enc.encode(images=IMAGES, instruction="Represent the given image.", side=side)])
                      for side in ("q", "d")])


def test_an_export_loads_as_its_checkpoint_not_as_a_baseline(checkpoint_and_export):
    """Encoder(export): K, template, L_q / L_d, matching prompt and w_qdm of the checkpoint;
    its vectors equal the checkpoint's (both sides, texts and images) to 1e-5."""
    from evaluate import Encoder
    ckpt, export = checkpoint_and_export
    a, b = Encoder(ckpt), Encoder(export)
    assert (b.model.num_tokens, b.model.embed_template) == (3, "chat")
    assert b.config["export"] and b.config["match_prompt"] == a.config.get("match_prompt", "paper")
    assert b.config["w_qdm"] == a.config["w_qdm"] == 0.1 and b.config["projector"]
    torch.testing.assert_close(b.model.L_q, a.model.L_q, rtol=0, atol=0)
    torch.testing.assert_close(b.model.L_d, a.model.L_d, rtol=0, atol=0)
    torch.testing.assert_close(encode_both_sides(b), encode_both_sides(a), rtol=0, atol=1e-5)


def test_the_export_embeds_as_sentence_transformers_does(checkpoint_and_export):
    """Encoder(export) == SentenceTransformer(export): encode_query for side q, encode_document
    for side d, texts and images with their instruction in the text, to 1e-5."""
    st = pytest.importorskip("sentence_transformers")
    from evaluate import Encoder
    _, export = checkpoint_and_export
    enc, m = Encoder(export), st.SentenceTransformer(export, trust_remote_code=True)
    docs = TEXTS + [{"image": im, "text": "<|image_1|>\nRepresent the given image."} for im in IMAGES]
    for side, encode in (("q", m.encode_query), ("d", m.encode_document)):
        want = encode(docs, convert_to_tensor=True).float()
        got = torch.cat([enc.encode(texts=TEXTS, side=side),
                         enc.encode(images=IMAGES, instruction="Represent the given image.", side=side)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_export_reranks_as_its_checkpoint(checkpoint_and_export):
    """tools/rerank.rerank on Encoder(export) == on the checkpoint (raw and feature views:
    the projector travels in rematch_projector.safetensors)."""
    from evaluate import Encoder
    from tools.rerank import rerank
    ckpt, export = checkpoint_and_export
    a, b = Encoder(ckpt), Encoder(export)
    cands = [IMAGES[0], "a blue square", (IMAGES[1], "<|image_1|>\nRepresent the given image.")]
    for views in ("raw", "all"):
        torch.testing.assert_close(rerank(b, TEXTS[0], cands, views=views), rerank(a, TEXTS[0], cands, views=views),
                                   rtol=0, atol=1e-5)


def test_an_export_without_projector_refuses_feature_views(checkpoint_and_export, tmp_path):
    """An export written before the projector travelled: raw views work, feature views are
    refused by name (never scored with a fresh projector)."""
    from evaluate import Encoder
    from tools.rerank import rerank
    from util.backbone import EXPORT_PROJECTOR_FILE
    _, export = checkpoint_and_export
    old = str(tmp_path / "old")
    shutil.copytree(export, old)
    os.remove(os.path.join(old, EXPORT_PROJECTOR_FILE))
    enc = Encoder(old)
    assert enc.config["projector"] is False
    assert rerank(enc, TEXTS[0], [TEXTS[1]], views="raw").isfinite().all()
    with pytest.raises(ValueError, match="holds none .no rematch_projector.safetensors"):
        rerank(enc, TEXTS[0], [TEXTS[1]], views="feat")


def test_an_export_by_hub_id_fetches_no_code(checkpoint_and_export, tmp_path, monkeypatch):
    """A hub id of an export (an offline cache stands in for the hub) loads like the folder;
    the download asks for the weights, tokenizer and rematch files, never a .py file."""
    import fnmatch

    import huggingface_hub

    from evaluate import Encoder
    from util.backbone import EXPORT_FILES
    _, export = checkpoint_and_export
    fake_hub(tmp_path, monkeypatch, "someone/rematch-merged", export)
    real = huggingface_hub.snapshot_download
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append(kw["allow_patterns"]) or real(repo, **kw))
    E_hub = Encoder("someone/rematch-merged").encode(texts=TEXTS, side="q")
    torch.testing.assert_close(E_hub, Encoder(export).encode(texts=TEXTS, side="q"), rtol=0, atol=0)
    assert asked == [EXPORT_FILES]
    for f in os.listdir(export):
        if f.endswith(".py"):
            assert not any(fnmatch.fnmatch(f, p) for p in EXPORT_FILES), f


def test_raw_backbone_flags_and_damaged_exports_are_refused(checkpoint_and_export, tmp_path):
    """--num_tokens / --embed_template that contradict the export, a broken
    rematch_pooling.json, and the speed benches (which time a raw backbone) stop by name."""
    import argparse

    from evaluate import Encoder
    from util.backbone import EXPORT_FILE
    _, export = checkpoint_and_export
    with pytest.raises(ValueError, match="merged ReMatch export .K=3, template chat.: --num_tokens 8"):
        Encoder(export, num_tokens=8)
    Encoder(export, num_tokens=3, embed_template="chat")                 # the export's own: fine
    bad = str(tmp_path / "bad")
    shutil.copytree(export, bad)
    spec = json.load(open(os.path.join(bad, EXPORT_FILE)))
    json.dump(dict(spec, query_tokens=spec["query_tokens"][:2]), open(os.path.join(bad, EXPORT_FILE), "w"))
    with pytest.raises(ValueError, match="query_tokens must be a list of 3 token strings"):
        Encoder(bad)
    json.dump(dict(spec, prefix="Other: "), open(os.path.join(bad, EXPORT_FILE), "w"))
    with pytest.raises(ValueError, match="none of this repository's embedding templates"):
        Encoder(bad)
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import common
    args = argparse.Namespace(threads=1, seed=0, image_size=224, model=export, device="cpu", dtype="auto")
    with pytest.raises(SystemExit, match="merged ReMatch export .K=3.: this bench times a raw backbone"):
        common.setup(args)


def test_evaluate_cli_on_an_export_equals_the_checkpoint(checkpoint_and_export, tmp_path):
    """evaluate.py --model EXPORT on the synthetic benchmark: the same Hit@1 per task as
    --model CHECKPOINT (a K = 0 baseline would score otherwise)."""
    import evaluate
    from demo.synthetic import make_synthetic
    ckpt, export = checkpoint_and_export
    data = str(tmp_path / "demo")
    make_synthetic(data, seed=0, train_rows=4, eval_queries=10)
    runs = [evaluate.main(["--model", m, "--benchmark", "synthetic", "--mmeb_dir", os.path.join(data, "eval"),
                           "--image_dir", data, "--no_progress", "--tasks", "ShapesColour", "ShapesT2I"])
            for m in (ckpt, export)]
    assert runs[0]["mmeb"] == runs[1]["mmeb"]


def test_a_bare_image_document_is_embedded_one_way_everywhere(checkpoint_and_export):
    """The one rule (evaluate.format_document, util.inputs.DOC_IMAGE_INSTRUCTION): a bare
    image document gets "Represent the given image." in Encoder.encode(side="d"), in
    rerank's candidates and in SentenceTransformer(export).encode_document(image); a bare
    image query stays bare."""
    st = pytest.importorskip("sentence_transformers")
    from evaluate import Encoder
    from tools.rerank import rerank
    from util.inputs import DOC_IMAGE_INSTRUCTION
    _, export = checkpoint_and_export
    enc, m = Encoder(export), st.SentenceTransformer(export, trust_remote_code=True)
    bare = enc.encode(images=IMAGES, side="d")
    torch.testing.assert_close(bare, enc.encode(images=IMAGES, instruction=DOC_IMAGE_INSTRUCTION, side="d"),
                               rtol=0, atol=0)
    torch.testing.assert_close(bare, m.encode_document(IMAGES, convert_to_tensor=True).float(), rtol=0, atol=1e-5)
    q = enc.encode(images=IMAGES, side="q")
    torch.testing.assert_close(q, m.encode_query(IMAGES, convert_to_tensor=True).float(), rtol=0, atol=1e-5)
    assert (q - enc.encode(images=IMAGES, instruction=DOC_IMAGE_INSTRUCTION, side="q")).abs().max() > 1e-4
    torch.testing.assert_close(rerank(enc, TEXTS[0], IMAGES),
                               rerank(enc, TEXTS[0], [(im, "<|image_1|>\n" + DOC_IMAGE_INSTRUCTION) for im in IMAGES]),
                               rtol=0, atol=0)
