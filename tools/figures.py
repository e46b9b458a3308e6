"""
Pictures of a training run, as PNGs:

  curves.png      the terms of Eq. 5 (total, L_cl, L_orth, L_qdm), matching accuracy and the
                  learning rate per step, from the run's log.jsonl (moving average + raw);
  attention.png   the last-layer attention of the K learnable tokens over the image patches
                  of a few image queries, drawn over the images (the paper's Fig. 7): mean
                  over heads and over the K tokens, one value per merged patch;
  embeddings.png  a 2-D t-SNE map of query and positive-document embeddings of a few
                  tasks (the paper's Fig. 6): colour = task, circle = query, cross = document.

    python tools/figures.py runs/demo                      # the demo: its eval split
    python tools/figures.py runs/x --eval_data DIR --eval_image_dir IMG --tasks A B C

Plotting needs matplotlib, an optional dependency (`pip install matplotlib`); the t-SNE is
written out here (exact, O(n²): meant for a few hundred points).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import collate_embed, encode_item  # noqa: E402
from util.benchmarks import read_eval_task  # noqa: E402
from util.inputs import load_image  # noqa: E402


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("tools/figures.py draws with matplotlib, an optional dependency: "
                         "pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------
# Loss curves

CURVES = [("loss", "Eq. 5 total"), ("L_cl", "L_cl (Eq. 3)"), ("L_orth", "L_orth (Eq. 2)"),
          ("L_qdm", "L_qdm (Eq. 4)"), ("match_acc", "matching accuracy (train)"), ("lr", "learning rate")]


def moving_average(x, w):
    """Mean of the last w values at each step (fewer at the start). x: list → list."""
    c = [0.0]
    for v in x:
        c.append(c[-1] + v)
    return [(c[i + 1] - c[max(0, i + 1 - w)]) / (i + 1 - max(0, i + 1 - w)) for i in range(len(x))]


def plot_curves(log_path, out_png, window=50):
    plt = pyplot()
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{log_path}: no steps logged")
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        y = [r.get(key, float("nan")) for r in rows]
        if key != "lr":
            ax.plot(steps, y, color="0.8", lw=0.6)
            ax.plot(steps, moving_average(y, window), lw=1.6)
        else:
            ax.plot(steps, y, lw=1.6)
        if key == "match_acc":
            ax.axhline(0.5, color="0.5", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.suptitle(f"{log_path} (grey: per step; line: moving average over {window})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# Attention of the learnable tokens over the image (Fig. 7)

@torch.no_grad()
def token_attention(model, processor, text, image):
    """Last-layer attention of the K learnable tokens (query side) to the image tokens of
    one (text, image) query: mean over heads and the K tokens. Returns (h, w) over the
    merged patch grid. Runs the decoder with eager attention to get the weights."""
    batch = collate_embed([encode_item(processor, text, image)], processor.tokenizer,
                          model.num_tokens, model.embed_template)
    hf, dev = model.backbone, model.device
    ids = batch["input_ids"].to(dev)                                          # (1, T)
    x = model.input_embeds(ids, batch["pixel_values"], batch["image_grid_thw"])
    token_idx = batch["token_idx"].to(dev)                                    # (1, K)
    x[0, token_idx[0]] = model.L_q.to(x.dtype)
    lm = hf.model.language_model
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"                                 # weights are returned
    try:
        out = lm(inputs_embeds=x, attention_mask=batch["attention_mask"].to(dev),
                 position_ids=model.positions(ids, batch["attention_mask"], batch["image_grid_thw"]),
                 output_attentions=True, use_cache=False)
    finally:
        lm.config._attn_implementation = previous
    A = out.attentions[-1][0]                                                 # (heads, T, T)
    is_img = ids[0] == hf.config.image_token_id                               # (T,)
    a = A[:, token_idx[0]][:, :, is_img].mean(dim=(0, 1))                     # (n_img_tok,)
    _, gh, gw = batch["image_grid_thw"][0].tolist()
    m = hf.config.vision_config.spatial_merge_size
    return a.reshape(gh // m, gw // m).float().cpu()                          # (h, w)


def plot_attention(model, processor, queries, out_png):
    """queries: [(title, text, PIL image)]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(queries), figsize=(3.2 * len(queries), 3.6), squeeze=False)
    for ax, (title, text, image) in zip(axes[0], queries):
        a = token_attention(model, processor, text, image)
        ax.imshow(image)
        ax.imshow(a.numpy(), cmap="inferno", alpha=0.55, interpolation="nearest",
                  extent=(0, image.width, image.height, 0))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle("last-layer attention of the learnable tokens over the image patches")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------
# t-SNE of embeddings (Fig. 6)

def tsne(X, perplexity=20.0, steps=750, seed=0):
    """Exact t-SNE (van der Maaten & Hinton, 2008) of X (n, d) → (n, 2): Gaussian
    affinities with a per-point bandwidth found by bisection to the perplexity,
    symmetrised; Student-t affinities in 2-D; gradient descent with momentum and early
    exaggeration (×12 for the first 250 steps), learning rate max(n / 48, 50)."""
    g = torch.Generator().manual_seed(seed)
    X = X.double()
    n = len(X)
    D = torch.cdist(X, X).pow(2)                                              # (n, n)
    target = math.log(min(perplexity, (n - 1) / 3))
    P = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):                                                        # bisection on β = 1/2σ²
        lo, hi, beta = 0.0, float("inf"), 1.0
        d = torch.cat([D[i, :i], D[i, i + 1:]])
        for _ in range(64):
            p = torch.exp(-(d - d.min()) * beta)
            p = p / p.sum()
            H = -(p * torch.log(p.clamp_min(1e-300))).sum().item()           # entropy (nats)
            if abs(H - target) < 1e-5:
                break
            if H > target:
                lo, beta = beta, beta * 2 if hi == float("inf") else (beta + hi) / 2
            else:
                hi, beta = beta, (lo + beta) / 2
        P[i, :i], P[i, i + 1:] = p[:i], p[i:]
    P = ((P + P.T) / (2 * n)).clamp_min(1e-12)                                # (n, n)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64) * 1e-4
    lr = max(n / 48, 50.0)                                                    # scikit-learn's "auto"
    V = torch.zeros_like(Y)
    for t in range(steps):
        num = 1 / (1 + torch.cdist(Y, Y).pow(2))                              # (n, n)
        num.fill_diagonal_(0)
        Q = (num / num.sum()).clamp_min(1e-12)
        ex = 12.0 if t < 250 else 1.0
        W = (ex * P - Q) * num                                                # (n, n)
        grad = 4 * (W.sum(1, keepdim=True) * Y - W @ Y)                       # (n, 2)
        V = (0.5 if t < 250 else 0.8) * V - lr * grad
        Y = Y + V
        Y = Y - Y.mean(0)
    return Y.float()


def plot_embeddings(E, labels, sides, out_png, seed=0):
    """E (n, d) embeddings; labels: task per row; sides: "q" / "d" per row."""
    plt = pyplot()
    Y = tsne(F.normalize(E.float(), dim=-1), seed=seed)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for k, task in enumerate(dict.fromkeys(labels)):
        for side, marker in (("q", "o"), ("d", "x")):
            rows = [i for i, (t, s) in enumerate(zip(labels, sides)) if t == task and s == side]
            ax.scatter(Y[rows, 0], Y[rows, 1], s=14, marker=marker, color=f"C{k}",
                       label=f"{task} {'queries' if side == 'q' else 'documents'}")
    ax.legend(fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of query and positive-document embeddings")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------

def latest_checkpoint(run_dir):
    from util.run import checkpoint_dirs
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise SystemExit(f"{run_dir}: no checkpoint-N folder")
    return dirs[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a train.py --out_dir (log.jsonl and checkpoint-N folders)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/figures)")
    p.add_argument("--checkpoint", default=None, help="default: the run's latest checkpoint")
    p.add_argument("--eval_data", default=None, help="MMEB-format eval dir (default: the demo's)")
    p.add_argument("--eval_image_dir", default=None)
    p.add_argument("--tasks", nargs="+", default=None, help="tasks for the embedding map (default: up to 4)")
    p.add_argument("--points", type=int, default=60, help="queries per task in the embedding map")
    p.add_argument("--attention_queries", type=int, default=4, help="image queries in attention.png")
    a = p.parse_args(argv)
    pyplot()                                                  # fail early, with the message
    out = a.out or os.path.join(a.run_dir, "figures")
    os.makedirs(out, exist_ok=True)
    plot_curves(os.path.join(a.run_dir, "log.jsonl"), os.path.join(out, "curves.png"))
    print(f"wrote {out}/curves.png")

    from model import load_rematch
    model, processor, config = load_rematch(a.checkpoint or latest_checkpoint(a.run_dir), device="cpu")
    root = a.eval_data or os.path.join(a.run_dir, "demo_data", "eval")
    image_dir = a.eval_image_dir or os.path.join(a.run_dir, "demo_data")
    tasks = a.tasks or sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))[:4]
    rows = {t: read_eval_task(root, t, max_rows=a.points) for t in tasks}
    if model.num_tokens > 0:
        with_image = [[r for r in rows[t] if r["qry_img_path"]] for t in tasks]
        picks = [(t, rs[i]) for i in range(a.points) for t, rs in zip(tasks, with_image)
                 if i < len(rs)][:a.attention_queries]                       # round-robin over tasks
        queries = [(f"{t}: {r['tgt_text'][0][:28]}", r["qry_text"],
                    load_image(os.path.join(image_dir, r["qry_img_path"]))) for t, r in picks]
        if queries:
            plot_attention(model, processor, queries, os.path.join(out, "attention.png"))
            print(f"wrote {out}/attention.png")
    else:
        print("attention.png skipped: the checkpoint has no learnable tokens (K = 0)")

    from evaluate import _target_instruction_fn, discovered_task_table, embed_inputs
    target, table = _target_instruction_fn(config), discovered_task_table(root, tasks)
    items, labels = [], []
    for t in tasks:
        for r in rows[t]:
            text, path = r["tgt_text"][0], r["tgt_img_path"][0]
            if target is not None and not path:
                text = target(text, t, table[t][0])
            items += [("q", r["qry_text"], os.path.join(image_dir, r["qry_img_path"]) if r["qry_img_path"] else None),
                      ("d", text, os.path.join(image_dir, path) if path else None)]
            labels += [t, t]
    E = embed_inputs(model, processor, items, distributed=False)
    plot_embeddings(E, labels, [s for s, _, _ in items], os.path.join(out, "embeddings.png"))
    print(f"wrote {out}/embeddings.png")


if __name__ == "__main__":
    main()
