"""
Speed-ups that compute what transformers' plain path computes — plumbing behind model.py,
none of it in the paper. Each has a named test against the plain path:

  patch_embed_as_matmul      the vision Conv3d patch embedding as one matmul
                             (tests/test_model.py)
  vision_attention_by_size   one vision attention call per distinct image (window) size
                             instead of one per image (tests/test_model.py, fp64,
                             outputs and gradients, both families)
  vision_indices             the tower's rotary ids and Qwen2.5-VL's window order once per
                             distinct image size (vision_position_ids, vision_window_index;
                             tests/test_model.py against transformers' per-image loops)
  set_attention("flex")      the unified matching mask as a FlexAttention BlockMask
                             (masks.unified_block_mask) through a registered transformers
                             attention function (tests/test_flex.py)

All four apply to Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike, each proven there: Qwen3-VL's
patch embedding is the same kernel-equals-stride Conv3d (16-px patches), its vision attention
the same qkv / rotary / proj layout (DeepStack features are taken after whole blocks, so
they see the same outputs; the by-size test includes them), its tower takes the same
precomputed rotary ids (it has no windows; its position-table interpolation indices are
computed vectorised by transformers itself), and its decoder attention goes through the
same attention interface as the others (tests/test_flex.py runs on tiny-qwen3-vl).

Measurements of each: bench/ (bench/README.md).
"""
import collections
import functools
import importlib
import types

import torch

try:   # transformers ≥ 5.x whose vision towers accept precomputed position_ids and window
    # indices (vision_position_ids, vision_window_index)
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
except ImportError:
    get_vision_position_ids = get_vision_window_index = None

# ----------------------------------------------------------------------------------
# The vision tower

def patch_embed_as_matmul(patch_embed):
    """The vision tower's patch embedding is a Conv3d whose kernel equals its stride and
    its input (C × t × p × p per patch): one matmul with the flattened weight, computed
    the same way, and a matmul's backward is much cheaper than the Conv3d's on the CPU
    (as is bf16 on some CUDA/cuDNN versions). The weights stay the Conv3d's,
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
    SDPA path makes one attention call per segment (one per image). This forward
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
    images (about 15 small operators each; bench/vision_indices.py measures both),
    computed here once per distinct (t, h, w) and gathered. grid_thw (N, 3) → (Σ t·h·w, 2);
    passed to the tower as its precomputed position_ids (vision_indices).
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
    before it (bench/vision_indices.py measures both).
    grid_thw (N, 3) → window_index (Σ t·h·w / merge², ) long, cu_window_seqlens
    (n_windows + 1, ) int32, both on grid_thw's device; the tower's precomputed
    window_index / cu_window_seqlens (vision_indices).
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


def vision_indices(vision_config, grid):
    """The tower's per-image index work done once per distinct image size, as keyword
    arguments of get_image_features: rotary position ids and, for Qwen2.5-VL, the window
    order ({} on a transformers whose towers take no precomputed indices: the tower then
    loops over the images itself). grid: image_grid_thw (N, 3) on the model's device."""
    if get_vision_position_ids is None:
        return {}
    vc = vision_config
    out = {"position_ids": vision_position_ids(grid, vc.spatial_merge_size)}
    if getattr(vc, "window_size", None):                                 # Qwen2.5-VL
        out["window_index"], out["cu_window_seqlens"] = vision_window_index(
            grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    return out


# ----------------------------------------------------------------------------------
# Attention of the decoder: dense SDPA (the default and the oracle) or block-sparse
# FlexAttention for the unified matching mask (--attn flex; bench/matching.py)

ATTENTION = ("sdpa", "flex")
FLEX_NAME = "rematch_flex"          # registered with transformers' attention interfaces
_FLEX_COMPILED = {}


FALLBACK = {"--attn flex": "use --attn sdpa (the default)",
            "--pack": "leave out --pack (the padded passes, the default)"}


def flex_unavailable(device, training, flag="--attn flex"):
    """Why `flag` (--attn flex, or --pack, which runs on the same kernel) cannot run here:
    a message naming the flag and the fallback, or None when it can."""
    fallback = FALLBACK[flag]
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401,PLC0415
    except ImportError:
        return (f"{flag}: torch {torch.__version__} has no FlexAttention "
                f"(torch.nn.attention.flex_attention, torch >= 2.5); {fallback}")
    if device.type not in ("cpu", "cuda"):
        return f"{flag}: FlexAttention does not run on {device.type}; {fallback}"
    if training and device.type == "cpu":
        return (f"{flag}: torch {torch.__version__}'s FlexAttention has no backward on the CPU; "
                f"{fallback} on the CPU, or train on a CUDA device")
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


def set_attention(model, attn, training=False, pack=False):
    """Switch a ReMatch model's decoder to "sdpa" or "flex" (FLEX_NAME, registered here)
    for the unified matching mask, and its embedding passes to padding-free (pack: one
    packed row per pass under a block-diagonal BlockMask, model.embed_packed), which
    needs the flex kernel too; dense masks still go through SDPA. The vision tower keeps
    its own attention. Raises with the flag and the fallback where flex cannot run
    (flex_unavailable)."""
    if attn not in ATTENTION:
        raise ValueError(f"--attn {attn!r}: choose from {', '.join(ATTENTION)}")
    if attn == "flex" or pack:
        why = flex_unavailable(model.device, training, "--attn flex" if attn == "flex" else "--pack")
        if why:
            raise RuntimeError(why)
        from transformers import AttentionInterface  # noqa: PLC0415
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface  # noqa: PLC0415
        AttentionInterface.register(FLEX_NAME, flex_attention_forward)
        AttentionMaskInterface.register(FLEX_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # padding masks
    flex = attn == "flex" or pack
    model.backbone.model.language_model.config._attn_implementation = FLEX_NAME if flex else "sdpa"
    model.attn, model.pack = attn, pack
    return model
