"""
Block-sparse unified attention (`--attn flex`): masks.unified_block_mask and
util.speed.set_attention / flex_attention_forward.

Oracles: the dense mask of masks.unified_mask_batch (itself checked against the rules in
tests/test_masks.py), lifted block by block from what the BlockMask says (an empty block
is all False, a full block all True, a partial block is mask_mod at every position); and
the dense SDPA pass (the default path) for the label logits and, on CUDA, the gradients.
torch has no FlexAttention backward on the CPU, so the gradient test runs only where
CUDA is present (it ran on an H100, see bench/RESULTS.md); CI checks the forward.

    pytest tests/test_flex.py
"""
import copy
import random
import sys

import pytest
import torch

import util.speed as model_module
from data import collate_match
from masks import (PAD, VIEW_SETS, answer_name, segments_used, unified_block_mask,
                   unified_mask_batch)
from model import ReMatch
from util.speed import flex_unavailable, set_attention
from test_matching import embeddings, instances

# on the CPU flex runs uncompiled on purpose (the reference forward), and torch warns so
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.proof]          # part of the two-minute proof (tests/conftest.py)


def lift(block_mask, L):
    """The position-level (B, L, L) mask a BlockMask stands for, block by block."""
    bs = block_mask.BLOCK_SIZE[0]
    B, _, n = block_mask.kv_num_blocks.shape
    out = torch.zeros(B, n * bs, n * bs, dtype=torch.bool)
    pos = torch.arange(n * bs)
    for b in range(B):
        for i in range(n):
            qi = pos[i * bs:(i + 1) * bs, None]                              # (bs, 1)
            for full, num, idx in ((False, block_mask.kv_num_blocks, block_mask.kv_indices),
                                   (True, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
                for j in idx[b, 0, i, :num[b, 0, i]].tolist():
                    kj = pos[None, j * bs:(j + 1) * bs]                      # (1, bs)
                    out[b, i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = (
                        True if full else block_mask.mask_mod(torch.tensor(b), 0, qi, kj))
    return out[:, :L, :L]


def random_rows(rng, views, n_rows=3):
    return [[(s, rng.randint(1, 40)) for s in segments_used(views)]
            + [(answer_name(i), rng.randint(1, 3)) for i in range(len(views))] for _ in range(n_rows)]


@pytest.mark.parametrize("view_set", sorted(VIEW_SETS))
@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_block_mask_stands_for_the_dense_unified_mask(view_set, block_size):
    rng = random.Random(block_size)
    for _ in range(4):
        rows = random_rows(rng, VIEW_SETS[view_set])                         # different lengths: pad
        dense = unified_mask_batch(rows, VIEW_SETS[view_set])                 # (B, L, L)
        bm = unified_block_mask(rows, VIEW_SETS[view_set], block_size=block_size)
        assert tuple(bm.shape) == (len(rows), 1, dense.shape[1], dense.shape[1])
        assert torch.equal(lift(bm, dense.shape[1]), dense)


def test_block_mask_skips_the_blocks_no_view_needs():
    """MMEB-like lengths (three 256-token images): the answers never look into the
    feature or other raw segments of other views, so most blocks are skipped."""
    views = VIEW_SETS["all"]
    lengths = {"P": 40, "Q": 290, "Zq": 5, "D1": 270, "Zd1": 5, "D2": 270, "Zd2": 5, "H": 5}
    rows = [[(s, lengths[s]) for s in segments_used(views)] + [(answer_name(i), 3) for i in range(8)]]
    bm = unified_block_mask(rows, views, block_size=64)
    dense = unified_mask_batch(rows, views)
    assert torch.equal(lift(bm, dense.shape[1]), dense)
    assert bm.kv_num_blocks.shape[-1] == 15                                   # L = 914 → 15 blocks of 64
    # by hand, blocks a row block i computes (P = block 0; Q 40-329 = blocks 0-5; D1 335-604 =
    # blocks 5-9; D2 610-879 = blocks 9-13; Zd2, H and the answers in blocks 13-14):
    #   i = 0..5 (P, Q: causal)         1+2+3+4+5+6 = 21
    #   i = 6, 7, 8 (D1: P and D1)      {0,5..i}       3+4+5 = 12
    #   i = 9 (D1, Zd1, D2)             {0,5..9}           = 6
    #   i = 10, 11, 12 (D2: P and D2)   {0,9..i}       3+4+5 = 12
    #   i = 13, 14 (the answers)        all earlier       14+15 = 29
    computed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert computed == 21 + 12 + 6 + 12 + 29 == 80                          # of 120 causal, 225 dense
    assert int(bm.full_kv_num_blocks.sum()) > 0                              # full blocks skip mask_mod


def test_pad_blocks_are_never_full():
    rows = [[("P", 20), ("Zq", 3), ("Zd1", 3), ("Zd2", 3), ("H", 3), ("A1", 2), ("A2", 2)],
            [("P", 20), ("Zq", 3), ("Zd1", 3), ("Zd2", 3), ("H", 3), ("A1", 2), ("A2", 2), (PAD, 0)]]
    rows[1][0] = ("P", 60)                                                    # row 0 gets 40 pad positions
    bm = unified_block_mask(rows, VIEW_SETS["feat"], block_size=8)
    dense = unified_mask_batch(rows, VIEW_SETS["feat"])
    assert torch.equal(lift(bm, dense.shape[1]), dense)


def _flex_spy(monkeypatch):
    """Count the decoder layers that ran through FlexAttention."""
    calls = []
    real = model_module._flex_kernel

    def spy(device):
        kernel = real(device)

        def run(*a, **k):
            calls.append(a[0].shape)
            return kernel(*a, **k)
        return run
    monkeypatch.setattr(model_module, "_flex_kernel", spy)
    return calls


@pytest.mark.parametrize("view_set", ["all", "feat", "raw"])
def test_flex_label_logits_equal_the_dense_pass(tiny, view_set, monkeypatch):
    _, backbone, processor = tiny
    rm = ReMatch(copy.deepcopy(backbone), num_tokens=4).eval()
    items = instances(processor)
    mb = collate_match(*items, processor.tokenizer, VIEW_SETS[view_set], random.Random(0))
    calls = _flex_spy(monkeypatch)
    with torch.no_grad():
        E = embeddings(rm, processor, items)
        dense, labels = rm.match(mb, *E)                                      # (M·V, vocab)
        set_attention(rm, "flex")
        flex, labels_flex = rm.match(mb, *E)
        E_flex = embeddings(rm, processor, items)                             # padding masks: SDPA
    assert len(calls) == backbone.config.text_config.num_hidden_layers       # every layer, once
    assert torch.equal(labels, labels_flex)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(E, E_flex):
        assert torch.equal(a, b)


def test_set_attention_switches_back_to_dense(tiny, monkeypatch):
    _, backbone, processor = tiny
    rm = ReMatch(copy.deepcopy(backbone), num_tokens=4).eval()
    calls = _flex_spy(monkeypatch)
    items = instances(processor)
    mb = collate_match(*items, processor.tokenizer, VIEW_SETS["feat"], random.Random(0))
    set_attention(rm, "flex")
    set_attention(rm, "sdpa")
    with torch.no_grad():
        rm.match(mb, *embeddings(rm, processor, items))
    assert calls == [] and rm.backbone.model.language_model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no FlexAttention backward on the CPU")
def test_flex_gradients_equal_the_dense_pass_on_cuda(tiny):
    _, backbone, processor = tiny
    dev = torch.device("cuda")
    items = instances(processor)
    mb = collate_match(*items, processor.tokenizer, VIEW_SETS["all"], random.Random(0))
    out = {}
    for attn in ("sdpa", "flex"):
        rm = ReMatch(copy.deepcopy(backbone), num_tokens=4).to(dev).train()
        set_attention(rm, attn, training=True)
        E = embeddings(rm, processor, items)
        logits, labels = rm.match(mb, *E)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads = {n: p.grad.detach().clone() for n, p in rm.named_parameters() if p.grad is not None}
        out[attn] = logits.detach(), grads
    (ld, gd), (lf, gf) = out["sdpa"], out["flex"]
    torch.testing.assert_close(lf, ld, rtol=1e-4, atol=1e-4)
    assert gd.keys() == gf.keys() and any("layers.0.self_attn.q_proj" in n for n in gd)
    for name in gd:
        torch.testing.assert_close(gf[name], gd[name], rtol=1e-3, atol=1e-5, msg=name)


# -- bad input: the flag and the fallback are named ---------------------------------

def test_flex_on_cpu_training_names_the_flag_and_the_fallback(tiny):
    why = flex_unavailable(torch.device("cpu"), training=True)
    assert "--attn flex" in why and "--attn sdpa" in why and "backward" in why
    assert flex_unavailable(torch.device("cpu"), training=False) is None
    _, backbone, _ = tiny
    with pytest.raises(RuntimeError, match="--attn sdpa"):
        set_attention(ReMatch(copy.deepcopy(backbone), num_tokens=4), "flex", training=True)


def test_torch_without_flex_attention_names_the_flag(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)     # import fails
    why = flex_unavailable(torch.device("cuda"), training=True)
    assert "--attn flex" in why and "no FlexAttention" in why and "--attn sdpa" in why


def test_unknown_attention_and_mismatched_block_mask(tiny):
    _, backbone, _ = tiny
    rm = ReMatch(copy.deepcopy(backbone), num_tokens=4)
    with pytest.raises(ValueError, match="--attn 'dense'"):
        set_attention(rm, "dense")
    bm = unified_block_mask([[("P", 4), ("Zq", 2), ("Zd1", 2), ("Zd2", 2), ("H", 2), ("A1", 1), ("A2", 1)]],
                            VIEW_SETS["feat"])
    q = torch.randn(1, 4, 10, 8)                                              # 10 ≠ 14 positions
    with pytest.raises(ValueError, match="--attn flex: a block mask for"):
        model_module.flex_attention_forward(None, q, q, q, bm)


def test_train_refuses_flex_on_cpu_at_parse_time(capsys, monkeypatch):
    import train
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train.parse_args(["--attn", "flex"])
    err = capsys.readouterr().err
    assert "--attn flex" in err and "--attn sdpa" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--attn", "dense"])
    assert "--attn" in capsys.readouterr().err
