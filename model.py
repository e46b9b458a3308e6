"""
The ReMatch model: a Qwen2-VL / Qwen2.5-VL backbone turned into an embedding model.

  §3.2.1  K learnable tokens per side (L_q, L_d ∈ R^{K×d}) appended after the chat
          template and fed through `inputs_embeds`; their last-layer states
          ME = [e_1..e_K] (N, K, d) and the fused embedding E = mean_i e_i (N, d).
          K = 0 gives last-token pooling (the single-vector baseline).
  §3.2.3  the projector Z = MLP(E) into the input-embedding space, and the unified
          multi-view matching pass (Fig. 3): one forward over a packed
          [P, Q, Zq, D1, Zd1, D2, Zd2, H, A_1..A_8] row per (q, d⁺, d⁻), the unified
          mask of masks.py, logits at the label positions only (Eq. 4 in losses.py).

Backbones load from a Hugging Face id or a local directory (`load_backbone`); the names
`tiny-qwen2-vl` and `tiny-qwen2.5-vl` build a randomly initialised tiny model offline,
with a small byte-level BPE tokenizer trained on the demo's corpus (demo/corpus.py) and
the real PIL Qwen2-VL image processor — the same code paths as the real checkpoints.

Naming: "pos" is always the positive document d⁺; positions in a sequence are "*_idx"
(token_idx, feat_idx, label_idx) or position_ids (M-RoPE).

Used by train.py (training) and evaluate.py (embedding); the demo: python train.py
Tests: pytest tests/test_model.py tests/test_matching.py
"""
import collections
import functools
import importlib
import os
import types

import torch
import torch.nn as nn
from transformers import (AutoConfig, AutoTokenizer, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                          Qwen2VLProcessor)
try:   # transformers ≥ 5.x whose vision towers accept precomputed position_ids and window
    # indices (vision_position_ids, vision_window_index)
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
except ImportError:
    get_vision_position_ids = get_vision_window_index = None

from data import ANSWER_WORDS, looks_like_hub_id, rank0_first, resolve_dir
from demo.corpus import tokenizer_corpus   # the tiny tokenizer learns the demo's strings (see there)
from masks import additive_mask, unified_block_mask, unified_mask_batch

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
# The official Qwen2-VL chat template (one vision block per image).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size=1024):
    """
    A Qwen-style byte-level BPE trained offline on demo.corpus.tokenizer_corpus(): any text
    encodes (256 byte symbols), the corpus' words become short sequences, the Qwen
    special tokens and chat template are kept. Deterministic.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(tokenizer_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>",
                                  additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


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

TINY = {
    "tiny-qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                      dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)),
    "tiny-qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                        dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                             out_hidden_size=64, window_size=112, fullatt_block_indexes=[0])),
}
BACKBONES = {"qwen2_vl": Qwen2VLForConditionalGeneration,
             "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
TINY_PIXELS = (56 * 56, 112 * 112)     # tiny default: 4..16 merged image tokens per image


def _build_tiny(name, tok, seed):
    """Randomly initialised tiny backbone (h=64, 2 layers) whose vocab is `tok`'s."""
    config_cls, model_cls, vision = TINY[name]
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                 "rope_theta": 1e6},   # sum(mrope_section) = head_dim / 2
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = config_cls(text_config=text, vision_config=vision,
                     image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls._from_config(cfg, attn_implementation="sdpa")


def default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def image_processor_for(path, min_pixels, max_pixels):
    """The PIL Qwen2-VL image processor (no torchvision), from `path`'s
    preprocessor_config.json or the defaults, with optional pixel bounds. The bounds are
    passed as min_pixels / max_pixels: a hub preprocessor_config.json holds those keys at
    its top level, and they would override a `size` argument."""
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    return (Qwen2VLImageProcessorPil.from_pretrained(path, **bounds) if path
            else Qwen2VLImageProcessorPil(**bounds))


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
            f"{path}: not a complete Qwen2-VL/Qwen2.5-VL checkpoint, missing {', '.join(missing)}. "
            "Copy these files from the base model's hub folder (e.g. Qwen/Qwen2-VL-2B-Instruct), "
            "or save with model.save_backbone, which writes all of them")


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


def load_backbone(name_or_path, device=None, dtype=None, seed=0, min_pixels=None, max_pixels=None):
    """
    Load (model, processor) for Qwen2-VL or Qwen2.5-VL from a hub id or a local directory,
    or build `tiny-qwen2-vl` / `tiny-qwen2.5-vl` offline (random init from `seed`).
    sdpa attention; dtype bf16 on CUDA, fp32 on CPU unless given. min/max_pixels bound
    the image size (default: the checkpoint's own; tiny: 56² .. 112²). The config, the
    tokenizer and the image processor are checked before the weights are read.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if name_or_path in TINY:
        tok = build_tiny_tokenizer()
        model = _build_tiny(name_or_path, tok, seed)
        image_processor = image_processor_for(None, min_pixels or TINY_PIXELS[0], max_pixels or TINY_PIXELS[1])
        answer_token_ids(tok, name_or_path)
    else:
        name_or_path = str(name_or_path)
        local = os.path.isdir(name_or_path)
        if not local and (os.path.isabs(name_or_path) or name_or_path.startswith(".")
                          or name_or_path.count("/") != 1):
            raise FileNotFoundError(f"{name_or_path}: no such directory, and not a hub id of the "
                                    "form owner/name (nor one of " + ", ".join(sorted(TINY)) + ")")
        if local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            _check_local_checkpoint(name_or_path)               # names every missing file
        config = AutoConfig.from_pretrained(name_or_path)
        if config.model_type not in BACKBONES:
            raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not supported "
                             f"(supported: {sorted(BACKBONES)} and {sorted(TINY)})")
        if local:
            _check_local_checkpoint(name_or_path)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        _check_tokenizer(tok, config, name_or_path)
        image_processor = image_processor_for(name_or_path, min_pixels, max_pixels)
        model = BACKBONES[config.model_type].from_pretrained(name_or_path, dtype=dtype,
                                                             attn_implementation="sdpa")
    patch_embed_as_matmul(model.model.visual.patch_embed)
    for block in model.model.visual.blocks:
        vision_attention_by_size(block.attn)
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tok,
                                         chat_template=tok.chat_template)
    return model.to(device=device, dtype=dtype), processor


def patch_embed_as_matmul(patch_embed):
    """The vision tower's patch embedding is a Conv3d whose kernel equals its stride and
    its input (C × t × p × p per patch): one matmul with the flattened weight, computed
    the same way. On the CPU the Conv3d's backward is about 5× slower than the matmul's
    (and bf16 Conv3d is slow on some CUDA/cuDNN versions). The weights stay the Conv3d's,
    so checkpoints are unchanged. Bound as a method, so copies of the model keep their own."""
    patch_embed.forward = types.MethodType(_patch_embed_forward, patch_embed)


def _patch_embed_forward(self, hidden_states):
    W = self.proj.weight                                                      # (E, C, t, p, p)
    x = hidden_states.to(W.dtype).reshape(-1, W[0].numel())                   # (n_patch, C·t·p·p)
    return torch.nn.functional.linear(x, W.reshape(W.shape[0], -1))           # (n_patch, E)


def vision_attention_by_size(attn):
    """
    The vision tower attends within each image (or, in Qwen2.5-VL's windowed blocks,
    each window): cu_seqlens cuts the packed patch sequence into segments. transformers'
    SDPA path makes one attention call per segment, 30-100 calls a demo step. This forward
    computes the same with one call per distinct segment length: segments of one length
    are stacked as a batch (a permutation puts them side by side, its inverse restores the
    order). Everything else is transformers' forward: qkv, the vision rotary embedding,
    proj. Bound as a method on each block's attention; flash-attention implementations
    (already one varlen call) keep theirs. tests/test_model.py checks outputs and
    gradients against the original forward for both families.
    """
    if "flash" in str(attn.config._attn_implementation):
        return
    rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb_vision
    attn.forward = types.MethodType(functools.partial(_vision_attention_forward, rope=rope), attn)


def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None,
                              rope=None, **kwargs):
    n, h = hidden_states.shape[0], self.num_heads
    q, k, v = self.qkv(hidden_states).reshape(n, 3, h, -1).permute(1, 0, 2, 3).unbind(0)  # (n, h, hd) each
    q, k = rope(q, k, *position_embeddings)
    bounds = cu_seqlens.tolist()
    segs = sorted((b - a, a) for a, b in zip(bounds, bounds[1:]) if b > a)  # (length, start), by length
    lens, starts = torch.tensor(segs, device=q.device).T                      # (S,) each
    grouped_start = torch.cumsum(lens, 0) - lens                              # (S,) start once grouped
    order = (torch.repeat_interleave(starts - grouped_start, lens)
             + torch.arange(n, device=q.device))                              # (n,) grouped positions
    q, k, v = (t.index_select(0, order) for t in (q, k, v))                   # (n, h, hd), grouped
    outs, at = [], 0
    for ln, g in sorted(collections.Counter(ln for ln, _ in segs).items()):  # length, segments of it
        qg, kg, vg = (t[at:at + g * ln].reshape(g, ln, h, -1).transpose(1, 2) for t in (q, k, v))  # (g, h, ln, hd)
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, scale=self.scaling)  # (g, h, ln, hd)
        outs.append(o.transpose(1, 2).reshape(g * ln, h, -1))                 # (g·ln, h, hd)
        at += g * ln
    out = torch.empty_like(q).index_copy(0, order, torch.cat(outs))          # (n, h, hd), packed order
    return self.proj(out.reshape(n, -1))


def vision_position_ids(grid_thw, merge):
    """
    The vision rotary embedding's (h, w) index of every patch, block-major over the
    merge × merge blocks: transformers' get_vision_position_ids, which loops over the
    images (about 15 small operators each: 4.6 ms for 64 images of 3 sizes, 0.35 here;
    32 against 0.75 ms for one paper-preset step's 384: bench/vision_indices.py),
    computed here once per distinct (t, h, w) and gathered. grid_thw (N, 3) → (Σ t·h·w, 2);
    passed to the tower as its precomputed position_ids (ReMatch.image_features).
    """
    grids = [tuple(g) for g in grid_thw.tolist()]
    per = {g: get_vision_position_ids(grid_thw.new_tensor([g]), merge) for g in set(grids)}  # (t·h·w, 2) each
    return torch.cat([per[g] for g in grids])                                 # (Σ t·h·w, 2)


def vision_window_index(grid_thw, merge, window_size, patch_size):
    """
    Qwen2.5-VL's windowed attention: the order that groups each image's merged tokens
    window by window, and the windows' cumulative lengths in patches. transformers'
    get_vision_window_index loops over the images; here it runs once per distinct
    (t, h, w), and each image's indices are shifted by the merged tokens of the images
    before it (the 384 images of one paper-preset step: 35 against 1 ms on a CPU core,
    bench/vision_indices.py).
    grid_thw (N, 3) → window_index (Σ t·h·w / merge², ) long, cu_window_seqlens
    (n_windows + 1, ) int32, both on grid_thw's device; the tower's precomputed
    window_index / cu_window_seqlens (ReMatch.image_features).
    """
    grids = [tuple(g) for g in grid_thw.tolist()]
    per = {}
    for g in set(grids):
        index, cu = get_vision_window_index(grid_thw.new_tensor([g]), spatial_merge_size=merge,
                                            window_size=window_size, patch_size=patch_size)
        per[g] = (index.to(grid_thw.device), cu.to(grid_thw.device).diff())  # (n_g,), (w_g,)
    n = grid_thw.prod(-1) // merge ** 2                                      # (N,) merged tokens
    start = torch.repeat_interleave(n.cumsum(0) - n, n)                      # (Σ n,) image's first
    index = torch.cat([per[g][0] for g in grids]) + start                    # (Σ n,)
    lengths = torch.cat([per[g][1] for g in grids])                          # (n_windows,)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()          # (n_windows + 1,)
    return index, cu


def save_backbone(model, processor, path):
    """Write a directory that load_backbone reads back: config + safetensors weights, the
    tokenizer and preprocessor_config.json — the layout of a hub checkpoint."""
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)


# ----------------------------------------------------------------------------------
# M-RoPE positions (Qwen2-VL §2.1), written out so that packed rows get exactly the
# positions of an ordinary sequence. Tested against the backbone's own get_rope_index.

def mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id, merge):
    """
    input_ids, attention_mask (N, T) right- or left-padded; image_grid_thw (n_img, 3) of
    the images in row-major token order. Text token: t = h = w = p, p += 1. Image of
    merged grid (gt, h, w): p + (frame, row, col) for each patch, then p += max(h, w).
    Returns (3, N, T) long on input_ids' device; padding positions are 0.
    Vectorised: p before each token is an exclusive cumulative sum of per-token advances
    (1 per text token, max(h, w) at an image's last token, 0 elsewhere).
    """
    dev = input_ids.device
    real = attention_mask.to(dev).bool()                                    # (N, T)
    is_img = (input_ids == image_token_id) & real                          # (N, T)
    advance = real.long()                                                   # (N, T)
    offset = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=dev)  # (3, N, T)
    n_img_tok = int(is_img.sum())
    if n_img_tok:
        g = image_grid_thw.to(dev).long()                                   # (n_img, 3)
        h, w = g[:, 1] // merge, g[:, 2] // merge                           # (n_img,)
        n = g[:, 0] * h * w                                                 # tokens per image
        if int(n.sum()) != n_img_tok:
            raise ValueError(f"{n_img_tok} image tokens but image_grid_thw describes {int(n.sum())}")
        img = torch.repeat_interleave(torch.arange(len(g), device=dev), n)  # (n_img_tok,) image of each
        k = torch.arange(n_img_tok, device=dev) - (n.cumsum(0) - n)[img]    # index within its image
        hi, wi = h[img], w[img]
        offset[:, is_img] = torch.stack([k // (hi * wi), (k // wi) % hi, k % wi])  # (3, n_img_tok)
        advance[is_img] = torch.where(k == n[img] - 1, torch.maximum(hi, wi), 0)
    p = advance.cumsum(1) - advance                                         # (N, T) p before each token
    return (p[None] + offset) * real[None]                                  # (3, N, T)


# ----------------------------------------------------------------------------------
# ReMatch

@torch.no_grad()
def embedding_stats(W, rows=8192):
    """Per-dimension mean and (unbiased) std of an embedding table W (V, d), in fp64, two
    passes over chunks of `rows` rows on W's own device: a 152k × 3584 table never needs a
    full fp64 copy. Returns (mu, sd), each (d,) fp64 on the CPU."""
    V = W.shape[0]
    mu = sum(W[i:i + rows].double().sum(0) for i in range(0, V, rows)) / V          # (d,)
    var = sum((W[i:i + rows].double() - mu).pow(2).sum(0) for i in range(0, V, rows)) / (V - 1)
    return mu.cpu(), var.sqrt().cpu()


# ----------------------------------------------------------------------------------
# Attention of the decoder: dense SDPA (the default and the oracle) or block-sparse
# FlexAttention for the unified matching mask (--attn flex; bench/matching.py)

ATTENTION = ("sdpa", "flex")
FLEX_NAME = "rematch_flex"          # registered with transformers' attention interfaces
_FLEX_COMPILED = {}


def flex_unavailable(device, training):
    """Why `--attn flex` cannot run here (a message naming the flag and the fallback),
    or None when it can."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401,PLC0415
    except ImportError:
        return (f"--attn flex: torch {torch.__version__} has no FlexAttention "
                "(torch.nn.attention.flex_attention, torch >= 2.5); use --attn sdpa (the default)")
    if device.type not in ("cpu", "cuda"):
        return f"--attn flex: FlexAttention does not run on {device.type}; use --attn sdpa (the default)"
    if training and device.type == "cpu":
        return (f"--attn flex: torch {torch.__version__}'s FlexAttention has no backward on the CPU; "
                "train with --attn sdpa (the default) on the CPU, or on a CUDA device")
    return None


def _flex_kernel(device):
    """flex_attention, compiled on CUDA (fused kernels that skip empty blocks); on the CPU
    the uncompiled reference (forward only, dense inside: correct, not fast)."""
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415
    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _FLEX_COMPILED:
        _FLEX_COMPILED["cuda"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX_COMPILED["cuda"]


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "rematch_flex". A BlockMask (the unified matching
    mask, masks.unified_block_mask) runs through FlexAttention; any other mask (the
    embedding passes' padding masks) through transformers' own SDPA, unchanged.
    query (N, H, L, hd), key/value (N, H_kv, L, hd) → output (N, L, H, hd), no weights."""
    from torch.nn.attention.flex_attention import BlockMask  # noqa: PLC0415
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"--attn flex: attention dropout {dropout} is not supported; use --attn sdpa")
    if tuple(attention_mask.shape[-2:]) != (query.shape[2], key.shape[2]):
        raise ValueError(f"--attn flex: a block mask for {tuple(attention_mask.shape[-2:])} positions but "
                         f"{query.shape[2]} queries and {key.shape[2]} keys (a cache or a cropped "
                         "sequence cannot use it); use --attn sdpa")
    group = query.shape[1] // key.shape[1]                          # query heads per kv head (GQA)
    if group & (group - 1):                  # as transformers' flex path: GQA groups of 2^k only
        key, value = (t.repeat_interleave(group, dim=1) for t in (key, value))   # (N, H, L, hd)
        group = 1
    out = _flex_kernel(query.device)(query, key, value, block_mask=attention_mask, scale=scaling,
                                     enable_gqa=group > 1)          # (N, H, L, hd)
    return out.transpose(1, 2).contiguous(), None                   # (N, L, H, hd)


def set_attention(model, attn, training=False):
    """Switch a ReMatch model's decoder to "sdpa" or "flex" (FLEX_NAME, registered here).
    The vision tower keeps its own attention. Raises with the flag and the fallback
    where flex cannot run (flex_unavailable)."""
    if attn not in ATTENTION:
        raise ValueError(f"--attn {attn!r}: choose from {', '.join(ATTENTION)}")
    if attn == "flex":
        why = flex_unavailable(model.device, training)
        if why:
            raise RuntimeError(why)
        from transformers import AttentionInterface  # noqa: PLC0415
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415
        AttentionInterface.register(FLEX_NAME, flex_attention_forward)
        AttentionMaskInterface.register(FLEX_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # padding masks
    model.hf.model.language_model.config._attn_implementation = "sdpa" if attn == "sdpa" else FLEX_NAME
    model.attn = attn
    return model


class ReMatch(nn.Module):
    """
    backbone: a Qwen2-VL / Qwen2.5-VL *ForConditionalGeneration (or a peft model of one).
    L_q, L_d: the learnable tokens (K, d) of queries and documents (§3.2.1).
    projector: Z = MLP(E) (§3.2.3).
    """

    def __init__(self, backbone, num_tokens=16, embed_template="chat", seed=0):
        super().__init__()
        self.backbone = backbone
        self.num_tokens = num_tokens
        self.embed_template = embed_template
        self.tokens_processed = 0          # decoder tokens run so far (throughput logs)
        self.attn = "sdpa"                 # unified mask: dense additive (sdpa) or BlockMask (flex)
        hf = self.hf
        d = hf.config.text_config.hidden_size
        W = hf.get_input_embeddings().weight.detach()                         # (V, d)
        mu, sd = embedding_stats(W)                                           # (d,) each, CPU fp64
        g = torch.Generator().manual_seed(seed)
        K = max(num_tokens, 1)
        # initialised from the statistics of the input-embedding table (docs/readings.md §1)
        self.L_q = nn.Parameter((mu + sd * torch.randn(K, d, generator=g)).to(W.device))
        self.L_d = nn.Parameter((mu + sd * torch.randn(K, d, generator=g)).to(W.device))
        if num_tokens == 0:                                # last-token pooling: no tokens
            self.L_q.requires_grad_(False)
            self.L_d.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        # the tokens and the projector stay in at least fp32 (trainable, small); cast where used
        head_dtype = torch.promote_types(hf.get_input_embeddings().weight.dtype, torch.float32)
        self.L_q.data, self.L_d.data = self.L_q.data.to(head_dtype), self.L_d.data.to(head_dtype)
        self.projector.to(device=W.device, dtype=head_dtype)

    @property
    def hf(self):
        """The underlying *ForConditionalGeneration (LoRA layers, if any, live inside it)."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    @property
    def device(self):
        return self.L_q.device

    # -- backbone pieces -------------------------------------------------------------
    def image_features(self, pixel_values, image_grid_thw):
        """The vision tower's merged features of each image: a list of (n_i, d), one per
        row of image_grid_thw ([] without images)."""
        if pixel_values is None:
            return []
        dev, grid = self.device, image_grid_thw.to(self.device)
        return list(self.hf.model.get_image_features(pixel_values.to(dev), grid, return_dict=True,
                                                     **self.vision_indices(grid)).pooler_output)

    def vision_indices(self, grid):
        """The tower's per-image index work done once per distinct image size: rotary
        position ids and, for Qwen2.5-VL, the window order ({} on a transformers whose
        towers take no precomputed indices: the tower then loops over the images)."""
        if get_vision_position_ids is None:
            return {}
        vc = self.hf.config.vision_config
        out = {"position_ids": vision_position_ids(grid, vc.spatial_merge_size)}
        if getattr(vc, "window_size", None):                                 # Qwen2.5-VL
            out["window_index"], out["cu_window_seqlens"] = vision_window_index(
                grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        return out

    def input_embeds(self, input_ids, pixel_values=None, image_grid_thw=None, images=None):
        """Token embeddings with the images' features scattered into the <|image_pad|>
        positions. (N, T) → (N, T, d). `images`: the per-image features (image_features)
        when already computed, else the vision tower runs on pixel_values."""
        hf = self.hf
        x = hf.get_input_embeddings()(input_ids)                              # (N, T, d)
        if images is None:
            images = self.image_features(pixel_values, image_grid_thw)
        if images:
            img = torch.cat(images, dim=0).to(x.dtype)                        # (n_img_tok, d)
            is_img = input_ids == hf.config.image_token_id                    # (N, T)
            if int(is_img.sum()) != img.shape[0]:
                raise ValueError(f"{int(is_img.sum())} image tokens but {img.shape[0]} image "
                                 "features: text placeholders and images do not match")
            x = x.masked_scatter(is_img[..., None], img)
        return x

    def positions(self, input_ids, attention_mask, image_grid_thw):
        hf = self.hf
        return mrope_position_ids(input_ids, attention_mask, image_grid_thw,
                                  hf.config.image_token_id, hf.config.vision_config.spatial_merge_size)

    def last_hidden(self, inputs_embeds, attention_mask, position_ids):
        """Decoder over inputs_embeds; last-layer (post-norm) states (N, T, d). The LM head
        is not applied here (embedding passes never need it)."""
        self.tokens_processed += inputs_embeds.shape[0] * inputs_embeds.shape[1]
        return self.hf.model.language_model(inputs_embeds=inputs_embeds,
                                            attention_mask=attention_mask,
                                            position_ids=position_ids,
                                            use_cache=False).last_hidden_state

    # -- §3.2.1 embeddings -------------------------------------------------------------
    def embed(self, batch, side, images=None):
        """
        batch: data.collate_embed output; side: "q" (uses L_q) or "d" (uses L_d);
        images: the batch's per-image features if already computed (image_features).
        Returns E (N, d), the fused embedding (mean of the K states), and
        e (N, K, d), the K learnable-token states for Eq. 2 (K = 0: the last token, K=1).
        """
        dev = self.device
        input_ids = batch["input_ids"].to(dev)                                # (N, T)
        attention_mask = batch["attention_mask"].to(dev)                      # (N, T)
        token_idx = batch["token_idx"].to(dev)                                # (N, K)
        x = self.input_embeds(input_ids, batch["pixel_values"], batch["image_grid_thw"], images)
        rows = torch.arange(len(token_idx), device=dev)[:, None].expand_as(token_idx)  # (N, K)
        if self.num_tokens > 0:
            L = self.L_q if side == "q" else self.L_d                         # (K, d)
            x = x.index_put((rows.reshape(-1), token_idx.reshape(-1)),
                            L.to(x.dtype).repeat(len(token_idx), 1))          # token_idx ← L_1..L_K
        position_ids = self.positions(input_ids, attention_mask, batch["image_grid_thw"])  # (3, N, T)
        h = self.last_hidden(x, attention_mask, position_ids)                 # (N, T, d)
        e = h[rows, token_idx]                                                # (N, K, d)
        E = e.mean(dim=1)                                                     # (N, d)
        return E, e

    # -- §3.2.3 matching -------------------------------------------------------------
    def match_inputs(self, mbatch, E_q, E_pos, E_neg, images=None):
        """
        The packed matching rows ready for the decoder: input embeddings with images and
        Z = MLP(E) injected at the feature tokens (Zq; Zd1/Zd2 from d⁺/d⁻ by slot), the
        unified mask (M, 1, L, L: additive, or a BlockMask with --attn flex) and M-RoPE
        positions (3, M, L) of each row computed as for an ordinary sequence. `images`: the
        raw segments' per-image features when already computed (forward reuses the
        embedding passes').
        """
        dev = self.device
        input_ids = mbatch["input_ids"].to(dev)                               # (M, L)
        attention_mask = mbatch["attention_mask"].to(dev)                     # (M, L)
        x = self.input_embeds(input_ids, mbatch["pixel_values"], mbatch["image_grid_thw"], images)
        head_dtype = self.L_q.dtype
        Z_q, Z_pos, Z_neg = (self.projector(E.to(head_dtype)).to(x.dtype)
                             for E in (E_q, E_pos, E_neg))                   # (M, d) each
        pos_in_1 = (mbatch["pos_slot"].to(dev) == 1)[:, None]                 # (M, 1)
        Z = torch.stack([Z_q, torch.where(pos_in_1, Z_pos, Z_neg),
                         torch.where(pos_in_1, Z_neg, Z_pos)], dim=1)         # (M, 3, d): Zq, Zd1, Zd2
        feat_idx = mbatch["feat_idx"].to(dev)                                 # (M, 3), -1 = absent
        present = feat_idx >= 0
        rows = torch.arange(len(feat_idx), device=dev)[:, None].expand_as(feat_idx)
        x = x.index_put((rows[present], feat_idx[present]), Z[present])
        if self.attn == "flex":                                               # set_attention
            mask = unified_block_mask(mbatch["segments"], mbatch["views"], device=dev)  # (M, 1, L, L) blocks
        else:
            mask = additive_mask(unified_mask_batch(mbatch["segments"], mbatch["views"], dev),
                                 x.dtype)                                     # (M, 1, L, L), on dev
        position_ids = self.positions(input_ids, attention_mask, mbatch["image_grid_thw"])  # (3, M, L)
        return x, mask, position_ids

    def match(self, mbatch, E_q, E_pos, E_neg, images=None):
        """
        The unified 8-view matching pass (Fig. 3): one decoder forward for all views.
        E_q, E_pos, E_neg: (M, d) fused embeddings of the instances' query, d⁺ and d⁻.
        Returns logits (M·V, vocab) at the positions that predict each answer's label
        (the LM head runs on those positions only) and labels (M·V,) for Eq. 4.
        """
        x, mask, position_ids = self.match_inputs(mbatch, E_q, E_pos, E_neg, images)
        h = self.last_hidden(x, mask, position_ids)                           # (M, L, d)
        label_idx = mbatch["label_idx"].to(h.device)                          # (M, V)
        rows = torch.arange(len(label_idx), device=h.device)[:, None].expand_as(label_idx)
        logits = self.hf.lm_head(h[rows, label_idx])                          # (M, V, vocab)
        return logits.flatten(0, 1), mbatch["labels"].to(h.device).flatten()  # (M·V, vocab), (M·V,)

    def forward(self, q, d, match=None, n_pos=None, reuse_images=True):
        """
        One training forward (a single call, so DistributedDataParallel sees one forward
        per step): q, d are collate_embed batches of the queries and of the documents
        (positives first, then the hard negatives, n_pos = number of positives);
        `match` an optional collate_match batch over the first M instances.
        The vision tower runs once per image: the matching rows' raw segments reuse the
        features of the same items from the embedding passes (reuse_images=False runs
        the tower again on them; same values, and the same gradients as a sum).
        Returns E_q (B, d), e_q (B, K, d), E_d (B+B', d), e_d, and for matching the
        label logits (M·V, vocab) and labels (M·V,).
        """
        img_q = self.image_features(q["pixel_values"], q["image_grid_thw"])
        img_d = self.image_features(d["pixel_values"], d["image_grid_thw"])
        E_q, e_q = self.embed(q, "q", img_q)
        E_d, e_d = self.embed(d, "d", img_d)
        out = {"E_q": E_q, "e_q": e_q, "E_d": E_d, "e_d": e_d}
        if match is not None:
            M = len(match["input_ids"])
            n_pos = len(E_q) if n_pos is None else n_pos
            E_pos, E_neg = E_d[:n_pos], E_d[n_pos:]
            images = None
            if reuse_images and "image_src" in match:
                of_q, of_d = self._image_of_row(q, img_q), self._image_of_row(d, img_d)
                row = {"q": lambda m: of_q[m], "pos": lambda m: of_d[m],
                       "neg": lambda m: of_d[n_pos + m]}
                images = [row[part](m) for part, m in match["image_src"]]
            out["logits"], out["labels"] = self.match(match, E_q[:M], E_pos[:M], E_neg[:M], images)
        return out

    def _image_of_row(self, batch, images):
        """{row: its image's features} for a collate_embed batch (at most one image per
        item; rows in order, as collate_embed stacks them)."""
        has = (batch["input_ids"] == self.hf.config.image_token_id).any(1)   # (N,)
        return dict(zip(has.nonzero().flatten().tolist(), images))


# ----------------------------------------------------------------------------------
# LoRA (§4) and checkpoints

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def apply_lora(backbone, r=32, alpha=64, dropout=0.0):
    """peft LoRA on the language model's q,k,v,o,gate,up,down projections only (§4: r=32,
    α=64). The regex keeps Qwen2.5-VL's vision MLP (also gate/up/down_proj) frozen."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(backbone, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=LORA_TARGETS))


CONFIG_FILE = "rematch_config.json"
HEADS_FILE = "rematch_heads.safetensors"


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
    if hasattr(model.backbone, "peft_config"):
        model.backbone.save_pretrained(os.path.join(path, "adapter"))
    else:
        save_backbone(model.hf, processor, os.path.join(path, "backbone"))
    heads = {"L_q": model.L_q, "L_d": model.L_d,
             **{f"projector.{k}": v for k, v in model.projector.state_dict().items()}}
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, os.path.join(path, HEADS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_model_card(path, config)


CARD_KEYS = ("model", "lora", "lora_r", "lora_alpha", "num_tokens", "embed_template", "tau",
             "w_orth", "w_qdm", "match_views", "steps", "batch_size", "world_size", "lr",
             "train_data", "subsets", "split", "hard_negative", "target_instructions", "seed")


def write_model_card(path, config, results=None):
    """README.md of a checkpoint folder: what it is (base model, the training arguments
    that define it), the measured results when given ({"overall": …, "hit_at_1": {task:
    …}} as train.py's evaluation returns them), and how to use it."""
    import json
    rows = "\n".join(f"| `{k}` | `{json.dumps(config[k])}` |" for k in CARD_KEYS if k in config)
    if results and results.get("hit_at_1"):
        measured = "\n".join(f"| {t} | {'n/a' if v is None else f'{v:.3f}'} |"
                              for t, v in results["hit_at_1"].items())
        measured = (f"Hit@1 on the evaluation run after training (`eval_data` = "
                    f"`{config.get('eval_data')}`), overall {results['overall']:.3f}:\n\n"
                    f"| task | Hit@1 |\n|---|---|\n{measured}")
    else:
        measured = "No evaluation was run with this checkpoint."
    card = f"""---
base_model: {config.get("model")}
library_name: rematch
tags: [rematch, multimodal-embedding, retrieval, qwen2-vl]
---
# ReMatch checkpoint

A [ReMatch](https://arxiv.org/abs/2511.19278) embedding model: `{config.get("model")}`
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
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(card)


def resolve_checkpoint(name_or_path):
    """A local directory as is; a hub id of a ReMatch checkpoint folder (one holding
    rematch_config.json) → its local copy, downloaded once (rank 0 first, then the other
    ranks reuse the cache; no code from the repo is ever run); anything else (a raw
    backbone's hub id such as Qwen/Qwen2-VL-2B-Instruct, tiny-*) unchanged."""
    name = str(name_or_path)
    if os.path.isdir(name) or name in TINY or not looks_like_hub_id(name):
        return name
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        rank0_first(lambda: hf_hub_download(name, CONFIG_FILE))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return name                                   # no rematch_config.json: a raw backbone
    return resolve_dir(name, repo_type="model")


def load_rematch(name_or_path, device=None, dtype=None, num_tokens=0, embed_template="plain"):
    """
    (ReMatch, processor, config) from a directory written by save_rematch (train.py's
    checkpoints) or such a folder's hub id (resolve_checkpoint), or a raw backbone (hub
    id, local directory, tiny-*) evaluated as the single-vector baseline: `num_tokens`
    (default 0 = last-token pooling) and `embed_template` (default "plain", VLM2Vec's
    layout) apply only to raw backbones.
    """
    import json

    name_or_path = resolve_checkpoint(name_or_path)
    config_path = os.path.join(str(name_or_path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        backbone, processor = load_backbone(name_or_path, device=device, dtype=dtype)
        config = {"model": name_or_path, "num_tokens": num_tokens, "embed_template": embed_template}
        return ReMatch(backbone, num_tokens, embed_template).eval(), processor, config
    with open(config_path) as f:
        config = json.load(f)
    pixels = dict(min_pixels=config.get("min_pixels"), max_pixels=config.get("max_pixels"))
    if os.path.isdir(os.path.join(name_or_path, "adapter")):
        from peft import PeftModel
        base, processor = load_backbone(config["model"], device=device, dtype=dtype,
                                        seed=config.get("seed", 0), **pixels)   # tiny: same init
        backbone = PeftModel.from_pretrained(base, os.path.join(name_or_path, "adapter"))
    else:
        backbone, processor = load_backbone(os.path.join(name_or_path, "backbone"),
                                            device=device, dtype=dtype)
    model = ReMatch(backbone, config["num_tokens"], config["embed_template"])
    load_heads(model, name_or_path)
    return model.eval(), processor, config


def load_heads(model, path):
    """Copy the learnable tokens and the projector saved by save_rematch into `model`."""
    from safetensors.torch import load_file
    heads = load_file(os.path.join(path, HEADS_FILE))
    with torch.no_grad():
        model.L_q.copy_(heads.pop("L_q"))
        model.L_d.copy_(heads.pop("L_d"))
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in heads.items()})
