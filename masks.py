"""The unified attention mask of ReMatch (paper Fig. 3, §3.2.3; docs/readings.md §3).

Multi-view query-document matching (MVQDM) asks the MLLM "is <DOC> relevant to
<QUERY>?" for 8 views at once: the query as raw data Q or as its projected
embedding token Zq, times two document slots, each raw (D1, D2) or embedded
(Zd1, Zd2). d+ sits in one slot and d- in the other (chosen at random). All 8
questions share one packed sequence and one forward pass; this mask makes
answer A_v see only the prompt, the header, its own query and its own document,
so each answer is predicted exactly as if its view had been run alone (with the
same position ids: docs/readings.md §3).

One packed sequence per (q, d+, d-) instance, in this order (docs/readings.md §3):

    | P | Q | Zq | D1 | Zd1 | D2 | Zd2 | H | A1 | A2 | ... | A8 | pad |
      P    prompt: system + user header + matching instruction (App. S7)
      Q    <QUERY> raw query </QUERY>        Zq   <QUERY><feat_start>z<feat_end></QUERY>
      D1   <DOC> raw slot-1 doc </DOC>       Zd1  <DOC><feat_start>z<feat_end></DOC>
      D2   <DOC> raw slot-2 doc </DOC>       Zd2  likewise
      H    <|im_end|>\\n<|im_start|>assistant\\n
      Av   <ANSWER>Yes|No</ANSWER> for the v-th view, views in the order of VIEWS
      pad  right padding (batches only)

Segment-level "may see" table for the 8 views (rows = queries, columns = keys;
every block is also intersected with causality, so a diagonal block is
lower-triangular and an answer cannot see a later segment):

          P  Q  Zq D1 Zd1 D2 Zd2 H  A1 A2 A3 A4 A5 A6 A7 A8 pad
    P     x  .  .  .  .   .  .   .  .  .  .  .  .  .  .  .  .
    Q     x  x  .  .  .   .  .   .  .  .  .  .  .  .  .  .  .
    Zq    x  .  x  .  .   .  .   .  .  .  .  .  .  .  .  .  .
    D1    x  .  .  x  .   .  .   .  .  .  .  .  .  .  .  .  .
    Zd1   x  .  .  .  x   .  .   .  .  .  .  .  .  .  .  .  .
    D2    x  .  .  .  .   x  .   .  .  .  .  .  .  .  .  .  .
    Zd2   x  .  .  .  .   .  x   .  .  .  .  .  .  .  .  .  .
    H     x  .  .  .  .   .  .   x  .  .  .  .  .  .  .  .  .
    A1    x  x  .  x  .   .  .   x  x  .  .  .  .  .  .  .  .    (Q, D1)
    A2    x  x  .  .  x   .  .   x  .  x  .  .  .  .  .  .  .    (Q, Zd1)
    A3    x  x  .  .  .   x  .   x  .  .  x  .  .  .  .  .  .    (Q, D2)
    A4    x  x  .  .  .   .  x   x  .  .  .  x  .  .  .  .  .    (Q, Zd2)
    A5    x  .  x  x  .   .  .   x  .  .  .  .  x  .  .  .  .    (Zq, D1)
    A6    x  .  x  .  x   .  .   x  .  .  .  .  .  x  .  .  .    (Zq, Zd1)
    A7    x  .  x  .  .   x  .   x  .  .  .  .  .  .  x  .  .    (Zq, D2)
    A8    x  .  x  .  .   .  x   x  .  .  .  .  .  .  .  x  .    (Zq, Zd2)
    pad   .  .  .  .  .   .  .   .  .  .  .  .  .  .  .  .  d    d = diagonal only

Smaller view sets (Table 5: `feat`, `raw`, ...) use fewer answers, and leave the
segments they do not need out of the sequence (`segments_used`).

`python masks.py` prints the position-level mask of a tiny example.
Tests: `pytest tests/test_masks.py`
"""
import re

import torch

SEGMENTS = ("P", "Q", "Zq", "D1", "Zd1", "D2", "Zd2", "H")  # content segments, in sequence order
PAD = "pad"

# the 8 (query segment, document segment) views, in the order of the answers A1..A8
VIEWS = (("Q", "D1"), ("Q", "Zd1"), ("Q", "D2"), ("Q", "Zd2"),
         ("Zq", "D1"), ("Zq", "Zd1"), ("Zq", "D2"), ("Zq", "Zd2"))

# view sets of Table 5 (pairs keep their relative order in VIEWS)
VIEW_SETS = {
    "all": VIEWS,
    "feat": (("Zq", "Zd1"), ("Zq", "Zd2")),
    "raw": (("Q", "D1"), ("Q", "D2")),
    "raw2feat": (("Q", "Zd1"), ("Q", "Zd2")),
    "feat2raw": (("Zq", "D1"), ("Zq", "D2")),
}


def answer_name(i):
    """Name of the answer segment of the i-th view (0-based): 0 -> "A1"."""
    return f"A{i + 1}"


def segments_used(views):
    """Content segments a view set needs, in SEGMENTS order (P and H always)."""
    needed = {"P", "H"} | {s for view in views for s in view}
    return tuple(s for s in SEGMENTS if s in needed)


def _answer_index(name):
    """"A3" -> 2; None if `name` is not an answer name."""
    m = re.fullmatch(r"A([1-9][0-9]*)", name)
    return int(m.group(1)) - 1 if m else None


def _keys_of(name, views):
    """The segments that rows of segment `name` may attend to (the rules of readings §3)."""
    if name == "P":
        return ("P",)
    if name in SEGMENTS:  # Q, Zq, D1, Zd1, D2, Zd2, H
        return ("P", name)
    if name == PAD:
        return ()  # pad sees only its own position: added as a diagonal below
    q, d = views[_answer_index(name)]
    return ("P", "H", q, d, name)


def _check(segments, views):
    """Validate (name, length) pairs; return the names and lengths as two lists."""
    for view in views:
        if tuple(view) not in VIEWS:
            raise ValueError(f"unknown view {view!r}; views must come from VIEWS")
    names, lengths = [], []
    for name, n in segments:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"segment {name!r}: length must be an int >= 0, got {n!r}")
        i = _answer_index(name)
        if name not in SEGMENTS and name != PAD and i is None:
            raise ValueError(f"unknown segment name {name!r}")
        if name != PAD and name in names:
            raise ValueError(f"segment {name!r} appears twice")
        if i is not None and i >= len(views):
            raise ValueError(f"answer {name!r} but only {len(views)} views")
        names.append(name)
        lengths.append(n)
    present = {name: n for name, n in zip(names, lengths) if n > 0}
    for name in names:
        i = _answer_index(name)
        if i is not None:
            for s in views[i]:
                if s not in present:
                    raise ValueError(f"answer {name!r} needs segment {s!r}, "
                                     "which is missing or has length 0")
    return names, lengths


def unified_mask(segments, views=VIEWS):
    """Boolean attention mask of one packed matching sequence (Fig. 3).

    segments: sequence of (name, length) in sequence order; names from SEGMENTS,
        "A1".."An" (A_{i+1} answers views[i]) and "pad". Zero-length segments take
        no positions (but are still validated). The rules go by name, so any order
        works; the order used everywhere is P Q Zq D1 Zd1 D2 Zd2 H A1..An pad.
    views: the (query segment, document segment) pairs answered, e.g. VIEW_SETS["feat"].
    Returns mask (L, L) bool, L = sum of lengths; mask[i, j] = True means query
    position i may attend to key position j. Always causal (j <= i); every row
    has at least its own position, so no row is fully masked.
    """
    names, lengths = _check(segments, views)
    ids, see = _segment_table(names, views)
    seg = torch.repeat_interleave(torch.tensor([ids[n] for n in names], dtype=torch.long),
                                  torch.tensor(lengths, dtype=torch.long))  # (L,) segment id per position
    return _lift(see, seg[None], ids.get(PAD, -1))[0]


def _segment_table(names, views):
    """Segment ids (all pad segments share one) and the segment-to-segment table
    see[a, b] = rows of segment a may attend to segment b (the rules of readings §3)."""
    ids = {}  # name -> segment id
    for name in names:
        ids.setdefault(name, len(ids))
    see = torch.zeros(len(ids), len(ids), dtype=torch.bool)  # (S, S)
    for name, a in ids.items():
        for key in _keys_of(name, views):
            if key in ids:  # P or H may be absent
                see[a, ids[key]] = True
    return ids, see


def _lift(see, seg, pad_id):
    """Segment table (S, S) + segment id per position (B, L) -> position mask (B, L, L):
    the table lifted to positions, intersected with causality, pad rows see their own
    position only."""
    L = seg.shape[1]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=seg.device))  # (L, L) key <= query
    mask = see[seg[:, :, None], seg[:, None, :]] & causal  # (B, L, 1) x (B, 1, L) -> (B, L, L)
    return mask | torch.diag_embed(seg == pad_id)  # (B, L, L); pad rows: own position only


def segment_ids(rows, views=VIEWS):
    """Segment id per position of rows of different lengths, right-padded with "pad".

    rows: list of segment lists (as for unified_mask). Returns seg (B, L) long with
    L = the longest row, the segment table see (S, S) bool over all rows' segment
    names (_segment_table), and the pad segment's id. Position (i, j) of row b may
    attend iff see[seg[b, i], seg[b, j]] and j <= i, or i == j (_lift).
    """
    checked = [_check(row, views) for row in rows]  # [(names, lengths)] per row
    totals = [sum(lengths) for _, lengths in checked]
    L = max(totals, default=0)
    ids, see = _segment_table([PAD] + [n for names, _ in checked for n in names], views)
    seg = torch.full((len(rows), L), ids[PAD], dtype=torch.long)  # (B, L), pad by default
    for b, (names, lengths) in enumerate(checked):
        seg[b, :totals[b]] = torch.repeat_interleave(torch.tensor([ids[n] for n in names]),
                                                     torch.tensor(lengths, dtype=torch.long))
    return seg, see, ids[PAD]


def unified_mask_batch(rows, views=VIEWS, device=None):
    """Masks of rows of different lengths, right-padded with a "pad" segment.

    rows: list of segment lists (as for unified_mask). Returns (B, L, L) bool with
    L = the longest row; row b equals unified_mask(rows[b] + [("pad", L - len_b)]).
    Built for the whole batch at once (one table over all rows' segment names), on
    `device`: only the (B, L) segment ids travel, never the (B, L, L) mask.
    """
    if not rows:
        return torch.zeros(0, 0, 0, dtype=torch.bool, device=device)
    seg, see, pad_id = segment_ids(rows, views)
    return _lift(see.to(device), seg.to(device), pad_id)  # (B, L, L)


def unified_block_mask(rows, views=VIEWS, block_size=128, device=None):
    """The same mask as unified_mask_batch, as a FlexAttention BlockMask (`--attn flex`),
    built from the segment table without materialising the (B, L, L) mask.

    FlexAttention tiles the (L, L) score matrix into block_size² blocks and skips a
    block that the mask empties entirely; a "full" block (all True) runs without
    calling mask_mod; a "partial" block applies mask_mod per position. Which segments
    occur in each block is a (B, n, S) table (n = ceil(L / block_size)), so
        allowed[b, i, j]   = Σ_{s in block i, t in block j} see[s, t]     (B, n, n)
        forbidden[b, i, j] = Σ_{s in block i, t in block j} ¬see[s, t]
    and, since every key of an earlier block precedes every query of a later one,
    block j < i is full iff forbidden = 0, empty iff allowed = 0; j > i is empty
    (causal); the diagonal block is partial. Pad never sees or is seen through the
    table (its diagonal is mask_mod's q == kv), so blocks holding pad are never full.
    Returns a BlockMask of shape (B, 1, L, L), heads broadcast.
    """
    if not rows:
        raise ValueError("unified_block_mask: no rows")
    seg, see, _ = segment_ids(rows, views)                         # (B, L), (S, S)
    return _block_mask(seg, see, block_size, device)


def packed_ids(lengths):
    """Item id of every position of one packed row (1, Σ lengths): 0 … 0 1 … 1 …"""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))[None]


def packed_mask(lengths, device=None):
    """Dense oracle of packed_block_mask: (1, T, T) bool, position i may attend j iff both
    belong to the same item and j <= i (each item causal on its own, as in its own row)."""
    doc = packed_ids(lengths).to(device)[0]                          # (T,)
    i = torch.arange(doc.numel(), device=device)
    return ((doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]))[None]  # (1, T, T)


def packed_block_mask(lengths, block_size=128, device=None):
    """The block-diagonal causal mask of a packed row (train.py --pack: a chunk's items
    in one row without padding) as a FlexAttention BlockMask (1, 1, T, T): the segment
    machinery of unified_block_mask with one segment per item that sees only itself."""
    n = len(lengths)
    if n == 0 or min(lengths) < 1:
        raise ValueError(f"packed_block_mask: every item needs at least one token, got {list(lengths)}")
    return _block_mask(packed_ids(lengths), torch.eye(n, dtype=torch.bool), block_size, device)


def _block_mask(seg, see, block_size, device):
    """BlockMask (B, 1, L, L) of "position i sees j iff j <= i and see[seg i, seg j], or
    i == j" from segment ids seg (B, L) and the segment table see (S, S) (unified_block_mask's
    docstring: how full, partial and empty blocks are found)."""
    from torch.nn.attention.flex_attention import BlockMask   # noqa: PLC0415 (torch ≥ 2.5)

    S = see.shape[0]
    pad_id = S                                                      # block padding: sees nothing
    see = torch.nn.functional.pad(see, (0, 1, 0, 1), value=False)   # (S + 1, S + 1)
    S += 1
    B, L = seg.shape
    n = -(-L // block_size)                                         # blocks per side
    seg = torch.nn.functional.pad(seg, (0, n * block_size - L), value=pad_id)   # (B, n·bs)
    member = torch.nn.functional.one_hot(seg.view(B, n, block_size), S).amax(2).float()  # (B, n, S)
    see_f = see.float()                                             # (S, S)
    allowed = member @ see_f @ member.transpose(1, 2)               # (B,n,S)(S,S)(B,S,n) → (B, n, n)
    forbidden = member @ (1 - see_f) @ member.transpose(1, 2)       # (B, n, n)
    i = torch.arange(n)
    below = i[None, :] < i[:, None]                                 # (n, n): kv block j < q block i
    full = below & (forbidden == 0)                                 # (B, n, n)
    partial = (below & (allowed > 0) & ~full) | torch.eye(n, dtype=torch.bool)  # (B, n, n)

    def kv_blocks(m):                                               # (B, n, n) bool
        num = m.sum(-1, dtype=torch.int32)[:, None]                 # (B, 1, n)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)  # Trues first
        return num.to(device), idx.to(torch.int32)[:, None].to(device)   # (B, 1, n, n)

    seg, see = seg.to(device), see.to(device)

    def mask_mod(b, h, q_idx, kv_idx):                              # one position pair
        return ((kv_idx <= q_idx) & see[seg[b, q_idx], seg[b, kv_idx]]) | (q_idx == kv_idx)

    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(L, L))


def additive_mask(mask, dtype=torch.float32):
    """Bool mask (L, L) or (B, L, L) -> additive float mask (B, 1, L, L) for the backbone.

    0 where the bool mask is True, torch.finfo(dtype).min where it is False; the
    singleton dim broadcasts over heads. This is the 4D `attention_mask` the HF
    Qwen2-VL model takes (it must already contain causality: a 4D mask is used
    as given). Why not the bool mask: eager attention computes
    softmax(q k^T / sqrt(d) + mask) v, so a bool mask is silently added as 0/1 and
    masks nothing (docs/readings.md §6). finfo.min instead of -inf
    keeps a fully masked row finite (never happens here: every row sees itself).
    """
    if mask.dtype != torch.bool or mask.dim() not in (2, 3):
        raise ValueError(f"expected a bool mask (L, L) or (B, L, L), got {mask.dtype} {tuple(mask.shape)}")
    if mask.dim() == 2:
        mask = mask[None]  # (L, L) -> (1, L, L)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    out = out.masked_fill(~mask, torch.finfo(dtype).min)  # (B, L, L)
    return out[:, None]  # (B, 1, L, L)


if __name__ == "__main__":
    # a tiny example: the `feat` view set, 2 positions per segment (one char per position)
    views = VIEW_SETS["feat"]
    segs = [(s, 2) for s in segments_used(views)] + [(answer_name(i), 2) for i in range(len(views))] + [(PAD, 2)]
    m = unified_mask(segs, views)
    labels = [name for name, n in segs for _ in range(n)]
    for name, row in zip(labels, m):
        print(f"{name:>4} " + "".join("x" if b else "." for b in row.tolist()))
