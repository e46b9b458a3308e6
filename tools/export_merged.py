"""
Export a trained ReMatch checkpoint as a standard Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory
that plain `transformers` can run, with none of this repository's code.

What changes against the training checkpoint:
  - the LoRA adapter (if any) is merged into the weights (peft merge_and_unload);
  - the 2·K learnable tokens (§3.2.1: L_q for queries, L_d for documents) become special
    tokens of the tokenizer, <|rematch_q_0|> … and <|rematch_d_0|> …, whose rows of the
    input-embedding table are L_q and L_d. Qwen's embedding tables have spare rows past
    the tokenizer (151936 rows for 151657 tokens), so the new ids usually fit; otherwise
    the table grows. With tied embeddings (Qwen2-VL-2B, Qwen2.5-VL-3B) the LM head's rows of
    those ids change too; nothing ever predicts them;
  - rematch_pooling.json says how to embed: the MMEB string with <|image_1|> replaced by
    the Qwen vision block, wrapped in the embedding template (prefix/suffix), followed by
    the K tokens of its side; the embedding is the mean of their last-layer (final-norm)
    hidden states, L2-normalised (K = 0: the last token's state);
  - the same folder loads in sentence-transformers (6.3+, trust_remote_code=True):
      SentenceTransformer(OUT) embeds: its chat template (chat_template.jinja) renders the
        embedding input and appends L_q for task="query" (encode_query), L_d for
        "document" (encode_document) and for plain encode; rematch_st.py's pooling takes
        the mean of the last K positions after checking they hold the side's tokens;
        Normalize. The instruction stays in the user text, as in training: ST prompts
        (a system message on chat backbones) are refused by the template;
      CrossEncoder(OUT) reranks with the matching head (Eq. 4, raw->raw view, one
        candidate per row as tools/rerank.py scores it): the template renders a (query,
        document) pair as the matching prompt up to <ANSWER>, and rematch_hf.py's
        scorer returns logit(Yes) - logit(No) at the last position;
      rematch_hf.py also holds an image-only processor (AutoProcessor with
        trust_remote_code: the stock one builds a video processor that needs torchvision).
    Without trust_remote_code, transformers loads the folder as the stock model.

    python tools/export_merged.py runs/demo/checkpoint-2000 runs/demo/merged

The plain-transformers snippet that uses the directory is in the README ("Merged export");
tests/test_export.py runs it against ReMatch.embed, tests/test_st_export.py the two
sentence-transformers classes against ReMatch.embed and the matching pass.
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import (
    EMBED_TEMPLATES,
    IMAGE_BLOCK,
    IMAGE_PLACEHOLDER,
    MATCH_ANSWER,
    MATCH_H,
    MATCH_PROMPTS,
    MATCH_RAW,
    _ids,
)
from model import load_rematch
from util.backbone import answer_token_ids, published_name

POOLING_FILE = "rematch_pooling.json"
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_code")
CODE_FILES = ("rematch_st.py", "rematch_hf.py")        # copied into the export, as is
# sentence-transformers version the export is tested with (tests/test_st_export.py), and the
# transformers range of this repository
ST_REQUIREMENTS = {
    "sentence-transformers": {"specifier": ">=6.3,<7", "reason": "the chat template's task "
                              "variable and custom modules as tested (6.3)"},
    "transformers": {"specifier": ">=5.0,<6", "reason": "Qwen-VL's mm_token_type_ids (M-RoPE)"},
}
STOCK_PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                   "qwen3_vl": "Qwen3VLProcessor"}
MATCHER = {"qwen2_vl": "RematchQwen2VLMatcher", "qwen2_5_vl": "RematchQwen2_5_VLMatcher",
           "qwen3_vl": "RematchQwen3VLMatcher"}


def token_names(K):
    """The special tokens that carry L_q and L_d: (query tokens, document tokens)."""
    return [f"<|rematch_q_{k}|>" for k in range(K)], [f"<|rematch_d_{k}|>" for k in range(K)]


def _lit(s):
    """A Jinja string literal that renders exactly s (JSON's escapes are Jinja's)."""
    return json.dumps(s)


def chat_template(prefix, suffix, query_tokens, document_tokens, match_prompt):
    """
    The export's chat template (Jinja, transformers' apply_chat_template). One macro renders
    an input's content as data.encode_item does: the user text (the MMEB string,
    instruction included) with <|image_1|> replaced by the Qwen vision block; an image
    without that mark goes first, then "\n" and the text (evaluate.format_input's rule).
      - one user message = an embedding input: prefix + content + suffix + the K tokens of
        the side, task="query" -> L_q, "document" or no task -> L_d (data.collate_embed);
      - a query and a document message = the matching head's raw->raw row as
        tools/rerank.py scores a candidate (data.collate_match, slot 1 only): P,
        <QUERY> q </QUERY>, <DOC> d </DOC>, H and "<ANSWER>", whose next token is Yes/No.
    Everything else raises, naming what was wrong (a system message from ST prompts, two
    images, a placeholder without its image, an empty input, an unknown task).
    """
    (q_open, q_close), (d_open, d_close) = MATCH_RAW["Q"], MATCH_RAW["D"]
    mark, block = _lit(IMAGE_PLACEHOLDER), _lit(IMAGE_BLOCK)
    return "\n".join([
        "{#- ReMatch export (arXiv 2511.19278), written by the rematch repository's "
        "tools/export_merged.py. One user message: an embedding input, the side's K tokens "
        "appended (task query: L_q; document or none: L_d). A query and a document message: "
        "the matching prompt, answered Yes/No by the next token. -#}",
        "{%- macro item(message) -%}",
        "{%- set ns = namespace(text='', images=0) -%}",
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}",
        "{%- else -%}{%- for c in message['content'] -%}",
        "{%- if c['type'] == 'text' -%}{%- set ns.text = ns.text + c['text'] -%}",
        "{%- elif c['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- else -%}{{- raise_exception('ReMatch embeds text and images, got ' ~ c['type']) -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- if ns.images > 1 -%}{{- raise_exception('ReMatch: one image per input, got ' ~ ns.images) -}}"
        "{%- endif -%}",
        "{%- if '<|image_pad|>' in ns.text or '<|vision_start|>' in ns.text -%}{{- raise_exception("
        "'ReMatch: the text holds a Qwen vision token itself; mark the image with ' ~ " + mark + ") -}}"
        "{%- endif -%}",
        "{%- if " + mark + " in ns.text -%}",
        "{%- if ns.images != 1 or ns.text.count(" + mark + ") != 1 -%}{{- raise_exception('ReMatch: the "
        "text marks ' ~ " + mark + " ~ ' ' ~ ns.text.count(" + mark + ") ~ ' time(s) for ' ~ ns.images ~ "
        "' image(s)') -}}{%- endif -%}",
        "{{- ns.text.replace(" + mark + ", " + block + ") -}}",
        "{%- elif ns.images == 1 -%}{{- " + block + " -}}{%- if ns.text -%}{{- " + _lit("\n") + " ~ ns.text -}}"
        "{%- endif -%}",
        "{%- elif not ns.text.strip() -%}{{- raise_exception('ReMatch: an empty input (no text, no image)') -}}",
        "{%- else -%}{{- ns.text -}}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set roles = messages | map(attribute='role') | list -%}",
        "{%- if 'query' in roles or 'document' in roles -%}",
        "{%- if roles != ['query', 'document'] -%}{{- raise_exception('ReMatch matching: one query then one "
        "document message, got roles ' ~ roles | join(', ')) -}}{%- endif -%}",
        "{{- " + _lit(match_prompt + q_open) + " -}}{{- item(messages[0]) -}}"
        "{{- " + _lit(q_close + d_open) + " -}}{{- item(messages[1]) -}}"
        "{{- " + _lit(d_close + MATCH_H + MATCH_ANSWER[0]) + " -}}",
        "{%- else -%}",
        "{%- if roles != ['user'] -%}{{- raise_exception('ReMatch embeds one user message, the instruction "
        "inside its text as in training (sentence-transformers prompts= adds a system message), got roles ' "
        "~ roles | join(', ')) -}}{%- endif -%}",
        "{%- if task is defined and task is not none and task not in ['query', 'document'] -%}"
        "{{- raise_exception('ReMatch: task must be query or document, got ' ~ task) -}}{%- endif -%}",
        "{{- " + _lit(prefix) + " -}}{{- item(messages[0]) -}}{{- " + _lit(suffix) + " -}}",
        "{%- if task is defined and task == 'query' -%}{{- " + _lit("".join(query_tokens)) + " -}}"
        "{%- else -%}{{- " + _lit("".join(document_tokens)) + " -}}{%- endif -%}",
        "{%- endif -%}"])


def write_sentence_transformers(out_dir, K, query_ids, document_ids):
    """The sentence-transformers files: modules.json (rematch_st's Transformer over the whole
    folder and RematchPooling, then the stock Normalize), their configs, the version requirements,
    and the two code files. Plain JSON: the export needs no sentence-transformers installed."""
    modules = [("", "rematch_st.RematchTransformer"),
               ("1_Pooling", "rematch_st.RematchPooling"),
               ("2_Normalize", "sentence_transformers.base.modules.Normalize")]
    files = {
        "modules.json": [{"idx": i, "name": str(i), "path": path, "type": t}
                         for i, (path, t) in enumerate(modules)],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",      # AutoModel: the final-norm states
            "modality_config": {
                **{m: {"method": "forward", "method_output_name": "last_hidden_state"} for m in ("text", "image")},
                "message": {"method": "forward", "method_output_name": "last_hidden_state", "format": "structured"}},
            "module_output_name": "token_embeddings",
            "unpad_inputs": False},                        # M-RoPE needs the padded batch
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
            "similarity_fn_name": "cosine", "requirements": ST_REQUIREMENTS},
        "1_Pooling/config.json": {"num_tokens": K, "query_token_ids": query_ids,
                                  "document_token_ids": document_ids},
        "2_Normalize/config.json": {"module_input_name": "sentence_embedding",
                                    "module_output_name": "sentence_embedding"},
    }
    for name, obj in files.items():
        os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    for name in CODE_FILES:
        shutil.copy(os.path.join(CODE_DIR, name), out_dir)


@torch.no_grad()
def export_merged(checkpoint, out_dir, dtype=torch.float32):
    """Write the merged checkpoint of `checkpoint` (a train.py checkpoint directory) to
    out_dir, loadable by plain transformers and by sentence-transformers; returns the
    pooling description (also written as rematch_pooling.json)."""
    model, processor, config = load_rematch(checkpoint, device="cpu", dtype=dtype)
    backbone = model.backbone
    if model.peft is not None:                                 # peft: LoRA into the weights
        backbone = model.peft.merge_and_unload()
    tok, K = processor.tokenizer, model.num_tokens
    q_tokens, d_tokens = token_names(K)
    if K:
        tok.add_special_tokens({"additional_special_tokens": q_tokens + d_tokens},
                               replace_extra_special_tokens=False)
        ids = tok.convert_tokens_to_ids(q_tokens + d_tokens)
        emb = backbone.get_input_embeddings()
        if max(ids) >= emb.weight.shape[0]:
            backbone.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            emb = backbone.get_input_embeddings()
        emb.weight[ids] = torch.cat([model.L_q, model.L_d]).to(emb.weight.dtype)   # (2K, d)
    prefix, suffix = EMBED_TEMPLATES[model.embed_template]
    family = backbone.config.model_type
    # CrossEncoder(out_dir): AutoModelForSequenceClassification → rematch_hf's scorer, whose
    # score is logit(Yes) - logit(No), returned as is (Identity; sigmoid gives p(Yes))
    backbone.config.auto_map = {"AutoModelForSequenceClassification": f"rematch_hf.{MATCHER[family]}"}
    P = MATCH_PROMPTS[config.get("match_prompt") or "paper"]
    backbone.config.rematch = {       # the matching row's fixed pieces (rematch_hf.matching_segments),
        "answer_token_ids": list(answer_token_ids(tok, "export")),   # tokenized as collate_match does
        **{k: _ids(tok, s) for k, s in (
            ("prompt_ids", P), ("query_open_ids", MATCH_RAW["Q"][0]),
            ("query_close_ids", MATCH_RAW["Q"][1]), ("document_open_ids", MATCH_RAW["D"][0]),
            ("document_close_ids", MATCH_RAW["D"][1]), ("head_ids", MATCH_H),
            ("answer_open_ids", MATCH_ANSWER[0]))}}
    backbone.config.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
    backbone.config.num_labels = 1
    backbone.save_pretrained(out_dir)
    tok.chat_template = chat_template(prefix, suffix, q_tokens, d_tokens, P)
    tok.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:   # AutoProcessor
        json.dump({"processor_class": STOCK_PROCESSOR[family],
                   "auto_map": {"AutoProcessor": "rematch_hf.RematchProcessor"}}, f, indent=2)
    write_sentence_transformers(out_dir, K, tok.convert_tokens_to_ids(q_tokens),
                                tok.convert_tokens_to_ids(d_tokens))
    pooling = {
        "format": "rematch-merged-v1",
        "num_tokens": K,
        "query_tokens": q_tokens,
        "document_tokens": d_tokens,
        "prefix": prefix,
        "suffix": suffix,
        "image_placeholder": IMAGE_PLACEHOLDER,
        "image_block": IMAGE_BLOCK,
        "pooling": "mean" if K else "last",
        "normalize": True,
        "target_instructions": bool(config.get("target_instructions")),
        "base_model": published_name(config.get("model")),
        "source_checkpoint": published_name(str(checkpoint)),       # a name, not a local path
    }
    with open(os.path.join(out_dir, POOLING_FILE), "w") as f:
        json.dump(pooling, f, indent=2)
    return pooling


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a train.py checkpoint directory (checkpoint-N)")
    p.add_argument("out_dir", help="where to write the merged Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the written weights")
    a = p.parse_args(argv)
    if os.path.exists(a.out_dir) and os.listdir(a.out_dir):
        p.error(f"{a.out_dir} exists and is not empty: choose a new directory")
    pooling = export_merged(a.checkpoint, a.out_dir, getattr(torch, a.dtype))
    print(f"wrote {a.out_dir}: K={pooling['num_tokens']}, pooling={pooling['pooling']}, "
          f"tokens {pooling['query_tokens'][:1]}…/{pooling['document_tokens'][:1]}…")


if __name__ == "__main__":
    main()
