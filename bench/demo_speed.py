"""
The CPU demo's training speed (`python train.py`) of this working tree against another
commit, side by side in one run: the two trees' demos alternate (A B A B ...), each run
trains --steps steps and is stopped as soon as its log.jsonl has them; a step's time is
its `samples_per_s` in log.jsonl (B / wall time of the whole step: data, collation,
forward, backward, optimiser). Per run: the median step time over steps > --skip; the
ratio reported is that of the medians over runs.

    python bench/demo_speed.py --against 244a7d4              # 3 runs each, steps 100-400
    python bench/demo_speed.py --against 244a7d4 --reps 2 --steps 1500 --skip 0   # whole demo
    python bench/demo_speed.py --against HEAD~5 --reps 5 --steps 600 --skip 200

The window matters: the data phase is large until the item cache has seen every
distinct item and near zero afterwards, so a change to data loading shows a larger
ratio early than over the whole run. What a user waits for is the whole run (--steps
1500 --skip 0, about 13 minutes for 2 runs per tree).

The other commit is checked out with `git worktree` under a temporary directory (removed
afterwards). Take numbers on a quiet machine: both trees use every core.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_times(tree, out_dir, steps, skip, extra):
    """Run the demo in `tree` until log.jsonl holds `steps` steps; → step times (s) after skip."""
    log = os.path.join(out_dir, "log.jsonl")
    cmd = [sys.executable, "train.py", "--out_dir", out_dir, "--overwrite", "--save_every",
           str(10 ** 9), "--steps", str(steps + 1), *extra]
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if os.path.exists(log) and sum(1 for _ in open(log)) >= steps:
                break
        else:
            raise SystemExit(f"demo in {tree} exited with {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.wait()
    rows = [json.loads(line) for line in open(log)][:steps]
    return [batch_size(extra) / r["samples_per_s"] for r in rows[skip:]]


def batch_size(extra):
    """The demo's B (32) unless --batch_size is among the extra flags."""
    return int(extra[extra.index("--batch_size") + 1]) if "--batch_size" in extra else 32


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="the other commit (e.g. main before a change)")
    p.add_argument("--reps", type=int, default=3, help="runs per tree (interleaved)")
    p.add_argument("--steps", type=int, default=400, help="steps per run")
    p.add_argument("--skip", type=int, default=100, help="steps not counted (start-up, item cache)")
    p.add_argument("extra", nargs="*", help="more train.py flags for both trees (after --)")
    a = p.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", a.against], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        other = os.path.join(tmp, "tree")
        subprocess.run(["git", "worktree", "add", "--detach", other, rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {f"this tree ({head}{'+changes' if dirty else ''})": ROOT, f"{rev}": other}
            med = {name: [] for name in trees}
            for r in range(a.reps):
                for name, tree in trees.items():
                    out = os.path.join(tmp, f"run-{len(med[name])}-{name.split()[0]}")   # fresh per run
                    times = step_times(tree, out, a.steps, a.skip, a.extra)
                    med[name].append(statistics.median(times))                # s / step
                    print(f"rep {r} {name}: median {1e3 * med[name][-1]:.1f} ms/step", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", other], cwd=ROOT, capture_output=True)
    print(f"config: demo (train.py {' '.join(a.extra)}), steps {a.skip}-{a.steps - 1} of each run, "
          f"{a.reps} runs per tree interleaved, cpu_count {os.cpu_count()}")
    print("| tree | median step (ms) | steps/s |\n|---|---|---|")
    for name, m in med.items():
        s = statistics.median(m)
        print(f"| {name} | {1e3 * s:.1f} | {1 / s:.2f} |")
    (n0, m0), (n1, m1) = med.items()
    print(f"speed-up of {n0} over {n1}: {statistics.median(m1) / statistics.median(m0):.2f}x")


if __name__ == "__main__":
    main()
