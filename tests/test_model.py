"""
Backbone loading, the tiny tokenizer, M-RoPE positions and the §3.2.1 embeddings.

    pytest tests/test_model.py
"""
import copy
import os

import pytest
import torch

from conftest import TINY_KINDS, shape_image
from data import EMBED_TEMPLATES, IMAGE_BLOCK, collate_embed, encode_item
from model import ReMatch, mrope_position_ids
from util.backbone import answer_token_ids, build_tiny_tokenizer, load_backbone, save_backbone

Q_IMG = "<|image_1|>\nRepresent the given image with the following question: What colour is the circle?"
D_IMG = "<|image_1|>\nRepresent the given image."


def mixed_items(processor):
    """Text-only and image items of different lengths and image sizes (4 and 16 tokens)."""
    return [encode_item(processor, Q_IMG, shape_image("red")),
            encode_item(processor, "a blue circle"),
            encode_item(processor, D_IMG, shape_image("green", (112, 84), "square")),
            encode_item(processor, "What colour is the star on the left? yellow"),
            encode_item(processor, D_IMG, shape_image("purple", 100))]


# ---------------------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_is_deterministic_and_encodes_any_text():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "héllo wörld 😀 <QUERY> 12345"
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text
    # the Qwen specials are single tokens and the chat template is kept
    for s in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert len(a(s, add_special_tokens=False)["input_ids"]) == 1
    assert "<|vision_start|><|image_pad|><|vision_end|>" in a.chat_template
    a.add_tokens(["<new>"])                              # each call's tokenizer is its own
    assert len(a) == len(b) + 1 and "<new>" not in build_tiny_tokenizer().get_vocab()


def test_answer_words_are_single_tokens_or_loading_fails():
    for kind in TINY_KINDS:
        _, processor = load_backbone(kind, device="cpu")
        yes, no = answer_token_ids(processor.tokenizer)
        assert yes != no
    bytes_only = build_tiny_tokenizer(vocab_size=256 + 14)     # no merges: "Yes" is 3 bytes
    with pytest.raises(ValueError, match="'Yes' is 3 tokens"):
        answer_token_ids(bytes_only)


def test_chat_embedding_template_is_the_qwen_chat_template(tiny):
    """Readings §1: our MVQDM++ prefix/suffix around the MMEB string give exactly what the
    tokenizer's own Qwen chat template writes for the system message, [image, text] and
    the generation prompt. Qwen2/2.5-VL's template adds that system message by itself;
    Qwen3-VL's adds none, so there our templates name it (the recipe stays the same)."""
    name, _, processor = tiny
    prefix, suffix = EMBED_TEMPLATES["chat"]
    text = "\nRepresent the given image."
    ours = prefix + IMAGE_BLOCK + text + suffix
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    system = {"role": "system", "content": "You are a helpful assistant."}
    render = lambda msgs: processor.tokenizer.apply_chat_template(msgs, tokenize=False,  # noqa: E731
                                                                 add_generation_prompt=True)
    assert ours == render([system, user])
    assert (ours == render([user])) == (not name.startswith("tiny-qwen3"))


# ---------------------------------------------------------------------------- loading

def test_tiny_build_is_deterministic_for_a_seed():
    for kind in TINY_KINDS:
        a, _ = load_backbone(kind, device="cpu", seed=3)
        b, _ = load_backbone(kind, device="cpu", seed=3)
        c, _ = load_backbone(kind, device="cpu", seed=4)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_back_gives_identical_outputs(tiny, tmp_path):
    kind, model, processor = tiny
    items = mixed_items(processor)
    batch = collate_embed(items, processor.tokenizer, 4)
    E0, _ = ReMatch(model, num_tokens=4).embed(batch, "q")

    save_backbone(model, processor, tmp_path)
    model2, processor2 = load_backbone(str(tmp_path), device="cpu")
    assert type(model2) is type(model)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert processor2.image_processor.size == processor.image_processor.size
    items2 = mixed_items(processor2)
    assert all(a["ids"] == b["ids"] for a, b in zip(items, items2))
    E1, _ = ReMatch(model2.eval(), num_tokens=4).embed(
        collate_embed(items2, processor2.tokenizer, 4), "q")
    assert torch.equal(E0, E1)


def test_a_loaded_checkpoint_holds_its_saved_tokens_without_reading_the_table(tmp_path, monkeypatch):
    """load_rematch builds the model with init_tokens=False and copies the saved L_q, L_d in
    (each its own, as saved): the pass over the embedding table (152k rows at real width) is
    never made; nor for K = 0 (last-token pooling uses no token). A fresh K > 0 model makes it."""
    import model as M
    from util.backbone import save_rematch
    backbone, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    saved = ReMatch(backbone, num_tokens=4, seed=3)
    save_rematch(saved, processor, str(tmp_path / "ckpt"),
                 {"model": "tiny-qwen2-vl", "num_tokens": 4, "embed_template": "chat", "lora": False})

    def no_pass(*a, **k):
        raise AssertionError("embedding_stats was called")
    monkeypatch.setattr(M, "embedding_stats", no_pass)
    loaded = M.load_rematch(str(tmp_path / "ckpt"), device="cpu")[0]
    assert torch.equal(loaded.L_q, saved.L_q) and torch.equal(loaded.L_d, saved.L_d)
    assert not torch.equal(loaded.L_q, loaded.L_d)
    assert M.ReMatch(backbone, num_tokens=0).L_q.abs().sum() == 0
    with pytest.raises(AssertionError, match="embedding_stats"):
        M.ReMatch(backbone, num_tokens=4)


def test_unknown_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        load_backbone(str(tmp_path), device="cpu")


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_hybrid_linear_attention_checkpoints_are_refused_with_the_reason(tmp_path, model_type):
    """Qwen3-Next / Qwen3.5 mix Gated DeltaNet (linear-attention) layers into the decoder:
    the unified matching mask cannot hold there, and the refusal says why, before any
    weight or tokenizer file is read (the directory holds only config.json)."""
    import transformers
    config = transformers.CONFIG_MAPPING[model_type]()
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{model_type}.*linear_attention.*unified matching"):
        load_backbone(str(tmp_path), device="cpu")


def test_a_decoder_with_recurrent_layer_types_is_refused_whatever_its_name():
    """refuse_hybrid reads layer_types, not only the model_type: a Qwen3-VL config whose
    decoder declares a linear-attention layer is refused too; plain attention passes."""
    from transformers import Qwen3VLConfig

    from util.backbone import refuse_hybrid
    cfg = Qwen3VLConfig()
    refuse_hybrid(cfg, "plain")                                          # no layer_types: fine
    cfg.text_config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        refuse_hybrid(cfg, "hybrid")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny backbone written in the hub layout (save_backbone)."""
    model, processor = load_backbone("tiny-qwen2-vl", device="cpu")
    path = tmp_path_factory.mktemp("saved_tiny")
    save_backbone(model, processor, path)
    return path


def copy_without(src, dst, drop=(), edit_config=None):
    import json
    import shutil
    shutil.copytree(src, dst)
    for f in drop:
        (dst / f).unlink()
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(edit_config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_bad_checkpoint_directories_are_named(saved_tiny, tmp_path, monkeypatch):
    import util.backbone as model_module
    with pytest.raises(FileNotFoundError, match="/abs/missing-dir: no such directory"):
        load_backbone("/abs/missing-dir", device="cpu")
    no_pre = copy_without(saved_tiny, tmp_path / "a", drop=["preprocessor_config.json"])
    with pytest.raises(FileNotFoundError, match=f"{no_pre}.*missing preprocessor_config.json"):
        load_backbone(no_pre, device="cpu")
    no_tok = copy_without(saved_tiny, tmp_path / "b", drop=["tokenizer.json"])
    with pytest.raises(FileNotFoundError, match=f"{no_tok}.*missing tokenizer.json"):
        load_backbone(no_tok, device="cpu")
    other_ids = copy_without(saved_tiny, tmp_path / "c", edit_config={"image_token_id": 7})
    with pytest.raises(ValueError, match=r"<\|image_pad\|>.*image_token_id is 7"):
        load_backbone(other_ids, device="cpu")
    monkeypatch.setattr(model_module, "ANSWER_WORDS", ("Yes indeed", "No"))   # a multi-token answer
    with pytest.raises(ValueError, match=f"{saved_tiny}: answer word 'Yes indeed' is [2-9] tokens"):
        load_backbone(str(saved_tiny), device="cpu")


def test_patch_embedding_as_matmul_equals_the_conv3d(tiny):
    """load_backbone runs the vision tower's patch Conv3d as one matmul: same output as
    the Conv3d itself (fp64), and gradients reach its weight."""
    _, model, _ = tiny
    pe = model.model.visual.patch_embed
    W = pe.proj.weight.detach().double()                                     # (E, C, t, p, p)
    x = torch.randn(5, W[0].numel(), dtype=torch.float64)
    conv = torch.nn.functional.conv3d(x.view(-1, *W.shape[1:]), W, stride=W.shape[2:]).flatten(1)
    with torch.no_grad():
        pe.proj.weight.data = pe.proj.weight.data.double()
        try:
            torch.testing.assert_close(pe(x), conv, rtol=1e-12, atol=1e-12)
        finally:
            pe.proj.weight.data = pe.proj.weight.data.float()
    pe(x.float()).sum().backward()
    assert pe.proj.weight.grad is not None and pe.proj.weight.grad.abs().sum() > 0
    pe.proj.weight.grad = None
    twin = copy.deepcopy(pe).double()                      # a copy computes with its own weight
    torch.testing.assert_close(twin(x), conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_attention_by_size_equals_the_per_image_loop(family, monkeypatch):
    """load_backbone binds vision_attention_by_size to every vision block: one attention
    call per distinct segment length instead of one per image. Outputs and all weight
    gradients equal transformers' own forward (fp64), for images of mixed and repeated
    sizes out of order, and for Qwen2.5-VL's windowed block (block 0: windows of 4×4
    patches cut the larger images) as well as its full block. Qwen3-VL: the DeepStack
    features of both blocks are part of the output (and of the loss)."""
    from transformers import (Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig)
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    import util.speed as model_py
    patch = 16 if family == "qwen3_vl" else 14
    if family == "qwen2_vl":
        cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls = Qwen2VisionTransformerPretrainedModel
    elif family == "qwen3_vl":
        cfg = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                  out_hidden_size=64, num_position_embeddings=256,
                                  deepstack_visual_indexes=[0, 1], patch_size=16,
                                  spatial_merge_size=2, temporal_patch_size=2)
        cls = Qwen3VLVisionModel
    else:
        cfg = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                     out_hidden_size=64, window_size=56, fullatt_block_indexes=[1],
                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls = Qwen2_5_VisionTransformerPretrainedModel
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ref = cls._from_config(cfg).double()
    by_size = copy.deepcopy(ref)
    for block in by_size.blocks:
        model_py.vision_attention_by_size(block.attn)
    grid = torch.tensor([[1, 4, 4], [1, 8, 4], [1, 4, 4], [1, 8, 8], [1, 4, 8], [1, 8, 4]])
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * patch * patch, dtype=torch.float64)
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(tuple(q.shape)) or real_sdpa(q, *a, **k))
    outs = []
    for tower in (ref, by_size):
        calls.clear()
        res = tower(x, grid_thw=grid)
        out = torch.cat([res.pooler_output, *(getattr(res, "deepstack_features", None) or [])])  # (n merged·(1+S), d)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in tower.named_parameters()}, list(calls)))
    (o_ref, g_ref, c_ref), (o, g, c) = outs
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-9, atol=1e-10, msg=name)
    windowed = family == "qwen2_5_vl"
    lengths = {16} if windowed else {16, 32, 64}                             # 2.5 block 0: 4×4 windows
    full = {16, 32, 64}
    assert len(c) == (len(lengths) + len(full) if windowed else 2 * len(lengths))
    assert len(c_ref) > len(c)                                                # one per image / window


def test_vision_position_ids_once_per_size_equal_the_per_image_loop(tiny, monkeypatch):
    """vision_position_ids computes transformers' per-image ids once per distinct (t, h, w):
    a hand-worked grid (block-major over 2×2 merge blocks), then the library's own loop on
    mixed, repeated and out-of-order grids (t = 2 included), then ReMatch.image_features
    (which hands the ids to the tower) against the tower computing them itself, also
    with the fallback for a transformers without precomputed ids."""
    from transformers.vision_utils import get_vision_position_ids

    from util.speed import vision_position_ids
    # one image of 2×4 patches: blocks (rows 0-1, cols 0-1) then (rows 0-1, cols 2-3)
    hand = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]])
    assert torch.equal(vision_position_ids(torch.tensor([[1, 2, 4]]), 2), hand)
    grid = torch.tensor([[1, 4, 4], [2, 8, 4], [1, 4, 4], [1, 2, 4], [2, 8, 4], [1, 4, 8]])
    assert torch.equal(vision_position_ids(grid, 2), get_vision_position_ids(grid, 2))
    assert torch.equal(vision_position_ids(grid[3:4], 2), hand)

    name, backbone, processor = tiny
    items = mixed_items(processor)
    batch = collate_embed(items + items[::-1], processor.tokenizer, 4)        # sizes repeat
    model = ReMatch(backbone, num_tokens=4)
    ours = model.image_features(batch["pixel_values"], batch["image_grid_thw"])
    out = backbone.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                            return_dict=True)
    levels = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]  # Qwen3-VL: + S
    monkeypatch.setattr("util.speed.get_vision_position_ids", None)                # older transformers
    fallback = model.image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert len(ours) == len(fallback) == 6 and all(len(level) == 6 for level in levels)
    S = len(getattr(backbone.config.vision_config, "deepstack_visual_indexes", ()))
    assert len(levels) == 1 + S and (S == 2) == name.startswith("tiny-qwen3")
    for i, (a, c) in enumerate(zip(ours, fallback)):
        assert a.shape == (levels[0][i].shape[0], 1 + S, levels[0][i].shape[1])   # (n_i, 1 + S, d)
        for s, level in enumerate(levels):               # slot 0 merged, slots 1.. DeepStack
            assert torch.equal(a[:, s], level[i]) and torch.equal(c[:, s], level[i])


def test_vision_window_index_once_per_size_equals_the_per_image_loop(tiny):
    """vision_window_index (Qwen2.5-VL's window order and window lengths) computes
    transformers' per-image loop once per distinct (t, h, w): a hand-worked case, the
    library's loop on mixed, repeated and out-of-order grids (t = 2, sizes a multiple of
    the window and not, an image smaller than one window), and the tiny Qwen2.5-VL
    tower's features, which receive these indices from ReMatch.image_features, against
    the tower computing them itself (test above)."""
    from transformers.vision_utils import get_vision_window_index

    from util.speed import vision_indices, vision_window_index
    kw = dict(merge=2, window_size=112, patch_size=14)                         # 4×4 merged tokens
    # image 0: 2×2 merged tokens, one window of 4·4 patches; image 1: 2×6 merged tokens,
    # windows of 2×4 and 2×2 tokens (row-major inside each), shifted by image 0's 4 tokens
    index, cu = vision_window_index(torch.tensor([[1, 4, 4], [1, 4, 12]]), **kw)
    assert index.tolist() == [0, 1, 2, 3] + [4 + i for i in (0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11)]
    assert cu.tolist() == [0, 16, 48, 64] and cu.dtype == torch.int32
    grid = torch.tensor([[1, 4, 4], [2, 16, 8], [1, 4, 4], [1, 12, 20], [2, 16, 8], [1, 8, 8]])
    ref_index, ref_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112,
                                                patch_size=14)
    index, cu = vision_window_index(grid, **kw)
    assert torch.equal(index, ref_index) and torch.equal(cu, ref_cu) and cu.dtype == ref_cu.dtype
    name, backbone, _ = tiny
    if name == "tiny-qwen2.5-vl":                                              # windowed tower
        indices = vision_indices(backbone.config.vision_config, grid)
        assert torch.equal(indices["window_index"], ref_index)
    else:                                                                      # no windows
        assert "window_index" not in vision_indices(backbone.config.vision_config, grid)


def test_bench_vision_indices_checks_equality_and_prints_its_table(capsys):
    """bench/vision_indices.py runs (a small grid), prints one row per index, and names
    the flag of a size the patch grid cannot take."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "vision_indices.py")
    spec = importlib.util.spec_from_file_location("bench_vision_indices", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--queries", "3", "--sizes", "56", "112", "--reps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "images=9" in out and "| position ids |" in out and "| window index |" in out
    with pytest.raises(SystemExit, match="--sizes \\[30\\]"):
        bench.main(["--sizes", "30"])


# ---------------------------------------------------------------------------- positions

@pytest.mark.proof
def test_mrope_positions_equal_the_backbone_get_rope_index(tiny):
    """Oracle: the backbone's own get_rope_index on an ordinary (right-padded) batch."""
    _, model, processor = tiny
    batch = collate_embed(mixed_items(processor), processor.tokenizer, 4)
    ids, am, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    ours = mrope_position_ids(ids, am, grid, model.config.image_token_id,
                              model.config.vision_config.spatial_merge_size)
    mm_token_type_ids = (ids == model.config.image_token_id).long()
    theirs, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=mm_token_type_ids,
                                           image_grid_thw=grid, attention_mask=am)
    real = am.bool()
    assert torch.equal(ours[:, real], theirs[:, real])


def naive_mrope(input_ids, attention_mask, image_grid_thw, image_token_id, merge):
    """Token-by-token oracle of the M-RoPE rule (Qwen2-VL §2.1): a text token takes
    (p, p, p) and advances p by 1; an image of merged grid (gt, h, w) takes p + (frame,
    row, col) for its gt·h·w tokens, then p advances by max(h, w); padding stays 0."""
    N, T = input_ids.shape
    out = torch.zeros(3, N, T, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for n in range(N):
        p, left = 0, []                                    # left: (t, r, c) still to place
        for t in range(T):
            if not attention_mask[n, t]:
                continue
            if input_ids[n, t] != image_token_id:
                out[:, n, t] = p
                p += 1
                continue
            if not left:
                gt, gh, gw = next(grids)
                h, w = gh // merge, gw // merge
                left = [(f, r, c) for f in range(gt) for r in range(h) for c in range(w)]
                start, adv = p, max(h, w)
            f, r, c = left.pop(0)
            out[:, n, t] = torch.tensor([start + f, start + r, start + c])
            if not left:
                p = start + adv
    return out


@pytest.mark.proof
def test_mrope_positions_equal_a_naive_loop_on_hard_layouts():
    """Left padding, two images in a row (one right after the other), frames > 1 and a
    text-only row, against the token-by-token oracle."""
    img, merge = 9, 2
    ids = torch.tensor([[0, 0, 5] + [9] * 12 + [6, 7],                     # left-padded; 3 images back to back
                        [5, 9, 9, 9, 6, 9, 9, 9, 9, 7, 7, 7, 0, 0, 0, 0, 0],  # 2 images, text between
                        [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 0, 0, 0, 0]])  # text only
    am = (ids != 0).long()
    grid = torch.tensor([[1, 4, 4],       # row 0: 2×2 = 4 tokens,
                         [2, 2, 4],       #        2 frames of 1×2 = 4 tokens,
                         [1, 4, 4],       #        2×2 = 4 tokens
                         [1, 2, 6],       # row 1: 1×3 = 3 tokens,
                         [1, 4, 4]])      #        2×2 = 4 tokens
    ours = mrope_position_ids(ids, am, grid, img, merge)
    torch.testing.assert_close(ours, naive_mrope(ids, am, grid, img, merge), rtol=0, atol=0)
    with pytest.raises(ValueError, match="image tokens but image_grid_thw"):
        mrope_position_ids(ids, am, grid[:4], img, merge)


# ---------------------------------------------------------------------------- embeddings

@pytest.mark.proof
@pytest.mark.parametrize("num_tokens,template", [(4, "chat"), (0, "chat"), (3, "plain")])
def test_embedding_does_not_depend_on_the_batch(tiny, num_tokens, template):
    """An item's embedding alone == inside a padded mixed batch (text-only + images)."""
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=num_tokens, embed_template=template)
    items = mixed_items(processor)
    E, e = rm.embed(collate_embed(items, processor.tokenizer, num_tokens, template), "d")
    assert E.shape == (len(items), 64) and e.shape == (len(items), max(num_tokens, 1), 64)
    for n, item in enumerate(items):
        E1, e1 = rm.embed(collate_embed([item], processor.tokenizer, num_tokens, template), "d")
        torch.testing.assert_close(E1[0], E[n], atol=1e-5, rtol=0)
        torch.testing.assert_close(e1[0], e[n], atol=1e-5, rtol=0)


@pytest.mark.proof
def test_last_token_pooling_equals_the_plain_hf_forward(tiny):
    """K = 0: E is the last real token's last-layer state of the backbone's own forward
    on the processor's output (independent of our embedding/position code)."""
    _, model, processor = tiny
    prefix, suffix = EMBED_TEMPLATES["chat"]
    text = prefix + IMAGE_BLOCK + "\nRepresent the given image." + suffix
    out = processor(text=[text], images=[shape_image("blue", (84, 56))], return_tensors="pt")
    with torch.no_grad():
        ref = model(**out, output_hidden_states=True, use_cache=False).hidden_states[-1][0, -1]
        item = encode_item(processor, D_IMG, shape_image("blue", (84, 56)))
        E, _ = ReMatch(model, num_tokens=0).embed(collate_embed([item], processor.tokenizer, 0), "d")
    torch.testing.assert_close(E[0], ref, atol=1e-5, rtol=0)


@pytest.mark.proof
def test_deepstack_is_kept_in_the_embedding_pass(monkeypatch):
    """Qwen3-VL: the embedding pass (inputs_embeds built by ReMatch, the decoder called
    directly) equals the backbone's own forward at every position of a padded batch with
    images, which adds the DeepStack features itself; dropping them (decoder_inputs → {})
    is caught."""
    model, processor = load_backbone("tiny-qwen3-vl", device="cpu", seed=0)
    model.eval()
    rm = ReMatch(model, num_tokens=0)
    prefix, suffix = EMBED_TEMPLATES["chat"]
    texts = [prefix + IMAGE_BLOCK + "\nRepresent the given image." + suffix,
             prefix + "a red circle" + suffix,
             prefix + "What is left? " + IMAGE_BLOCK + suffix]
    out = processor(text=texts, images=[shape_image("blue", (84, 56)), shape_image("red", 112, "square")],
                    padding=True, return_tensors="pt")
    ids, am, grid = out["input_ids"], out["attention_mask"], out["image_grid_thw"]
    assert processor.tokenizer.padding_side == "right"
    with torch.no_grad():
        ref = model.model(**out, use_cache=False).last_hidden_state               # (3, T, d)
        images = rm.image_features(out["pixel_values"], grid)
        assert [im.shape[1] for im in images] == [3, 3]                            # merged + 2 levels
        h = rm.last_hidden(rm.input_embeds(ids, images=images), am, rm.positions(ids, am, grid),
                           **rm.decoder_inputs(ids, images))                       # (3, T, d)
        real = am.bool()
        torch.testing.assert_close(h[real], ref[real], atol=1e-5, rtol=0)
        item = encode_item(processor, D_IMG, shape_image("blue", (84, 56)))
        E, _ = rm.embed(collate_embed([item], processor.tokenizer, 0), "d")
        torch.testing.assert_close(E[0], ref[0, int(am[0].sum()) - 1], atol=1e-5, rtol=0)
        monkeypatch.setattr(ReMatch, "decoder_inputs", lambda self, ids, images, videos=(): {})
        E_dropped, _ = rm.embed(collate_embed([item], processor.tokenizer, 0), "d")
    assert (E_dropped[0] - ref[0, int(am[0].sum()) - 1]).abs().max() > 1e-3


@pytest.mark.proof
def test_learnable_token_states_differ_and_receive_gradients(tiny):
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=4)
    batch = collate_embed(mixed_items(processor)[:2], processor.tokenizer, 4)
    E, e = rm.embed(batch, "q")
    for i in range(4):
        for j in range(i + 1, 4):
            assert (e[:, i] - e[:, j]).abs().max() > 1e-3
    E.square().sum().backward()
    assert rm.L_q.grad is not None and rm.L_q.grad.abs().sum() > 0
    assert rm.L_d.grad is None                         # the query side does not use L_d
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.proof
def test_query_and_document_tokens_are_separate(tiny):
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=2)
    batch = collate_embed(mixed_items(processor)[:1], processor.tokenizer, 2)
    with torch.no_grad():
        assert not torch.allclose(rm.embed(batch, "q")[0], rm.embed(batch, "d")[0])


# ---------------------------------------------------------------------------- bad input


@pytest.mark.proof
def test_embedding_stats_chunked_equals_full_table():
    from model import embedding_stats
    W = torch.randn(1000, 24) * 0.02 + 0.01                      # 1000 rows, chunks of 64 (last short)
    mu, sd = embedding_stats(W, rows=64)
    assert torch.allclose(mu, W.double().mean(0), atol=1e-15, rtol=0)
    assert torch.allclose(sd, W.double().std(0), atol=1e-15, rtol=1e-12)
    assert mu.dtype == sd.dtype == torch.float64 and mu.device.type == "cpu"
