"""Shared test set-up: the repo root on sys.path, 2 threads (1 per xdist worker), tiny
backbones, width-real checkpoints and the demo's benchmark built once per session; the two
suites.

`pytest` alone runs the proof of the paper: the tests marked `proof` (Eq. 1–5 against
naive loops, Fig. 3's mask, the one-pass claim, M-RoPE positions, App. S7's templates with
Qwen's real tokenizer, one chunked step, a one-step run), in about two minutes on 2 cores.
`pytest --full` runs everything (CI): the boundary tests of tests/test_inputs.py, learning
runs, width-real checkpoints, the real path, DDP, the speed oracles, the tools; CI adds
`-n 2 --dist worksteal` (pytest-xdist: two workers of one thread each, the session's builds
shared between them under file locks). Naming a test file or test on the command line runs
it whole, as --full would. When a selected test uses tiny-qwen2-vl-chat (the `chat_model`
fixture) and HF_HOME holds no build, the session builds it beside the first tests
(start_chat_build)."""
import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pytest-xdist (`-n 2`, the README's full-suite command): each worker on one core, so that
# two workers share the 2 cores; a plain run keeps both threads
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:                    # the processes a test starts (gloo ranks) inherit it too
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if XDIST_WORKER else 2)

TINY_KINDS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
# The width-real checkpoints the test modules share (tools/width_real.py; preset → decoder
# layers, vision blocks): two decoder layers (tests/test_real_path.py says why), 2 vision
# blocks on Qwen2.5-VL (block 0 windowed, block 1 full), 3 of each on Qwen3-VL (one per
# DeepStack level)
WIDTH_REAL_BUILD = {"qwen2-vl-2b": dict(num_layers=2, vision_depth=1),
                    "qwen2.5-vl-3b": dict(num_layers=2, vision_depth=2),
                    "qwen3-vl-2b": dict(num_layers=3, vision_depth=3),
                    "qwen3-vl-8b": dict(num_layers=3, vision_depth=3)}


@pytest.fixture(scope="session", params=TINY_KINDS)
def tiny(request):
    """(name, model, processor) for each tiny backbone, fp32 on CPU, seed 0."""
    from util.backbone import load_backbone
    model, processor = load_backbone(request.param, device="cpu", seed=0)
    model.eval()
    return request.param, model, processor


@pytest.fixture(scope="session")
def width_real_checkpoint(tmp_path_factory):
    """write(preset, num_layers, vision_depth) → the path of a width-real fp32 checkpoint
    (tools/width_real.py, seed 0), written once per session for those settings under
    <basetemp>/shared_width_real/layers<n>-vision<m>/<preset> and reused by every module
    that asks for the same ones (write_checkpoint reuses a folder written with the same
    arguments). Each is 1-2 GB and takes 5-15 s to write; callers must not write into it."""
    from tools import width_real
    root = shared_root(tmp_path_factory) / "shared_width_real"

    def write(preset, num_layers, vision_depth):
        folder = root / f"layers{num_layers}-vision{vision_depth}"
        with once(folder / preset):
            return width_real.write_checkpoint(preset, folder / preset, num_layers=num_layers,
                                               vision_depth=vision_depth, seed=0)
    return write


@pytest.fixture(scope="session")
def demo_benchmark(tmp_path_factory):
    """make_synthetic(seed=0) at its default size (the demo's benchmark), written once per
    session and read by every module that uses it as is; callers must not write into it."""
    from demo import make_synthetic
    path = shared_root(tmp_path_factory) / "shared_demo_data"
    with once(path):
        return make_synthetic(str(path), seed=0)


def shared_root(tmp_path_factory):
    """Where session-wide builds go: this run's base temp folder, or under pytest-xdist the
    folder its workers' base temp folders share (each worker builds nothing another built)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if XDIST_WORKER else base


@contextlib.contextmanager
def once(path):
    """A file lock beside `path`: one pytest-xdist worker builds it, the others wait and
    reuse it (each builder returns an existing complete build)."""
    from filelock import FileLock
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def shape_image(colour, size=56, shape="circle", background="white"):
    """A small PIL test image: one coloured shape."""
    from PIL import Image, ImageDraw
    w, h = (size, size) if isinstance(size, int) else size
    im = Image.new("RGB", (w, h), background)
    box = (w // 6, h // 6, 5 * w // 6, 5 * h // 6)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return im


# What the workers' fork server imports once (in a fresh process, not the test process):
# each worker then starts with these loaded instead of importing them again (~5 s a worker)
WORKER_PRELOAD = ["torch", "transformers", "train", "evaluate"]


def run_processes(target, args_per_rank, err_dir, timeout):
    """Start one fresh process per args tuple (multiprocessing's forkserver: forked from a
    clean server process that has only imported WORKER_PRELOAD, never from the test
    process), wait at most `timeout` s each, kill any that hang, and fail with the
    workers' tracebacks (written to err_dir/rank*.err)."""
    import pathlib

    import torch.multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)             # read when the server starts
    procs = [ctx.Process(target=target, args=a) for a in args_per_rank]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    errors = "".join(f.read_text() for f in sorted(pathlib.Path(err_dir).glob("rank*.err")))
    assert not hung, f"worker(s) did not finish within {timeout}s\n{errors}"
    assert [p.exitcode for p in procs] == [0] * len(procs), \
        f"worker exit codes {[p.exitcode for p in procs]}\n{errors}"


@contextlib.contextmanager
def gloo_worker(rank, world, rendezvous, err_dir, timeout_s=60):
    """Inside a worker that run_processes started: 1 thread (2 processes on 2 cores), a gloo
    process group through the rendezvous file, left with teardown_distributed on success;
    any exception's traceback goes to err_dir/rank<rank>.err (run_processes shows it) and
    is raised again, so the worker exits non-zero."""
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    from util.dist import teardown_distributed
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        yield
        teardown_distributed()
    except BaseException:                                   # noqa: BLE001
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def pytest_configure(config):
    config.addinivalue_line("markers", "proof: part of the two-minute proof of the paper that plain "
                                       "`pytest` runs (the rest needs `pytest --full`)")
    config.addinivalue_line("markers", "slow: a test over ~10 s on 2 CPU cores; `pytest --full "
                                       "-m 'not slow'` leaves them out, CI runs them")
    config.addinivalue_line("markers", "big: needs ~8 GB of disk and memory (a width-real 8B "
                                       "checkpoint); runs only with `pytest --big`, a smaller "
                                       "model of the same family covers it in the full suite")


def pytest_addoption(parser):
    parser.addoption("--big", action="store_true", help="also run the tests marked big")
    parser.addoption("--full", action="store_true", help="the full suite (CI); without it and "
                     "without named test files only the tests marked proof run")


def _names_tests(config):
    """Test files or node ids were named on the command line (not just the tests folder)."""
    return any(a.split("::")[0].endswith(".py") for a in config.args)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--full") and not _names_tests(config):
        rest = [item for item in items if "proof" not in item.keywords]
        if rest:
            config.hook.pytest_deselected(items=rest)
            items[:] = [item for item in items if "proof" in item.keywords]
    guard_chat_build()
    if config.getoption("--big"):
        return
    skip = pytest.mark.skip(reason="big (~8 GB): run with pytest --big")
    for item in items:
        if "big" in item.keywords:
            item.add_marker(skip)


# tiny-qwen2-vl-chat: its build (demo/pretrain.py, ~2 minutes on 2 cores) forces two threads,
# its weights depend on the count. Inside a test, beside the other xdist worker's test (three
# threads on two cores), it took ~11 minutes. Instead the first test of the session starts
# it in a process of its own at the normal priority and lowers the test workers' (nice 10):
# the build keeps both cores when it needs them and the tests take the rest.
CHAT_BUILD = "shared_chat_build"        # under shared_root: started, build.log, rc
CHAT_BUILD_TIMEOUT = 1800               # s a test waits for it (~2 minutes on 2 cores)


@pytest.fixture(scope="session", autouse=True)
def start_chat_build(request, tmp_path_factory):
    """When a selected test uses the `chat_model` fixture and HF_HOME holds no build: one
    worker starts `python -m demo.pretrain` (the first to create <CHAT_BUILD>/started), each
    worker lowers its own priority while it runs. The starting worker's session ends only
    after the build (the other worker's test may still wait for it)."""
    from demo import pretrain as P
    waiter = None
    if not P.built(P.cache_dir()) and any("chat_model" in item.fixturenames for item in request.session.items):
        waiter = _start_chat_build(shared_root(tmp_path_factory) / CHAT_BUILD)
    yield
    if waiter is not None:
        waiter.join()


def _start_chat_build(folder):
    """A thread that waits for the build's process and writes its exit status to
    <folder>/rc, if this worker started it, else None (the other worker did); either way
    this worker's priority is lowered while the build runs."""
    import subprocess
    import threading
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:                                 # the other worker started it
        if not (folder / "rc").exists():
            os.nice(10)
        return None
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}     # as a user's run, but
    env["OMP_WAIT_POLICY"] = "PASSIVE"      # its threads sleep at a barrier, leaving the core to the tests
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])

    def record(status):                                     # for every worker to read
        (folder / "rc.tmp").write_text(str(status))
        os.replace(folder / "rc.tmp", folder / "rc")
    try:
        with open(folder / "build.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "demo.pretrain"], cwd=root, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
    except OSError as e:
        record(f"not started: {e}")
        raise
    os.nice(10)                                             # after the start: the build keeps priority 0
    waiter = threading.Thread(target=lambda: record(proc.wait()), daemon=True)
    waiter.start()
    return waiter


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """The folder of the built tiny-qwen2-vl-chat: waits for the build start_chat_build
    started (if it did) and fails with its log if the build failed."""
    import time

    from demo import pretrain as P
    folder = shared_root(tmp_path_factory) / CHAT_BUILD
    if (folder / "started").exists():
        t0 = time.time()
        while not (folder / "rc").exists() and time.time() - t0 < CHAT_BUILD_TIMEOUT:
            time.sleep(1)
        rc = (folder / "rc").read_text() if (folder / "rc").exists() else f"no status after {CHAT_BUILD_TIMEOUT} s"
        if rc != "0":
            log = (folder / "build.log").read_text()[-3000:] if (folder / "build.log").exists() else ""
            pytest.fail(f"building tiny-qwen2-vl-chat (python -m demo.pretrain): {rc}\n{log}")
    assert P.built(P.cache_dir()), "tiny-qwen2-vl-chat is not built"
    return P.cache_dir()


def guard_chat_build():
    """Any build of this HF_HOME's tiny-qwen2-vl-chat from inside a test fails that test: a
    test that uses the model without the `chat_model` fixture would build it beside the
    other worker's test."""
    from demo import pretrain as P
    cache, build = P.cache_dir(), P._build_locked

    def guarded(path, progress):
        if path == cache and not P.built(path):
            raise RuntimeError("this test builds tiny-qwen2-vl-chat: give it the chat_model fixture, so that "
                               "the session builds it beside the first tests (tests/conftest.py)")
        return build(path, progress)
    P._build_locked = guarded
