"""
torchrun plumbing shared by train.py and evaluate.py: process-group set-up (nccl on CUDA,
gloo on the CPU) and teardown, rank-0 printing, the collectives evaluation uses, and the
peak TFLOP/s behind the MFU estimate; rank_world, the one place the project asks for
(rank, world). Tests: tests/test_distributed_losses.py, the DDP tests
of tests/test_train.py and tests/test_evaluate.py.
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist


def rank_world():
    """(rank, world_size) of the default process group, or (0, 1) when none is set up.
    The one place the project asks this (losses.py, train.py and evaluate.py use it)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device():
    """The current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


DIST_TIMEOUT_MINUTES = 60    # a collective may wait this long: rank 0 alone downloads a 7B
                             # checkpoint or writes a checkpoint while the others wait


def setup_distributed(device=None, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """
    Under torchrun (RANK set): join the process group, nccl on cuda:LOCAL_RANK when CUDA is
    there (and `device` is not "cpu"), else gloo on the CPU, with collectives that wait up
    to `timeout_minutes` (NCCL's own default, 10 minutes, aborts a healthy job whose rank 0
    is still downloading or saving). Alone: `device`, or the default device.
    Returns (ddp, rank, world, device).
    """
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, torch.device(device) if device else default_device()
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available() and str(device) != "cpu":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True, rank, world, device


def teardown_distributed():
    """Leave the process group. gloo can abort at interpreter exit while DDP state is alive
    (docs/readings.md §6): callers `del` their DDP model and optimizer first, then this
    collects garbage, waits for every rank and destroys the group. Without a process group
    there is nothing to leave (a collection of a large heap costs a fraction of a second)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def print0(*a, **kw):
    """print on rank 0 only (every process prints without a process group)."""
    if rank_world()[0] == 0:
        print(*a, **kw, flush=True)


def collective_device(device):
    """Where tensors for a collective must live: `device` (the GPU) under nccl, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(t, device):
    """A CPU tensor summed over all ranks (itself without a process group)."""
    if rank_world()[1] == 1:
        return t
    t = t.to(collective_device(device))
    dist.all_reduce(t)
    return t.cpu()


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(device, override=None):
    """Peak bf16 TFLOP/s of this GPU (`override`, else by name), None if unknown or on CPU."""
    if device.type != "cuda":
        return None
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
