"""
Worker for tests/test_train.py::test_two_process_ddp_training, launched by torchrun:
    torchrun --standalone --nproc_per_node=2 tests/ddp_train_worker.py OUT_DIR -- TRAIN_FLAGS...
Runs a few real training steps with train.py's pieces (DDP, gloo; --chunk_size for
cached-gradient micro-batching) and saves, per rank,
the rows it saw, the first step's (DDP-averaged) gradients and the final parameters.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import train  # noqa: E402
from util.dist import setup_distributed, teardown_distributed  # noqa: E402
from data import TrainBatchSampler, TrainDataset  # noqa: E402


def main():
    out_dir, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    args = train.parse_args(flags)
    ddp, rank, world, device = setup_distributed()
    model, processor = train.build_model(args, device)
    dataset = TrainDataset(args.train_data, args.image_dir, processor,
                           target_instructions=args.target_instructions)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    sampler = iter(TrainBatchSampler(dataset, args.batch_size, world, rank, args.seed,
                                     homogeneous=args.homogeneous_batches))
    seen, first_grads = [], None
    for step in range(args.steps):
        idx = next(sampler)
        seen.append(list(idx))
        opt.zero_grad(set_to_none=True)
        train.forward_backward(train.Step(model, processor.tokenizer, args, ddp_model),
                               [dataset[i] for i in idx], step)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    torch.save({"seen": seen, "grads": first_grads,
                "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp_model, opt                               # DDP state first (teardown_distributed)
    teardown_distributed()


if __name__ == "__main__":
    main()
