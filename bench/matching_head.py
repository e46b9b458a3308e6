"""
The matching head alone, on fixed embeddings: how fast does Eq. 4 learn once the
embedding is good? (docs/demo.md §3.3, the head alone)

A trained checkpoint is the embedder and stays frozen: the E of every query and document
(Eq. 1's fused embedding) never changes. A copy of the checkpoint is trained with the
matching loss alone (Eq. 4, the unified pass of Fig. 3) on the training rows' (q, d⁺, d⁻)
instances, E coming from the frozen embedder; its held-out Yes/No accuracy per view type
(tools/rerank.matching_accuracy: (query, positive) and (query, hardest other candidate) pairs)
is printed as it trains. Beside it, what any judge that reads only cos(E_q, E_d) could
reach on the same pairs with one threshold for all of them: the feature views' ceiling
with these embeddings. Separating the head from the embedding this way tells whether a
matching run that stays at chance is held back by the embedding, by the weight and share
matching gets in Eq. 5, or by the head itself.

    python bench/matching_head.py --checkpoint runs/demo/checkpoint-2000
    python bench/matching_head.py --checkpoint CK --views all --prompt paper --instances 16

--data is a directory as the demo writes it (train/<Subset>/*.parquet, eval/<Task>/
*.parquet, images relative to it): MMEB's schema, so MMEB-format data works the same.
One seed, CPU or CUDA; about 1 minute for 600 steps of `feat` views on 2 CPU cores.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import train  # noqa: E402
from data import MATCH_PROMPTS, TrainBatchSampler, TrainDataset  # noqa: E402
from demo import DEMO_META  # noqa: E402
from losses import matching_loss  # noqa: E402
from masks import VIEW_SETS  # noqa: E402
from util.dist import default_device  # noqa: E402
from model import load_rematch  # noqa: E402
from tools.rerank import MATCH_VIEW_TYPES, matching_accuracy  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (train.py's checkpoint-N)")
    p.add_argument("--data", default="runs/demo/demo_data", help="train/ and eval/ in MMEB's schema")
    p.add_argument("--views", choices=sorted(VIEW_SETS), default="feat", help="view set trained")
    p.add_argument("--prompt", choices=sorted(MATCH_PROMPTS), default="paper", help="segment P")
    p.add_argument("--instances", type=int, default=32, help="(q, d⁺, d⁻) instances per step")
    p.add_argument("--steps", type=int, default=600, help="training steps of the head")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (50 warm-up steps, then flat)")
    p.add_argument("--eval_every", type=int, default=300, help="held-out evaluation every N steps")
    p.add_argument("--eval_queries", type=int, default=60, help="held-out queries per task")
    p.add_argument("--seed", type=int, default=0, help="torch seed, batch order and slots of d⁺")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if present)")
    a = p.parse_args(argv)
    for flag in ("instances", "steps", "eval_every", "eval_queries"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if not os.path.isdir(os.path.join(a.data, "train")) or not os.path.isdir(os.path.join(a.data, "eval")):
        p.error(f"--data {a.data}: expected train/ and eval/ in it (python train.py writes the demo's)")
    return a


def threshold_ceiling(pos, neg):
    """Best accuracy of one threshold t on scores: (mean(pos > t) + mean(neg <= t)) / 2 over
    every t that separates differently (the scores themselves, and below all of them).
    pos, neg: (n,) scores of the positive and of the hardest other candidate."""
    ts = torch.cat([pos, neg, (torch.cat([pos, neg]).min() - 1)[None]])       # (2n + 1,)
    tp = (pos[None, :] > ts[:, None]).double().mean(1)                        # (2n + 1,)
    tn = (neg[None, :] <= ts[:, None]).double().mean(1)
    return float(((tp + tn) / 2).max())


def positive_and_hardest(scores):
    """(pos, neg): the positive's score and the hardest other candidate's, for the rows of
    score_rows' `scores` (rows, candidates; -inf padding) that have another candidate —
    the rows tools/rerank.matching_accuracy judges."""
    keep = torch.isfinite(scores[:, 1:]).any(1)                               # (rows,)
    return scores[keep, 0], scores[keep, 1:].max(1).values


def held_out_sets(embedder, processor, config, data, n):
    """Per eval task: its evaluate.TaskEmbeddings by the frozen embedder (the first n rows'
    encoded items kept for the matching passes)."""
    root = os.path.join(data, "eval")
    table = evaluate.discovered_task_table(root)
    sets = {}
    for task, (meta, _) in table.items():
        sets[task] = evaluate.embed_task(embedder, processor, read_eval_task(root, task),
                                         task, data, config, meta, keep_rows=n)
    return sets


def held_out(matcher, processor, sets, n, prompt):
    """{view type: mean over tasks of the held-out Yes/No accuracy}."""
    acc = {}
    for emb in sets.values():
        r = matching_accuracy(matcher, processor, emb, n, prompt=MATCH_PROMPTS[prompt])
        for k in MATCH_VIEW_TYPES:
            acc.setdefault(k, []).append(r[k])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def main(argv=None):
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    device = torch.device(a.device) if a.device else default_device()
    embedder, processor, config = load_rematch(a.checkpoint, device=device)
    embedder.eval().requires_grad_(False)
    matcher = copy.deepcopy(embedder).train().requires_grad_(True)
    config = dict(config, match_prompt=a.prompt)
    args = train.parse_args(["--out_dir", os.devnull, "--w_qdm", "1", "--match_views", a.views,
                             "--match_prompt", a.prompt, "--match_instances", str(a.instances),
                             "--batch_size", str(a.instances), "--seed", str(a.seed),
                             "--num_tokens", str(config["num_tokens"]),
                             "--embed_template", config["embed_template"]])
    tok = processor.tokenizer
    dataset = TrainDataset(os.path.join(a.data, "train"), a.data, processor, cache_items=100_000,
                           task_meta=DEMO_META, target_instructions=config.get("target_instructions", True))
    batches = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=TrainBatchSampler(dataset, a.instances, 1, 0, a.seed), collate_fn=list))
    params = [p for p in matcher.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)

    sets = held_out_sets(embedder, processor, config, a.data, a.eval_queries)
    pairs = {t: positive_and_hardest(s.scores[:a.eval_queries])              # (pos, neg) per task
             for t, s in sets.items()}
    pos, neg = (torch.cat([p[k] for p in pairs.values()]) for k in (0, 1))
    print(f"checkpoint {a.checkpoint}: views {a.views}, P = {a.prompt}, {a.instances} instances a step, "
          f"lr {a.lr}; held-out: {a.eval_queries} queries x {len(sets)} tasks")
    print(f"one threshold on cos(E_q, E_d), best possible: {threshold_ceiling(pos, neg):.3f} "
          f"(per task: " + ", ".join(f"{t} {threshold_ceiling(*p):.2f}" for t, p in pairs.items()) + ")")
    print("| step | train Yes/No (last steps) | " + " | ".join(MATCH_VIEW_TYPES) + " | s |")
    print("|---|---|" + "---|" * (len(MATCH_VIEW_TYPES) + 1))
    t0, hits = time.time(), []

    def row(step):
        h = held_out(matcher, processor, sets, a.eval_queries, a.prompt)
        tr = f"{sum(hits) / len(hits):.3f}" if hits else "-"
        print(f"| {step} | {tr} | " + " | ".join(f"{v:.3f}" for v in h.values())
              + f" | {time.time() - t0:.0f} |", flush=True)
        hits.clear()
        return h

    result = {0: row(0)}
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 50)
        inst = train.step_instances(next(batches), args, step)
        q, d, match = train.collate_step(inst, tok, args)
        B, M = len(inst.q), inst.n_match
        with torch.no_grad():
            E_q, _ = embedder.embed(q, "q")                                   # (B, d), frozen
            E_d, _ = embedder.embed(d, "d")                                   # (2B, d): d⁺ then d⁻
        logits, labels = matcher.match(match, E_q[:M], E_d[:M], E_d[B:B + M])  # (M·V, vocab), (M·V,)
        loss = matching_loss(logits, labels)                                  # Eq. 4
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: non-finite matching loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hits.append((logits.argmax(-1) == labels).float().mean().item())
        if step % a.eval_every == 0 or step == a.steps:
            result[step] = row(step)
    return result


if __name__ == "__main__":
    main()
