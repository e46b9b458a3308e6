"""
The ReMatch model (paper §3.2): a Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbone turned into
an embedding model that also judges matches. The class reads in the paper's order:

  §3.2.1  K learnable tokens per side (L_q, L_d ∈ R^{K×d}) appended after the chat
          template and fed through `inputs_embeds`; their last-layer states
          ME = [e_1..e_K] (N, K, d) and the fused embedding E = mean_i e_i (N, d)
          (ReMatch.embed). K = 0 gives last-token pooling (the single-vector baseline).
  §3.2.3  the projector Z = MLP(E) into the input-embedding space, and the unified
          multi-view matching pass (Fig. 3, ReMatch.match): one forward over a packed
          [P, Q, Zq, D1, Zd1, D2, Zd2, H, A_1..A_8] row per (q, d⁺, d⁻), the unified
          mask of masks.py, logits at the label positions only (Eq. 4 in losses.py).
  then    the backbone plumbing both call (vision tower, token embeddings, M-RoPE
          positions, DeepStack inputs, the decoder).
  §4      LoRA on the language model (apply_lora); M-RoPE positions of packed rows
          (mrope_position_ids); checkpoints (load_rematch; util/backbone.save_rematch writes them).

Beside the paper, as a function after the class: padding-free embedding passes
(embed_packed; train.py --pack, a speed path equal to ReMatch.embed: tests/test_pack.py).
The time rule of videos' M-RoPE positions (MMEB-V2's video tasks) is util/video.py's
video_time.

Loading a backbone (hub id, local directory, or the offline tiny-qwen2-vl /
tiny-qwen2.5-vl / tiny-qwen3-vl) is util/backbone.py's; speed-ups proven equal to
transformers' plain path (vision tower, FlexAttention) are util/speed.py's.

Qwen3-VL (not in the paper; the recipe is unchanged): its vision tower also returns
DeepStack features that the decoder adds to its hidden states at the image positions
after its first layers. ReMatch builds inputs_embeds itself, so every pass hands them to
the decoder (decoder_inputs); M-RoPE positions are the same rule (the interleaving of the
sections is the decoder's rotary embedding, given the same (3, N, T) positions).

Naming: "pos" is always the positive document d⁺; positions in a sequence are "*_idx"
(token_idx, feat_idx, label_idx) or position_ids (M-RoPE).

Used by train.py (training) and evaluate.py (embedding); the demo: python train.py
Tests: pytest tests/test_model.py tests/test_matching.py tests/test_video.py tests/test_pack.py
"""
import os

import torch
import torch.nn as nn

from masks import additive_mask, packed_block_mask, unified_block_mask, unified_mask_batch
from util.backbone import (CONFIG_FILE, check_config, export_config, is_export, load_backbone, load_export_heads,
                            load_heads, published_name, resolve_checkpoint)
from util.speed import vision_indices
from util.video import video_time


class ReMatch(nn.Module):
    """
    backbone: the Qwen2-VL / Qwen2.5-VL / Qwen3-VL *ForConditionalGeneration (LoRA layers, if any,
    live inside it); built from such a model or a peft model of one, kept as `peft` for
    saving the adapter (not a submodule: the same parameters).
    L_q, L_d: the learnable tokens (K, d) of queries and documents (§3.2.1).
    projector: Z = MLP(E) (§3.2.3).
    init_tokens=False leaves L_q, L_d at zero, for saved ones to be copied in (load_rematch):
    no pass over the embedding table. So does num_tokens=0 (last-token pooling uses none).
    """

    def __init__(self, backbone, num_tokens=16, embed_template="chat", seed=0, init_tokens=True):
        super().__init__()
        self.__dict__["peft"] = backbone if hasattr(backbone, "get_base_model") else None
        self.backbone = backbone.get_base_model() if self.peft is not None else backbone
        self.num_tokens = num_tokens
        self.embed_template = embed_template
        self.tokens_processed = 0          # decoder tokens run so far (throughput logs)
        self.attn = "sdpa"                 # unified mask: dense additive (sdpa) or BlockMask (flex)
        self.pack = False                  # embedding passes padding-free (embed_packed; set_attention)
        hf = self.backbone
        d = hf.config.text_config.hidden_size
        W = hf.get_input_embeddings().weight.detach()                         # (V, d)
        K = max(num_tokens, 1)
        if init_tokens and num_tokens > 0:
            mu, sd = embedding_stats(W)                                       # (d,) each, CPU fp64
            g = torch.Generator().manual_seed(seed)
            # initialised from the statistics of the input-embedding table (docs/readings.md §1)
            L_q = mu + sd * torch.randn(K, d, generator=g)                     # (K, d)
            L_d = mu + sd * torch.randn(K, d, generator=g)                     # (K, d)
        else:
            L_q, L_d = torch.zeros(K, d), torch.zeros(K, d)
        self.L_q, self.L_d = nn.Parameter(L_q.to(W.device)), nn.Parameter(L_d.to(W.device))
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
    def device(self):
        return self.L_q.device

    # -- §3.2.1 embeddings -------------------------------------------------------------
    def embed_inputs(self, batch, side, images=None):
        """
        §3.2.1, the decoder inputs of an embedding pass: the items' token embeddings with
        their images, and L_q (side "q") or L_d ("d") written at the K positions token_idx
        after the template; M-RoPE positions; DeepStack inputs (Qwen3-VL). batch: a
        data.collate_embed output; images: its per-image features if already computed.
        Returns (input_ids (N, T), attention_mask (N, T), token_idx (N, K), x (N, T, d),
        position_ids (3, N, T), deepstack kwargs).
        """
        dev = self.device
        input_ids = batch["input_ids"].to(dev)                                # (N, T)
        attention_mask = batch["attention_mask"].to(dev)                      # (N, T)
        token_idx = batch["token_idx"].to(dev)                                # (N, K)
        if images is None:
            images = self.image_features(batch["pixel_values"], batch["image_grid_thw"])
        videos = self.image_features(batch.get("pixel_values_videos"), batch.get("video_grid_thw"))
        x = self.input_embeds(input_ids, images=images, videos=videos)       # (N, T, d)
        if self.num_tokens > 0:
            rows = torch.arange(len(token_idx), device=dev)[:, None].expand_as(token_idx)  # (N, K)
            L = self.L_q if side == "q" else self.L_d                         # (K, d)
            x = x.index_put((rows.reshape(-1), token_idx.reshape(-1)),
                            L.to(x.dtype).repeat(len(token_idx), 1))          # token_idx ← L_1..L_K
        position_ids = self.positions(input_ids, attention_mask, batch["image_grid_thw"],
                                      batch.get("video_grid_thw"), batch.get("second_per_grid_ts"))  # (3, N, T)
        return (input_ids, attention_mask, token_idx, x, position_ids,
                self.decoder_inputs(input_ids, images, videos))

    def embed(self, batch, side, images=None):
        """
        batch: data.collate_embed output; side: "q" (uses L_q) or "d" (uses L_d);
        images: the batch's per-image features if already computed (image_features).
        Returns E (N, d), the fused embedding (mean of the K states), and
        e (N, K, d), the K learnable-token states for Eq. 2 (K = 0: the last token, K=1).
        With `pack` set (train.py --pack), embed_packed (beside the class) computes the same
        without padding.
        """
        if self.pack:
            return embed_packed(self, batch, side, images)
        _, attention_mask, token_idx, x, position_ids, deepstack = self.embed_inputs(batch, side, images)
        h = self.last_hidden(x, attention_mask, position_ids, **deepstack)   # (N, T, d)
        rows = torch.arange(len(token_idx), device=h.device)[:, None].expand_as(token_idx)  # (N, K)
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
        if images is None:
            images = self.image_features(mbatch["pixel_values"], mbatch["image_grid_thw"])
        x = self.input_embeds(input_ids, images=images)                      # (M, L, d)
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
        if images is None:
            images = self.image_features(mbatch["pixel_values"], mbatch["image_grid_thw"])
        x, mask, position_ids = self.match_inputs(mbatch, E_q, E_pos, E_neg, images)
        deepstack = self.decoder_inputs(mbatch["input_ids"].to(self.device), images)  # Qwen3-VL
        h = self.last_hidden(x, mask, position_ids, **deepstack)              # (M, L, d)
        label_idx = mbatch["label_idx"].to(h.device)                          # (M, V)
        rows = torch.arange(len(label_idx), device=h.device)[:, None].expand_as(label_idx)
        logits = self.backbone.lm_head(h[rows, label_idx])                          # (M, V, vocab)
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
        has = (batch["input_ids"] == self.backbone.config.image_token_id).any(1)   # (N,)
        return dict(zip(has.nonzero().flatten().tolist(), images))

    # -- backbone plumbing (called by the passes above) ------------------------------
    def image_features(self, pixel_values, image_grid_thw):
        """The vision tower's output for each image (or video: the same tower over its
        temporal patches, given pixel_values_videos and video_grid_thw): a list of
        (n_i, 1 + S, d), one per row of the grid ([] without images). [:, 0] is the merged
        features that replace the image's <|image_pad|> (video: <|video_pad|>) tokens;
        [:, 1:] are Qwen3-VL's DeepStack features (S = number of deepstack_visual_indexes;
        S = 0 on Qwen2/2.5-VL), which the decoder adds to its hidden states at the same
        positions after layers 0..S-1 (decoder_inputs)."""
        if pixel_values is None:
            return []
        dev, grid = self.device, image_grid_thw.to(self.device)
        indices = vision_indices(self.backbone.config.vision_config, grid)  # util/speed.py
        out = self.backbone.model.get_image_features(pixel_values.to(dev), grid, return_dict=True,
                                                     **indices)
        levels = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]  # 1 + S tuples
        if len(levels) == 1:                                  # S = 0: a view, no copy per step
            return [f[:, None] for f in levels[0]]                            # (n_i, 1, d) each
        return [torch.stack(per_image, dim=1) for per_image in zip(*levels)]  # (n_i, 1 + S, d) each

    def vision_tokens(self, input_ids, images, videos=()):
        """Where the vision features go and which: (mask (N, T) of the <|image_pad|> and
        <|video_pad|> positions, feats (n_tok, 1 + S, d) in row-major token order), or
        (None, None) without images and videos. images, videos: image_features outputs."""
        cfg = self.backbone.config
        parts = []
        for kind, token_id, feats in (("image", cfg.image_token_id, images),
                                      ("video", cfg.video_token_id, videos)):
            if not feats:
                continue
            mask, f = input_ids == token_id, torch.cat(feats, dim=0)          # (N, T), (n, 1 + S, d)
            if int(mask.sum()) != f.shape[0]:
                raise ValueError(f"{int(mask.sum())} {kind} tokens but {f.shape[0]} {kind} "
                                 f"features: text placeholders and {kind}s do not match")
            parts.append((mask, f))
        if len(parts) < 2:
            return parts[0] if parts else (None, None)
        mask = parts[0][0] | parts[1][0]                                      # (N, T)
        joint = parts[0][1].new_empty(int(mask.sum()), *parts[0][1].shape[1:])  # (n_tok, 1 + S, d)
        for m, f in parts:
            joint[m[mask]] = f
        return mask, joint

    def input_embeds(self, input_ids, pixel_values=None, image_grid_thw=None, images=None, videos=()):
        """Token embeddings with the images' (and videos') merged features scattered into
        the <|image_pad|> (<|video_pad|>) positions. (N, T) → (N, T, d). `images`: the
        per-image features (image_features) when already computed, else the vision tower
        runs on pixel_values; `videos`: the per-video features."""
        hf = self.backbone
        x = hf.get_input_embeddings()(input_ids)                              # (N, T, d)
        if images is None:
            images = self.image_features(pixel_values, image_grid_thw)
        mask, feats = self.vision_tokens(input_ids, images, videos)
        if mask is not None:
            x = x.masked_scatter(mask[..., None], feats[:, 0].to(x.dtype))    # (n_tok, d) into (N, T, d)
        return x

    def decoder_inputs(self, input_ids, images, videos=()):
        """Qwen3-VL's DeepStack: the keyword arguments that make the decoder add each image's
        (video's) DeepStack features (image_features [:, 1:]) to its hidden states at its
        pad positions after layers 0..S-1, exactly as the backbone's own forward does
        (images and videos merged in token order) — {} on Qwen2/2.5-VL and without images.
        Any pass that builds inputs_embeds itself must pass these to last_hidden, or it
        silently computes another model."""
        mask, feats = self.vision_tokens(input_ids, images, videos)
        if mask is None or feats.shape[1] == 1:
            return {}
        return {"visual_pos_masks": mask,                                     # (N, T)
                "deepstack_visual_embeds": list(feats[:, 1:].unbind(1))}     # S × (n_tok, d)

    def positions(self, input_ids, attention_mask, image_grid_thw, video_grid_thw=None,
                  second_per_grid_ts=None):
        """M-RoPE positions (3, N, T) as the backbone's get_rope_index gives them (videos:
        their time rule is util/video.py's video_time)."""
        cfg = self.backbone.config
        video_grid_thw, step = video_time(cfg, video_grid_thw, second_per_grid_ts, input_ids.device)
        return mrope_position_ids(input_ids, attention_mask, image_grid_thw, cfg.image_token_id,
                                  cfg.vision_config.spatial_merge_size,
                                  video_grid_thw, cfg.video_token_id, step)

    def last_hidden(self, inputs_embeds, attention_mask, position_ids, **deepstack):
        """Decoder over inputs_embeds; last-layer (post-norm) states (N, T, d). The LM head
        is not applied here (embedding passes never need it). deepstack: decoder_inputs."""
        self.tokens_processed += inputs_embeds.shape[0] * inputs_embeds.shape[1]
        return self.backbone.model.language_model(inputs_embeds=inputs_embeds,
                                            attention_mask=attention_mask,
                                            position_ids=position_ids,
                                            use_cache=False, **deepstack).last_hidden_state


# ----------------------------------------------------------------------------------
# Beside the paper: packed rows (a speed path). ReMatch.embed calls it in one line; it
# does not change what the model computes.

def embed_packed(model, batch, side, images=None):
    """
    ReMatch.embed without padding (train.py --pack; plumbing, not in the paper): the batch's rows
    without their padding, one after another in ONE row (1, Σ T_n) under a block-diagonal
    causal mask (masks.packed_block_mask: each item sees only its own earlier tokens, as
    in its own padded row), each item with its own M-RoPE positions (and DeepStack
    features), the K token states gathered at their packed offsets. The decoder computes
    Σ T_n tokens instead of N · max T_n. Same E, e as the padded pass (tests/test_pack.py);
    needs the FlexAttention kernel (util/speed.set_attention(..., pack=True)).
    """
    _, attention_mask, token_idx, x, position_ids, deepstack = model.embed_inputs(batch, side, images)
    real = attention_mask.bool()                                              # (N, T), right padding
    lengths = real.sum(1)                                                     # (N,)
    start = lengths.cumsum(0) - lengths                                       # (N,) offset in the row
    if deepstack:                                                             # (N, T) → (1, Σ T_n)
        deepstack["visual_pos_masks"] = deepstack["visual_pos_masks"][real][None]
    mask = packed_block_mask(lengths.tolist(), device=x.device)               # (1, 1, ΣT, ΣT) blocks
    h = model.last_hidden(x[real][None], mask, position_ids[:, real][:, None],
                          **deepstack)[0]                                     # (Σ T_n, d)
    e = h[start[:, None] + token_idx]                                         # (N, K, d)
    return e.mean(dim=1), e


# ----------------------------------------------------------------------------------
# M-RoPE positions (Qwen2-VL §2.1), written out so that packed rows get exactly the
# positions of an ordinary sequence. Tested against the backbone's own get_rope_index.

def mrope_position_ids(input_ids, attention_mask, image_grid_thw, image_token_id, merge,
                       video_grid_thw=None, video_token_id=None, video_step=None):
    """
    input_ids, attention_mask (N, T) right- or left-padded; image_grid_thw (n_img, 3) of
    the images in row-major token order (video_grid_thw (n_vid, 3) of the videos, their
    pads video_token_id). Text token: t = h = w = p, p += 1. Image (video) of merged grid
    (gt, h, w): p + (⌊frame · step⌋, row, col) for each patch, step 1 for images and
    video_step[v] (n_vid,) for video v, then p += max(h, w).
    Returns (3, N, T) long on input_ids' device; padding positions are 0.
    Vectorised: p before each token is an exclusive cumulative sum of per-token advances
    (1 per text token, max(h, w) at an image's last token, 0 elsewhere).
    """
    dev = input_ids.device
    real = attention_mask.to(dev).bool()                                    # (N, T)
    advance = real.long()                                                   # (N, T)
    offset = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=dev)  # (3, N, T)
    for kind, token_id, grid, step in (("image", image_token_id, image_grid_thw, None),
                                       ("video", video_token_id, video_grid_thw, video_step)):
        is_vis = (input_ids == token_id) & real if token_id is not None else None  # (N, T)
        n_tok = int(is_vis.sum()) if is_vis is not None else 0
        if not n_tok:
            continue
        if grid is None:
            raise ValueError(f"{n_tok} {kind} tokens but no {kind}_grid_thw")
        g = grid.to(dev).long()                                             # (n_item, 3)
        h, w = g[:, 1] // merge, g[:, 2] // merge                           # (n_item,)
        n = g[:, 0] * h * w                                                 # tokens per item
        if int(n.sum()) != n_tok:
            raise ValueError(f"{n_tok} {kind} tokens but {kind}_grid_thw describes {int(n.sum())}")
        item = torch.repeat_interleave(torch.arange(len(g), device=dev), n)  # (n_tok,) item of each
        k = torch.arange(n_tok, device=dev) - (n.cumsum(0) - n)[item]       # index within its item
        hi, wi = h[item], w[item]
        t = k // (hi * wi)                                                  # (n_tok,) temporal patch
        if step is not None:                                                # get_rope_index's float32 rule
            t = (t.float() * step.to(dev, torch.float32)[item]).long()
        offset[:, is_vis] = torch.stack([t, (k // wi) % hi, k % wi])        # (3, n_tok)
        advance[is_vis] = torch.where(k == n[item] - 1, torch.maximum(hi, wi), 0)
    p = advance.cumsum(1) - advance                                         # (N, T) p before each token
    return (p[None] + offset) * real[None]                                  # (3, N, T)


@torch.no_grad()
def embedding_stats(W, rows=8192):
    """Per-dimension mean and (unbiased) std of an embedding table W (V, d), in fp64, two
    passes over chunks of `rows` rows on W's own device (the second in place on each chunk's
    fp64 copy): a 152k × 3584 table never needs a full fp64 copy. Returns (mu, sd), each (d,) fp64 on the CPU."""
    V = W.shape[0]
    mu = sum(W[i:i + rows].double().sum(0) for i in range(0, V, rows)) / V          # (d,)
    var = sum(W[i:i + rows].to(torch.float64, copy=True).sub_(mu).pow_(2).sum(0) for i in range(0, V, rows)) / (V - 1)
    return mu.cpu(), var.sqrt().cpu()


# ----------------------------------------------------------------------------------
# LoRA (§4) and loading a ReMatch checkpoint folder

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def apply_lora(backbone, r=32, alpha=64, dropout=0.0):
    """peft LoRA on the language model's q,k,v,o,gate,up,down projections only (§4: r=32,
    α=64). The regex keeps Qwen2.5-VL's vision MLP (also gate/up/down_proj) frozen."""
    from peft import LoraConfig, get_peft_model
    return get_peft_model(backbone, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=LORA_TARGETS))


def load_rematch(name_or_path, device=None, dtype=None, num_tokens=0, embed_template="plain",
                 revision=None):
    """
    (ReMatch, processor, config) from a directory written by save_rematch (train.py's
    checkpoints) or such a folder's hub id (resolve_checkpoint), or a raw backbone (hub
    id, local directory, tiny-*) evaluated as the single-vector baseline: `num_tokens`
    (default 0 = last-token pooling) and `embed_template` (default "plain", VLM2Vec's
    layout) apply only to raw backbones. revision: the hub id's commit, branch or tag,
    recorded in the returned config (and so in evaluation results). dtype: default, the
    checkpoint's training dtype when it trained in full precision (--dtype float32 /
    float64), else bf16 on CUDA and fp32 on the CPU. A local path is recorded by its last
    component only. A merged export (tools/export_merged.py; folder or hub id): the model it
    was exported from (util/backbone.py: export_config, load_export_heads), never a baseline.
    """
    import json

    name = published_name(str(name_or_path))                    # no local path in a result file
    name_or_path = resolve_checkpoint(name_or_path, revision)
    pin = {"revision": revision} if revision else {}
    if is_export(name_or_path):
        from data import EMBED_TEMPLATES, MATCH_PROMPTS
        config = export_config(name_or_path, EMBED_TEMPLATES, num_tokens, embed_template, name, pin)
        backbone, processor = load_backbone(name_or_path, device=device, dtype=dtype)
        model = ReMatch(backbone, config["num_tokens"], config["embed_template"], init_tokens=False)
        config.update(load_export_heads(model, processor.tokenizer, name_or_path, MATCH_PROMPTS))
        return model.eval(), processor, config
    config_path = os.path.join(str(name_or_path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        backbone, processor = load_backbone(name_or_path, device=device, dtype=dtype, revision=revision)
        config = {"model": name, "num_tokens": num_tokens, "embed_template": embed_template, **pin}
        return ReMatch(backbone, num_tokens, embed_template).eval(), processor, config
    with open(config_path) as f:
        config = dict(check_config(json.load(f), config_path), **pin)
    pixels = dict(min_pixels=config.get("min_pixels"), max_pixels=config.get("max_pixels"))
    if dtype is None and config.get("dtype") in ("float32", "float64"):   # as train.py evaluated it
        dtype = getattr(torch, config["dtype"])
    if os.path.isdir(os.path.join(name_or_path, "adapter")):
        from peft import PeftModel
        base, processor = load_backbone(config["model"], device=device, dtype=dtype,    # tiny: same init
                                        seed=config.get("seed", 0), revision=config.get("model_revision"),
                                        **pixels)
        backbone = PeftModel.from_pretrained(base, os.path.join(name_or_path, "adapter"))
    else:
        backbone, processor = load_backbone(os.path.join(name_or_path, "backbone"),
                                            device=device, dtype=dtype, **pixels)
    model = ReMatch(backbone, config["num_tokens"], config["embed_template"], init_tokens=False)
    load_heads(model, name_or_path)
    return model.eval(), processor, config
