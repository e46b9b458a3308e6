"""Losses (Eq. 2-5) against naive per-item loops and hand-worked numbers.

Run:  python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch

from losses import info_nce, matching_loss, orthogonality_loss, total_loss

pytestmark = pytest.mark.proof          # part of the two-minute proof (tests/conftest.py)

# -----------------------------------------------------------------------------
# Eq. 2: orthogonality


def naive_orthogonality(e):
    """Eq. 2 one item and one pair at a time, then the mean over items."""
    N, K, _ = e.shape
    per_item = []
    for n in range(N):
        total = e[n].sum() * 0.0  # a zero that keeps the graph (K=1 has no pair)
        for i in range(K):
            for j in range(i + 1, K):
                e_i = e[n, i] / e[n, i].norm()
                e_j = e[n, j] / e[n, j].norm()
                total = total + torch.dot(e_i, e_j) ** 2
        if K > 1:
            total = total * 2.0 / (K * (K - 1))
        per_item.append(total)
    return sum(per_item) / N


@pytest.mark.parametrize("N,K,d", [(1, 1, 4), (3, 1, 8), (2, 2, 5), (4, 3, 7), (3, 16, 32)])
def test_orthogonality_matches_naive_loop(N, K, d):
    g = torch.Generator().manual_seed(N * 100 + K * 10 + d)
    e = (torch.randn(N, K, d, generator=g) * 3).requires_grad_()
    e_ref = e.detach().clone().requires_grad_()

    loss = orthogonality_loss(e)
    ref = naive_orthogonality(e_ref)
    loss.backward()
    ref.backward()

    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(e.grad, e_ref.grad, atol=1e-6, rtol=1e-5)


def test_orthogonality_single_token_is_zero_with_graph():
    e = torch.randn(3, 1, 6, requires_grad=True)
    loss = orthogonality_loss(e)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


def test_orthogonality_hand_worked():
    # K orthogonal states (identity rows with arbitrary positive scales) -> 0
    scales = torch.tensor([2.0, 0.5, 3.0, 7.0])
    e = torch.diag(scales)[None]  # (1, 4, 4)
    assert orthogonality_loss(e).item() == pytest.approx(0.0, abs=1e-7)

    # K identical directions (different lengths, one flipped: (-1)^2 = 1) -> 1
    v = torch.tensor([1.0, -2.0, 0.5])
    e = torch.stack([v, 3 * v, -0.1 * v, 2 * v])[None]  # (1, 4, 3)
    assert orthogonality_loss(e).item() == pytest.approx(1.0, abs=1e-6)

    # two tokens 60 degrees apart: cos = 0.5 -> 0.25; second item orthogonal -> 0; mean 0.125
    e = torch.tensor([[[2.0, 0.0], [1.0, math.sqrt(3.0)]],
                      [[0.0, 5.0], [4.0, 0.0]]])  # (2, 2, 2)
    assert orthogonality_loss(e).item() == pytest.approx((0.25 + 0.0) / 2, abs=1e-6)


def test_orthogonality_bf16_input_is_computed_in_fp32():
    e = torch.randn(2, 4, 8).bfloat16()
    loss = orthogonality_loss(e)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, naive_orthogonality(e.float()), atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# Eq. 3: InfoNCE


def cos(a, b):
    return torch.dot(a, b) / (a.norm() * b.norm())


def naive_info_nce(q, d_pos, d_neg=None, tau=0.02, pos_ids=None, neg_ids=None):
    """Eq. 3 one query at a time, with the denominator as an explicit sum.

    Negatives of query i: every other positive d_pos[j] (j != i) and every hard negative
    d_neg[j] (its own included). With ids, documents identical to d_pos[i] are skipped.
    """
    B = q.shape[0]
    docs = [(d_pos[j], None if pos_ids is None else int(pos_ids[j])) for j in range(B)]
    if d_neg is not None:
        docs += [(d_neg[j], None if neg_ids is None else int(neg_ids[j])) for j in range(B)]
    losses = []
    for i in range(B):
        own_id = None if pos_ids is None else int(pos_ids[i])
        s_pos = cos(q[i], d_pos[i]) / tau
        neg_sum = 0.0
        for c, (doc, doc_id) in enumerate(docs):
            if c == i:  # the query's own positive
                continue
            if own_id is not None and doc_id == own_id:  # a copy of the own positive
                continue
            neg_sum = neg_sum + torch.exp(cos(q[i], doc) / tau)
        losses.append(-torch.log(torch.exp(s_pos) / (torch.exp(s_pos) + neg_sum)))
    return sum(losses) / B


def random_batch(B, d, seed, with_neg=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g, dtype=dtype)
    d_pos = q + 0.8 * torch.randn(B, d, generator=g, dtype=dtype)  # correlated with q: non-trivial loss
    d_neg = q + 1.2 * torch.randn(B, d, generator=g, dtype=dtype) if with_neg else None
    return q, d_pos, d_neg


def loss_and_grads(fn, tensors, **kwargs):
    """Value of fn(*tensors, **kwargs) and the gradient w.r.t. each non-None tensor."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves, **kwargs)
    loss.backward()
    grads = [None if t is None else torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
    return loss.detach().double(), [None if g is None else g.double() for g in grads]  # unused input: 0


def assert_same(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            # gradients scale with 1/τ; fp32 (loss) vs fp64 (oracle)
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tau", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("B", [1, 2, 5, 8])
def test_info_nce_matches_naive_loop(B, with_neg, tau):
    batch = random_batch(B, 16, seed=B, with_neg=with_neg, dtype=torch.float64)
    got = loss_and_grads(info_nce, batch, tau=tau)
    ref = loss_and_grads(naive_info_nce, batch, tau=tau)  # fp64 oracle
    assert_same(got, ref)


def test_info_nce_two_queries_by_hand():
    # Unnormalised vectors whose cosines are 0, ±1 or 0.5; τ = 0.5, so logits are 2·cos.
    q = torch.tensor([[3.0, 0.0, 0.0],    # q1 = e1
                      [0.0, 0.5, 0.0]])   # q2 = e2
    d_pos = torch.tensor([[2.0, 0.0, 0.0],   # p1: cos(q1,p1)=1,  cos(q2,p1)=0
                          [0.0, 4.0, 0.0]])  # p2: cos(q1,p2)=0,  cos(q2,p2)=1
    d_neg = torch.tensor([[1.0, 0.0, math.sqrt(3.0)],  # n1: cos(q1,n1)=0.5, cos(q2,n1)=0
                          [0.0, -7.0, 0.0]])           # n2: cos(q1,n2)=0,   cos(q2,n2)=-1
    e = math.exp
    # query 1: positive logit 2; negatives p2 -> 0, n1 -> 1, n2 -> 0
    loss_1 = -math.log(e(2) / (e(2) + e(0) + e(1) + e(0)))
    # query 2: positive logit 2; negatives p1 -> 0, n1 -> 0, n2 -> -2
    loss_2 = -math.log(e(2) / (e(2) + e(0) + e(0) + e(-2)))
    expected = (loss_1 + loss_2) / 2
    assert info_nce(q, d_pos, d_neg, tau=0.5).item() == pytest.approx(expected, abs=1e-6)

    # without the hard negatives only the other positive stays in the denominator
    expected = -math.log(e(2) / (e(2) + e(0)))
    assert info_nce(q, d_pos, tau=0.5).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("B,with_neg", [(4, True), (6, True), (6, False), (1, True)])
def test_info_nce_duplicate_ids_match_naive_loop(B, with_neg):
    g = torch.Generator().manual_seed(7 + B)
    batch = random_batch(B, 8, seed=B + 100, with_neg=with_neg, dtype=torch.float64)
    pos_ids = torch.randint(0, 3, (B,), generator=g)  # few ids: many duplicate positives
    neg_ids = torch.randint(0, 5, (B,), generator=g) if with_neg else None  # some equal to a positive
    if with_neg:
        neg_ids[0] = pos_ids[0]  # a hard negative identical to its own positive is skipped too
    ids = dict(pos_ids=pos_ids, neg_ids=neg_ids)
    got = loss_and_grads(info_nce, batch, tau=0.05, **ids)
    ref = loss_and_grads(naive_info_nce, batch, tau=0.05, **ids)
    assert_same(got, ref)
    if B > 1:  # the masking removed something: the result differs from plain Eq. 3
        assert not torch.allclose(got[0], loss_and_grads(info_nce, batch, tau=0.05)[0])


def test_info_nce_distinct_ids_equal_no_ids_exactly():
    q, d_pos, d_neg = random_batch(5, 8, seed=3)
    ids = dict(pos_ids=torch.arange(5), neg_ids=torch.arange(5, 10))
    assert torch.equal(info_nce(q, d_pos, d_neg, **ids), info_nce(q, d_pos, d_neg))
    assert torch.equal(info_nce(q, d_pos, pos_ids=torch.arange(5)), info_nce(q, d_pos))


def test_info_nce_rejects_half_given_ids_and_bad_shapes():
    q, d_pos, d_neg = random_batch(3, 4, seed=0)
    ids = torch.arange(3)
    with pytest.raises(ValueError):
        info_nce(q, d_pos, d_neg, pos_ids=ids)
    with pytest.raises(ValueError):
        info_nce(q, d_pos, d_neg, neg_ids=ids)
    with pytest.raises(ValueError):
        info_nce(q, d_pos, neg_ids=ids)
    with pytest.raises(ValueError):
        info_nce(q, d_pos[:2], d_neg)


def test_info_nce_bf16_input_is_computed_in_fp32():
    q, d_pos, d_neg = random_batch(4, 8, seed=1)
    loss = info_nce(q.bfloat16(), d_pos.bfloat16(), d_neg.bfloat16())
    assert loss.dtype == torch.float32
    ref = naive_info_nce(q.bfloat16().double(), d_pos.bfloat16().double(), d_neg.bfloat16().double())
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)


# -----------------------------------------------------------------------------
# Eq. 4 and Eq. 5


def test_matching_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    M, V = 8, 50
    logits = (torch.randn(M, V, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, V, (M,), generator=g)
    logits_ref = logits.detach().clone().requires_grad_()

    loss = matching_loss(logits, labels)
    ref = sum(-torch.log(torch.exp(logits_ref[m][labels[m]]) / torch.exp(logits_ref[m]).sum())
              for m in range(M)) / M
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits.grad, logits_ref.grad, atol=1e-6, rtol=1e-5)


def test_matching_loss_hand_worked():
    V = 10
    uniform = torch.zeros(3, V)  # p(label) = 1/V for every answer
    assert matching_loss(uniform, torch.tensor([1, 2, 3])).item() == pytest.approx(math.log(V), abs=1e-6)
    # "Yes" (id 4) with logit log(3) against nine zeros: p = 3 / 12; bf16 in, fp32 out
    logits = torch.zeros(1, V)
    logits[0, 4] = math.log(3.0)
    loss = matching_loss(logits.bfloat16(), torch.tensor([4]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(3 / 12), abs=1e-2)  # bf16 rounding of log(3)


def test_total_loss_hand_numbers():
    assert total_loss(1.0, 0.2, 3.0) == pytest.approx(1.0 + 0.5 * 0.2 + 0.1 * 3.0)
    assert total_loss(1.0, 0.2, 3.0, w_orth=0.0, w_qdm=1.0) == pytest.approx(4.0)
    l_cl, l_orth, l_qdm = (torch.tensor(x, requires_grad=True) for x in (2.0, 0.4, 1.5))
    L = total_loss(l_cl, l_orth, l_qdm)
    L.backward()
    assert L.item() == pytest.approx(2.0 + 0.2 + 0.15)
    assert (l_cl.grad.item(), l_orth.grad.item(), l_qdm.grad.item()) == pytest.approx((1.0, 0.5, 0.1))
