"""ReMatch training losses (paper §3.2.1-3.2.4, Eq. 2-5), as small pure functions.

    orthogonality_loss  Eq. 2  soft orthogonality of the K learnable-token states (§3.2.1)
    info_nce            Eq. 3  InfoNCE over in-batch documents + one hard negative (§3.2.2),
                               columns gathered over all ranks with gradient
    matching_loss       Eq. 4  -log p(Yes/No) at the answer positions of the matching pass (§3.2.3)
    total_loss          Eq. 5  L = L_cl + w_orth * L_orth + w_qdm * L_qdm (§3.2.4)

Every loss computes in at least fp32 (`at_least_fp32` upcasts bf16/fp16 inputs; fp64 stays
fp64), so bf16 callers get stable numbers. Conventions that the paper leaves open are
written down in docs/readings.md §2.

Test:  pytest tests/test_losses.py tests/test_distributed_losses.py
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.dist import rank_world


def at_least_fp32(x):
    """Upcast half-precision tensors to fp32; fp32 and fp64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# -----------------------------------------------------------------------------
# distributed helper: an all_gather that carries gradients ((rank, world): util/dist.py)

class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sends each rank the gradient of its own rows.

    forward:  x (B, ...) on every rank -> cat of all ranks' x, (W*B, ...).
    backward: every rank holds dL_r/d(gathered) for its local loss L_r. The gradient of
              the sum of all local losses w.r.t. rank r's rows is the sum over ranks of
              those gradients, restricted to rows r*B:(r+1)*B -> all_reduce(SUM), slice.
    A plain (no-grad) dist.all_gather would drop every other rank's contribution, which is
    wrong when each rank computes only its local rows of the loss (open_clip's local_loss).
    Every rank must run backward, since the backward is itself a collective.
    """

    @staticmethod
    def forward(ctx, x):
        rank, world_size = rank_world()
        ctx.rank, ctx.B = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; don't touch autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # (W*B, ...), now d(sum_r L_r)/d(gathered)
        return grad[ctx.rank * ctx.B : (ctx.rank + 1) * ctx.B]  # (B, ...), this rank's rows


def _gather(x):
    """Rows of x from all ranks, concatenated in rank order, (B, ...) -> (W*B, ...).

    Float tensors keep their autograd graph; integer tensors (document ids) are gathered
    without one. Identity when there is no process group (W=1).
    """
    _, world_size = rank_world()
    if world_size == 1:
        return x
    if x.is_floating_point():
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _check_same_batch_size(B, device):
    """Raise on every rank if the ranks hold different numbers of queries.

    The gather concatenates equal-sized blocks and the targets are r*B + i, so all ranks
    must have the same B. One tiny all_gather of the sizes makes a mismatch a clear error
    rather than a crash or hang inside the collective of the embeddings.
    """
    _, world_size = rank_world()
    if world_size == 1:
        return
    sizes = _gather(torch.tensor([B], device=device))  # (W,)
    if not bool((sizes == B).all()):
        raise ValueError(f"info_nce needs the same batch size on every rank, got {sizes.tolist()}")


# -----------------------------------------------------------------------------
# Eq. 2: soft orthogonality of the K learnable-token states


def orthogonality_loss(e):
    """Eq. 2, averaged over items: mean over pairs i<j of (ẽ_iᵀ ẽ_j)², ẽ_i = e_i / ||e_i||.

    e: (N, K, d) last-layer hidden states at the K learnable-token positions of N items
       (queries and documents alike).
    Returns a scalar: (1/N) Σ_n 2/(K(K-1)) Σ_{i<j} (ẽ_iᵀ ẽ_j)². It is 0 when the K states are
    mutually orthogonal and 1 when they are all parallel. K=1 has no pair and gives 0.
    """
    N, K, d = e.shape
    e_tilde = F.normalize(at_least_fp32(e), dim=-1)  # (N, K, d), unit rows
    G = e_tilde @ e_tilde.transpose(1, 2)  # (N, K, d) @ (N, d, K) -> (N, K, K), G[n, i, j] = ẽ_iᵀẽ_j
    off_diag = ~torch.eye(K, dtype=torch.bool, device=e.device)  # (K, K), True where i != j
    # the sum over i != j counts every pair i<j twice, so dividing by K(K-1) gives 2/(K(K-1)) Σ_{i<j}
    L_orth_per_item = (G.pow(2) * off_diag).sum(dim=(1, 2)) / max(K * (K - 1), 1)  # (N,)
    return L_orth_per_item.mean()


# -----------------------------------------------------------------------------
# Eq. 3: InfoNCE with one hard negative per query, in-batch documents gathered over ranks


def info_nce(q, d_pos, d_neg=None, tau=0.02, pos_ids=None, neg_ids=None):
    """Eq. 3: -log Φ(E_q, E_d+) / (Φ(E_q, E_d+) + Φ(E_q, E_d-) + Σ_{d∈𝔅} Φ(E_q, E_d)),
    Φ(a, b) = exp(cos(a, b) / τ), averaged over this rank's queries.

    q, d_pos, d_neg: (B, d) fused embeddings E_q, E_d+, E_d- (not normalised; the cosine
        is taken here). d_neg is the explicit hard negative of each query, or None.
    tau: temperature τ.
    pos_ids, neg_ids: optional (B,) integer document ids, equal id = identical document.

    Columns are the documents of the global batch, [D+_all ; D-_all], (W*B + W*B) of them
    (W*B without d_neg), gathered over the W ranks of the default process group if there is
    one (W=1 otherwise). They contain the query's own positive, its hard negative and every
    other document (positive or negative) as in-batch negatives 𝔅. Each rank computes only
    its own B rows; the target of local query i on rank r is column r*B + i. The gather
    sends gradients back to the rank that owns each document, so W ranks with B queries
    each give the same gradients as one process with W*B queries once DDP averages them.
    Every rank must hold the same B.

    False-negative masking (docs/readings.md §2): with ids, every column other than the target
    whose id equals the id of the query's own positive is left out of the denominator.
    Without ids (or with all-distinct ids) this is Eq. 3 as written.
    Returns a scalar, the mean over the B local queries.
    """
    if not tau > 0:                     # cos/τ: τ = 0 divides by zero (NaN), τ < 0 inverts Eq. 3
        raise ValueError(f"info_nce: the temperature tau must be > 0, got {tau}")
    if (d_neg is None and neg_ids is not None) or (d_neg is not None and (pos_ids is None) != (neg_ids is None)):
        raise ValueError("give document ids for d_pos and d_neg together (or neither); neg_ids needs d_neg")
    B = q.shape[0]
    for name, x in (("d_pos", d_pos), ("d_neg", d_neg)):
        if x is not None and x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    rank, _ = rank_world()
    _check_same_batch_size(B, q.device)

    E_q = F.normalize(at_least_fp32(q), dim=-1)  # (B, d), unit rows, so dot product = cosine
    docs = [d_pos] if d_neg is None else [d_pos, d_neg]
    # columns [D+_all ; D-_all]: C = W*B documents, or 2*W*B with the hard negatives
    E_d = torch.cat([_gather(F.normalize(at_least_fp32(x), dim=-1)) for x in docs])  # (C, d)
    logits = E_q @ E_d.T / tau  # (B, d) @ (d, C) -> (B, C), cos(E_q, E_d) / τ
    target = rank * B + torch.arange(B, device=q.device)  # (B,), column of each query's own positive

    if pos_ids is not None:
        col_ids = torch.cat([_gather(ids.long()) for ids in (pos_ids, neg_ids) if ids is not None])  # (C,)
        same_doc = col_ids[None, :] == pos_ids.long()[:, None]  # (B, C), column is a copy of the own positive
        same_doc[torch.arange(B, device=q.device), target] = False  # ...but the target itself stays
        logits = logits.masked_fill(same_doc, float("-inf"))  # exp(-inf) = 0: out of the denominator

    return F.cross_entropy(logits, target)  # mean over the B local queries


# -----------------------------------------------------------------------------
# Eq. 4: matching loss, Eq. 5: total


def matching_loss(logits, labels):
    """Eq. 4: L_qdm = -log p(l | P(q̃, d̃)), averaged over the answers.

    logits: (M, V) language-model logits over the full vocabulary at the M positions that
            predict an answer token (all views of all instances).
    labels: (M,) token ids of the answers: "Yes" for a view of d+, "No" for a view of d-.
    Returns a scalar, the mean over the M answers of -log softmax(logits)[label].
    """
    return F.cross_entropy(at_least_fp32(logits), labels)  # (M, V), (M,) -> scalar


def total_loss(l_cl, l_orth, l_qdm, w_orth=0.5, w_qdm=0.1):
    """Eq. 5: L = L_cl + w_orth * L_orth + w_qdm * L_qdm (paper: w_orth = 0.5, w_qdm = 0.1)."""
    return l_cl + w_orth * l_orth + w_qdm * l_qdm
