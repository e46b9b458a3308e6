"""
Padding-free embedding passes (train.py --pack, model.embed_packed): a pass's items in
one row under a block-diagonal causal mask, each with its own M-RoPE positions (and
Qwen3-VL's DeepStack features), the K token states gathered at their packed offsets.
Oracle: the padded pass (ReMatch.embed with SDPA), the default.

  - the packed row's BlockMask == its dense definition (same item, causal), for any lengths
    and block sizes, and it skips the blocks between items;
  - E and e of the packed pass == the padded pass (fp32, 1e-5) on all three tiny families,
    with images of several sizes, K = 4 and K = 0, both templates;
  - every gradient equal on CUDA (skipped on the CPU: torch has no FlexAttention backward
    there, as in tests/test_flex.py);
  - `--pack` where FlexAttention cannot run names the flag and the fallback.

    pytest tests/test_pack.py
"""
import copy
import random

import pytest
import torch

from data import collate_embed
from masks import packed_block_mask, packed_mask
from model import ReMatch
from test_flex import lift
from test_model import mixed_items
from util.speed import flex_unavailable, set_attention

pytestmark = pytest.mark.proof          # part of the two-minute proof (tests/conftest.py)


@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_packed_block_mask_is_the_block_diagonal_causal_mask(block_size):
    rng = random.Random(block_size)
    for _ in range(5):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 6))]
        T = sum(lengths)
        dense = packed_mask(lengths)                                          # (1, T, T)
        naive = torch.zeros(T, T, dtype=torch.bool)                           # by hand: item by item
        at = 0
        for n in lengths:
            naive[at:at + n, at:at + n] = torch.ones(n, n).tril().bool()
            at += n
        assert torch.equal(dense[0], naive)
        bm = packed_block_mask(lengths, block_size=block_size)
        assert tuple(bm.shape) == (1, 1, T, T)
        assert torch.equal(lift(bm, T), dense)
    with pytest.raises(ValueError, match="at least one token"):
        packed_block_mask([3, 0])


def test_packed_block_mask_skips_the_blocks_between_items():
    """Four items of 256 tokens, blocks of 128: per item its 2 diagonal blocks (partial)
    and the 1 below them (full) are visited, 12 of the 64; the blocks between items are
    skipped."""
    bm = packed_block_mask([256] * 4, block_size=128)
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert visited == 4 * 3                              # per item: 2 diagonal + 1 below, of 64 blocks


@pytest.mark.parametrize("num_tokens,template", [(4, "chat"), (0, "chat"), (3, "plain")])
def test_packed_embeddings_equal_the_padded_pass(tiny, num_tokens, template):
    name, backbone, processor = tiny
    rm = ReMatch(backbone, num_tokens=num_tokens, embed_template=template).eval()
    batch = collate_embed(mixed_items(processor), processor.tokenizer, num_tokens, template)
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()   # padding there
    with torch.no_grad():
        E, e = rm.embed(batch, "q")
        set_attention(rm, "sdpa", pack=True)
        try:
            calls = []
            lh = rm.last_hidden
            rm.last_hidden = lambda x, *a, **k: calls.append(tuple(x.shape)) or lh(x, *a, **k)
            E_p, e_p = rm.embed(batch, "q")
        finally:
            del rm.last_hidden
            set_attention(rm, "sdpa")
    assert calls == [(1, int(batch["attention_mask"].sum()), backbone.config.text_config.hidden_size)]
    torch.testing.assert_close(E_p, E, atol=1e-5, rtol=0)
    torch.testing.assert_close(e_p, e, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no FlexAttention backward on the CPU")
def test_packed_gradients_equal_the_padded_pass_on_cuda(tiny):
    _, backbone, processor = tiny
    dev = torch.device("cuda")
    batch = collate_embed(mixed_items(processor), processor.tokenizer, 4)
    out = {}
    for pack in (False, True):
        rm = ReMatch(copy.deepcopy(backbone), num_tokens=4).to(dev).train()
        set_attention(rm, "sdpa", training=True, pack=pack)
        E, e = rm.embed(batch, "q")
        (E.square().sum() + e[:, 0].sum()).backward()
        out[pack] = E.detach(), {n: p.grad.detach().clone() for n, p in rm.named_parameters() if p.grad is not None}
    (E0, g0), (E1, g1) = out[False], out[True]
    torch.testing.assert_close(E1, E0, rtol=1e-4, atol=1e-4)
    assert g0.keys() == g1.keys() and any("layers.0.self_attn.q_proj" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=1e-5, msg=name)


def test_pack_where_flex_cannot_train_names_the_flag_and_the_fallback(tiny, capsys, monkeypatch):
    import train
    _, backbone, _ = tiny
    assert flex_unavailable(torch.device("cpu"), training=True)
    with pytest.raises(RuntimeError, match=r"--pack.*leave out --pack"):
        set_attention(ReMatch(backbone, num_tokens=2), "sdpa", training=True, pack=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train.parse_args(["--pack"])
    err = capsys.readouterr().err.strip().splitlines()[-1]               # the error line
    assert "--pack" in err and "leave out --pack" in err and "--attn" not in err
