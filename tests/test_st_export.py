"""
The merged export in sentence-transformers (tools/export_merged.py, tools/export_code/):
SentenceTransformer(export, trust_remote_code=True) embeds, CrossEncoder(export,
trust_remote_code=True) reranks, from the same folder, offline.

Oracles: ReMatch.embed on the training checkpoint (L_q / L_d appended, mean of their last
states, L2-normalised) and the repository's matching pass (tools/rerank.matching_p_yes,
logit=True: the raw->raw view of slot 1 under the unified mask, model.match). On the three
tiny families (trained 2 steps with LoRA, K = 3) and a width-real Qwen2-VL-2B with Qwen's
real tokenizer (random weights, 2 decoder layers, K = 4). CPU, fp32.

    pytest tests/test_st_export.py
Needs the optional extra: pip install -r requirements-extra.txt
"""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KINDS, shape_image
from test_train import flags, write_train_fixture

st = pytest.importorskip("sentence_transformers")

D_IMG = "<|image_1|>\nRepresent the given image."
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


def reference_embeddings(model, processor, side):
    """ReMatch.embed of INPUTS on one side, one at a time: (N, d) normalised."""
    from data import collate_embed, encode_item
    from evaluate import format_input
    out = []
    for text, image in INPUTS:
        item = encode_item(processor, format_input(text, image is not None), image)
        batch = collate_embed([item], processor.tokenizer, model.num_tokens, model.embed_template)
        with torch.no_grad():
            E, _ = model.embed(batch, side)
        out.append(F.normalize(E[0], dim=-1))
    return torch.stack(out)


def reference_scores(model, processor, config):
    """The matching head's logit(Yes) - logit(No) for PAIRS, one row each (tools/rerank.py)."""
    from data import encode_item
    from evaluate import format_input
    from tools.rerank import match_prompt, matching_p_yes
    items = [encode_item(processor, format_input(t, im is not None), im) for t, im in INPUTS]
    E = torch.zeros(1, model.L_q.shape[-1])            # the raw view reads no embedding
    return torch.cat([matching_p_yes(model, processor, items[q], E[0], [items[d]], E, logit=True,
                                     prompt=match_prompt(config)) for q, d in PAIRS])


def check_embedder(path, model, processor, atol=1e-5):
    """encode_query / encode_document == ReMatch.embed for every input, in one batch of
    unequal lengths (right and left padded) and one at a time; plain encode == documents."""
    m = st.SentenceTransformer(path, trust_remote_code=True)
    inputs = [st_input(t, im) for t, im in INPUTS]
    tok = m[0].processor.tokenizer
    for side, encode in (("q", m.encode_query), ("d", m.encode_document)):
        ref = reference_embeddings(model, processor, side)
        for padding in ("right", "left"):
            tok.padding_side = padding
            got = encode(inputs, convert_to_tensor=True, batch_size=len(inputs))
            torch.testing.assert_close(got, ref, rtol=0, atol=atol, msg=lambda s, w=f"{side} {padding}": f"{w}: {s}")
        for n, x in enumerate(inputs):
            torch.testing.assert_close(encode([x], convert_to_tensor=True)[0], ref[n], rtol=0, atol=atol)
    torch.testing.assert_close(m.encode(inputs, convert_to_tensor=True),
                               m.encode_document(inputs, convert_to_tensor=True), rtol=0, atol=0)
    return m


def check_cross_encoder(path, model, processor, config, atol=1e-4):
    """CrossEncoder.predict == the matching head's Yes/No logit difference, one batch."""
    ce = st.CrossEncoder(path, trust_remote_code=True)
    pairs = [(st_input(*INPUTS[q]), st_input(*INPUTS[d])) for q, d in PAIRS]
    ref = reference_scores(model, processor, config)
    for padding in ("right", "left"):
        ce[0].processor.tokenizer.padding_side = padding
        got = ce.predict(pairs, convert_to_tensor=True, batch_size=len(pairs)).float()
        torch.testing.assert_close(got, ref, rtol=0, atol=atol, msg=lambda s, w=padding: f"{w}: {s}")
    return ce


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
    export_merged(ckpt, str(root / "export"))
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
    """Without trust_remote_code: sentence-transformers' own refusal. Prompts (a system
    message), two images, a mark without its image, an empty input: the template refuses."""
    _, path, *_ = exported
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        st.SentenceTransformer(path)
    m = st.SentenceTransformer(path, trust_remote_code=True)
    # the image-only processor of the folder, not the stock one (whose video half needs torchvision)
    assert type(m[0].processor).__name__ == "RematchProcessor"
    assert getattr(m[0].processor, "video_processor", None) is None
    with pytest.raises(Exception, match="system message"):
        m.encode_query(["a red circle"], prompt="Represent the query: ")
    with pytest.raises(Exception, match="one image per input"):
        m.encode_query([{"image": [BLUE, RED], "text": "two"}])
    with pytest.raises(Exception, match="1 time.s. for 0 image"):
        m.encode_query(["<|image_1|>\nno image"])
    with pytest.raises(Exception, match="empty input"):
        m.encode_document(["  "])
    with pytest.raises(Exception, match="Qwen vision token"):
        m.encode_document(["<|image_pad|>"])
    ce = st.CrossEncoder(path, trust_remote_code=True)
    with pytest.raises(ValueError, match="boundary occurs 2 times"):
        ce.predict([("a red </QUERY>\n<DOC>\n circle", "a blue square")])


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
def test_width_real_qwen2_vl_2b(tmp_path):
    """A ReMatch checkpoint over a width-real Qwen2-VL-2B (K = 4, the paper's chat
    template and matching prompt, random weights), exported: both classes equal the
    repository with Qwen's real tokenizer (tied embeddings: the L tokens' rows are the LM
    head's rows too)."""
    from model import ReMatch
    from tools import width_real
    from tools.export_merged import export_merged
    from util.backbone import load_backbone, save_rematch
    base = width_real.write_checkpoint("qwen2-vl-2b", tmp_path / "base", num_layers=2, vision_depth=1)
    backbone, processor = load_backbone(str(base), device="cpu", dtype=torch.float32)
    model = ReMatch(backbone, num_tokens=4, embed_template="chat").eval()
    config = {"model": str(base), "num_tokens": 4, "embed_template": "chat", "lora": False,
              "w_qdm": 1.0, "match_prompt": "paper", "dtype": "float32"}
    save_rematch(model, processor, str(tmp_path / "ckpt"), config)
    export_merged(str(tmp_path / "ckpt"), str(tmp_path / "export"))
    check_embedder(str(tmp_path / "export"), model, processor)
    check_cross_encoder(str(tmp_path / "export"), model, processor, config)


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

def test_bench_serving_matches_the_repository(tmp_path):
    """On a checkpoint trained a few steps on the demo's data: Hit@1 before and after
    reranking through SentenceTransformer + CrossEncoder == evaluate + tools/rerank.py,
    task by task (the bench's side-by-side columns)."""
    import train
    from bench import serving
    from demo import make_synthetic
    paths = make_synthetic(str(tmp_path / "data"), seed=0)
    train.main(["--train_data", paths["train"], "--image_dir", paths["image_dir"], "--model", "tiny-qwen2-vl",
                "--steps", "3", "--batch_size", "8", "--num_tokens", "4", "--lr", "1e-3", "--warmup_steps", "1",
                "--num_workers", "0", "--out_dir", str(tmp_path / "run"), "--log_every", "10"])
    rows, cost = serving.main(["--checkpoint", str(tmp_path / "run" / "checkpoint-3"), "--data",
                               str(tmp_path / "data"), "--tasks", "ShapesColour", "ShapesVQA", "--queries", "12",
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
