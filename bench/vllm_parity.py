"""
vLLM against ReMatch.embed on a GPU: are the vectors vLLM serves the ReMatch embedding?

A merged export (tools/export_merged.py) of a checkpoint (--checkpoint; default: a
width-real Qwen2-VL-2B, K = 16, random weights, written offline) is embedded three ways on
the same inputs (text, image, image + text; query and document side):

  - reference: ReMatch.embed under transformers, on the same GPU and dtype;
  - exact: tools/vllm_embed.py — vLLM with PoolerConfig(task="token_embed",
    use_activation=False), the last K states pooled on the client;
  - default: vLLM's default embedding for this folder (runner "pooling", no pooler config:
    LAST pooling, normalised), the K-th learnable token's state alone, what `vllm serve`
    answers on /v1/embeddings.

Each route runs in its own process (this script with --route), one after the other, and
writes its vectors to <work>/route-<name>.npz: a process returns all its GPU memory when it
exits, whereas a second vLLM engine started in the process of the first fails vLLM's
free-memory check while the first still holds its share. vLLM's engine runs inside the
route's process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set), so no engine process
outlives its route. This process then prints, side by
side, max |Δ| and the lowest cosine of each vLLM route against the reference. The exact
route should agree to the dtype's noise; the default should not (the silent error the
exact route avoids).

    pip install 'vllm>=0.21'     # not in requirements: GPU only, never in CI
    python bench/vllm_parity.py                        # width-real 2B, bf16
    python bench/vllm_parity.py --checkpoint runs/x/checkpoint-N --dtype float32
    python bench/vllm_parity.py --dry_run              # the same processes and table on the CPU,
                                                       # with stand-in vectors: nothing measured

Exits 0 without CUDA or without vllm (prints why); a vLLM older than tools/vllm_embed.py's
MIN_VLLM stops, naming both releases. tests/test_vllm_client.py runs --dry_run.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROUTES = ("reference", "exact", "default")
COMPARED = (("exact", "exact route"), ("default", "vLLM default LAST"))
SIDES = (("q", "query"), ("d", "document"))
# (MMEB-style text, drawn image (colour, size) or None)
INPUTS = [("Find an image of a red circle.", None),
          ("<|image_1|>\nRepresent the given image.", ("red", (224, 224))),
          ("<|image_1|>\nWhat colour is the circle? Answer in one word.", ("blue", (336, 224))),
          ("Represent the class label: a blue circle", None)]


class RouteError(RuntimeError):
    """A route's process failed or wrote vectors that cannot be compared."""


def inputs():
    """(text, PIL image or None) for INPUTS."""
    from PIL import Image, ImageDraw
    out = []
    for text, drawing in INPUTS:
        im = None
        if drawing is not None:
            colour, size = drawing
            im = Image.new("RGB", size, "white")
            ImageDraw.Draw(im).ellipse((40, 40, size[0] - 40, size[1] - 40), fill=colour)
        out.append((text, im))
    return out


def engine_args(a):
    return dict(dtype=a.dtype, max_model_len=4096, gpu_memory_utilization=a.gpu_memory_utilization,
                enforce_eager=True)


def device_name():
    import torch
    return torch.cuda.get_device_name()


def reference_route(a):
    """ReMatch.embed of INPUTS under transformers, both sides: {side: (N, d) fp32 normalised}."""
    import torch
    import torch.nn.functional as F
    from data import collate_embed, encode_item
    from model import load_rematch
    model, processor, _ = load_rematch(a.checkpoint, device="cuda", dtype=getattr(torch, a.dtype))
    vectors = {}
    for s, _ in SIDES:
        rows = []
        for text, image in inputs():
            batch = collate_embed([encode_item(processor, text, image)], processor.tokenizer,
                                  model.num_tokens, model.embed_template)
            with torch.no_grad():
                E, _ = model.embed(batch, s)
            rows.append(F.normalize(E[0].float(), dim=-1).cpu().numpy())
        vectors[s] = np.stack(rows)
    return vectors, {"device": device_name()}


def exact_route(a):
    """tools/vllm_embed.py on the export: {side: (N, d)}."""
    from tools.vllm_embed import ReMatchVLLM, load_llm
    rm = ReMatchVLLM(load_llm(a.export, **engine_args(a)), a.export)
    xs = [(t, im) if im is not None else t for t, im in inputs()]
    vectors = {s: rm.embed(xs, side).numpy() for s, side in SIDES}
    return vectors, {"device": device_name(), "vllm": rm.vllm_version}


def default_route(a):
    """vLLM's default embedding of the same prompts (LLM.embed, no pooler config)."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from tools.vllm_embed import check_vllm, render
    version = check_vllm()
    tok = AutoTokenizer.from_pretrained(a.export)
    llm = LLM(model=a.export, runner="pooling", **engine_args(a))
    vectors = {}
    for s, side in SIDES:
        prompts = []
        for text, image in inputs():
            p = {"prompt": render(tok, text, image, side)}
            if image is not None:
                p["multi_modal_data"] = {"image": image}
            prompts.append(p)
        outs = llm.embed(prompts, use_tqdm=False)
        vectors[s] = np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])
    return vectors, {"device": device_name(), "vllm": version}


def standin_route(route):
    """--dry_run: vectors without a GPU, a model or vLLM — the reference and the exact route
    equal, the default another (what a GPU run shows when the exact route is right)."""
    vectors = {}
    for k, (s, _) in enumerate(SIDES):
        v = np.random.default_rng([int(route == "default"), k]).standard_normal((len(INPUTS), 16))
        vectors[s] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return vectors, {"device": "CPU (dry run: stand-in vectors)", "vllm": "(none)"}


def run_route(a):
    """The child: one route → a.out (.npz: each side's vectors, its pid, device, vLLM version)."""
    routes = {"reference": reference_route, "exact": exact_route, "default": default_route}
    vectors, info = standin_route(a.route) if a.dry_run else routes[a.route](a)
    np.savez(a.out, pid=os.getpid(), **info, **vectors)


def run_routes(a, work, export=None):
    """Each route in its own process, one after the other (each exits, returning its GPU
    memory, before the next starts) → {route: {name: array}} as the routes wrote them."""
    results = {}
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **os.environ}     # the engine dies with its route
    for route in ROUTES:
        out = os.path.join(work, f"route-{route}.npz")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, os.path.abspath(__file__), "--route", route, "--out", out, "--dtype", a.dtype,
               "--gpu_memory_utilization", str(a.gpu_memory_utilization)]
        cmd += ["--dry_run"] if a.dry_run else ["--checkpoint", a.checkpoint, "--export", export]
        done = subprocess.run(cmd, env=env)                   # this cwd: relative paths hold
        if done.returncode or not os.path.isfile(out):
            raise RouteError(f"route {route} failed (exit {done.returncode}; its output is above); run it "
                             f"alone: {' '.join(cmd)}")
        with np.load(out) as z:
            results[route] = {k: z[k] for k in z.files}
    return results


def compare(results):
    """[(route and side, max |Δ|, lowest cosine)] of each vLLM route against the reference."""
    rows = []
    for route, label in COMPARED:
        for s, side in SIDES:
            got, want = results[route][s].astype(np.float64), results["reference"][s].astype(np.float64)
            if got.shape != want.shape:
                raise RouteError(f"route {route} ({side}) wrote {got.shape} vectors, the reference {want.shape}")
            cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            rows.append((f"{label} ({side})", float(np.abs(got - want).max()), float(cos.min())))
    return rows


def prepare(a, work):
    """The checkpoint (default: width-real Qwen2-VL-2B, written offline) and its merged
    export, on the CPU: this process holds no GPU memory while the routes run."""
    import torch

    from tools.export_merged import export_merged
    dtype = getattr(torch, a.dtype)
    if a.checkpoint is None:                   # width-real Qwen2-VL-2B, full depth, K = 16
        from model import ReMatch
        from tools import width_real
        from util.backbone import load_backbone, save_rematch
        base = width_real.write_checkpoint("qwen2-vl-2b", os.path.join(work, "base"), num_layers=28,
                                           vision_depth=32, dtype=a.dtype)
        backbone, processor = load_backbone(str(base), device="cpu", dtype=dtype)
        model = ReMatch(backbone, num_tokens=16, embed_template="chat")
        a.checkpoint = os.path.join(work, "ckpt")
        save_rematch(model, processor, a.checkpoint, {"model": str(base), "num_tokens": 16,
                                                      "embed_template": "chat", "lora": False})
        del model, backbone
    export = os.path.join(work, "export")
    if not os.path.isdir(export):
        export_merged(a.checkpoint, export, dtype)
    return export


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: width-real 2B)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the export and of every route (default bfloat16)")
    p.add_argument("--work", default=None, help="where to write the checkpoint, export and vectors (default: temp)")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.5, help="vLLM's share of the GPU, per route")
    p.add_argument("--dry_run", action="store_true",
                   help="run the route processes with stand-in vectors on the CPU (no GPU, model or vLLM)")
    p.add_argument("--route", choices=ROUTES, default=None, help=argparse.SUPPRESS)    # a child: one route
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--export", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.route:
        run_route(a)
        return None
    export = None
    if not a.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: nothing measured")
            return None
        if importlib.util.find_spec("vllm") is None:
            print("vllm is not installed (pip install 'vllm>=0.21'): nothing measured")
            return None
        from tools.vllm_embed import VLLMVersionError, check_vllm
        try:
            check_vllm()
        except VLLMVersionError as e:
            raise SystemExit(f"{e}: nothing measured") from None
    work = a.work or tempfile.mkdtemp()
    os.makedirs(work, exist_ok=True)
    if not a.dry_run:
        export = prepare(a, work)
    results = run_routes(a, work, export)
    rows = compare(results)
    ref, exact = results["reference"], results["exact"]
    pids = ", ".join(f"{r} {int(results[r]['pid'])}" for r in ROUTES)
    print(f"{ref['device']} | {a.dtype} | export {export or '(none)'} | {len(INPUTS)} inputs per side | "
          f"vLLM {exact['vllm']} | one process per route (pid {pids})")
    print(f"{'vLLM route':<30} {'max |Δ|':>10} {'min cosine':>11}")
    for name, diff, cos in rows:
        print(f"{name:<30} {diff:>10.2e} {cos:>11.6f}")
    if a.dry_run:
        print("dry run: stand-in vectors, nothing measured")
    return rows, results


if __name__ == "__main__":
    main()
