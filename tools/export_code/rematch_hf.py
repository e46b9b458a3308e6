"""
ReMatch export: the two transformers classes that sentence-transformers loads from this
folder with trust_remote_code=True (transformers only, no other import).

  RematchProcessor  the Qwen-VL processor for images and text only. The stock one also
                    builds a video processor, which imports torchvision; ReMatch embeds
                    images and text, so the video half is left out. Without
                    trust_remote_code, AutoProcessor loads the stock processor as before.
  Rematch*Matcher   the model's matching head (ReMatch Eq. 4, the raw->raw view) as a
                    sequence scorer: logit(Yes) - logit(No) after "<ANSWER>", under the
                    attention mask it was trained with (the query and the document do not
                    see each other; the answer sees both), either padding side.
                    CrossEncoder loads it through AutoModelForSequenceClassification
                    (config.json's auto_map). Flash attention takes no 4D mask: the scorer
                    refuses attn_implementation flash_attention_2 / _3 (and kernels' flash
                    builds) by name, at load and at forward; sdpa (the default) and eager run.

Written into the export by tools/export_merged.py of the rematch repository.
"""
import os

import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLForConditionalGeneration,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class RematchProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor: images expand <|image_pad|> to one pad
    per merged patch exactly as the stock processor does (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# segment codes of a matching row, in sequence order
P, Q, D, H, A, PAD = 0, 1, 2, 3, 4, -1


def matching_segments(ids, spec):
    """
    Segment codes of one rendered matching row (its real tokens, a list of ids):
    P = prompt, Q = <QUERY> q </QUERY>, D = <DOC> d </DOC>, H = assistant header, A =
    "<ANSWER>" (spec: their fixed id sequences, config.rematch). Q ends where the one
    occurrence of " </QUERY>\n" + "<DOC>\n" between the two contents splits the row. A row
    that does not have this shape (another template, or a text that holds the split
    marker itself) raises.
    """
    p, head = spec["prompt_ids"], spec["head_ids"] + spec["answer_open_ids"]
    start, end = p + spec["query_open_ids"], spec["document_close_ids"] + head
    split = spec["query_close_ids"] + spec["document_open_ids"]
    if len(ids) < len(start) + len(split) + len(end) or ids[:len(start)] != start \
            or ids[len(ids) - len(end):] != end:
        raise ValueError("ReMatch matcher: the row is not this folder's matching prompt (rendered "
                         "with another chat template?)")
    at = [i for i in range(len(start), len(ids) - len(end) - len(split) + 1)
          if ids[i:i + len(split)] == split]
    if len(at) != 1:
        raise ValueError(f"ReMatch matcher: the query/document boundary occurs {len(at)} times in "
                         "the row (a text holds ' </QUERY>' followed by '<DOC>' itself)")
    b = at[0] + len(spec["query_close_ids"])                         # D starts here
    e = len(ids) - len(head)                                         # H starts here
    return [P] * len(p) + [Q] * (b - len(p)) + [D] * (e - b) + [H] * len(spec["head_ids"]) \
        + [A] * len(spec["answer_open_ids"])


def matching_mask(seg, dtype):
    """
    The unified mask of the rematch repository (masks.py, Fig. 3) for a row that holds one
    view, raw query Q and raw document D: P sees P; Q sees P and Q; D sees P and D (not Q);
    H sees P and H; the answer A sees all; every block causal. seg (B, T) segment codes
    (PAD = -1: a pad sees itself only). Returns the additive mask (B, 1, T, T).
    """
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()          # (T, T)
    sq, sk = seg[:, :, None], seg[:, None, :]                                      # (B, T, 1), (B, 1, T)
    ok = causal & (sk != PAD) & ((sk == P) | (sk == sq) | (sq == A))             # (B, T, T)
    ok = ok | (torch.eye(T, dtype=torch.bool, device=seg.device) & (sq == PAD))   # pads: diagonal
    return torch.zeros(ok.shape, dtype=dtype, device=seg.device).masked_fill(
        ~ok, torch.finfo(dtype).min)[:, None]                                       # (B, 1, T, T)


def flash_attention_name(impl):
    """The flash-attention implementation that `impl` (an attn_implementation: a name, or a
    dict per sub-config) asks of the language model, or None."""
    if isinstance(impl, dict):
        impl = impl.get("text_config", impl.get(""))
    return impl if isinstance(impl, str) and "flash" in impl.lower() else None


def refuse_flash_attention(impl, where):
    """ValueError naming `impl` when it is flash attention: the matching head scores under a
    4D mask (query and document hidden from each other, the answer seeing both), which
    transformers passes to the attention unchanged and flash attention cannot take."""
    name = flash_attention_name(impl)
    if name:
        raise ValueError(f"ReMatch matcher: attn_implementation={name!r} ({where}) cannot take the 4D attention "
                         "mask the matching head scores under (the query and the document do not see each other); "
                         "load it with attn_implementation=\"sdpa\" (the default) or \"eager\", e.g. "
                         "CrossEncoder(path, trust_remote_code=True, model_kwargs={\"attn_implementation\": \"sdpa\"})")


def _matcher(base):
    class Matcher(base):
        """The matching head's score of a rendered (query, document) row: logit(Yes) -
        logit(No) of the token after "<ANSWER>" (config.rematch["answer_token_ids"]),
        under the mask it was trained with (matching_mask), positions those of the
        ordinary sequence (M-RoPE with images), DeepStack as in the stock forward."""

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            """The stock class loads the weights (with its own checkpoint key mapping, which
            transformers applies to library classes only); the instance then scores. A
            folder without the LM head (a sentence-transformers re-save keeps the backbone
            only) raises instead of scoring with a freshly initialised head."""
            kwargs.pop("output_loading_info", None)
            refuse_flash_attention(kwargs.get("attn_implementation"), "asked at load")
            config = kwargs.get("config")
            if config is not None and not isinstance(config, (str, os.PathLike)):
                refuse_flash_attention(getattr(config.get_text_config(), "_attn_implementation", None),
                                       "set in the config")
            model, info = base.from_pretrained(*args, output_loading_info=True, **kwargs)
            if info.get("missing_keys"):
                raise ValueError(f"ReMatch matcher: {args[0] if args else 'the folder'} lacks "
                                 f"{sorted(info['missing_keys'])[:4]}...: load the export written by "
                                 "tools/export_merged.py (an embedder-only re-save has no LM head)")
            model.__class__ = cls
            return model

        def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                    mm_token_type_ids=None, **kwargs):
            refuse_flash_attention(self.config.get_text_config()._attn_implementation, "the loaded model's")
            B, T = input_ids.shape
            am = torch.ones_like(input_ids) if attention_mask is None else attention_mask   # (B, T)
            seg = torch.full((B, T), PAD, dtype=torch.long)
            for r in range(B):
                real = am[r].bool().cpu()
                seg[r, real] = torch.tensor(matching_segments(input_ids[r].cpu()[real].tolist(),
                                                              self.config.rematch))
            seg = seg.to(input_ids.device)
            pos = self.model.compute_3d_position_ids(
                input_ids=input_ids, inputs_embeds=None, image_grid_thw=image_grid_thw,
                video_grid_thw=None, attention_mask=am, cache=None,
                mm_token_type_ids=mm_token_type_ids)                                # (3, B, T) or None
            if pos is None:                                                          # text only
                pos = (am.long().cumsum(-1) - 1).clamp(min=0).expand(3, B, T)
            h = self.model(input_ids=input_ids, attention_mask=matching_mask(seg, self.dtype),
                           position_ids=pos, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                           mm_token_type_ids=mm_token_type_ids, use_cache=False).last_hidden_state
            last = (seg == A).long().cumsum(-1).argmax(-1)                            # (B,) last A position
            # the two label rows of the LM head only, in fp32: a bf16 logit near 10 is rounded to
            # 1/16, which a difference of two of them would carry into the score
            yes, no = self.config.rematch["answer_token_ids"]
            z = h[torch.arange(B, device=h.device), last].float() @ self.lm_head.weight[[yes, no]].float().T
            if getattr(self.lm_head, "bias", None) is not None:
                z = z + self.lm_head.bias[[yes, no]].float()                          # (B, 2)
            return SequenceClassifierOutput(logits=(z[:, 0] - z[:, 1])[:, None])
    Matcher.__name__ = Matcher.__qualname__ = "Rematch" + base.__name__.replace("ForConditionalGeneration", "Matcher")
    return Matcher


RematchQwen2VLMatcher = _matcher(Qwen2VLForConditionalGeneration)
RematchQwen2_5_VLMatcher = _matcher(Qwen2_5_VLForConditionalGeneration)
RematchQwen3VLMatcher = _matcher(Qwen3VLForConditionalGeneration)
