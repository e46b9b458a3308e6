"""
Search past one machine's memory: the exact flat index beside the approximate and
compressed ones of tools/search.py (--index_type hnsw, ivfsq8, ivfpq), each built as
`tools/search.py index` builds it (build_index streamed from an .npy file on disk, written
once with faiss.write_index) and searched as `query` searches it (read back memory-mapped,
ivfpq rescored exactly from the vectors). Side by side in one run, per index:

  recall@10   against the exact top 10 (computed with numpy, not faiss: flat reads 1.0)
  QPS         queries per second, all queries in one batch (faiss uses every core)
  latency     median milliseconds of one query alone
  build       seconds to train, add and write the index
  build RAM   peak RSS of the build above the process's RSS before it (VmHWM)
  search RAM  the same while loading and searching (memory-mapped pages that were read count)
  on disk     the index file: the RAM it needs to be served from memory

each also as a ratio to flat. Every build and every search runs in its own subprocess, so
each peak is that index's alone.

    python bench/index_scale.py                             # N=1,000,000 x 1536, without hnsw (below)
    python bench/index_scale.py --n 100000                  # 100k, all four: about 2.5 minutes on 2 cores
    python bench/index_scale.py --n 2000 --d 64 --queries 50 --centres 40   # seconds (tests/test_index_scale.py)
    python bench/index_scale.py --indexes flat ivfpq --nprobe 64 --rescore 8
    python bench/index_scale.py --vectors runs/index/embeddings.npy        # real embeddings instead

Data (unless --vectors): clustered synthetic unit vectors, a Gaussian mixture of --centres
components (default 4096, ~244 vectors each at 1M): each vector is its component's random
unit centre plus Gaussian noise of norm about --spread (cosine to the centre ~ 1/sqrt(1 +
spread^2)) lying in the component's own random --intrinsic-dimensional subspace (64: one
shared orthonormal basis, sign-flipped per component), normalised; the queries are drawn
the same way. Low-rank noise gives neighbours at distinct distances, as real embeddings
have (isotropic noise in 1536 dimensions, --intrinsic 0, makes every neighbour of a
component nearly equidistant: near-ties that no compressed index resolves). Uniform random
vectors, the worst case for approximate indexes (no neighbourhood structure), are not
used. With --vectors the queries are random rows plus isotropic noise of norm --spread.
The vectors are generated once into --work (a temporary folder unless given; kept and
reused when given) and every subprocess reads them from there. At 1M x 1536 they take
6.1 GB on disk, each index up to as much again (an index file is deleted after its search
unless --keep). hnsw runs by default only up to N=300,000: its build at d=1536 is by far
the slowest (95 s at 100k on 2 cores, 20+ min at 1M); name it in --indexes to run it.
Peak memory: the flat and hnsw builds hold one copy of the vectors plus two 64 MiB reads
(715 MiB for 586 MiB of vectors at 100k), so about 6.2 GB at 1M.
Results: bench/RESULTS.md.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.search import INDEX_TYPES, USES, iter_chunks, npy_layout  # noqa: E402   (numpy only: no torch)

PARAMS = sorted({f for fs in USES.values() for f in fs})
K = 10
HNSW_DEFAULT_MAX = 300_000      # above it hnsw runs only when --indexes names it

# ----------------------------------------------------------------------------------
# Data


def write_npy(path, n, d, blocks):
    """An (n, d) float32 .npy written block by block (one block in RAM)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
        for block in blocks:
            np.ascontiguousarray(block, dtype="<f4").tofile(f)


def unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def mixture(rng, centres, signs, basis, n, spread, block=50_000):
    """n unit vectors in blocks: each a random component's centre (c, d) plus Gaussian noise
    of norm ~spread in that component's own subspace, the span of basis (r, d) (orthonormal
    rows) flipped by its signs (c, d) of +-1 (basis None: isotropic in all d dimensions)."""
    c, d = centres.shape
    r = d if basis is None else len(basis)
    for a in range(0, n, block):
        b = min(block, n - a)
        comp = rng.integers(0, c, b)                                                    # (b,)
        g = rng.standard_normal((b, r), dtype=np.float32) * (spread / np.sqrt(r))       # (b, r), |row| ~ spread
        noise = g if basis is None else (g @ basis) * signs[comp]                       # (b, r) @ (r, d) → (b, d)
        yield unit(centres[comp] + noise)                                               # (b, d)


def make_data(args, work):
    """vectors.npy (N, d) and queries.npy (nq, d) in `work`, reused when data.json matches."""
    spec = {"n": args.n, "d": args.d, "queries": args.queries, "centres": args.centres, "spread": args.spread,
            "intrinsic": args.intrinsic, "seed": args.seed, "vectors": os.path.abspath(args.vectors) if args.vectors else None}
    spec_path, vec, qry = (os.path.join(work, f) for f in ("data.json", "vectors.npy", "queries.npy"))
    if os.path.isfile(spec_path) and os.path.isfile(qry) and json.load(open(spec_path)) == spec:
        return (args.vectors or vec), qry
    rng = np.random.default_rng(args.seed)
    t = time.perf_counter()
    if args.vectors:
        n, d, _ = npy_layout(args.vectors)
        rows = np.sort(rng.choice(n, args.queries, replace=False))
        base = np.load(args.vectors, mmap_mode="r")[rows]                                 # (nq, d)
        noise = rng.standard_normal(base.shape, dtype=np.float32) * (args.spread / np.sqrt(d))
        write_npy(qry, args.queries, d, [unit(base + noise)])
    else:
        centres = unit(rng.standard_normal((args.centres, args.d), dtype=np.float32))   # (c, d)
        basis = signs = None
        if args.intrinsic:                                                               # (r, d), orthonormal rows
            basis = np.linalg.qr(rng.standard_normal((args.d, args.intrinsic)))[0].T.astype(np.float32)
            signs = rng.choice(np.array([-1, 1], np.float32), (args.centres, args.d))       # (c, d)
        write_npy(vec, args.n, args.d, mixture(rng, centres, signs, basis, args.n, args.spread))
        write_npy(qry, args.queries, args.d, mixture(rng, centres, signs, basis, args.queries, args.spread))
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    print(f"data: {time.perf_counter() - t:.1f} s", flush=True)
    return (args.vectors or vec), qry


def exact_top_k(vectors, Q, k):
    """The exact top k rows of each query by inner product, with numpy (not faiss): scores
    (nq, N) are computed block by block and merged (one block in RAM)."""
    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.zeros((len(Q), k), np.int64)
    for a, block in iter_chunks(vectors):
        S = Q @ block.T                                                                 # (nq, d) @ (d, b) → (nq, b)
        s = np.concatenate([best_s, S], axis=1)                                          # (nq, k + b)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(a, a + len(block)), S.shape)], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]                                  # (nq, k), unordered
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


# ----------------------------------------------------------------------------------
# One index: build, then search, each in its own process


def rss_kib(field):
    """VmRSS / VmHWM of this process in KiB (ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(args):
    """--_worker build|search for one --_type: prints one JSON line of measurements."""
    import faiss

    from tools.search import build_index, mmap_flag, search, set_search_params
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    params = {k: getattr(args, k) for k in USES[args._type] if getattr(args, k) is not None}
    path = os.path.join(args._work, f"{args._type}.faiss")
    base = rss_kib("VmRSS")
    out = {}
    if args._worker == "build":
        t = time.perf_counter()
        index, p = build_index(args._vectors, args._type, **params)
        faiss.write_index(index, path)
        out = {"build_s": time.perf_counter() - t, "params": p, "bytes": os.path.getsize(path)}
    else:
        with open(os.path.join(args._work, f"{args._type}.json")) as f:
            p = json.load(f)["params"]
        index = faiss.read_index(path, mmap_flag(args._type))
        set_search_params(index, p)
        vectors = np.load(args._vectors, mmap_mode="r") if p["rescore"] > 1 else None
        Q = np.load(os.path.join(args._work, "queries.npy"))                             # (nq, d)
        search(index, Q[:min(5, len(Q))], K, vectors, p["rescore"])                       # warm-up
        alone = []
        for q in Q[:min(20, len(Q))]:
            t = time.perf_counter()
            search(index, q[None], K, vectors, p["rescore"])
            alone.append(time.perf_counter() - t)
        t = time.perf_counter()
        _, rows = search(index, Q, K, vectors, p["rescore"])                              # (nq, K)
        out = {"qps": len(Q) / (time.perf_counter() - t), "latency_ms": 1000 * float(np.median(alone))}
        np.save(os.path.join(args._work, f"{args._type}_rows.npy"), rows)
    out["peak_kib"] = rss_kib("VmHWM") - base
    print(json.dumps(out), flush=True)


def run_worker(args, kind, index_type, vectors, work):
    """One subprocess (module doc); returns its JSON line, raises with its output on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_type", index_type,
           "--_work", work, "--_vectors", vectors, "--threads", str(args.threads)]
    for k in USES[index_type]:
        if getattr(args, k) is not None:
            cmd += [f"--{k}", str(getattr(args, k))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{index_type} {kind} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(args, index_type, vectors, work, truth):
    """Build, then search, one index; its row of results."""
    built = run_worker(args, "build", index_type, vectors, work)
    with open(os.path.join(work, f"{index_type}.json"), "w") as f:
        json.dump(built, f)
    searched = run_worker(args, "search", index_type, vectors, work)
    rows = np.load(os.path.join(work, f"{index_type}_rows.npy"))                          # (nq, K)
    recall = np.mean([len(set(r) & set(t)) / K for r, t in zip(rows, truth)])
    if not args.keep:
        os.remove(os.path.join(work, f"{index_type}.faiss"))
    return {"index": index_type, "params": built["params"], "recall@10": float(recall), "qps": searched["qps"],
            "latency_ms": searched["latency_ms"], "build_s": built["build_s"],
            "build_mib": built["peak_kib"] / 1024, "search_mib": searched["peak_kib"] / 1024,
            "disk_mib": built["bytes"] / 2 ** 20}


# ----------------------------------------------------------------------------------
# The table


def describe(p):
    keys = [k for k in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe", "pq_m", "train_size")
            if k in p] + (["rescore"] if p.get("rescore", 1) > 1 else [])
    return p["factory"] + "".join(f" {k}={p[k]}" for k in keys if k not in ("hnsw_m",))


def print_table(results):
    """One Markdown table: each measure and its ratio to flat side by side."""
    flat = next((r for r in results if r["index"] == "flat"), None)
    cols = [("QPS", "qps", ".1f"), ("latency ms", "latency_ms", ".1f"), ("build s", "build_s", ".1f"),
            ("build RAM MiB", "build_mib", ".0f"), ("search RAM MiB", "search_mib", ".0f"),
            ("on disk MiB", "disk_mib", ".0f")]
    header = ["index", "recall@10"] + [h for name, _, _ in cols for h in (name, "x flat")]
    rows = []
    for r in results:
        row = [describe(r["params"]), f"{r['recall@10']:.3f}"]
        for _, key, spec in cols:
            ratio = r[key] / flat[key] if flat and flat[key] > 0 else float("nan")
            row += [format(r[key], spec), f"{ratio:.2f}"]
        rows.append(row)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for cells in [header, ["-" * n for n in w]] + rows:
        print("| " + " | ".join(c.ljust(n) for c, n in zip(cells, w)) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors indexed")
    p.add_argument("--d", type=int, default=1536, help="dimension (Qwen2-VL-2B's width)")
    p.add_argument("--queries", type=int, default=300, help="queries (drawn near the data)")
    p.add_argument("--centres", type=int, default=4096, help="mixture components")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a centre (cosine ~ 1/sqrt(1+s^2))")
    p.add_argument("--intrinsic", type=int, default=64, help="each component's noise lies in its own random "
                   "subspace of this dimension (0: isotropic in all d dimensions)")
    p.add_argument("--vectors", default=None, help="index these (N, d) float32 vectors (.npy) instead")
    p.add_argument("--indexes", nargs="+", default=None, choices=INDEX_TYPES,
                   help=f"index types (flat always runs: the ratios' base); default: all, hnsw only up to "
                        f"N={HNSW_DEFAULT_MAX:,} (its build: 95 s at 100k, extrapolated 20+ min at 1M x 1536 on 2 cores)")
    p.add_argument("--work", default=None, help="folder for the vectors and indexes (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the index files in --work")
    p.add_argument("--threads", type=int, default=0, help="faiss threads (0: every core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic vectors and queries")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    for k in PARAMS:
        p.add_argument(f"--{k}", type=int, default=None, help="tools/search.py's flag (default: its default)")
    for k in ("_worker", "_type", "_work", "_vectors"):
        p.add_argument(f"--{k}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return worker(args)
    work = args.work or tempfile.mkdtemp(prefix="index_scale_")
    os.makedirs(work, exist_ok=True)
    try:
        vectors, queries = make_data(args, work)
        n, d, _ = npy_layout(vectors)
        print(f"config: n={n:,} d={d} queries={args.queries} k={K} data="
              f"{args.vectors or f'mixture of {args.centres} centres, spread {args.spread}, noise in {args.intrinsic or d} dims'} "
              f"threads={args.threads or os.cpu_count()} cpus={os.cpu_count()} work={work}", flush=True)
        t = time.perf_counter()
        truth = exact_top_k(vectors, np.load(queries), K)                                  # (nq, K)
        print(f"exact top {K} (numpy): {time.perf_counter() - t:.1f} s", flush=True)
        results = []
        chosen = args.indexes or [t for t in INDEX_TYPES if t != "hnsw" or n <= HNSW_DEFAULT_MAX]
        if "hnsw" not in chosen and not args.indexes:
            print(f"hnsw: left out above N={HNSW_DEFAULT_MAX:,} (its build: 20+ min at 1M on 2 cores); "
                  "--indexes flat hnsw ivfsq8 ivfpq runs it", flush=True)
        for index_type in ["flat"] + [t for t in chosen if t != "flat"]:
            t = time.perf_counter()
            results.append(measure(args, index_type, vectors, work, truth))
            print(f"{index_type}: {time.perf_counter() - t:.1f} s", flush=True)
        print_table(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config": {"n": n, "d": d, "queries": args.queries, "centres": args.centres,
                                      "spread": args.spread, "intrinsic": args.intrinsic,
                                      "vectors": args.vectors}, "results": results}, f,
                          indent=2)
        return results
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
