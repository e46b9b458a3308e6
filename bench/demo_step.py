"""
Where the CPU demo's training step spends its time (`python train.py`: tiny-qwen2-vl,
B = 32, Eq. 2-5 with 8 instances in the unified matching pass), phase by phase.

The loop is train.py's own (its data set, sampler, collation, forward, losses, backward
and AdamW step); each phase is timed by wrapping the function that does it:

  data            next(batches): row → images read → processor (tokenise + patches), or the item cache
  collate (host)  train.collate_step: id rows, padding, token/feature/label indices, segment tables
  forward         ReMatch.forward, of which
    vision          the vision tower (ReMatch.image_features; once per image and step)
    M-RoPE          ReMatch.positions (3-D positions of every row)
    unified mask    masks.unified_mask_batch + additive_mask (the (M, 1, L, L) matching mask)
    decoder         ReMatch.last_hidden (the language model, all passes)
  backward        loss.backward()
  optimizer       gradient clipping + AdamW step
  rest            the step minus the phases above (losses, logging tensors, Python)

    python bench/demo_step.py                    # steps 0-299 of the demo (first 50 not timed)
    python bench/demo_step.py --steps 600 --skip 300 --threads 2

Times are per step, mean over the timed steps (the data phase changes as the item cache
fills: the demo encodes each distinct item once, --skip sets where timing starts).
"""
import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import masks  # noqa: E402
import model as model_py  # noqa: E402
import train  # noqa: E402
from data import TrainBatchSampler, TrainDataset  # noqa: E402

T = collections.defaultdict(float)      # phase → seconds over the timed steps
timing = [False]


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        if not timing[0]:
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[name] += time.perf_counter() - t
    return wrapper


def instrument():
    """Wrap the functions that do each phase (module attributes, as train.py and
    model.py look them up at call time)."""
    train.collate_step = timed("collate (host)", train.collate_step)
    R = model_py.ReMatch
    R.forward = timed("forward", R.forward)
    R.image_features = timed("  vision", R.image_features)
    R.positions = timed("  M-RoPE", R.positions)
    R.last_hidden = timed("  decoder", R.last_hidden)
    model_py.unified_mask_batch = timed("  unified mask", masks.unified_mask_batch)
    model_py.additive_mask = timed("  unified mask", masks.additive_mask)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="demo steps to run")
    p.add_argument("--skip", type=int, default=50, help="untimed first steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the demo uses all cores)")
    p.add_argument("--out_dir", default="runs/bench_demo_step", help="where the synthetic data goes")
    a, rest = p.parse_known_args()
    torch.set_num_threads(a.threads)
    args = train.parse_args(["--out_dir", a.out_dir, "--steps", str(a.steps)] + rest)
    from demo import make_synthetic
    paths = make_synthetic(os.path.join(a.out_dir, "demo_data"), seed=args.seed)
    device = torch.device("cpu")
    model, processor = train.build_model(args, device)
    tok = processor.tokenizer
    dataset = TrainDataset(paths["train"], paths["image_dir"], processor,
                           cache_items=args.cache_items, task_meta=__import__("demo").DEMO_META)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                            fused=True)
    batches = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=TrainBatchSampler(dataset, args.batch_size, 1, 0, args.seed),
        collate_fn=list, num_workers=0))
    instrument()
    autocast = torch.autocast("cpu", enabled=False)
    model.train()
    total = 0.0
    for step in range(a.steps):
        timing[0] = step >= a.skip
        t0 = time.perf_counter()
        t = time.perf_counter()
        examples = next(batches)
        if timing[0]:
            T["data"] += time.perf_counter() - t
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        train.forward_backward(train.Step(model, tok, args, autocast=autocast), examples, step)
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        if timing[0]:
            T["optimizer"] += time.perf_counter() - t
            total += time.perf_counter() - t0
    n = a.steps - a.skip
    top = ["data", "collate (host)", "forward", "backward", "optimizer"]
    T["rest"] = total - sum(T[k] for k in top)
    print(f"config: demo preset, B={args.batch_size}, match_instances={args.match_instances}, "
          f"views={args.match_views}, steps {a.skip}-{a.steps - 1} timed, torch threads "
          f"{torch.get_num_threads()}, cpu_count {os.cpu_count()}, torch {torch.__version__}")
    print(f"| phase | ms / step | share |\n|---|---|---|")
    for k in ["data", "collate (host)", "forward", "  vision", "  M-RoPE", "  unified mask",
              "  decoder", "backward", "optimizer", "rest"]:
        print(f"| {k} | {1e3 * T[k] / n:.1f} | {100 * T[k] / total:.0f}% |")
    print(f"| step | {1e3 * total / n:.1f} | 100% |   ({n / total:.2f} steps/s)")


if __name__ == "__main__":
    main()
