"""
Shared pieces of the benchmark scripts (bench/matching.py, bench/embed.py, bench/eval.py):
common flags, set-up (threads, seed, tiny backbone at MMEB-like image sizes), MMEB-like
items, interleaved timing with medians, peak memory of one call, and a plain table.

Peak memory, as measured by `peak_mib` (the rise above the memory in use when the
call starts; tensors only: memory that BLAS or oneDNN allocate themselves is not seen):
  CUDA  torch.cuda.max_memory_allocated() during the call minus memory_allocated() before.
  CPU   the same quantity from torch.profiler (profile_memory=True): every allocation and
        free of torch's CPU allocator during the call, in time order; the peak of their
        running sum. (Process RSS is too coarse for the tiny model's few-MiB activations,
        and tracemalloc does not see torch's allocator.) Each measurement is one extra,
        untimed call after all timings, so profiling overhead never enters a timing.
"""
import contextlib
import itertools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)                         # the flat repo: model.py, data.py, ...

from data import encode_item                      # noqa: E402
from demo.synthetic import COLOURS, SHAPES       # noqa: E402
from util.backbone import is_export, load_backbone, read_export_spec  # noqa: E402

# ----------------------------------------------------------------------------------
# Flags and set-up

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def add_common_args(p, reps=5):
    g = p.add_argument_group("common")
    g.add_argument("--model", default="tiny-qwen2-vl",
                   help="backbone for load_backbone (tiny-qwen2-vl / tiny-qwen2.5-vl build offline)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (cuda also reports max_memory_allocated)")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="model dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: keeps timings stable when other jobs share the cores)")
    g.add_argument("--image_size", type=int, default=224,
                   help="every image is resized to about image_size² pixels (min = max pixels): "
                        "(image_size/28)² merged image tokens, 224 → 64, 448 → 256")
    g.add_argument("--reps", type=int, default=reps, help="timed repetitions per variant (median reported)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant before timing")
    g.add_argument("--seed", type=int, default=0, help="seed for the tiny init and the inputs")
    return p


def setup(args):
    """Threads, seed, (backbone, processor) with images fixed at ~image_size² pixels. A merged
    export is refused by name (these benches time a raw backbone)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.image_size % 28:
        print(f"note: --image_size {args.image_size} is not a multiple of 28 (patch 14 × merge 2); "
              "the processor rounds it")
    pixels = args.image_size ** 2
    if is_export(args.model):     # these benches time a raw backbone with a K of their own
        raise SystemExit(f"--model {args.model} is a merged ReMatch export (K="
                         f"{read_export_spec(args.model)['num_tokens']}): this bench times a raw backbone "
                         "with its own --num_tokens; pass the export's base model, or time the export with "
                         "bench/serving.py / evaluate.py, which embed through its own tokens and pooling")
    return load_backbone(args.model, device=args.device, dtype=DTYPES[args.dtype], seed=args.seed,
                         min_pixels=pixels, max_pixels=pixels)


def print_config(args, **extra):
    cfg = {**vars(args), **extra, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.device(args.device).type == "cuda":
        cfg["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))


# ----------------------------------------------------------------------------------
# MMEB-like items (the content is irrelevant for cost; the lengths are what matter)

QUERY_TEXT = ("<|image_1|>\nRepresent the given image with the following question: "
              "What colour is the {} on the {}? Find a caption describing the given image.")
DOC_IMAGE_TEXT = "<|image_1|>\nRepresent the given image."
DOC_TEXT = "a picture of a {} {} on the {} and a {} {} on the {}"


def image(i, size):
    """A deterministic size×size image with two coloured shapes (varies with i)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    for k in range(2):
        c = COLOURS[(i + 3 * k) % len(COLOURS)]
        x0 = k * size // 2 + size // 16
        box = (x0, size // 4, x0 + size // 3, 3 * size // 4)
        (draw.ellipse if (i + k) % 2 else draw.rectangle)(box, fill=c)
    return im


def make_item(processor, kind, i, size):
    """kind "query" (image + ~30-token instruction), "doc_image" or "doc_text"."""
    s, c, p = SHAPES[i % 4], COLOURS[i % 6], ("left", "right")[i % 2]
    if kind == "query":
        return encode_item(processor, QUERY_TEXT.format(s, p), image(i, size))
    if kind == "doc_image":
        return encode_item(processor, DOC_IMAGE_TEXT, image(i + 1000, size))
    return encode_item(processor, DOC_TEXT.format(c, s, p, COLOURS[(i + 1) % 6], SHAPES[(i + 1) % 4], "right"))


# ----------------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(fns, reps, warmup, device):
    """
    fns: {name: zero-argument callable}. Runs `warmup` untimed rounds, then `reps` rounds
    in which every variant runs once, interleaved (a load change hits all variants alike).
    Returns {name: median seconds}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def _stderr_silenced():
    """fd 2 → /dev/null: the profiler's C++ side logs two lines per use (KINETO_LOG_LEVEL is
    read only when torch is imported)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_mib(fn, device):
    """Peak extra memory of one call of fn() in MiB (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()     # allocator records
                     if e.name() == "[memory]" and e.device_type() == cpu), key=lambda e: e.start_ns())
    live = list(itertools.accumulate(e.nbytes() for e in events))       # bytes, + alloc / - free
    return max([0, *live]) / 2 ** 20


# ----------------------------------------------------------------------------------
# Output

def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def ratio(a, b, spec=".2f"):
    return "n/a" if a is None or b is None or b == 0 else format(a / b, spec) + "x"


def print_table(header, rows):
    """A plain aligned text table (also valid Markdown)."""
    rows = [[str(c) for c in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(n) for c, n in zip(cells, w)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for r in rows:
        print(line(r))
