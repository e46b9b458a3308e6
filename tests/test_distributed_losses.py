"""info_nce (Eq. 3) on 2 gloo processes with B queries each == one process with 2B queries.

Run:  python -m pytest -q tests/test_distributed_losses.py

Both ranks build the same global batch of W*B rows from a fixed seed and take their own
rows; the reference is the same code in this (non-distributed) test process on all rows.
The two workers run every case once (module fixture) and save their results with
torch.save; each test then compares one case.
"""

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import gloo_worker, run_processes
from losses import info_nce

pytestmark = pytest.mark.proof          # part of the two-minute proof (tests/conftest.py)

W, B, D_IN, D = 2, 3, 6, 5  # ranks, queries per rank, raw input size, embedding size
TAU = 0.05
TIMEOUT_S = 60  # bound on every wait: a hang fails the test instead of blocking CI


def global_batch():
    """The global batch of W*B rows, identical in every process (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(W * B, D, generator=g)
    d_pos = q + 0.8 * torch.randn(W * B, D, generator=g)
    d_neg = q + 1.2 * torch.randn(W * B, D, generator=g)
    # document ids with duplicates that cross ranks (rank 0 owns rows 0-2, rank 1 rows 3-5):
    pos_ids = torch.tensor([0, 1, 2, 3, 0, 5])  # row 4 (rank 1) has the positive of row 0 (rank 0)
    neg_ids = torch.tensor([10, 11, 3, 13, 14, 1])  # row 2's hard negative = row 3's positive;
    #                                                  row 5's (rank 1) = row 1's positive (rank 0)
    # identical documents have identical embeddings (and then matter most in the denominator)
    d_pos[4], d_neg[2], d_neg[5] = d_pos[0], d_pos[3], d_pos[1]
    x = torch.randn(3, W * B, D_IN, generator=g)  # raw inputs of queries, positives, negatives for DDP
    return dict(q=q, d_pos=d_pos, d_neg=d_neg, pos_ids=pos_ids, neg_ids=neg_ids, x=x)


def loss_and_input_grads(batch, rows, with_neg=True, with_ids=False):
    """info_nce on batch[rows] and its gradient w.r.t. q, d_pos (and d_neg)."""
    names = ["q", "d_pos", "d_neg"] if with_neg else ["q", "d_pos"]
    leaves = {n: batch[n][rows].clone().requires_grad_() for n in names}
    ids = dict(pos_ids=batch["pos_ids"][rows], neg_ids=batch["neg_ids"][rows]) if with_ids else {}
    loss = info_nce(*leaves.values(), tau=TAU, **ids)
    loss.backward()
    return loss.detach(), {n: t.grad for n, t in leaves.items()}


def encoder_param_grads(batch, rows, distributed):
    """One backward of info_nce through a tiny nn.Linear encoder (in DDP if distributed)."""
    torch.manual_seed(1)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    encoder = nn.Linear(D_IN, D)
    model = DDP(encoder) if distributed else encoder
    x_q, x_pos, x_neg = batch["x"][:, rows]  # 3 x (n, D_IN), n = B or W*B
    E = model(torch.cat([x_q, x_pos, x_neg]))  # one forward, (3n, D)
    E_q, E_pos, E_neg = E.chunk(3)  # 3 x (n, D)
    loss = info_nce(E_q, E_pos, E_neg, tau=TAU)
    loss.backward()  # DDP averages the parameter gradients over the W ranks here
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    del model, encoder, E, E_q, E_pos, E_neg, loss  # drop DDP before the gloo teardown
    return grads


def run_cases(rows, distributed=False):
    batch = global_batch()
    return {
        "plain": loss_and_input_grads(batch, rows),
        "no_neg": loss_and_input_grads(batch, rows, with_neg=False),
        "dup": loss_and_input_grads(batch, rows, with_ids=True),
        "ddp": encoder_param_grads(batch, rows, distributed),
    }


def _worker(rank, rendezvous_file, out_dir):
    with gloo_worker(rank, W, rendezvous_file, out_dir, TIMEOUT_S // 2):
        results = run_cases(slice(rank * B, (rank + 1) * B), distributed=True)
        # unequal batch sizes (B on rank 0, B-1 on rank 1) must raise on every rank, not hang
        n = B if rank == 0 else B - 1
        try:
            info_nce(torch.randn(n, D), torch.randn(n, D))
            results["unequal"] = "no error"
        except ValueError as err:
            results["unequal"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        del results                               # gloo can abort at exit otherwise


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per-rank results from 2 gloo processes, single-process results on all W*B rows)."""
    tmp = tmp_path_factory.mktemp("dist")
    run_processes(_worker, [(r, str(tmp / "rendezvous"), str(tmp)) for r in range(W)], tmp, TIMEOUT_S)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(W)]
    return per_rank, run_cases(slice(None))


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["plain", "no_neg", "dup"])
def test_value_is_mean_of_local_losses(runs, case):
    # (a) each rank's loss is the mean over its B queries, so the mean over ranks is the
    # mean over all W*B queries: the single-process loss.
    per_rank, single = runs
    close(sum(r[case][0] for r in per_rank) / W, single[case][0])


@pytest.mark.parametrize("case", ["plain", "no_neg", "dup"])
def test_input_grads_match_single_process(runs, case):
    # (b) x.grad on rank r is d(Σ_s L_s)/dx_r: its own local loss plus, through the gathered
    # columns, the losses of the other ranks. DDP then averages parameter gradients over
    # the W ranks, so the gradient that reaches the parameters is x.grad / W, which must be
    # d(L_single)/dx_r with L_single = (1/W) Σ_s L_s, the loss of one process on W*B rows.
    per_rank, single = runs
    for r, res in enumerate(per_rank):
        rows = slice(r * B, (r + 1) * B)
        for name, grad in res[case][1].items():
            close(grad / W, single[case][1][name][rows])


def test_ddp_parameter_grads_match_single_process(runs):
    # (c) the contract users rely on: DDP(encoder) + info_nce on W ranks with B each gives
    # the parameter gradients of one process on W*B, on every rank, with no loss scaling.
    per_rank, single = runs
    for res in per_rank:
        for name, grad in res["ddp"].items():
            close(grad, single["ddp"][name])


def test_duplicate_ids_across_ranks(runs):
    # (d) in global_batch every duplicate of a query's own positive lives on the *other*
    # rank (none within a rank), so masking changes a rank's local loss only if the ids
    # were gathered. Value and gradients of "dup" equal the single process in (a), (b).
    per_rank, single = runs
    for res in per_rank:
        assert not torch.allclose(res["dup"][0], res["plain"][0])
    assert not torch.allclose(single["dup"][0], single["plain"][0])


def test_unequal_batch_sizes_raise_on_every_rank(runs):
    per_rank, _ = runs
    for res in per_rank:
        assert "same batch size" in res["unequal"], res["unequal"]
