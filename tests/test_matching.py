"""
The unified multi-view matching pass (§3.2.3, Fig. 3, docs/readings.md §3), made checkable.

The paper's efficiency claim: one forward with the unified mask gives every view the
answer it would get from its own pass. Oracle: for each instance and view, a separate
decoder pass over only [P, query view, document view, H, A_v] with the same position
ids and a mask written out here from the rules of readings §3 (not from masks.py).

    pytest tests/test_matching.py
"""
import copy
import random

import pytest
import torch

from conftest import shape_image
from data import collate_embed, collate_match, encode_item
from masks import VIEW_SETS, additive_mask
from model import ReMatch
from util.backbone import answer_token_ids

pytestmark = pytest.mark.proof          # part of the two-minute proof (tests/conftest.py)

QUERIES = ["<|image_1|>\nRepresent the given image with the following question: What colour is the circle?",
           "<|image_1|>\nRepresent the given image for classification"]
DOCS = ["<|image_1|>\nRepresent the given image.", "<|image_1|>\nRepresent the given image."]


def instances(processor):
    """Two (q, d⁺, d⁻) instances with images in the query and in both documents."""
    q = [encode_item(processor, QUERIES[0], shape_image("red")),
         encode_item(processor, QUERIES[1], shape_image("blue", (84, 56), "square"))]
    pos = [encode_item(processor, DOCS[0], shape_image("red", 84)),
           encode_item(processor, DOCS[1], shape_image("blue", (56, 112), "square"))]
    neg = [encode_item(processor, DOCS[0], shape_image("green", 84)),
           encode_item(processor, DOCS[1], shape_image("yellow", 56))]
    return q, pos, neg


def embeddings(rm, processor, items):
    return [rm.embed(collate_embed(side, processor.tokenizer, rm.num_tokens), s)[0]
            for side, s in zip(items, ("q", "d", "d"))]


def oracle_sub_mask(names):
    """Readings §3 for a sub-sequence [P, q-view, d-view, H, A]: causal, and a row sees P,
    its own segment, and (answer rows only) everything before it."""
    L = len(names)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(i + 1):
            allowed[i, j] = names[j] == "P" or names[j] == names[i] or names[i] == "A"
    return allowed


def deepstack_per_token(rm, mb):
    """Qwen3-VL's DeepStack features laid out per token (M, L, S, d): each image's features
    at its <|image_pad|> positions, zeros elsewhere (S = 0 on Qwen2/2.5-VL)."""
    images = rm.image_features(mb["pixel_values"], mb["image_grid_thw"])      # (n_i, 1 + S, d) each
    ids = mb["input_ids"]
    if not images:                                        # feat views only: no raw image in the rows
        return torch.zeros(*ids.shape, 0, 1)
    S, d = images[0].shape[1] - 1, images[0].shape[2]
    D = torch.zeros(*ids.shape, S, d)
    D[ids == rm.backbone.config.image_token_id] = torch.cat(images)[:, 1:]   # row-major token order
    return D


def separate_pass_logits(rm, x, pos, segments, label_idx, views, row, mb=None, D=None):
    """Label logits of every view of one row, each from its own decoder pass (with the
    DeepStack features of the images the view's segments hold, when D is given)."""
    start, offsets = 0, {}
    for name, n in segments[row]:
        offsets[name] = (start, n)
        start += n
    out = []
    for v, (qs, ds) in enumerate(views):
        keep, names = [], []
        for name, tag in (("P", "P"), (qs, "q"), (ds, "d"), ("H", "H"), (f"A{v + 1}", "A")):
            s, n = offsets[name]
            keep += range(s, s + n)
            names += [tag] * n
        keep = torch.tensor(keep)
        mask = additive_mask(oracle_sub_mask(names), x.dtype)                 # (1, 1, l, l)
        deepstack = {}
        if D is not None and D.shape[2]:
            is_img = mb["input_ids"][row, keep] == rm.backbone.config.image_token_id  # (l,)
            deepstack = {"visual_pos_masks": is_img[None],
                         "deepstack_visual_embeds": list(D[row, keep][is_img].unbind(1))}
        h = rm.last_hidden(x[row, keep][None], mask, pos[:, row, keep][:, None], **deepstack)  # (1, l, d)
        at = (keep == label_idx[row, v]).nonzero().item()
        out.append(rm.backbone.lm_head(h[0, at]))
    return torch.stack(out)                                                   # (V, vocab)


@pytest.mark.parametrize("view_set", ["all", "feat", "raw2feat"])
def test_unified_pass_equals_one_pass_per_view(tiny, view_set):
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=4)
    views = VIEW_SETS[view_set]
    q, pos_items, neg_items = instances(processor)
    mb = collate_match(q, pos_items, neg_items, processor.tokenizer, views, random.Random(1))
    assert sorted(mb["pos_slot"].tolist()) == [1, 2]          # both placements exercised
    with torch.no_grad():
        E_q, E_pos, E_neg = embeddings(rm, processor, (q, pos_items, neg_items))
        logits, labels = rm.match(mb, E_q, E_pos, E_neg)                      # (M·V, vocab)
        x, _, pos = rm.match_inputs(mb, E_q, E_pos, E_neg)
        D = deepstack_per_token(rm, mb)                                       # Qwen3-VL: S = 2
        for row in range(len(q)):
            ref = separate_pass_logits(rm, x, pos, mb["segments"], mb["label_idx"], views, row, mb, D)
            V = len(views)
            torch.testing.assert_close(logits[row * V:(row + 1) * V], ref, atol=1e-5, rtol=0)
    assert logits.shape == (len(q) * len(views), len(processor.tokenizer))


def test_unified_pass_keeps_deepstack_and_dropping_it_is_caught(monkeypatch):
    """Qwen3-VL: the unified pass adds each raw image's DeepStack features at its positions,
    as one pass per view does; with DeepStack dropped (decoder_inputs → {}, the silent bug
    of code that builds inputs_embeds itself), the same comparison fails."""
    from util.backbone import load_backbone
    model, processor = load_backbone("tiny-qwen3-vl", device="cpu", seed=0)
    rm = ReMatch(model.eval(), num_tokens=4)
    views = VIEW_SETS["all"]
    q, pos_items, neg_items = instances(processor)
    mb = collate_match(q, pos_items, neg_items, processor.tokenizer, views, random.Random(1))
    with torch.no_grad():
        E_q, E_pos, E_neg = embeddings(rm, processor, (q, pos_items, neg_items))
        x, _, pos = rm.match_inputs(mb, E_q, E_pos, E_neg)
        D = deepstack_per_token(rm, mb)
        assert D.shape[2] == 2 and D.abs().sum() > 0
        ref = torch.cat([separate_pass_logits(rm, x, pos, mb["segments"], mb["label_idx"], views, r, mb, D)
                         for r in range(len(q))])
        torch.testing.assert_close(rm.match(mb, E_q, E_pos, E_neg)[0], ref, atol=1e-5, rtol=0)
        monkeypatch.setattr(ReMatch, "decoder_inputs", lambda self, ids, images, videos=(): {})
        dropped = rm.match(mb, E_q, E_pos, E_neg)[0]
    assert (dropped - ref).abs().max() > 1e-3


def test_feat_view_set_leaves_raw_segments_out(tiny):
    _, model, processor = tiny
    q, pos_items, neg_items = instances(processor)
    mb = collate_match(q, pos_items, neg_items, processor.tokenizer, VIEW_SETS["feat"],
                       random.Random(0))
    assert [n for n, _ in mb["segments"][0]] == ["P", "Zq", "Zd1", "Zd2", "H", "A1", "A2"]
    assert mb["pixel_values"] is None                          # no raw image in the sequence
    assert not (mb["input_ids"] == model.config.image_token_id).any()


def test_labels_follow_the_slot_of_the_positive(tiny):
    """Naive re-derivation: a view's label is Yes iff its document slot holds d⁺."""
    _, _, processor = tiny
    yes, no = answer_token_ids(processor.tokenizer)
    q, pos_items, neg_items = instances(processor)
    for seed in range(4):
        for name, views in VIEW_SETS.items():
            mb = collate_match(q, pos_items, neg_items, processor.tokenizer, views,
                               random.Random(seed))
            for row, slot in enumerate(mb["pos_slot"].tolist()):
                for v, (_, doc) in enumerate(views):
                    in_slot = 1 if doc in ("D1", "Zd1") else 2
                    expected = yes if in_slot == slot else no
                    assert mb["labels"][row, v] == expected
                    # the label token sits right after the label-predicting position
                    assert mb["input_ids"][row, mb["label_idx"][row, v] + 1] == expected


def test_slot_placement_is_seeded_and_balanced(tiny):
    _, _, processor = tiny
    q, pos_items, neg_items = instances(processor)
    n = 200
    slots = lambda seed: collate_match(q[:1] * n, pos_items[:1] * n, neg_items[:1] * n,
                                       processor.tokenizer, VIEW_SETS["feat"],
                                       random.Random(seed))["pos_slot"]
    a, b, c = slots(5), slots(5), slots(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 70 < int((a == 1).sum()) < 130


def test_perturbing_Zq_changes_no_raw_query_answer(tiny):
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=4)
    views = VIEW_SETS["all"]
    q, pos_items, neg_items = instances(processor)
    mb = collate_match(q, pos_items, neg_items, processor.tokenizer, views, random.Random(2))
    with torch.no_grad():
        E_q, E_pos, E_neg = embeddings(rm, processor, (q, pos_items, neg_items))
        a, _ = rm.match(mb, E_q, E_pos, E_neg)
        b, _ = rm.match(mb, E_q + 3.0 * torch.randn_like(E_q), E_pos, E_neg)
    raw_q = torch.tensor([qs == "Q" for qs, _ in views]).repeat(len(q))       # (M·V,)
    assert torch.equal(a[raw_q], b[raw_q])
    assert (a[~raw_q] - b[~raw_q]).abs().max() > 1e-4


def test_matching_gradients_reach_projector_and_learnable_tokens(tiny):
    _, model, processor = tiny
    rm = ReMatch(model, num_tokens=4)
    q, pos_items, neg_items = instances(processor)
    mb = collate_match(q, pos_items, neg_items, processor.tokenizer, VIEW_SETS["feat"],
                       random.Random(0))
    E_q, E_pos, E_neg = embeddings(rm, processor, (q, pos_items, neg_items))
    logits, labels = rm.match(mb, E_q, E_pos, E_neg)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for p in (rm.L_q, rm.L_d, *rm.projector.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    rm.zero_grad(set_to_none=True)


def test_forward_reuses_image_features_with_the_same_outputs_and_gradients(tiny):
    """ReMatch.forward runs the vision tower once per image: the matching rows' raw
    segments take the embedding passes' features (collate_match's image_src). Oracle:
    the same forward with the tower run again on the matching rows (reuse_images=False):
    equal logits, embeddings and gradients of every parameter (fp64). One negative is
    text-only, so the d batch's image rows are not its row numbers."""
    _, model, processor = tiny
    rm = ReMatch(copy.deepcopy(model), num_tokens=4).double()
    q, pos_items, neg_items = instances(processor)
    neg_items[0] = encode_item(processor, "a green circle")
    tok = processor.tokenizer
    qb, db = collate_embed(q, tok, 4), collate_embed(pos_items + neg_items, tok, 4)
    mb = collate_match(q, pos_items, neg_items, tok, VIEW_SETS["all"], [2, 1])
    assert mb["image_src"] == [("q", 0), ("pos", 0), ("q", 1), ("pos", 1), ("neg", 1)]
    grads, outs = [], []
    for reuse in (True, False):
        rm.zero_grad(set_to_none=True)
        out = rm(qb, db, mb, n_pos=2, reuse_images=reuse)
        (torch.nn.functional.cross_entropy(out["logits"], out["labels"])
         + out["E_q"].sum() + out["E_d"].square().sum()).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None})
    for k in ("logits", "E_q", "E_d"):
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=0, atol=1e-12)
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])
    for n in grads[0]:
        # the sum of two backward passes vs one: only rounding differs, and the vision
        # rotary embedding runs in fp32 even in an fp64 model (≈1e-8 relative here)
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6,
                                   atol=1e-6 * grads[1][n].abs().max().item(), msg=n)
