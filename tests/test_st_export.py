"""
The merged export in sentence-transformers (tools/export_merged.py, tools/export_code/):
SentenceTransformer(export, trust_remote_code=True) embeds, CrossEncoder(export,
trust_remote_code=True) reranks, from the same folder, offline.

Oracles: ReMatch.embed on the training checkpoint (L_q / L_d appended, mean of their last
states, L2-normalised) and the repository's matching pass (tools/rerank.matching_p_yes,
logit=True: the raw->raw view of slot 1 under the unified mask, model.match). On the three
tiny families (trained 2 steps with LoRA, K = 3) and a width-real Qwen2-VL-2B with Qwen's
real tokenizer (random weights, 2 decoder layers, K = 4). CPU; the oracle exports are fp32,
the default bf16 export is held to them (BF16_* below).

Also sentence-transformers' own conventions on this folder: prompts (prompt=, prompt_name=
with prompts={...}) are the instruction in front of the text; a bare image document gets
util/inputs.DOC_IMAGE_INSTRUCTION; tuples, empty inputs and image rows cut by max_seq_length
are refused by name; the matcher refuses flash attention; the model card.

    pytest tests/test_st_export.py
Needs the optional extra: pip install -r requirements-extra.txt
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KINDS, shape_image
from test_train import flags, write_train_fixture

from util.inputs import DOC_IMAGE_INSTRUCTION

st = pytest.importorskip("sentence_transformers")

D_IMG = "<|image_1|>\n" + DOC_IMAGE_INSTRUCTION         # MMEB's image candidates
# bf16 export vs the fp32 export of the same checkpoint, CPU. Measured: tiny families, cosine
# >= 0.997, max |delta| <= 0.0037 per unit-vector component, reranker scores within 0.0036;
# width-real Qwen2-VL-2B (2 layers, random weights), cosine >= 0.996, max |delta| <= 0.0012,
# scores (-1.6 to -0.8) within 0.027
BF16_MIN_COSINE, BF16_MAX_ABS = 0.99, 0.01
BF16_SCORE_ATOL = {"tiny": 0.02, "width-real": 0.05}
# (text, image) per input: text, image with its instruction, image + question, a long text,
# image + text without the mark (the image goes first, as Encoder.encode places it), image alone
BLUE, RED = shape_image("blue", 84, "square"), shape_image("red", (56, 112))
INPUTS = [("a red circle", None), (D_IMG, BLUE),
          ("<|image_1|>\nWhat colour is the circle? Answer in one word.", RED),
          ("Represent the class label: a green square on a white background, drawn small", None),
          ("What shape is this?", BLUE), (None, RED)]
PAIRS = [(0, 3), (0, 1), (2, 0), (2, 1), (4, 5)]          # (query, document) of INPUTS


def st_input(text, image):
    """The sentence-transformers form of an input: a str, an image, or {"image", "text"}."""
    if image is None:
        return text
    return image if text is None else {"image": image, "text": text}


def mmeb_text(text, image, side):
    """The MMEB string the export renders for an input: a bare image document gets the
    default image instruction (DOC_IMAGE_INSTRUCTION), a bare image query stays bare."""
    from evaluate import format_input
    bare_doc = image is not None and not text and side in ("d", "document")
    return format_input(text, image is not None, DOC_IMAGE_INSTRUCTION if bare_doc else None)


def reference_embedding(model, processor, text, image, side):
    """ReMatch.embed of one MMEB-format input on side "q" / "d": (d,) normalised."""
    from data import collate_embed, encode_item
    item = encode_item(processor, text, image)
    batch = collate_embed([item], processor.tokenizer, model.num_tokens, model.embed_template)
    with torch.no_grad():
        E, _ = model.embed(batch, side)
    return F.normalize(E[0], dim=-1)


def reference_embeddings(model, processor, side):
    """ReMatch.embed of INPUTS on one side, one at a time: (N, d) normalised."""
    return torch.stack([reference_embedding(model, processor, mmeb_text(t, im, side), im, side)
                        for t, im in INPUTS])


def reference_scores(model, processor, config):
    """The matching head's logit(Yes) - logit(No) for PAIRS, one row each (tools/rerank.py)."""
    from data import encode_item
    from tools.rerank import match_prompt, matching_p_yes
    item = {side: [encode_item(processor, mmeb_text(t, im, side), im) for t, im in INPUTS] for side in "qd"}
    E = torch.zeros(1, model.L_q.shape[-1])            # the raw view reads no embedding
    return torch.cat([matching_p_yes(model, processor, item["q"][q], E[0], [item["d"][d]], E, logit=True,
                                     prompt=match_prompt(config)) for q, d in PAIRS])


def check_embedder(path, model, processor, atol=1e-5):
    """encode_query / encode_document == ReMatch.embed for every input, in one batch of
    unequal lengths (right and left padded) and one at a time; plain encode == documents.
    Returns {"query", "document"}: the one batch's vectors at the padding side the model
    loads with (what check_bf16 computes on the fp32 export)."""
    m = st.SentenceTransformer(path, trust_remote_code=True)
    inputs = [st_input(t, im) for t, im in INPUTS]
    tok = m[0].processor.tokenizer
    loaded_padding, as_loaded = tok.padding_side, {}
    for side, encode in (("query", m.encode_query), ("document", m.encode_document)):
        ref = reference_embeddings(model, processor, side[0])
        for padding in ("right", "left"):
            tok.padding_side = padding
            got = encode(inputs, convert_to_tensor=True, batch_size=len(inputs))
            torch.testing.assert_close(got, ref, rtol=0, atol=atol, msg=lambda s, w=f"{side} {padding}": f"{w}: {s}")
            if padding == loaded_padding:
                as_loaded[side] = got
        for n, x in enumerate(inputs):
            torch.testing.assert_close(encode([x], convert_to_tensor=True)[0], ref[n], rtol=0, atol=atol)
    torch.testing.assert_close(m.encode(inputs, convert_to_tensor=True),
                               m.encode_document(inputs, convert_to_tensor=True), rtol=0, atol=0)
    return as_loaded


def check_cross_encoder(path, model, processor, config, atol=1e-4):
    """CrossEncoder.predict == the matching head's Yes/No logit difference, one batch.
    Returns the scores at the padding side the model loads with (check_bf16's fp32 ones)."""
    ce = st.CrossEncoder(path, trust_remote_code=True)
    pairs = [(st_input(*INPUTS[q]), st_input(*INPUTS[d])) for q, d in PAIRS]
    ref = reference_scores(model, processor, config)
    tok = ce[0].processor.tokenizer
    loaded_padding, as_loaded = tok.padding_side, None
    for padding in ("right", "left"):
        tok.padding_side = padding
        got = ce.predict(pairs, convert_to_tensor=True, batch_size=len(pairs)).float()
        torch.testing.assert_close(got, ref, rtol=0, atol=atol, msg=lambda s, w=padding: f"{w}: {s}")
        if padding == loaded_padding:
            as_loaded = got
    return as_loaded


# ----------------------------------------------------------------------------------
# The three tiny families, trained two steps (LoRA merged by the export)

@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return write_train_fixture(str(tmp_path_factory.mktemp("st_train")), n=6)


@pytest.fixture(scope="module", params=TINY_KINDS)
def exported(request, fixture_dir, tmp_path_factory):
    """(family, export dir, ReMatch, processor, config) of a 2-step LoRA checkpoint."""
    import train
    from model import load_rematch
    from tools.export_merged import export_merged
    root = tmp_path_factory.mktemp("st_" + request.param)
    train.main(flags(fixture_dir, str(root / "run"), "--steps", "2", "--num_tokens", "3",
                     "--model", request.param, "--lora", "--lora_r", "4", "--lora_alpha", "8"))
    ckpt = str(root / "run" / "checkpoint-2")
    export_merged(ckpt, str(root / "export"), dtype=torch.float32)     # the oracle's precision
    model, processor, config = load_rematch(ckpt, device="cpu")
    return request.param, str(root / "export"), model, processor, config


def test_sentence_transformer_equals_rematch_embed(exported):
    _, path, model, processor, _ = exported
    check_embedder(path, model, processor)


def test_cross_encoder_equals_the_matching_head(exported):
    _, path, model, processor, config = exported
    check_cross_encoder(path, model, processor, config)


def test_the_last_k_ids_are_the_side_tokens(exported):
    """The rendered input ends with <|rematch_q_*|> for queries, <|rematch_d_*|> for
    documents and plain encode; the pooling module refuses a row whose tail is not the
    side's tokens (a truncated input, another template)."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    with open(f"{path}/rematch_pooling.json") as f:
        spec = json.load(f)
    tok = m[0].processor.tokenizer
    want = {side: tok.convert_tokens_to_ids(spec[f"{side}_tokens"]) for side in ("query", "document")}
    assert len(want["query"]) == 3 and set(want["query"]).isdisjoint(want["document"])
    x = [st_input(*INPUTS[2]), st_input(*INPUTS[0])]
    for task, side in (("query", "query"), ("document", "document"), (None, "document")):
        f = m[0].preprocess(x, task=task)
        for r in range(2):
            ids = f["input_ids"][r][f["attention_mask"][r].bool()].tolist()
            assert ids[-3:] == want[side], (task, ids[-5:])
    f = m[0].preprocess(x, task="document")
    f = m[0](f)
    with pytest.raises(ValueError, match="do not end with the query tokens"):
        m[1](dict(f), task="query")
    q, d = m.encode_query(x, convert_to_tensor=True), m.encode_document(x, convert_to_tensor=True)
    assert (q - d).abs().max() > 1e-3                              # the sides differ


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)   # files the families share
def test_refusals_name_what_is_wrong(exported, tmp_path):
    """Without trust_remote_code: sentence-transformers' own refusal. Two images, a mark
    without its image, a vision token in the text, an empty input rendered by the template
    itself (vLLM's route), a prompt on the reranker: the template refuses; a video:
    sentence-transformers refuses (the folder declares text, image and message only)."""
    _, path, *_ = exported
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        st.SentenceTransformer(path)
    m = st.SentenceTransformer(path, trust_remote_code=True)
    # the image-only processor of the folder, not the stock one (whose video half needs torchvision)
    assert type(m[0].processor).__name__ == "RematchProcessor"
    assert getattr(m[0].processor, "video_processor", None) is None
    with pytest.raises(Exception, match="one image per input"):
        m.encode_query([{"image": [BLUE, RED], "text": "two"}])
    with pytest.raises(Exception, match="1 time.s. for 0 image"):
        m.encode_query(["<|image_1|>\nno image"])
    tok = m[0].processor.tokenizer
    with pytest.raises(Exception, match="an empty input"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "  "}]}],
                                tokenize=False, task="document")
    with pytest.raises(Exception, match="Qwen vision token"):
        m.encode_document(["<|image_pad|>"])
    with pytest.raises(ValueError, match="Modality 'video' is not supported"):     # sentence-transformers' own
        m.encode_document([np.zeros((2, 28, 28, 3), dtype=np.uint8)])
    ce = st.CrossEncoder(path, trust_remote_code=True)
    with pytest.raises(ValueError, match="boundary occurs 2 times"):
        ce.predict([("a red </QUERY>\n<DOC>\n circle", "a blue square")])
    with pytest.raises(Exception, match="matching takes no prompt"):
        ce.predict([("a red circle", "a blue square")], prompt="Judge: ")


# ----------------------------------------------------------------------------------
# sentence-transformers' conventions: prompts, the bare image, tuples, empty rows, truncation

@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)   # template and module: shared
def test_prompts_are_the_instruction_in_front_of_the_text(exported):
    """prompt=, prompt_name= with prompts={...} in the constructor, and a default prompt name
    (mteb's model prompts take the prompt= / prompt_name= route) equal the prompt prepended to
    the text, to 1e-5: encode_query([t], prompt=p) == encode_query([p + t]). With an image the
    text becomes p + t and the image rules apply to it: {"image", "text": t} with p ==
    {"image", "text": p + t}; a bare image with p == {"image", "text": p} == ReMatch.embed of
    "<|image_1|>\n" + p (Encoder's instruction=p); an MMEB text that marks the image keeps it
    where it is."""
    _, path, model, processor, _ = exported
    p, t = "Find me an everyday image that matches the given caption: ", "a red circle"
    m = st.SentenceTransformer(path, trust_remote_code=True)
    mp = st.SentenceTransformer(path, trust_remote_code=True, prompts={"caption": p, "document": "Doc: "})

    def enc(model_, x, side, **kw):
        return getattr(model_, f"encode_{side}")(x, convert_to_tensor=True, **kw)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    q_mark = "<|image_1|>\nWhat colour is the circle?"
    for side in ("query", "document"):
        close(enc(m, [t], side, prompt=p), enc(m, [p + t], side))
        close(enc(mp, [t], side, prompt_name="caption"), enc(m, [p + t], side))
        close(enc(m, [{"image": RED, "text": t}], side, prompt=p), enc(m, [{"image": RED, "text": p + t}], side))
        close(enc(m, [{"image": RED, "text": q_mark}], side, prompt=p),
              enc(m, [{"image": RED, "text": p + q_mark}], side))
        close(enc(m, [RED], side, prompt=p), enc(m, [{"image": RED, "text": p}], side))
        close(enc(m, [RED], side, prompt=p)[0],
              reference_embedding(model, processor, "<|image_1|>\n" + p, RED, side[0]))
        close(enc(m, [t], side, prompt=p)[0], reference_embedding(model, processor, p + t, None, side[0]))
    # a prompts={"document": ...} entry is encode_document's default prompt, as in sentence-transformers
    close(enc(mp, [t], "document"), enc(m, ["Doc: " + t], "document"))
    md = st.SentenceTransformer(path, trust_remote_code=True, prompts={"caption": p}, default_prompt_name="caption")
    close(md.encode([t], convert_to_tensor=True), enc(m, [p + t], "document"))
    assert (enc(m, [t], "query", prompt=p) - enc(m, [t], "query")).abs().max() > 1e-3   # the prompt counts


@pytest.mark.parametrize("exported", TINY_KINDS, indirect=True)
def test_a_bare_image_document_gets_the_default_instruction(exported):
    """encode_document(image) and encode(image) == the MMEB candidate form {"image", "text":
    "<|image_1|>\n" + DOC_IMAGE_INSTRUCTION} == ReMatch.embed of it (as tools/search.py embeds
    corpus images); encode_query(image) stays the image alone == ReMatch.embed of
    "<|image_1|>" (as Encoder and tools/search.py embed query images). The string is
    util/inputs.DOC_IMAGE_INSTRUCTION, recorded in rematch_pooling.json; the template takes it
    from the export's argument, not a copy."""
    from tools import search
    from tools.export_merged import chat_template
    _, path, model, processor, _ = exported
    assert search.IMAGE_INSTRUCTION == DOC_IMAGE_INSTRUCTION
    with open(f"{path}/rematch_pooling.json") as f:
        assert json.load(f)["doc_image_instruction"] == DOC_IMAGE_INSTRUCTION
    m = st.SentenceTransformer(path, trust_remote_code=True)
    doc = m.encode_document([BLUE], convert_to_tensor=True)
    torch.testing.assert_close(doc, m.encode_document([{"image": BLUE, "text": D_IMG}], convert_to_tensor=True),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(doc[0], reference_embedding(model, processor, D_IMG, BLUE, "d"), rtol=0, atol=1e-5)
    torch.testing.assert_close(m.encode([BLUE], convert_to_tensor=True), doc, rtol=0, atol=0)
    query = m.encode_query([BLUE], convert_to_tensor=True)
    torch.testing.assert_close(query[0], reference_embedding(model, processor, "<|image_1|>", BLUE, "q"),
                               rtol=0, atol=1e-5)
    assert (query - m.encode_query([{"image": BLUE, "text": D_IMG}], convert_to_tensor=True)).abs().max() > 1e-4
    jinja = chat_template("", "", ["<q>"], ["<d>"], "P", doc_image_instruction="Look at it.")
    assert '"Look at it."' in jinja and DOC_IMAGE_INSTRUCTION not in jinja


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)
def test_tuples_are_refused_saying_what_to_pass(exported):
    """A (text, image) tuple (tools/vllm_embed.py's input form; sentence-transformers reads
    a 2-tuple as a (query, document) pair) and a (str, str) pair reaching the embedder are
    refused, naming the input and the dict to pass; the CrossEncoder still takes pairs."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    with pytest.raises(ValueError, match=r'input 1 of the 2 inputs is a tuple \(str, Image\).*\{"text": \.\.\., '
                                         r'"image": \.\.\.\}'):
        m.encode_document(["a red circle", ("<|image_1|>\nWhat colour?", RED)])
    with pytest.raises(ValueError, match=r"input 0 of the 1 inputs is a tuple \(str, str\).*CrossEncoder"):
        m.encode_query([("a red circle", "a blue square")])
    with pytest.raises(ValueError, match=r"input 0 of the 1 inputs is a list \(Image, str\)"):
        m.encode_query([[RED, "a red circle"]])
    ce = st.CrossEncoder(path, trust_remote_code=True)
    assert ce.predict([("a red circle", {"image": RED, "text": D_IMG})], convert_to_tensor=True).shape == (1,)


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)
def test_an_empty_input_is_refused_by_its_position(exported):
    """An empty string, a whitespace string, {"text": ""} and {"text": None, "image": None}
    are refused naming their position in the list given to encode (sentence-transformers
    sorts a batch by length: the position is the caller's, not the batch's), in one batch and
    in several; called on the module directly, the position in the batch, said so. A row
    {"text": t, "image": None} is the text t."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    inputs = ["a red circle", "a much longer text than the others, to sort first", "", "a blue square"]
    for batch_size in (4, 2, 1):
        with pytest.raises(ValueError, match=r"input 2 of the 4 inputs is empty \(''\)"):
            m.encode_document(inputs, batch_size=batch_size)
    for bad in ("   ", {"text": ""}, {"text": None, "image": None}):
        with pytest.raises(ValueError, match="input 1 of the 2 inputs is empty"):
            m.encode_query(["a red circle", bad])
    with pytest.raises(ValueError, match="input 1 of this batch of 2 is empty"):
        m[0].preprocess(["a red circle", ""], task="query")
    torch.testing.assert_close(m.encode_query([{"text": "a red circle", "image": None}], convert_to_tensor=True),
                               m.encode_query(["a red circle"], convert_to_tensor=True), rtol=0, atol=0)


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)
def test_an_image_row_cut_by_max_seq_length_is_refused(exported):
    """With a user-set max_seq_length (or a per-call processing_kwargs max_length) shorter
    than a row with an image, the row is refused by name, whether the cut falls in its text
    (its learnable tokens lost) or in the image's pad tokens (the processor's count check);
    sentence-transformers restores the template's tail on text rows only, so a text row cut
    the same way still ends with the side's tokens and embeds. Rows within the limit embed
    as without it."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    short = [{"image": BLUE, "text": D_IMG}, "a red circle"]
    before = m.encode_document(short, convert_to_tensor=True)
    m.max_seq_length = 45
    torch.testing.assert_close(m.encode_document(short, convert_to_tensor=True), before, rtol=0, atol=0)
    long_text = "<|image_1|>\nWhat colour is the circle?" + " and the square?" * 20
    with pytest.raises(ValueError, match=r"input 1 of the 2 inputs holds an image and is longer than "
                                         r"max_seq_length=45.*not restored"):
        m.encode_document(["a red circle", {"image": BLUE, "text": long_text}])
    with pytest.raises(ValueError, match=r"input 0 of the 1 inputs holds an image.*max_seq_length=45"):
        m.encode_query([{"image": BLUE, "text": "What colour? " * 20 + "<|image_1|>"}])   # cut in the pads
    f = m[0].preprocess(["a red circle" * 40], task="document")                           # a text row: restored
    tail = f["input_ids"][0][-3:].tolist()
    assert f["input_ids"].shape[1] == 45 and tail == m[1].document_token_ids
    assert m.encode_document(["a red circle" * 40], convert_to_tensor=True).shape[0] == 1
    m.max_seq_length = 10 ** 6
    with pytest.raises(ValueError, match=r"input 0 of the 1 inputs holds an image.*max_seq_length=30"):
        m.encode_document([{"image": BLUE, "text": long_text}], processing_kwargs={"text": {"max_length": 30}})


# ----------------------------------------------------------------------------------
# The export as peers ship one: bf16 weights, a model card, attention the matcher can take

def check_bf16(path32, path16, score_atol, fp32=None):
    """The bf16 export's weights are bf16 on disk (every tensor) and in config.json; loaded as
    written, its SentenceTransformer vectors (both sides, every input, one batch) are within
    cosine >= BF16_MIN_COSINE and max |delta| <= BF16_MAX_ABS of the fp32 export's, its
    CrossEncoder scores within score_atol. fp32: (vectors, scores) of the fp32 export from
    check_embedder and check_cross_encoder (the same calls on it, as loaded), instead of
    loading and running it again here."""
    from safetensors import safe_open
    dtypes = set()
    for name in (n for n in os.listdir(path16) if n.endswith(".safetensors") and n.startswith("model")):
        with safe_open(os.path.join(path16, name), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    with open(os.path.join(path16, "config.json")) as f:
        assert json.load(f).get("dtype") == "bfloat16"
    x = [st_input(*i) for i in INPUTS]
    m32 = None if fp32 else st.SentenceTransformer(path32, trust_remote_code=True)
    m16 = st.SentenceTransformer(path16, trust_remote_code=True)
    assert m16[0].model.dtype == torch.bfloat16
    for side in ("query", "document"):
        a = fp32[0][side] if fp32 else getattr(m32, f"encode_{side}")(x, convert_to_tensor=True, batch_size=len(x))
        a = a.float()
        b = getattr(m16, f"encode_{side}")(x, convert_to_tensor=True, batch_size=len(x)).float()
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        assert cos.min() >= BF16_MIN_COSINE and (a - b).abs().max() <= BF16_MAX_ABS, (side, cos, (a - b).abs().max())
    del m32, m16
    pairs = [(st_input(*INPUTS[q]), st_input(*INPUTS[d])) for q, d in PAIRS]
    s32 = fp32[1] if fp32 else st.CrossEncoder(path32, trust_remote_code=True).predict(
        pairs, convert_to_tensor=True).float()
    s16 = st.CrossEncoder(path16, trust_remote_code=True).predict(pairs, convert_to_tensor=True).float()
    torch.testing.assert_close(s16, s32, rtol=0, atol=score_atol)


def test_the_bf16_export_holds_to_the_fp32_export(exported, tmp_path):
    """The default export (bf16) of the fixture's checkpoint against its fp32 export (which
    equals ReMatch.embed to 1e-5 above): check_bf16, scores within BF16_SCORE_ATOL["tiny"]."""
    from tools.export_merged import export_merged
    _, path, *_ = exported
    ckpt = os.path.join(os.path.dirname(path), "run", "checkpoint-2")     # the fixture's layout
    assert export_merged(ckpt, str(tmp_path / "bf16"))["dtype"] == "bfloat16"   # the default
    check_bf16(path, str(tmp_path / "bf16"), BF16_SCORE_ATOL["tiny"])


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)   # rematch_hf.py: shared
def test_the_matcher_refuses_flash_attention(exported):
    """CrossEncoder with attn_implementation flash_attention_2, flash_attention_3 or a kernels
    flash build (the usual GPU setting; its 2D-mask kernels cannot take the matcher's 4D mask)
    is refused by name at load, before transformers looks for the package, saying to use sdpa
    or eager; a loaded matcher switched to flash attention refuses at forward; eager scores
    as sdpa (1e-5)."""
    import re
    _, path, *_ = exported
    for impl in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"):
        with pytest.raises(ValueError, match=re.escape(f"attn_implementation={impl!r}") + ".*sdpa.*eager"):
            st.CrossEncoder(path, trust_remote_code=True, model_kwargs={"attn_implementation": impl})
    pairs = [(st_input(*INPUTS[q]), st_input(*INPUTS[d])) for q, d in PAIRS]
    ce = st.CrossEncoder(path, trust_remote_code=True)
    sdpa = ce.predict(pairs, convert_to_tensor=True)
    eager = st.CrossEncoder(path, trust_remote_code=True, model_kwargs={"attn_implementation": "eager"})
    torch.testing.assert_close(eager.predict(pairs, convert_to_tensor=True), sdpa, rtol=0, atol=1e-5)
    ce[0].model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' .the loaded model's.*sdpa"):
        ce.predict(pairs[:1])


def card_block(card, marker):
    """The fenced code block of the card whose first line is `# marker`."""
    start = card.index(f"# {marker}\n")
    return card[start:card.index("```", start)]


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl", "tiny-qwen3-vl"], indirect=True)
def test_the_model_card(exported):
    """README.md of the export: YAML front matter (library_name sentence-transformers,
    pipeline_tag, tags; base_model when it is a hub id), the base model, K, each side's call
    and token names, trust_remote_code and a pinned revision, the four routes (SentenceTransformer,
    CrossEncoder, plain transformers, vLLM's token_embed without activation), the input rules
    (prompt, bare image, refusals) and what is not supported. Its plain-transformers block, run
    as written with the folder's path filled in, == ReMatch.embed (both sides, text and image)."""
    from tools.export_merged import CARD_SNIPPET, write_model_card
    family, path, model, processor, _ = exported
    card = open(os.path.join(path, "README.md")).read()
    front = card.split("---\n")[1]
    assert "library_name: sentence-transformers" in front and "pipeline_tag: sentence-similarity" in front
    assert "tags: [sentence-transformers, cross-encoder, rematch" in front and "base_model" not in front
    for want in (f"`{family}`", "K = 3", "encode_query` | query | L_q: `<|rematch_q_0|>` … `<|rematch_q_2|>`",
                 "`<|rematch_d_0|>` … `<|rematch_d_2|>`", "`SentenceTransformer.encode`", "CrossEncoder.predict",
                 "trust_remote_code=True", 'revision="<commit>"', "weights in float32",
                 '"task": "token_embed", "use_activation": False', "encode_query([t], prompt=p)",
                 f'"{DOC_IMAGE_INSTRUCTION}"', "A bare image query", "an empty input", "`(text, image)` tuple",
                 "max_seq_length", "**Truncated dimensions**", "**Video**", "more than one image",
                 "flash_attention_2"):
        assert want in card, want
    ns = {}
    exec(card_block(card, CARD_SNIPPET).replace('"<local folder>"', repr(path)), ns)
    for text, image in INPUTS[:3]:
        for side in ("query", "document"):
            t = mmeb_text(text, image, side)
            torch.testing.assert_close(ns["embed"](t, image, side),
                                       reference_embedding(model, processor, t, image, side[0]), rtol=0, atol=1e-5)
    spec = json.load(open(os.path.join(path, "rematch_pooling.json")))
    write_model_card(str(os.path.dirname(path)), {**spec, "base_model": "Qwen/Qwen2-VL-2B-Instruct"}, "qwen2_vl")
    front = open(os.path.join(os.path.dirname(path), "README.md")).read().split("---\n")[1]
    assert "base_model: Qwen/Qwen2-VL-2B-Instruct" in front and "qwen2-vl]" in front


@pytest.mark.parametrize("exported", ["tiny-qwen2-vl"], indirect=True)   # the same files for all three
def test_save_and_reload_give_the_same_vectors(exported, tmp_path):
    """SentenceTransformer.save, then load: the same vectors (text and image). The re-saved
    folder holds the backbone only: CrossEncoder refuses it rather than score with a fresh
    LM head."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    m.save(str(tmp_path / "saved"))
    m2 = st.SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True)
    x = [st_input(*i) for i in INPUTS]
    for enc, enc2 in ((m.encode_query, m2.encode_query), (m.encode_document, m2.encode_document)):
        torch.testing.assert_close(enc2(x, convert_to_tensor=True), enc(x, convert_to_tensor=True),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LM head"):
        st.CrossEncoder(str(tmp_path / "saved"), trust_remote_code=True)


@pytest.mark.parametrize("exported", ["tiny-qwen3-vl"], indirect=True)   # DeepStack is Qwen3-VL's
def test_qwen3_vl_keeps_deepstack(exported, monkeypatch):
    """On Qwen3-VL the image inputs equal ReMatch.embed (which adds DeepStack) above; here
    the same vectors with DeepStack switched off in the loaded model differ, so that
    equality is not blind to it."""
    _, path, *_ = exported
    m = st.SentenceTransformer(path, trust_remote_code=True)
    x = [st_input(*INPUTS[1])]
    with_ds = m.encode_document(x, convert_to_tensor=True)
    lm = m[0].model.language_model
    monkeypatch.setattr(lm, "_deepstack_process", lambda h, *a, **k: h)
    assert (m.encode_document(x, convert_to_tensor=True) - with_ds).abs().max() > 1e-4


# ----------------------------------------------------------------------------------
# Width-real Qwen2-VL-2B: Qwen's real tokenizer, real widths, 151936-row vocabulary

@pytest.mark.slow
def test_width_real_qwen2_vl_2b(tmp_path, width_real_checkpoint):
    """A ReMatch checkpoint over a width-real Qwen2-VL-2B (K = 4, the paper's chat
    template and matching prompt, random weights), exported in fp32: both classes equal the
    repository with Qwen's real tokenizer (tied embeddings: the L tokens' rows are the LM
    head's rows too); exported in bf16 (the default): within check_bf16's bounds of it, scores
    within BF16_SCORE_ATOL["width-real"]."""
    from model import ReMatch
    from tools.export_merged import export_merged
    from util.backbone import load_backbone, save_rematch
    base = width_real_checkpoint("qwen2-vl-2b", num_layers=2, vision_depth=1)   # tests/test_real_path.py's
    backbone, processor = load_backbone(str(base), device="cpu", dtype=torch.float32)
    model = ReMatch(backbone, num_tokens=4, embed_template="chat").eval()
    config = {"model": str(base), "num_tokens": 4, "embed_template": "chat", "lora": False,
              "w_qdm": 1.0, "match_prompt": "paper", "dtype": "float32"}
    save_rematch(model, processor, str(tmp_path / "ckpt"), config)
    export_merged(str(tmp_path / "ckpt"), str(tmp_path / "export"), dtype=torch.float32)
    vectors = check_embedder(str(tmp_path / "export"), model, processor)
    scores = check_cross_encoder(str(tmp_path / "export"), model, processor, config)
    export_merged(str(tmp_path / "ckpt"), str(tmp_path / "bf16"))                 # the default: bf16
    check_bf16(str(tmp_path / "export"), str(tmp_path / "bf16"), BF16_SCORE_ATOL["width-real"], (vectors, scores))


# ----------------------------------------------------------------------------------
# tools/vllm_embed.py: the client side of the exact vLLM route, vLLM stood in for by the
# same folder under transformers (per-token final-norm states, what token_embed returns)

class _FakeVLLM:
    """LLM.encode(prompts, pooling_task="token_embed") as vLLM answers it: per prompt, its
    token ids (the image pad expanded by the processor) and every token's last state."""

    def __init__(self, path):
        from transformers import AutoModel, AutoProcessor
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModel.from_pretrained(path).eval()

    def encode(self, prompts, pooling_task=None, pooling_params=None, use_tqdm=True):
        from types import SimpleNamespace
        assert pooling_task == "token_embed" and pooling_params.use_activation is False
        out = []
        for p in prompts:
            images = [p["multi_modal_data"]["image"]] if "multi_modal_data" in p else None
            x = self.processor(text=[p["prompt"]], images=images, return_tensors="pt")
            with torch.no_grad():
                h = self.model(**x).last_hidden_state[0]                  # (T, d)
            out.append(SimpleNamespace(prompt_token_ids=x["input_ids"][0].tolist(),
                                       outputs=SimpleNamespace(data=h)))
        return out


def test_vllm_client_pools_the_side_tokens(exported, monkeypatch):
    """ReMatchVLLM.embed (render with the export's template, token_embed states, last-K
    mean, normalise) == ReMatch.embed, both sides; a prompt without the side's tokens
    raises."""
    import sys
    from types import ModuleType, SimpleNamespace

    from tools import vllm_embed
    _, path, model, processor, _ = exported
    fake = ModuleType("vllm")
    fake.__version__ = "0.33.0"                      # the release the client is written for
    fake.PoolingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    rm = vllm_embed.ReMatchVLLM(_FakeVLLM(path), path)
    inputs = [(t, im) if im is not None else t for t, im in INPUTS]
    for side, s in (("query", "q"), ("document", "d")):
        torch.testing.assert_close(rm.embed(inputs, side), reference_embeddings(model, processor, s),
                                   rtol=0, atol=1e-5)
    h = torch.randn(6, 4)
    with pytest.raises(ValueError, match="not the side's tokens"):
        vllm_embed.pool([1, 2, 3, 4, 5, 6], h, [5, 7])
    with pytest.raises(ValueError, match="per-token states"):
        vllm_embed.pool([1, 2, 3], h, [2, 3])


# ----------------------------------------------------------------------------------
# bench/serving.py and bench/vllm_parity.py

def test_bench_serving_matches_the_repository(tmp_path, demo_benchmark):
    """On a checkpoint trained a few steps on the demo's data: Hit@1 before and after
    reranking through SentenceTransformer + CrossEncoder == evaluate + tools/rerank.py,
    task by task (the bench's side-by-side columns)."""
    import train
    from bench import serving
    paths = demo_benchmark                  # make_synthetic(seed=0), the session's (conftest)
    train.main(["--train_data", paths["train"], "--image_dir", paths["image_dir"], "--model", "tiny-qwen2-vl",
                "--steps", "3", "--batch_size", "8", "--num_tokens", "4", "--lr", "1e-3", "--warmup_steps", "1",
                "--num_workers", "0", "--out_dir", str(tmp_path / "run"), "--log_every", "10"])
    rows, cost = serving.main(["--checkpoint", str(tmp_path / "run" / "checkpoint-3"), "--data",
                               paths["root"], "--tasks", "ShapesColour", "ShapesVQA", "--queries", "12",
                               "--reps", "1", "--timed_queries", "2"])
    for task, repo_before, st_before, repo_after, st_after in rows:
        assert (st_before, st_after) == (repo_before, repo_after), task
    assert cost["retrieve + rerank"] > 0 and cost["retrieve"] > 0


def test_bench_vllm_parity_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("with CUDA the script measures (bench/vllm_parity.py)")
    from bench import vllm_parity
    vllm_parity.main([])
    assert "nothing measured" in capsys.readouterr().out
