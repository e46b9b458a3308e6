"""
Export a trained ReMatch checkpoint as a standard Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint directory
that plain `transformers` can run, with none of this repository's code.

What changes against the training checkpoint:
  - the LoRA adapter (if any) is merged into the weights (peft merge_and_unload), and the
    weights are written in bf16 by default (--dtype float16 / float32 on request; peers ship
    bf16; tests/test_st_export.py holds the bf16 export to the fp32 one, tolerance there);
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
        Normalize. sentence-transformers' prompts (prompt=, prompt_name=, prompts={...},
        mteb's model prompts) arrive as a system message, which the template puts in front
        of the input's text verbatim (encode_query([t], prompt=p) == encode_query([p + t]));
        a bare image document (no text, no prompt) gets util/inputs.DOC_IMAGE_INSTRUCTION,
        as MMEB's image candidates and tools/search.py's corpus images; a bare image query
        stays bare, as Encoder and tools/search.py embed query images;
      CrossEncoder(OUT) reranks with the matching head (Eq. 4, raw->raw view, one
        candidate per row as tools/rerank.py scores it): the template renders a (query,
        document) pair as the matching prompt up to <ANSWER>, and rematch_hf.py's
        scorer returns logit(Yes) - logit(No) at the last position (sdpa or eager
        attention: its mask is 4D, flash attention is refused by name);
      rematch_hf.py also holds an image-only processor (AutoProcessor with
        trust_remote_code: the stock one builds a video processor that needs torchvision).
    Without trust_remote_code, transformers loads the folder as the stock model;
  - README.md, the model card: base model, K, the sides, usage in sentence-transformers,
    plain transformers and vLLM, the input rules, what is not supported, and the advice to
    pin a revision (the folder's code runs on load).

    python tools/export_merged.py runs/demo/checkpoint-2000 runs/demo/merged [--dtype float32]

The plain-transformers snippet that uses the directory is in the README ("Merged export");
tests/test_export.py runs it against ReMatch.embed, tests/test_st_export.py the two
sentence-transformers classes against ReMatch.embed and the matching pass, and the card.
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
from util.backbone import CARD_FILE, EXPORT_PROJECTOR_FILE, answer_token_ids, family_tag, published_name
from util.inputs import DOC_IMAGE_INSTRUCTION

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
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
MATCHER = {"qwen2_vl": "RematchQwen2VLMatcher", "qwen2_5_vl": "RematchQwen2_5_VLMatcher",
           "qwen3_vl": "RematchQwen3VLMatcher"}


def token_names(K):
    """The special tokens that carry L_q and L_d: (query tokens, document tokens)."""
    return [f"<|rematch_q_{k}|>" for k in range(K)], [f"<|rematch_d_{k}|>" for k in range(K)]


def _lit(s):
    """A Jinja string literal that renders exactly s (JSON's escapes are Jinja's)."""
    return json.dumps(s)


def chat_template(prefix, suffix, query_tokens, document_tokens, match_prompt,
                  doc_image_instruction=DOC_IMAGE_INSTRUCTION):
    """
    The export's chat template (Jinja, transformers' apply_chat_template). One macro renders
    an input's content as data.encode_item does: the user text (the MMEB string,
    instruction included) with <|image_1|> replaced by the Qwen vision block; an image
    without that mark goes first, then "\n" and the text (evaluate.format_input's rule).
      - one user message = an embedding input: prefix + content + suffix + the K tokens of
        the side, task="query" -> L_q, "document" or no task -> L_d (data.collate_embed);
      - a system message before it (sentence-transformers' prompt=, prompt_name=,
        prompts={...}, mteb's model prompts) is the instruction: its text goes in front of
        the user text verbatim, so {"text": t} with prompt p renders as {"text": p + t}
        (the image rules then apply to p + t);
      - a bare image (no text, no prompt) on the document side is rendered with
        doc_image_instruction as its text (MMEB's image candidates, tools/search.py); on the
        query side it stays bare (Encoder and tools/search.py embed query images so);
      - a query and a document message = the matching head's raw->raw row as
        tools/rerank.py scores a candidate (data.collate_match, slot 1 only): P,
        <QUERY> q </QUERY>, <DOC> d </DOC>, H and "<ANSWER>", whose next token is Yes/No;
        a bare image document gets doc_image_instruction there too.
    Everything else raises, naming what was wrong (a prompt on the matching row, two
    images, a placeholder without its image, an empty input, an unknown task).
    """
    (q_open, q_close), (d_open, d_close) = MATCH_RAW["Q"], MATCH_RAW["D"]
    mark, block, bare_doc = _lit(IMAGE_PLACEHOLDER), _lit(IMAGE_BLOCK), _lit(doc_image_instruction)
    return "\n".join([
        "{#- ReMatch export (arXiv 2511.19278), written by the rematch repository's "
        "tools/export_merged.py. One user message: an embedding input, the side's K tokens "
        "appended (task query: L_q; document or none: L_d); a system message before it (a "
        "sentence-transformers prompt) goes in front of its text. A query and a document message: "
        "the matching prompt, answered Yes/No by the next token. A bare image document gets the "
        "default image instruction (its text, below). -#}",
        "{%- macro text_of(message) -%}",
        "{%- if message['content'] is string -%}{{- message['content'] -}}",
        "{%- else -%}{%- for c in message['content'] -%}",
        "{%- if c['type'] == 'text' -%}{{- c['text'] -}}",
        "{%- else -%}{{- raise_exception('ReMatch: a prompt (system message) holds text only, got ' ~ c['type']) -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- macro item(message, lead, bare) -%}",
        "{%- set ns = namespace(text=lead, images=0) -%}",
        "{%- if message['content'] is string -%}{%- set ns.text = ns.text + message['content'] -%}",
        "{%- else -%}{%- for c in message['content'] -%}",
        "{%- if c['type'] == 'text' -%}{%- set ns.text = ns.text + c['text'] -%}",
        "{%- elif c['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- else -%}{{- raise_exception('ReMatch embeds text and images, got ' ~ c['type']) -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- if ns.images > 1 -%}{{- raise_exception('ReMatch: one image per input, got ' ~ ns.images) -}}"
        "{%- endif -%}",
        "{%- if ns.images == 1 and not ns.text -%}{%- set ns.text = bare -%}{%- endif -%}",
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
        "{%- set top = namespace(lead='', messages=messages) -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set top.lead = text_of(messages[0]) -%}{%- set top.messages = messages[1:] -%}",
        "{%- endif -%}",
        "{%- set roles = top.messages | map(attribute='role') | list -%}",
        "{%- if 'query' in roles or 'document' in roles -%}",
        "{%- if roles != ['query', 'document'] -%}{{- raise_exception('ReMatch matching: one query then one "
        "document message, got roles ' ~ roles | join(', ')) -}}{%- endif -%}",
        "{%- if top.lead -%}{{- raise_exception('ReMatch matching takes no prompt (a system message): the "
        "folder holds the matching prompt the head was trained with') -}}{%- endif -%}",
        "{{- " + _lit(match_prompt + q_open) + " -}}{{- item(top.messages[0], '', '') -}}"
        "{{- " + _lit(q_close + d_open) + " -}}{{- item(top.messages[1], '', " + bare_doc + ") -}}"
        "{{- " + _lit(d_close + MATCH_H + MATCH_ANSWER[0]) + " -}}",
        "{%- else -%}",
        "{%- if roles != ['user'] -%}{{- raise_exception('ReMatch embeds one user message, optionally after one "
        "system message (a prompt), got roles ' ~ (messages | map(attribute='role') | join(', '))) -}}"
        "{%- endif -%}",
        "{%- if task is defined and task is not none and task not in ['query', 'document'] -%}"
        "{{- raise_exception('ReMatch: task must be query or document, got ' ~ task) -}}{%- endif -%}",
        "{%- set query = task is defined and task == 'query' -%}",
        "{{- " + _lit(prefix) + " -}}{{- item(top.messages[0], top.lead, '' if query else " + bare_doc + ") -}}"
        "{{- " + _lit(suffix) + " -}}",
        "{%- if query -%}{{- " + _lit("".join(query_tokens)) + " -}}"
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


CARD_SNIPPET = "plain-transformers"       # the card's code block that tests/test_st_export.py runs


def write_model_card(out_dir, pooling, family):
    """README.md of the export (a Hugging Face model card, YAML front matter first): what the
    folder is (base model, K, the sides, the weights' dtype), how to use it from
    SentenceTransformer, CrossEncoder, plain transformers and vLLM, the input formats and
    rules (prompts, the bare image, refusals), what is not supported, and why to pin a
    revision. The plain-transformers block is run by tests/test_st_export.py."""
    K, base = pooling["num_tokens"], pooling["base_model"] or "(not recorded)"
    q, d = pooling["query_tokens"], pooling["document_tokens"]
    span = (lambda t: f"`{t[0]}` … `{t[-1]}`" if len(t) > 1 else f"`{t[0]}`") if K else (lambda t: "none")
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    if "/" in str(pooling["base_model"] or ""):                # a hub id (a local name is not one)
        front.append(f"base_model: {pooling['base_model']}")
    front += [f"tags: [sentence-transformers, cross-encoder, rematch, multimodal-embedding, retrieval, "
              f"reranker, {family_tag(pooling['base_model'] or family)}]", "---"]
    target = ("\n- **Text documents need their target prompt** (this model was trained with target\n"
              "  instructions): put it in the text or give it as the prompt, as the rematch repository's\n"
              "  `data.with_target_instruction` does.") if pooling["target_instructions"] else ""
    pooled = (f"the mean of the last-layer states of the K = {K} appended tokens" if K else
              "the last token's last-layer state (K = 0: no appended tokens)")
    card = f"""{chr(10).join(front)}
# ReMatch embedder and reranker

A [ReMatch](https://arxiv.org/abs/2511.19278) model: `{base}` fine-tuned into a multimodal embedder with
K = {K} learnable tokens per side, and a Yes/No matching head in the same weights, merged into one
{FAMILY_NAMES.get(family, family)} checkpoint (weights in {pooling["dtype"]}). Written by the rematch reference
implementation (`tools/export_merged.py`). An input's embedding is {pooled}, L2-normalised.
The rematch repository tests a bf16 export against the fp32 export of the same checkpoint: embeddings within
cosine 0.99, reranker scores within 0.05.

| call | side | what it appends or scores |
|---|---|---|
| `SentenceTransformer.encode_query` | query | L_q: {span(q)} |
| `SentenceTransformer.encode_document`, `SentenceTransformer.encode` | document | L_d: {span(d)} |
| `CrossEncoder.predict([(query, document), ...])` | matching head | logit(Yes) − logit(No) after `<ANSWER>` |

Queries and documents use different tokens: encode queries with `encode_query`. Plain `encode` embeds
documents (what generic indexing tools call). The reranker's score is a logit difference; its sigmoid is p(Yes).

## Loading runs this folder's code: pin a revision

`trust_remote_code=True` is needed: `rematch_st.py` (the pooling of the last K tokens) and `rematch_hf.py`
(an image-only processor, the matching scorer) run when the folder loads. Read them, then pin the commit you
read, so that a later push cannot change the code you run:

```python
model = SentenceTransformer("<repo id>", trust_remote_code=True, revision="<commit>")
```

Requires sentence-transformers ≥ 6.3, < 7 and transformers ≥ 5, < 6 (checked on load); no torchvision.

## Use: sentence-transformers

```python
from PIL import Image
from sentence_transformers import CrossEncoder, SentenceTransformer
embedder = SentenceTransformer("<repo id>", trust_remote_code=True, revision="<commit>")
reranker = CrossEncoder("<repo id>", trust_remote_code=True, revision="<commit>")

docs = [Image.open("a.jpg"), Image.open("b.jpg"), "A dog runs on a beach."]
D = embedder.encode_document(docs)                                   # (3, d), unit vectors
task = "Find me an everyday image that matches the given caption: "   # the query's instruction
q = embedder.encode_query(["a dog on a beach"], prompt=task)
top = embedder.similarity(q, D)[0].argsort(descending=True)[:2].tolist()
scores = reranker.predict([(task + "a dog on a beach", docs[j]) for j in top])   # logit(Yes) − logit(No)
```

The reranker needs sdpa or eager attention (`model_kwargs={{"attn_implementation": "sdpa"}}`, the default): it
scores under the 4D mask the head was trained with, which flash attention cannot take; it refuses
`flash_attention_2` / `flash_attention_3` by name.

## Inputs

- **Forms**: a text; an image (PIL, a path or a URL); `{{"text": ..., "image": ...}}`, the text marking the
  image with `<|image_1|>` (MMEB's form) or, without the mark, the image first, then a newline and the text.
  One image per input. A `(text, image)` tuple is refused (sentence-transformers reads a 2-tuple as a
  (query, document) pair): pass the dict.
- **The instruction** is text in front of the input, as in training. sentence-transformers' `prompt=`,
  `prompt_name=` with `prompts={{...}}`, and mteb's model prompts are that text, put in front verbatim:
  `encode_query([t], prompt=p)` equals `encode_query([p + t])`, and for `{{"text": t, "image": im}}` the text
  becomes `p + t` (an image alone: `p`), where the image rules above apply. Put the separator in the prompt
  (`"Find me an everyday image that matches the given caption: "`).
- **A bare image document** (an image with no text and no prompt, through `encode_document` or `encode`, or as
  the reranker's document) is given the instruction `"{pooling["doc_image_instruction"]}"`: it is embedded as
  `{{"text": "<|image_1|>\\n{pooling["doc_image_instruction"]}", "image": im}}`, MMEB's image candidates' form,
  which the rematch repository's corpus search uses too. **A bare image query** (`encode_query`) is embedded as
  the image alone, as the repository's `Encoder` and search tool embed a query image without an instruction:
  give a query image its task's instruction (MMEB's queries all carry one).{target}
- **Refused, by name**: an empty input (no text, no image; the error gives its position in the list passed to
  `encode`), a `(text, image)` tuple, more than one image, a text holding Qwen's vision tokens itself, a
  `<|image_1|>` without its image, a prompt on the reranker, and a row with an image cut by a user-set
  `max_seq_length` (sentence-transformers restores the template's tail on text rows only; raise the limit).

## Not supported

- **Truncated dimensions** (`truncate_dim`, Matryoshka): the model was not trained for them; use the full vector.
- **Video** and audio inputs, and **more than one image** per input.
- A prompt on the reranker; the reranker under flash attention (see above).

## Use: plain transformers

No code from this folder runs; `rematch_pooling.json` says how to embed. The text must be in MMEB form
(`<|image_1|>` where the image goes; a bare image document's text is
`"<|image_1|>\\n{pooling["doc_image_instruction"]}"`); side is `"query"` or `"document"`.

```python
# {CARD_SNIPPET}
import json

import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

path = "<local folder>"           # huggingface_hub.snapshot_download("<repo id>", revision="<commit>")
spec = json.load(open(f"{{path}}/rematch_pooling.json"))
tok = AutoTokenizer.from_pretrained(path)
pixels = Qwen2VLImageProcessorPil.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path).eval()


@torch.no_grad()
def embed(text, image=None, side="query"):
    content, extra = text.replace(spec["image_placeholder"], spec["image_block"]), {{}}
    if image is not None:
        px = pixels(images=[image], return_tensors="pt")
        n = int(px["image_grid_thw"].prod()) // pixels.merge_size ** 2       # one pad per merged patch
        content = content.replace("<|image_pad|>", "<|image_pad|>" * n)
        extra = {{"pixel_values": px["pixel_values"].to(model.dtype), "image_grid_thw": px["image_grid_thw"]}}
    ids = tok(spec["prefix"] + content + spec["suffix"] + "".join(spec[f"{{side}}_tokens"]),
              add_special_tokens=False, return_tensors="pt")
    ids["mm_token_type_ids"] = (ids["input_ids"] == model.config.image_token_id).long()   # M-RoPE
    h = model.model(**ids, **extra).last_hidden_state[0]                 # (T, d), final norm
    e = h[-spec["num_tokens"]:].mean(0) if spec["pooling"] == "mean" else h[-1]
    return F.normalize(e.float(), dim=-1)
```

## Use: vLLM

vLLM has no pooling for the mean of the last K tokens and ignores custom pooling modules: **served with its
defaults, this folder returns the last token's state alone, a wrong vector that looks right.** The exact
request asks for every token's state without vLLM's per-token normalisation and pools on the client, with
`tools/vllm_embed.py` of the rematch repository:

```python
from vllm import LLM
from vllm_embed import ReMatchVLLM
llm = LLM(model="<local folder>", runner="pooling",
          pooler_config={{"task": "token_embed", "use_activation": False}})
rm = ReMatchVLLM(llm, "<local folder>")
q = rm.embed(["Find me an everyday image that matches the given caption: a dog on a beach"], side="query")
```

## Files

`model.safetensors`, `config.json` (the backbone; `auto_map` names the reranker class, `rematch` the matching
row's fixed token runs), the tokenizer with `chat_template.jinja` (the input rules above), `rematch_pooling.json`,
`modules.json` and the sentence-transformers configs, `rematch_st.py`, `rematch_hf.py`.
"""
    with open(os.path.join(out_dir, CARD_FILE), "w") as f:
        f.write(card)


@torch.no_grad()
def export_merged(checkpoint, out_dir, dtype=torch.bfloat16):
    """Write the merged checkpoint of `checkpoint` (a train.py checkpoint directory) to
    out_dir, loadable by plain transformers and by sentence-transformers, its weights in
    `dtype` (one of DTYPES; bf16 by default, as peers ship; the checkpoint is loaded in it, and
    peft computes the LoRA delta in fp32 on the CPU before adding it), with its model card;
    returns the pooling description (also written as rematch_pooling.json)."""
    if dtype not in DTYPES.values():
        raise ValueError(f"export_merged: dtype must be one of {', '.join(DTYPES)}, got {dtype}")
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
        "doc_image_instruction": DOC_IMAGE_INSTRUCTION,               # a bare image document's text
        "dtype": str(dtype).removeprefix("torch."),                   # of the written weights
        "target_prompt_table": config.get("target_prompt_table"),    # --target_prompts (None: the built-in)
        "w_qdm": config.get("w_qdm"),                                 # > 0: the matching head was trained
        "base_model": published_name(config.get("model")),
        "source_checkpoint": published_name(str(checkpoint)),       # a name, not a local path
    }
    with open(os.path.join(out_dir, POOLING_FILE), "w") as f:
        json.dump(pooling, f, indent=2)
    # §3.2.3's projector, for the feature views of the matching head (util.backbone.load_export_heads reads it)
    from safetensors.torch import save_file
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model.projector.state_dict().items()},
              os.path.join(out_dir, EXPORT_PROJECTOR_FILE))
    write_model_card(out_dir, pooling, family)
    return pooling


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a train.py checkpoint directory (checkpoint-N)")
    p.add_argument("out_dir", help="where to write the merged Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="dtype of the written weights (default bfloat16, as peers ship)")
    a = p.parse_args(argv)
    if os.path.exists(a.out_dir) and os.listdir(a.out_dir):
        p.error(f"{a.out_dir} exists and is not empty: choose a new directory")
    pooling = export_merged(a.checkpoint, a.out_dir, DTYPES[a.dtype])
    print(f"wrote {a.out_dir}: K={pooling['num_tokens']}, pooling={pooling['pooling']}, "
          f"tokens {pooling['query_tokens'][:1]}…/{pooling['document_tokens'][:1]}…")


if __name__ == "__main__":
    main()
