"""
ReMatch export: the two sentence-transformers modules of this folder (loaded with
trust_remote_code=True).

ReMatch (arXiv 2511.19278, §3.2.1) appends K learnable tokens to every input, L_q to
queries and L_d to documents, and embeds the input as the mean of their last-layer
states. The folder's chat template appends them (encode_query: L_q; encode_document and
plain encode: L_d), puts a sentence-transformers prompt (prompt=, prompt_name=, the
prompts={...} of the constructor, mteb's model prompts: all arrive as a system message)
in front of the input's text, and gives a bare image document the default instruction.

  RematchTransformer  sentence-transformers' Transformer, with the checks the template
                      cannot make because it sees one row without its number: each input
                      is a text, an image or {"text", "image"} (a (text, image) tuple,
                      which sentence-transformers would read as a (query, document) pair,
                      is refused saying what to pass), none is empty, and no row with an
                      image reached max_seq_length (sentence-transformers restores the
                      template's tail after truncation on text rows only). Refusals name
                      the input's position in the list given to encode. As the first
                      module, it also makes a load without trust_remote_code stop at
                      sentence-transformers' own refusal before anything loads.
  RematchPooling      the mean of the last K attended positions of each row (either
                      padding side), after checking that they hold the side's K token ids:
                      a truncated or re-templated input raises instead of embedding the
                      wrong tokens. K = 0 (a single-vector export): the last attended state.

Written into the export by tools/export_merged.py of the rematch repository.
"""
import sys

import torch
from sentence_transformers.base.modality import infer_modality
from sentence_transformers.base.modules import Module, Transformer


def _is_messages(x):
    """A chat-message input: one {"role", "content"} dict or a list of them."""
    def msg(m):
        return isinstance(m, dict) and "role" in m and "content" in m
    return msg(x) or (isinstance(x, list) and bool(x) and all(msg(m) for m in x))


def _kind(x):
    return "None" if x is None else type(x).__name__


def _has_image(x):
    """Whether an input (as sentence-transformers reads it) holds an image."""
    if _is_messages(x):
        for m in [x] if isinstance(x, dict) else x:
            if isinstance(m["content"], list) and any(isinstance(c, dict) and c.get("type") == "image"
                                                      for c in m["content"]):
                return True
        return False
    try:
        modality = infer_modality(x)
    except (ValueError, TypeError):
        return False
    return modality == "image" or (isinstance(modality, tuple) and "image" in modality)


def _input_rows(batch):
    """The positions of a batch's inputs in the list given to encode, and how to name them.
    sentence-transformers sorts the inputs by length before cutting batches, so the i-th input
    of a batch is rarely the caller's i-th: the positions are read from the batching frame
    (SentenceTransformer._inference's length_sorted_idx and start_index) when that frame holds
    this very batch object, else the batch's own positions are given, said so. Error path only."""
    f = sys._getframe(1)
    for _ in range(8):
        f = f.f_back
        if f is None:
            break
        loc = f.f_locals
        if loc.get("inputs_batch") is batch and "length_sorted_idx" in loc and "start_index" in loc:
            order, start = loc["length_sorted_idx"], loc["start_index"]
            return [int(order[start + i]) for i in range(len(batch))], f"of the {len(loc.get('inputs', ()))} inputs"
    return list(range(len(batch))), f"of this batch of {len(batch)}"


class RematchTransformer(Transformer):
    """The backbone (AutoModel: the final-norm hidden states) and the processor, with the
    per-row checks of the module docstring before the chat template renders a batch."""

    def preprocess(self, inputs, prompt=None, processing_kwargs=None, **kwargs):
        bad = [(r, why) for r, x in enumerate(inputs) if (why := self._refusal(x))]
        if bad:
            rows, of = _input_rows(inputs)
            r, why = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"ReMatch embedder: input {rows[r]} {of} {why}{more}")
        given = inputs                  # the batch object itself: _input_rows finds its positions by it
        # {"text": t, "image": None} is the text t (a row of a table with an empty image column)
        inputs = [{k: v for k, v in x.items() if v is not None}
                  if isinstance(x, dict) and not _is_messages(x) else x for x in inputs]
        limit = self._max_length(processing_kwargs, kwargs)
        media = [r for r, x in enumerate(inputs) if _has_image(x)] if limit else []
        try:
            features = super().preprocess(inputs, prompt=prompt, processing_kwargs=processing_kwargs, **kwargs)
        except ValueError:
            # the cut fell inside the image's pad tokens (the processor counts them): name the row
            cut = [r for r in media if self._untruncated_length(inputs[r], prompt, processing_kwargs, kwargs) > limit]
            if cut:
                raise self._cut_error(given, cut, limit) from None
            raise
        if media and "attention_mask" in features:
            real = features["attention_mask"].sum(dim=1).tolist()
            cut = [r for r in media if real[r] >= limit      # truncated to the limit, or exactly that long
                   and self._untruncated_length(inputs[r], prompt, processing_kwargs, kwargs) > limit]
            if cut:
                raise self._cut_error(given, cut, limit)
        return features

    def _untruncated_length(self, x, prompt, processing_kwargs, kwargs):
        """Token length of one input rendered without truncation (the error path only)."""
        pk = {k: dict(v) for k, v in (processing_kwargs or {}).items()}
        pk.setdefault("text", {})["truncation"] = False
        for bucket in ("chat_template", "common"):
            if bucket in pk:
                pk[bucket].pop("truncation", None)
                pk[bucket].pop("max_length", None)
        kwargs = {k: v for k, v in kwargs.items() if k != "max_length"}
        f = super().preprocess([x], prompt=prompt, processing_kwargs=pk, **kwargs)
        return int(f["attention_mask"].sum())

    @staticmethod
    def _cut_error(inputs, cut, limit):
        rows, of = _input_rows(inputs)
        more = f" (and {len(cut) - 1} more)" if len(cut) > 1 else ""
        return ValueError(
            f"ReMatch embedder: input {rows[cut[0]]} {of}{more} holds an image and is longer than max_seq_length="
            f"{limit} tokens: truncation cut its end (the side's learnable tokens, or the image's tokens), and "
            "sentence-transformers restores the template's tail on text rows only (rows with media are not "
            "restored). Raise model.max_seq_length or shorten the text of the rows with images")

    @staticmethod
    def _refusal(x):
        """Why the embedder refuses one input, or None."""
        if x is None:
            return "is None: give a text, an image or {\"text\": ..., \"image\": ...}"
        if isinstance(x, (tuple, list)) and not _is_messages(x):
            kinds = ", ".join(_kind(v) for v in x)
            return (f"is a {type(x).__name__} ({kinds}): the embedder takes one input per row, and "
                    "sentence-transformers reads a 2-tuple as a (query, document) pair. Pass a text and an "
                    "image as one input, {\"text\": ..., \"image\": ...} (the text marks the image with "
                    "<|image_1|>, or the image goes first); score (query, document) pairs with "
                    "CrossEncoder(this folder)")
        if isinstance(x, str) and not x.strip():
            return f"is empty ({x!r}): no text, no image"
        if isinstance(x, dict) and not _is_messages(x):
            text, image = x.get("text"), x.get("image")
            if image is None and "video" not in x and "audio" not in x and not (isinstance(text, str) and text.strip()):
                return f"is empty ({x!r}): no text, no image"
        return None

    def _max_length(self, processing_kwargs, kwargs):
        """The token limit sentence-transformers truncates this call to (None: no truncation):
        a max_length in the call's or the module's processing_kwargs, else max_seq_length."""
        merged = self._merge_processing_kwargs(processing_kwargs)
        truncation, limit = None, kwargs.get("max_length")
        for bucket in ("common", "text", "chat_template"):                  # later buckets win, as in ST
            b = merged.get(bucket) or {}
            truncation = b.get("truncation", truncation)
            limit = b.get("max_length", limit)
        if truncation is False or truncation == "do_not_truncate":
            return None
        return limit if limit is not None else self.max_seq_length


class RematchPooling(Module):
    config_keys = ["num_tokens", "query_token_ids", "document_token_ids"]
    forward_kwargs = {"task"}

    def __init__(self, num_tokens, query_token_ids, document_token_ids):
        super().__init__()
        self.num_tokens = int(num_tokens)
        self.query_token_ids = list(query_token_ids)
        self.document_token_ids = list(document_token_ids)

    def forward(self, features, task=None, **kwargs):
        h, mask = features["token_embeddings"], features["attention_mask"]        # (B, T, d), (B, T)
        B, T = mask.shape
        K = max(self.num_tokens, 1)
        pos = torch.arange(T, device=mask.device).expand(B, T)                  # (B, T)
        last = torch.where(mask.bool(), pos, -1).max(dim=1).values              # (B,)
        idx = last[:, None] - K + 1 + torch.arange(K, device=mask.device)       # (B, K)
        if (idx < 0).any() or not mask.gather(1, idx.clamp(min=0)).bool().all():
            raise ValueError(f"ReMatch pooling: a row has fewer than {K} attended positions")
        if self.num_tokens:
            side = "query" if task == "query" else "document"
            want = torch.tensor(getattr(self, f"{side}_token_ids"), device=idx.device)   # (K,)
            got = features["input_ids"].gather(1, idx)                          # (B, K)
            bad = (got != want).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"ReMatch pooling: row(s) {bad} do not end with the {side} tokens "
                                 f"{want.tolist()} (row {bad[0]} ends with {got[bad[0]].tolist()}): "
                                 "the input was truncated, or rendered without this folder's chat template")
        E = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1])).mean(1)   # (B, K, d) → (B, d)
        features["sentence_embedding"] = E
        return features

    def save(self, output_path, *args, safe_serialization=True, **kwargs):
        self.save_config(output_path)
