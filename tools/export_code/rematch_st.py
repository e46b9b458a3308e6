"""
ReMatch export: the two sentence-transformers modules of this folder (loaded with
trust_remote_code=True).

ReMatch (arXiv 2511.19278, §3.2.1) appends K learnable tokens to every input, L_q to
queries and L_d to documents, and embeds the input as the mean of their last-layer
states. The folder's chat template appends them (encode_query: L_q; encode_document and
plain encode: L_d).

  RematchTransformer  sentence-transformers' Transformer, unchanged, as the first module:
                      a load without trust_remote_code stops at sentence-transformers'
                      own refusal before anything loads (the stock Qwen-VL processor
                      would first fail for want of torchvision)
  RematchPooling      the mean of the last K attended positions of each row (either
                      padding side), after checking that they hold the side's K token ids:
                      a truncated or re-templated input raises instead of embedding the
                      wrong tokens. K = 0 (a single-vector export): the last attended state.

Written into the export by tools/export_merged.py of the rematch repository.
"""
import torch
from sentence_transformers.base.modules import Module, Transformer


class RematchTransformer(Transformer):
    """The backbone (AutoModel: the final-norm hidden states) and the processor."""


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
