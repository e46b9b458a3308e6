"""
Loading and saving the backbone: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint from a hub
id or a local directory, or a tiny randomly initialised one built offline — plumbing behind
model.py, none of it in the paper.

  load_backbone(name_or_path)   (model, processor); the config, the tokenizer and the
                                image processor are checked before any weight is read
  save_backbone(model, ...)     the layout of a hub checkpoint, which load_backbone reads
  tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl
                                h=64, 2 layers, random init from a seed, with a small
                                byte-level BPE tokenizer trained on the demo's strings
                                (demo/corpus.py, imported when a tiny model is built) and
                                the real PIL Qwen2-VL image processor (Qwen3-VL: 16-px
                                patches): the same code paths as the real checkpoints
  refuse_hybrid(config)         decoders with linear-attention layers (Qwen3-Next, Qwen3.5)
                                cannot carry the unified matching mask: refused, with why
  answer_token_ids(tokenizer)   the Yes/No label tokens of Eq. 4 (ANSWER_WORDS)
  save_rematch, load_heads      a ReMatch checkpoint folder's weights (LoRA adapter or full
                                backbone, the learnable tokens and the projector) and config
  resolve_checkpoint(name)      a ReMatch checkpoint folder's hub id → its local copy
  write_model_card(path, ...)   the README.md of a checkpoint folder

load_backbone also applies util/speed.py's vision-tower patches (each tested equal to
transformers' forward). Tests: pytest tests/test_model.py tests/test_real_path.py
"""
import functools
import os

import torch
from transformers import (AutoConfig, AutoTokenizer, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                          Qwen2VLProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

from util.chat_templates import ANSWER_WORDS, QWEN2VL_CHAT_TEMPLATE, QWEN3VL_CHAT_TEMPLATE
from util.dist import default_device
from util.inputs import MAX_MIN_PIXELS, MAX_PIXELS, looks_like_hub_id, rank0_first, resolve_dir
from util.speed import patch_embed_as_matmul, vision_attention_by_size
from util.video import is_timestamped

# ----------------------------------------------------------------------------------
# Tokenizer and processor

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen2's pre-tokenizer split (letters, single digits, punctuation runs, newlines, spaces).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
def build_tiny_tokenizer(vocab_size=1024, chat_template=QWEN2VL_CHAT_TEMPLATE):
    """
    A Qwen-style byte-level BPE trained offline on demo.corpus.tokenizer_corpus(): any text
    encodes (256 byte symbols), the corpus' words become short sequences, the Qwen
    special tokens and the family's chat template are kept. Deterministic: trained once
    per process and size, each call gets its own copy.
    """
    from tokenizers import Tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_bpe(vocab_size)),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tok.chat_template = chat_template
    return tok


@functools.cache
def _tiny_bpe(vocab_size):
    """build_tiny_tokenizer's trained BPE, as its JSON."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    from demo.corpus import tokenizer_corpus   # the tiny tokenizer learns the demo's strings
    tk.train_from_iterator(tokenizer_corpus(), trainer)
    return tk.to_str()


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (which needs torchvision). Used for
    Qwen2-VL and Qwen2.5-VL alike: for images both expand <|image_pad|> the same way."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def answer_token_ids(tokenizer, where="tokenizer"):
    """(yes_id, no_id): the label tokens of Eq. 4. Each answer word must be one token."""
    ids = []
    for w in ANSWER_WORDS:
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise ValueError(f"{where}: answer word {w!r} is {len(t)} tokens {t} in this "
                             "tokenizer; the matching loss (Eq. 4) needs exactly one (use the "
                             "checkpoint's own Qwen tokenizer)")
        ids.append(t[0])
    return tuple(ids)


# ----------------------------------------------------------------------------------
# Backbone loading

TINY = {   # name → (config class, model class, vision config, decoder config changes)
    "tiny-qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                      dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=14), {}),
    "tiny-qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                        dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=64, window_size=112, fullatt_block_indexes=[0],
                             patch_size=14), {}),
    # Qwen3-VL: 16-px patches, a learned position table (16 × 16, interpolated per image),
    # DeepStack features of both vision blocks added after decoder layers 0 and 1,
    # interleaved M-RoPE, q/k norms (every Qwen3 decoder has them), explicit head_dim
    "tiny-qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                      dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, num_position_embeddings=256,
                           deepstack_visual_indexes=[0, 1], patch_size=16),
                      dict(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                         "mrope_interleaved": True, "rope_theta": 5e6})),
}
TINY_CHAT_TEMPLATE = {"tiny-qwen3-vl": QWEN3VL_CHAT_TEMPLATE}   # the others: Qwen2-VL's
# Tiny models that speak: a tiny model pretrained generatively on the demo's TRAIN split,
# built on first use and cached under $HF_HOME (demo/pretrain.py); name → the demo's builder
TINY_PRETRAINED = {"tiny-qwen2-vl-chat": "demo.pretrain"}
TINY_NAMES = (*TINY, *TINY_PRETRAINED)      # every tiny model (LoRA off by default, no hub)
BACKBONES = {"qwen2_vl": Qwen2VLForConditionalGeneration,
             "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
             "qwen3_vl": Qwen3VLForConditionalGeneration}
TINY_TOKENS = (4, 16)     # tiny default: 4..16 merged image tokens per image (56²..112² px at
                          # Qwen2-VL's 28 px per merged token, 64²..128² px at Qwen3-VL's 32)
# Decoders whose layers are not all softmax attention over an arbitrary mask: the unified
# matching mask (Fig. 3) cannot be expressed in a recurrent (linear-attention) layer
HYBRID = ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text")


def merged_patch_px(config):
    """Side in pixels of one merged image token: patch × spatial merge (28 on Qwen2/2.5-VL,
    32 on Qwen3-VL)."""
    vc = config.vision_config
    return vc.patch_size * vc.spatial_merge_size


def _build_tiny(name, tok, seed):
    """Randomly initialised tiny backbone (h=64, 2 layers) whose vocab is `tok`'s."""
    config_cls, model_cls, vision, text_changes = TINY[name]
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                 "rope_theta": 1e6},   # sum(mrope_section) = head_dim / 2
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    text.update(text_changes)
    vision = dict(vision, spatial_merge_size=2, temporal_patch_size=2)
    cfg = config_cls(text_config=text, vision_config=vision,
                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls._from_config(cfg, attn_implementation="sdpa")


# The image processors of the tiny models: the real ones' settings (Qwen2/2.5-VL: 14-px
# patches, CLIP's mean and std; Qwen3-VL: 16-px patches, mean = std = 0.5)
TINY_IMAGE_PROCESSOR = {
    "qwen2_vl": {}, "qwen2_5_vl": {},
    "qwen3_vl": dict(patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}


def image_processor_for(path, min_pixels, max_pixels, revision=None, **defaults):
    """The PIL Qwen2-VL image processor (no torchvision; Qwen3-VL's checkpoints name the same
    class, with 16-px patches), from `path`'s preprocessor_config.json or `defaults`, with
    optional pixel bounds. The bounds are passed as min_pixels / max_pixels: a hub
    preprocessor_config.json holds those keys at its top level, and they would override a
    `size` argument."""
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    pin = {"revision": revision} if revision else {}
    return (Qwen2VLImageProcessorPil.from_pretrained(path, **pin, **bounds) if path
            else Qwen2VLImageProcessorPil(**defaults, **bounds))


def check_pixel_bounds(image_processor, where):
    """The image processor's own bounds (a checkpoint's preprocessor_config.json is data too)
    within the flags' ranges: a min_pixels of millions would blow a 56-px image up to
    20,000 patches. ValueError naming the checkpoint."""
    size = image_processor.size
    for key, value, hi in (("min_pixels", size.shortest_edge, MAX_MIN_PIXELS), ("max_pixels", size.longest_edge, MAX_PIXELS)):
        if value is not None and not 28 * 28 <= value <= hi:
            raise ValueError(f"{where}: preprocessor_config.json's {key} is {value}, outside [{28 * 28}, {hi}]")


def refuse_hybrid(config, where):
    """A decoder with recurrent (linear-attention) layers, such as Qwen3-Next's or Qwen3.5's
    Gated DeltaNet, cannot run the unified matching pass: it needs every layer to attend
    under an arbitrary mask (Fig. 3: a view sees only its own segments), and a recurrent
    layer carries one state along the whole row, so every view would read the others."""
    text = getattr(config, "text_config", None) or config
    other = set(getattr(text, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if config.model_type in HYBRID or other:
        raise ValueError(
            f"{where}: model_type {config.model_type!r} has decoder layers that are not softmax "
            f"attention ({', '.join(sorted(other)) or 'linear attention'}): the unified matching "
            "pass (Eq. 4, one row holding all 8 views under a block mask) needs every layer to "
            "attend under that mask, and a recurrent linear-attention layer passes one state "
            "along the whole row, so each view would see the others. Supported: "
            f"{', '.join(sorted(BACKBONES))}")


def _check_local_checkpoint(path):
    """A local checkpoint directory has the files load_backbone needs; else an error that
    names the directory, what is missing and the fix — before any weight is read."""
    missing = [f for f in ("config.json", "preprocessor_config.json")
               if not os.path.isfile(os.path.join(path, f))]
    if not (os.path.isfile(os.path.join(path, "tokenizer.json"))
            or all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(
            f"{path}: not a complete Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint, missing {', '.join(missing)}. "
            "Copy these files from the base model's hub folder (e.g. Qwen/Qwen2-VL-2B-Instruct), "
            "or save with util.backbone.save_backbone, which writes all of them")


def _check_tokenizer(tok, config, where):
    """The tokenizer fits the model: Qwen's vision tokens at the config's ids, every id
    inside the embedding table, Yes/No single tokens (Eq. 4)."""
    if len(tok) > config.text_config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {len(tok)} tokens but the model's "
                         f"embedding table {config.text_config.vocab_size} rows: tokenizer and "
                         "weights come from different models")
    for name, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
                        ("vision_end_token_id", "<|vision_end|>")):
        tid = tok.convert_tokens_to_ids(token)
        if tid != getattr(config, name):
            raise ValueError(f"{where}: the tokenizer maps {token} to {tid} but config.json's "
                             f"{name} is {getattr(config, name)}: tokenizer and config come from "
                             "different models")
    answer_token_ids(tok, where)


def tiny_builder(name):
    """The demo module that builds the pretrained tiny model `name` (TINY_PRETRAINED)."""
    import importlib
    return importlib.import_module(TINY_PRETRAINED[name])


def pretrained_data_seed(name):
    """The seed of the synthetic benchmark whose TRAIN split the pretrained tiny model `name`
    saw (its builder's PRETRAIN["data_seed"]: only that benchmark's eval split is held out
    for it); None for any other model."""
    return tiny_builder(name).PRETRAIN["data_seed"] if name in TINY_PRETRAINED else None


def pretrained_build(name):
    """The build this code makes of the pretrained tiny model `name` ("v3": its builder's
    PRETRAIN["version"]), its revision as a hub id has commits: train.py records it as
    --model_revision, so a LoRA checkpoint names the weights its adapter sits on. None for
    any other model."""
    return f"v{tiny_builder(name).PRETRAIN['version']}" if name in TINY_PRETRAINED else None


def load_backbone(name_or_path, device=None, dtype=None, seed=0, min_pixels=None, max_pixels=None,
                  revision=None):
    """
    Load (model, processor) for Qwen2-VL, Qwen2.5-VL or Qwen3-VL from a hub id or a local
    directory, or build `tiny-qwen2-vl` / `tiny-qwen2.5-vl` / `tiny-qwen3-vl` offline (random
    init from `seed`). Decoders with linear-attention layers are refused (refuse_hybrid).
    sdpa attention; dtype bf16 on CUDA, fp32 on CPU unless given. min/max_pixels bound
    the image size (default: the checkpoint's own; tiny: 56² .. 112²). revision: a hub
    id's commit, branch or tag. The config, the tokenizer and the image processor are
    checked before the weights are read. tiny-qwen2-vl-chat: tiny-qwen2-vl taught to speak
    about the demo's TRAIN images (demo/pretrain.py), built on first use and cached.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name_or_path in TINY_PRETRAINED:               # built once, then a local checkpoint
        if revision not in (None, pretrained_build(name_or_path)):
            raise ValueError(f"{name_or_path} build {revision} was asked for (a checkpoint's model_revision), but "
                             f"this code builds {pretrained_build(name_or_path)}: an adapter trained on the other "
                             "build would sit on other weights. Use the code it was trained with, or retrain")
        path = tiny_builder(name_or_path).chat_backbone()
        return load_backbone(path, device=device, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels)
    if name_or_path in TINY:
        tok = build_tiny_tokenizer(chat_template=TINY_CHAT_TEMPLATE.get(name_or_path, QWEN2VL_CHAT_TEMPLATE))
        model = _build_tiny(name_or_path, tok, seed)
        px = merged_patch_px(model.config) ** 2                           # pixels per merged token
        image_processor = image_processor_for(None, min_pixels or TINY_TOKENS[0] * px,
                                              max_pixels or TINY_TOKENS[1] * px,
                                              **TINY_IMAGE_PROCESSOR[model.config.model_type])
        answer_token_ids(tok, name_or_path)
    else:
        name_or_path = str(name_or_path)
        local = os.path.isdir(name_or_path)
        if not local and (os.path.isabs(name_or_path) or name_or_path.startswith(".")
                          or name_or_path.count("/") != 1):
            raise FileNotFoundError(f"{name_or_path}: no such directory, and not a hub id of the "
                                    "form owner/name (nor one of " + ", ".join(sorted(TINY_NAMES)) + ")")
        if local and revision:
            raise ValueError(f"--revision {revision}: {name_or_path} is a local directory, not a hub id")
        pin = {"revision": revision} if revision else {}
        if local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            _check_local_checkpoint(name_or_path)               # names every missing file
        config = AutoConfig.from_pretrained(name_or_path, **pin)
        refuse_hybrid(config, name_or_path)
        if config.model_type not in BACKBONES:
            raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not supported "
                             f"(supported: {sorted(BACKBONES)} and {sorted(TINY_NAMES)})")
        if local:
            _check_local_checkpoint(name_or_path)
        tok = AutoTokenizer.from_pretrained(name_or_path, **pin)
        _check_tokenizer(tok, config, name_or_path)
        image_processor = image_processor_for(name_or_path, min_pixels, max_pixels, revision)
        model = BACKBONES[config.model_type].from_pretrained(name_or_path, dtype=dtype,
                                                             attn_implementation="sdpa", **pin)
    check_pixel_bounds(image_processor, name_or_path)
    patch_embed_as_matmul(model.model.visual.patch_embed)
    for block in model.model.visual.blocks:
        vision_attention_by_size(block.attn)
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tok,
                                         chat_template=tok.chat_template)
    processor.video_timestamps = is_timestamped(model.config)   # Qwen3-VL: util/video.py
    return model.to(device=device, dtype=dtype), processor


def save_backbone(model, processor, path):
    """Write a directory that load_backbone reads back: config + safetensors weights, the
    tokenizer and preprocessor_config.json — the layout of a hub checkpoint."""
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


# ----------------------------------------------------------------------------------
# ReMatch checkpoint folders (save_rematch / model.load_rematch): weights, the hub, the card

CONFIG_FILE = "rematch_config.json"
HEADS_FILE = "rematch_heads.safetensors"
CARD_FILE = "README.md"         # the model card (write_model_card; an export's: tools/export_merged.py)
# what a checkpoint folder's hub copy may bring: only the files the project reads
# (fnmatch patterns; `?` stands for one digit of a shard's number, and no name reaches a subfolder)
BACKBONE_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                  "model-?????-of-?????.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                  "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                  "chat_template.json", "preprocessor_config.json"]
CHECKPOINT_FILES = [CONFIG_FILE, HEADS_FILE, CARD_FILE, "adapter/adapter_config.json",
                    "adapter/adapter_model.safetensors", *(f"backbone/{f}" for f in BACKBONE_FILES)]
RESUME_FILES = ["train_state.pt", "files.json"]     # only --resume_from needs the training state
# A merged export (tools/export_merged.py): a plain Qwen-VL checkpoint whose tokenizer carries
# L_q / L_d as special tokens, and EXPORT_FILE says how to embed with it. load_rematch reads
# it back as the ReMatch model it came from (export_config, load_export_heads); no code of the folder runs.
EXPORT_FILE = "rematch_pooling.json"
EXPORT_PROJECTOR_FILE = "rematch_projector.safetensors"   # §3.2.3's projector (feature views)
EXPORT_FILES = [EXPORT_FILE, EXPORT_PROJECTOR_FILE, CARD_FILE, *BACKBONE_FILES]
EXPORT_FORMAT = "rematch-merged-v1"


def is_export(path):
    """A local folder written by tools/export_merged.py (it holds rematch_pooling.json)."""
    return os.path.isfile(os.path.join(str(path), EXPORT_FILE))


def read_export_spec(path):
    """rematch_pooling.json of a merged export, each value export_config builds from checked
    (a hub export is data, not trusted), the key named on a refusal."""
    import json
    where = os.path.join(str(path), EXPORT_FILE)
    try:
        with open(where) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable JSON file ({e})") from e

    def bad(key, want):
        return ValueError(f"{where}: {key} must be {want}, got {spec.get(key)!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(spec).__name__}")
    if spec.get("format") != EXPORT_FORMAT:
        raise bad("format", f"{EXPORT_FORMAT!r} (written by another version of tools/export_merged.py)")
    K = spec.get("num_tokens")
    if not isinstance(K, int) or isinstance(K, bool) or not 0 <= K <= 1024:
        raise bad("num_tokens", "an integer in [0, 1024]")
    for key in ("query_tokens", "document_tokens"):
        v = spec.get(key)
        if not (isinstance(v, list) and len(v) == K and all(isinstance(t, str) and t for t in v)):
            raise bad(key, f"a list of {K} token strings (num_tokens)")
    for key in ("prefix", "suffix"):
        if not isinstance(spec.get(key), str):
            raise bad(key, "a string")
    return spec


def save_rematch(model, processor, path, config):
    """
    Write the weights of a ReMatch model into directory `path` (created): the LoRA adapter
    (peft save_pretrained, `adapter/`) or, without LoRA, the full backbone with its
    tokenizer and image processor (`backbone/`); the learnable tokens and the projector
    (`rematch_heads.safetensors`); and `rematch_config.json` = `config` (the run's
    arguments: model, num_tokens, embed_template, lora, pixels, ...). load_rematch reads it.
    """
    import json

    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    if model.peft is not None:
        model.peft.save_pretrained(os.path.join(path, "adapter"))
    else:
        save_backbone(model.backbone, processor, os.path.join(path, "backbone"))
    heads = {"L_q": model.L_q, "L_d": model.L_d,
             **{f"projector.{k}": v for k, v in model.projector.state_dict().items()}}
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, os.path.join(path, HEADS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_model_card(path, config)


def load_heads(model, path):
    """Copy the learnable tokens and the projector saved by save_rematch into `model`."""
    from safetensors.torch import load_file
    heads = load_file(os.path.join(path, HEADS_FILE))
    with torch.no_grad():
        model.L_q.copy_(heads.pop("L_q"))
        model.L_d.copy_(heads.pop("L_d"))
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in heads.items()})


def export_config(path, templates, num_tokens=0, embed_template="plain", name=None, pin=None):
    """The config of a merged export's ReMatch model (model.load_rematch), from its checked
    rematch_pooling.json: K, the embedding template its prefix/suffix name among `templates`
    (data.EMBED_TEMPLATES), w_qdm and the target instructions. num_tokens / embed_template
    (raw-backbone flags) must be left at their defaults or equal the export's own."""
    spec = read_export_spec(path)
    K = spec["num_tokens"]
    template = next((t for t, ps in templates.items() if list(ps) == [spec["prefix"], spec["suffix"]]), None)
    if template is None:
        raise ValueError(f"{path}: rematch_pooling.json's prefix/suffix are none of this repository's "
                         f"embedding templates ({', '.join(templates)})")
    if (num_tokens, embed_template) not in ((0, "plain"), (K, template)):
        raise ValueError(f"{path} is a merged ReMatch export (K={K}, template {template}): --num_tokens "
                         f"{num_tokens} / --embed_template {embed_template} apply to raw backbones only; "
                         "leave them out and the export's own are used")
    return {"model": name or published_name(str(path)), "export": True, "base_model": spec.get("base_model"),
            "num_tokens": K, "embed_template": template, "w_qdm": spec.get("w_qdm"),
            "target_instructions": bool(spec.get("target_instructions")),
            "target_prompt_table": spec.get("target_prompt_table"), **(pin or {})}


def load_export_heads(model, tokenizer, path, prompts):
    """Copy a merged export's heads into the ReMatch `model` built over its backbone, as
    load_heads does for a checkpoint: L_q and L_d are its K tokens' rows of the input-embedding
    table, the projector (§3.2.3) is rematch_projector.safetensors (an older export without it
    gets a NaN projector, so a feature view is refused — tools/rerank.require_matching — never
    scored with fresh weights). Returns the config's match_prompt (the name in `prompts`,
    data.MATCH_PROMPTS, whose tokens are config.json's rematch.prompt_ids) and projector keys."""
    from safetensors.torch import load_file

    from util.dist import print0
    spec = read_export_spec(path)
    W = model.backbone.get_input_embeddings().weight                               # (V, d)
    with torch.no_grad():
        for side, L in (("query", model.L_q), ("document", model.L_d)):
            ids = tokenizer.convert_tokens_to_ids(spec[f"{side}_tokens"])
            unknown = [t for t, i in zip(spec[f"{side}_tokens"], ids) if i is None or i == tokenizer.unk_token_id]
            if unknown or any(i >= W.shape[0] for i in ids):
                raise ValueError(f"{path}: the {side} tokens {unknown or spec[f'{side}_tokens']} are not in "
                                 "its tokenizer / embedding table: a damaged export")
            if model.num_tokens:
                L.copy_(W[ids].to(L.dtype))                                         # (K, d)
        projector = os.path.isfile(os.path.join(path, EXPORT_PROJECTOR_FILE))
        if projector:
            model.projector.load_state_dict(load_file(os.path.join(path, EXPORT_PROJECTOR_FILE)))
        else:
            for p in model.projector.parameters():
                p.fill_(float("nan"))
    prompt_ids = (getattr(model.backbone.config, "rematch", None) or {}).get("prompt_ids")
    prompt = next((n for n, P in prompts.items()
                   if prompt_ids == tokenizer(P, add_special_tokens=False)["input_ids"]), None)
    print0(f"{path}: a merged ReMatch export (K={model.num_tokens}, template {model.embed_template}), embedding "
           "through its own tokens and pooling" + ("" if projector else "; no projector in it (raw views only)"))
    return {"match_prompt": prompt, "projector": projector}


def check_config(config, where):
    """The rematch_config.json values load_rematch builds the model from, each checked for
    type and range with its key named (a hub checkpoint's config is data, not trusted)."""
    def bad(key, want):
        return ValueError(f"{where}: {key} must be {want}, got {config.get(key)!r}")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model"), str) or not config["model"]:
        raise bad("model", "the base model's hub id or path (a string)")
    k = config.get("num_tokens")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 1024:
        raise bad("num_tokens", "an integer in [0, 1024]")
    if config.get("embed_template") not in ("chat", "plain"):
        raise bad("embed_template", "'chat' or 'plain'")
    for key, hi in (("min_pixels", MAX_MIN_PIXELS), ("max_pixels", MAX_PIXELS)):
        v = config.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 28 * 28 <= v <= hi):
            raise bad(key, f"null or an integer in [{28 * 28}, {hi}]")
    if config.get("min_pixels") and config.get("max_pixels") and config["min_pixels"] > config["max_pixels"]:
        raise bad("min_pixels", f"<= max_pixels ({config['max_pixels']})")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise bad("seed", "an integer")
    w = config.get("w_qdm", 0)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0:
        raise bad("w_qdm", "a number >= 0")
    if config.get("match_prompt") not in (None, "paper", "header"):
        raise bad("match_prompt", "'paper' or 'header'")
    if config.get("model_revision") is not None and (not isinstance(config["model_revision"], str)
                                                    or not config["model_revision"]):
        raise bad("model_revision", "null or the base model's commit, branch or tag (a string)")
    if config["model"] in TINY_PRETRAINED and config.get("lora") and config.get("model_revision") is None:
        raise ValueError(f"{where}: a LoRA checkpoint on {config['model']} that records no build of it "
                         "(model_revision; written before builds were recorded): its adapter may sit on other "
                         f"weights than this code's build {pretrained_build(config['model'])}. Retrain")
    for key in ("target_instructions", "lora"):
        if key in config and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    table = config.get("target_prompt_table")
    if table is not None and not (isinstance(table, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in table.items())):
        raise bad("target_prompt_table", "null or {subset, task or meta-task: prompt} with non-empty strings")
    if config.get("dtype", "auto") not in ("auto", "float32", "bfloat16", "float64"):
        raise bad("dtype", "'auto', 'float32', 'bfloat16' or 'float64'")
    return config


def resolve_checkpoint(name_or_path, revision=None, train_state=False):
    """A local directory as is; a hub id of a ReMatch checkpoint folder (one holding
    rematch_config.json) → its local copy, downloaded once (rank 0 first, then the other
    ranks reuse the cache; no code from the repo is ever run): exactly the files
    CHECKPOINT_FILES names, and with train_state (--resume_from) RESUME_FILES too; a hub
    id of a merged export (rematch_pooling.json) → the files EXPORT_FILES names (never its code);
    anything else (a raw backbone's hub id such as Qwen/Qwen2-VL-2B-Instruct, tiny-*)
    unchanged. owner/name is a hub id even where a folder `owner/` exists here: a local
    path that does not exist starts with ./ or /."""
    name = str(name_or_path)
    if os.path.isdir(name) or name in TINY_NAMES or not looks_like_hub_id(name):
        if revision:
            raise ValueError(f"--revision {revision}: {name} is not a hub id (a revision pins a "
                             "hub repository's commit, branch or tag)")
        return name
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        rank0_first(lambda: hf_hub_download(name, CONFIG_FILE, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        try:                                          # a merged export (export_config)?
            rank0_first(lambda: hf_hub_download(name, EXPORT_FILE, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return name                               # neither: a raw backbone
        if train_state:
            raise ValueError(f"{name} is a merged ReMatch export: it holds no training state to resume "
                             "from; resume from the train.py checkpoint it was exported from")
        return resolve_dir(name, EXPORT_FILES, repo_type="model", revision=revision)
    return resolve_dir(name, CHECKPOINT_FILES + RESUME_FILES * train_state, repo_type="model", revision=revision)


CARD_KEYS = ("model", "model_revision", "lora", "lora_r", "lora_alpha", "num_tokens", "embed_template", "tau",
             "w_orth", "w_qdm", "match_views", "steps", "batch_size", "world_size", "lr",
             "train_data", "subsets", "split", "hard_negative", "target_instructions", "seed")


def published_name(value):
    """What a published file (checkpoint config, model card, merged export) records for a
    path-valued argument: a local path reduced to its last component, so that user names
    and a cluster's layout stay private; anything else (a hub id, tiny-*) as given."""
    if not isinstance(value, str) or not value:
        return value
    if os.path.isabs(value) or value.startswith((".", "~")) or os.path.exists(value):
        return os.path.basename(os.path.normpath(os.path.expanduser(value))) or value
    return value


def family_tag(model):
    """The hub tag of the base model's family, read off its name (a local folder whose name
    does not say: the generic "qwen-vl")."""
    name = str(model or "").lower().replace("_", ".")
    for key, tag in (("qwen3", "qwen3-vl"), ("qwen2.5", "qwen2.5-vl"), ("qwen2", "qwen2-vl")):
        if key in name:
            return tag
    return "qwen-vl"


def write_model_card(path, config, results=None):
    """README.md of a checkpoint folder: what it is (base model, the training arguments
    that define it), the measured results when given ({"overall": …, "hit_at_1": {task:
    …}} as train.py's evaluation returns them), and how to use it."""
    import json
    rows = "\n".join(f"| `{k}` | `{json.dumps(published_name(config[k]))}` |" for k in CARD_KEYS if k in config)
    if results and results.get("hit_at_1"):
        measured = "\n".join(f"| {t} | {'n/a' if v is None else f'{v:.3f}'} |"
                              for t, v in results["hit_at_1"].items())
        measured = (f"Hit@1 on the evaluation run after training (`eval_data` = "
                    f"`{published_name(config.get('eval_data'))}`), overall {results['overall']:.3f}:\n\n"
                    f"| task | Hit@1 |\n|---|---|\n{measured}")
    else:
        measured = "No evaluation was run with this checkpoint."
    card = f"""---
base_model: {published_name(config.get("model"))}
library_name: rematch
tags: [rematch, multimodal-embedding, retrieval, {family_tag(config.get("model"))}]
---
# ReMatch checkpoint

A [ReMatch](https://arxiv.org/abs/2511.19278) embedding model: `{published_name(config.get("model"))}`
fine-tuned with K = {config.get("num_tokens")} learnable tokens per side (Eq. 2),
InfoNCE with hard negatives (Eq. 3) and the generative matching loss (Eq. 4,
w_qdm = {config.get("w_qdm")}). Written by the rematch reference implementation
(`train.py`); every argument of the run is in `rematch_config.json`.

## Training arguments

| argument | value |
|---|---|
{rows}

## Results

{measured}

## Use

With the rematch repository (this folder's path, or its hub id once uploaded):

```python
from evaluate import Encoder
enc = Encoder("<this folder or its hub id>")
E = enc.encode(texts=["a dog on a beach"], side="q")       # L2-normalised (1, d)
```

```bash
python evaluate.py --model <this folder or its hub id> --mmeb_dir TIGER-Lab/MMEB-eval --image_dir eval_images
python tools/export_merged.py <this folder> merged/        # plain-transformers checkpoint
```
"""
    with open(os.path.join(path, CARD_FILE), "w") as f:
        f.write(card)
