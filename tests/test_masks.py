"""Tests of the unified attention mask (masks.py, paper Fig. 3, docs/readings.md §3).

Run: python -m pytest -q tests/test_masks.py

The expected key sets are computed here by a naive loop over positions from the
rules of readings §3, independently of the lookup table in masks.py.
"""
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from masks import (PAD, SEGMENTS, VIEW_SETS, VIEWS, additive_mask, answer_name,
                   segments_used, unified_mask, unified_mask_batch)

pytestmark = pytest.mark.proof          # part of the two-minute proof (tests/conftest.py)

CONTENT = ("Q", "Zq", "D1", "Zd1", "D2", "Zd2")
SEEDS = range(6)


# ----------------------------------------------------------------------------- helpers

def random_layout(views, seed, shuffle=False):
    """Random segment lengths for a view set: 0-length P/H/answers/unused segments, a pad tail.

    shuffle=True also shuffles the segment order and puts a pad block mid-sequence.
    """
    g = random.Random(seed)
    segs = []
    for s in SEGMENTS:
        if s in segments_used(views):
            needed = any(s in view for view in views)  # an answer's view segment must be non-empty
            segs.append((s, g.randint(1 if needed else 0, 4)))
        elif g.random() < 0.5:
            segs.append((s, 0))  # a segment the view set does not use, listed with length 0
    segs += [(answer_name(i), g.randint(0, 3)) for i in range(len(views))]
    if shuffle:
        g.shuffle(segs)  # the rules go by name, not by order
        segs.insert(g.randint(0, len(segs) - 1), (PAD, 2))  # a pad block in the middle: keys after it
    return segs + [(PAD, g.randint(0, 3))]


def position_names(segs):
    """The segment name of every position."""
    return [name for name, n in segs for _ in range(n)]


def visible_segments(name, views):
    """Readings §3: the segments a row of segment `name` may attend to (pad: handled apart)."""
    if name == "P":
        return {"P"}
    if name.startswith("A"):
        q, d = views[int(name[1:]) - 1]
        return {"P", "H", q, d, name}
    return {"P", name}  # Q, Zq, D1, Zd1, D2, Zd2, H


def expected_keys(names, i, views):
    """Naive oracle: the key positions query position i may attend to."""
    if names[i] == PAD:
        return {i}
    visible = visible_segments(names[i], views)
    return {j for j in range(i + 1) if names[j] in visible}


def keys(mask, i):
    return set(mask[i].nonzero().flatten().tolist())


def layouts():
    """(view-set name, seed, shuffled) for every view set, several draws each."""
    return [(vs, seed, shuffle) for vs in VIEW_SETS for seed in SEEDS for shuffle in (False, True)]


LAYOUTS = pytest.mark.parametrize("view_set,seed,shuffle", layouts())


def build(view_set, seed, shuffle):
    views = VIEW_SETS[view_set]
    segs = random_layout(views, seed, shuffle)
    return views, segs, position_names(segs), unified_mask(segs, views)


def check_rows(mask, names, views, which):
    rows = [i for i, s in enumerate(names) if s in which]
    for i in rows:
        assert keys(mask, i) == expected_keys(names, i, views), f"row {i} ({names[i]})"
    return rows


def eager_attention(q, k, v, float_mask):
    """softmax(q k^T / sqrt(d) + mask) v, the way HF eager attention uses a float mask."""
    att = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, L)
    att = att + float_mask  # (B, 1, L, L) broadcasts over heads
    return att.softmax(dim=-1) @ v  # (B, H, L, hd)


def attend(q, k, v, mask):
    """Both paths: fused SDPA with the bool mask, eager with additive_mask."""
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, L, hd)
    eager = eager_attention(q, k, v, additive_mask(mask))  # (1, H, L, hd)
    return fused, eager


def qkv(L, seed=0, heads=2, hd=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, L, hd, generator=g) for _ in range(3)]  # 3 x (1, H, L, hd)


# ----------------------------------------------------------------------------- structure

@LAYOUTS
def test_causal(view_set, seed, shuffle):
    _, _, names, mask = build(view_set, seed, shuffle)
    assert mask.shape == (len(names), len(names)) and mask.dtype == torch.bool
    for i in range(len(names)):
        assert all(j <= i for j in keys(mask, i)), f"row {i} sees the future"


@LAYOUTS
def test_prompt_rows_see_only_prompt(view_set, seed, shuffle):
    views, _, names, mask = build(view_set, seed, shuffle)
    check_rows(mask, names, views, {"P"})


@LAYOUTS
def test_content_rows_see_prompt_and_themselves(view_set, seed, shuffle):
    views, _, names, mask = build(view_set, seed, shuffle)
    check_rows(mask, names, views, set(CONTENT))


@LAYOUTS
def test_header_rows_see_prompt_and_themselves(view_set, seed, shuffle):
    views, _, names, mask = build(view_set, seed, shuffle)
    check_rows(mask, names, views, {"H"})


@LAYOUTS
def test_answer_rows_see_exactly_their_view(view_set, seed, shuffle):
    views, _, names, mask = build(view_set, seed, shuffle)
    answers = {answer_name(i) for i in range(len(views))}
    check_rows(mask, names, views, answers)


@LAYOUTS
def test_pad_rows_see_only_themselves(view_set, seed, shuffle):
    views, _, names, mask = build(view_set, seed, shuffle)
    check_rows(mask, names, views, {PAD})


@LAYOUTS
def test_pad_is_never_a_key_of_real_tokens(view_set, seed, shuffle):
    _, _, names, mask = build(view_set, seed, shuffle)
    pad = torch.tensor([s == PAD for s in names], dtype=torch.bool)
    assert not mask[~pad][:, pad].any()


@LAYOUTS
def test_no_fully_masked_row(view_set, seed, shuffle):
    _, _, _, mask = build(view_set, seed, shuffle)
    assert mask.any(dim=-1).all()


def test_docstring_table_matches_mask():
    """The segment-level table drawn in masks.py's docstring is the real mask."""
    import masks
    segs = [(s, 1) for s in SEGMENTS] + [(answer_name(i), 1) for i in range(8)] + [(PAD, 1)]
    mask = unified_mask(segs)
    rows = [line.split() for line in masks.__doc__.splitlines()]
    rows = {r[0]: r[1:18] for r in rows if len(r) >= 18 and set(r[1:18]) <= {"x", ".", "d"}}
    for i, (name, _) in enumerate(segs):
        assert [c != "." for c in rows[name]] == mask[i].tolist(), name


# ----------------------------------------------------------------------------- view sets

def test_view_sets_and_segments_used():
    assert len(VIEWS) == 8 and VIEWS[0] == ("Q", "D1") and VIEWS[-1] == ("Zq", "Zd2")
    for name, views in VIEW_SETS.items():
        idx = [VIEWS.index(v) for v in views]
        assert idx == sorted(idx), name  # same relative order as VIEWS
    assert segments_used(VIEW_SETS["feat"]) == ("P", "Zq", "Zd1", "Zd2", "H")
    assert segments_used(VIEW_SETS["raw"]) == ("P", "Q", "D1", "D2", "H")
    assert segments_used(VIEWS) == SEGMENTS
    assert answer_name(0) == "A1" and answer_name(7) == "A8"


# ----------------------------------------------------------------------------- behaviour

@pytest.mark.parametrize("view_set", list(VIEW_SETS))
@pytest.mark.parametrize("seed", range(3))
def test_perturbing_a_segment_changes_only_rows_that_see_it(view_set, seed):
    views, segs, names, mask = build(view_set, seed, False)
    q, k, v = qkv(len(names), seed)
    base = attend(q, k, v, mask)
    torch.manual_seed(seed)  # the perturbations
    for x in sorted({s for s in names if s != PAD}):
        at_x = torch.tensor([s == x for s in names])  # (L,)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, at_x] += torch.randn_like(k2[:, :, at_x])
        v2[:, :, at_x] += torch.randn_like(v2[:, :, at_x])
        for out, out2 in zip(base, attend(q, k2, v2, mask)):
            for i in range(len(names)):
                sees_x = any(names[j] == x for j in expected_keys(names, i, views))
                diff = (out[..., i, :] - out2[..., i, :]).abs().max().item()
                if sees_x:
                    assert diff > 1e-4, f"row {i} ({names[i]}) should depend on {x}"
                else:
                    assert diff <= 1e-6, f"row {i} ({names[i]}) leaks from {x}"


def test_named_leak_examples():
    """Perturb Zq: raw-query answers unchanged. Perturb D1: answers of D2 views unchanged."""
    segs = [(s, 3) for s in SEGMENTS] + [(answer_name(i), 2) for i in range(8)]
    names = position_names(segs)
    mask = unified_mask(segs)
    q, k, v = qkv(len(names))
    fused, eager = attend(q, k, v, mask)
    torch.manual_seed(0)  # the perturbations
    rows = lambda views_: [i for i, s in enumerate(names) if s in
                           {answer_name(VIEWS.index(w)) for w in views_}]
    for x, unchanged, n_rows in (("Zq", [w for w in VIEWS if w[0] == "Q"], 8),    # 4 views x 2
                                 ("D1", [w for w in VIEWS if w[1] == "D2"], 4)):  # 2 views x 2
        at_x = torch.tensor([s == x for s in names])
        k2, v2 = k.clone(), v.clone()
        k2[:, :, at_x] = torch.randn_like(k2[:, :, at_x])
        v2[:, :, at_x] = torch.randn_like(v2[:, :, at_x])
        fused2, eager2 = attend(q, k2, v2, mask)
        r = rows(unchanged)
        assert len(r) == n_rows
        torch.testing.assert_close(fused2[..., r, :], fused[..., r, :], rtol=0, atol=1e-6)
        torch.testing.assert_close(eager2[..., r, :], eager[..., r, :], rtol=0, atol=1e-6)
        used = rows([w for w in VIEWS if x in w])  # answers whose view contains x do move
        assert (fused2[..., used, :] - fused[..., used, :]).abs().amax(dim=(0, 1, 3)).min() > 1e-4


@pytest.mark.parametrize("view_set", list(VIEW_SETS))
@pytest.mark.parametrize("seed", range(3))
def test_answer_rows_equal_a_separate_pass_over_their_view(view_set, seed):
    """Fig. 3's point: one unified pass = a pass over [P, q-view, d-view, H, A_v] per view."""
    views, segs, names, mask = build(view_set, seed, False)
    lengths = dict(segs)
    q, k, v = qkv(len(names), seed)
    full = attend(q, k, v, mask)
    for i, (vq, vd) in enumerate(views):
        a = answer_name(i)
        if lengths[a] == 0:
            continue
        parts = ["P", vq, vd, "H", a]
        sub = [j for j, s in enumerate(names) if s in parts]  # positions, in sequence order
        sub_mask = unified_mask([(s if s != a else "A1", lengths[s]) for s in parts], views=((vq, vd),))
        alone = attend(q[:, :, sub], k[:, :, sub], v[:, :, sub], sub_mask)
        rows_full = [j for j in sub if names[j] == a]
        rows_sub = [n for n, j in enumerate(sub) if names[j] == a]
        for out, out_alone in zip(full, alone):
            torch.testing.assert_close(out[..., rows_full, :], out_alone[..., rows_sub, :],
                                       rtol=0, atol=1e-6)


def test_fused_and_eager_paths_agree():
    _, _, names, mask = build("all", 1, False)
    fused, eager = attend(*qkv(len(names)), mask)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- additive mask

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask_values_and_shape(dtype):
    views, segs, names, mask = build("all", 2, False)
    add = additive_mask(mask, dtype)
    L = len(names)
    assert add.shape == (1, 1, L, L) and add.dtype == dtype
    assert (add[0, 0][mask] == 0).all()
    assert (add[0, 0][~mask] == torch.finfo(dtype).min).all()
    batch = unified_mask_batch([segs, segs[:3]], views)  # (2, L, L)
    add = additive_mask(batch, dtype)
    assert add.shape == (2, 1, L, L)
    assert ((add[:, 0] == 0) == batch).all()


def test_bool_mask_used_as_additive_float_leaks():
    """The pitfall: eager attention adds the mask, so a 0/1 mask hides nothing."""
    segs = [(s, 3) for s in SEGMENTS] + [(answer_name(i), 2) for i in range(8)]
    names = position_names(segs)
    mask = unified_mask(segs)
    q, k, v = qkv(len(names))
    right = eager_attention(q, k, v, additive_mask(mask))
    wrong = eager_attention(q, k, v, mask.float()[None, None])  # (1, 1, L, L) of 0/1
    assert (right - wrong).abs().max() > 1e-2
    # and it leaks: perturbing D1 now moves the answers of the (Q, D2) view
    at_d1 = torch.tensor([s == "D1" for s in names])
    v2 = v.clone()
    v2[:, :, at_d1] += 1.0
    a3 = [i for i, s in enumerate(names) if s == "A3"]  # view (Q, D2)
    wrong2 = eager_attention(q, k, v2, mask.float()[None, None])
    right2 = eager_attention(q, k, v2, additive_mask(mask))
    assert (wrong2[..., a3, :] - wrong[..., a3, :]).abs().max() > 1e-3
    assert (right2[..., a3, :] - right[..., a3, :]).abs().max() == 0


def test_additive_mask_rejects_non_bool():
    with pytest.raises(ValueError):
        additive_mask(torch.ones(3, 3))


# ----------------------------------------------------------------------------- batches

@pytest.mark.parametrize("name", sorted(VIEW_SETS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_pads_rows_to_the_longest(name, shuffle):
    """The batched build == unified_mask row by row (the oracle), pad tail included."""
    views = VIEW_SETS[name]
    rows = [random_layout(views, s, shuffle) for s in range(3)]
    totals = [sum(n for _, n in r) for r in rows]
    L = max(totals)
    batch = unified_mask_batch(rows, views)
    assert batch.shape == (3, L, L)
    for b, (row, t) in enumerate(zip(rows, totals)):
        assert torch.equal(batch[b, :t, :t], unified_mask(row, views))
        assert torch.equal(batch[b, t:, :], torch.eye(L, dtype=torch.bool)[t:])  # pad tail: diagonal
        assert not batch[b, :t, t:].any()  # never a key of earlier rows


# ----------------------------------------------------------------------------- bad inputs

FEAT = VIEW_SETS["feat"]
GOOD_FEAT = [("P", 2), ("Zq", 1), ("Zd1", 1), ("Zd2", 1), ("H", 2), ("A1", 2), ("A2", 2)]


@pytest.mark.parametrize("segs,views,offender", [
    ([("P", 2), ("X", 1)], VIEWS, "X"),                                  # unknown name
    ([("P", 2), ("Q", 1), ("Q", 1)], VIEWS, "Q"),                        # used twice
    (GOOD_FEAT + [("A3", 1)], FEAT, "A3"),                               # answer beyond the views
    ([s for s in GOOD_FEAT if s[0] != "Zd2"], FEAT, "Zd2"),              # view segment absent
    ([(s, 0 if s == "Zd1" else n) for s, n in GOOD_FEAT], FEAT, "Zd1"),  # view segment empty
    ([("P", -1)], VIEWS, "P"),                                           # negative length
    ([("A0", 1)], VIEWS, "A0"),                                          # answers count from A1
])
def test_bad_inputs_raise(segs, views, offender):
    with pytest.raises(ValueError, match=re.escape(repr(offender))):
        unified_mask(segs, views)


def test_good_inputs_pass_and_pad_may_repeat():
    unified_mask(GOOD_FEAT + [(PAD, 2), (PAD, 1)], FEAT)
    unified_mask([(s, n) for s, n in reversed(GOOD_FEAT)], FEAT)  # any order: rules go by name
