"""Side-by-side speed of ``probe_speed.py``'s methods in two checkouts (e.g. before / after a change).

Both trees run the same methods on the same synthetic cache, alternately and in turn-swapping
order (round 1: old, new; round 2: new, old; ...), each run in its own process with the tree's own
``benchmarks/probe_speed.py`` and its own Python (a virtual environment where that tree is
installed): load from other jobs on a shared machine then hits both trees alike. The torch thread
count is pinned (``--threads``) so that neither tree's run is timed with another count than the
other's (``choose_threads`` otherwise times 1 and all CPUs at the start of every process, and the
answer depends on the load of that moment).

    python benchmarks/compare_trees.py --old ../base-checkout --new . \\
        --cache-dir /tmp/probe-bench/cache --methods batched_linear,batched_mlp,sweep --rounds 2 \\
        --json benchmarks/results/probe_speed_refactor_side_by_side.json

``--old-python`` / ``--new-python`` default to each tree's ``.venv/bin/python``. The cache is
written (by this tree's ``probe_speed.write_synthetic``) when missing, and read once before the
first run so that no run pays for the disk. Prints a table (wall seconds of every run, mean per
tree, new / old ratio, peak RSS, whether both trees reached the same eval accuracies) and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from probe_speed import write_synthetic  # noqa: E402

DEFAULT_METHODS = ("batched_linear", "batched_mlp", "sweep")

# Run in the child: the tree's own probe_speed.run_method, with the trainer's thread count pinned.
CHILD = """
import importlib.util, json, os, sys
script, method, train, evals, seed, threads = sys.argv[1:7]
spec = importlib.util.spec_from_file_location("probe_speed", script)
probe_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_speed)
if int(threads):
    try:
        import chiptuning.probe.bank as trainer
    except ImportError:  # a tree from before the trainer's module was called bank
        import chiptuning.probe.batched as trainer
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    trainer._THREADS[n_cpu] = int(threads)  # what choose_threads(None) answers in this process
out = probe_speed.run_method(method, train, evals, int(seed))
print(json.dumps(out))
"""


def warm(cache_dir: Path) -> float:
    """Read every file of the cache once (into the page cache); returns the seconds it took."""
    start = time.perf_counter()
    for path in sorted(cache_dir.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    return time.perf_counter() - start


def run_one(tree: Path, python: str, method: str, train: Path, evals: Path, seed: int, threads: int) -> dict:
    script = tree / "benchmarks" / "probe_speed.py"
    cmd = [python, "-c", CHILD, str(script), method, str(train), str(evals), str(seed), str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} failed in {tree}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.perf_counter() - start
    return out


def mean_accuracy(result: dict) -> float:
    return float(np.mean(list(result["eval_accuracy"].values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="The reference checkout.")
    parser.add_argument("--new", default=str(HERE.parent), help="The checkout to compare (default this one).")
    parser.add_argument("--old-python", default=None, help="Python of the old tree (default OLD/.venv/bin/python).")
    parser.add_argument("--new-python", default=None, help="Python of the new tree (default NEW/.venv/bin/python).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="Comma-separated probe_speed methods.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs per tree and method (alternating).")
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads of every run (0: let each run time it). 1 by default: with 2 threads "
                             "on 2 cores, a run that shares a core with another job can take many times longer.")
    parser.add_argument("--cache-dir", default="/tmp/probe-bench/cache", help="Synthetic cache (written if missing).")
    parser.add_argument("--small", action="store_true", help="2,000 rows x 9 layers x 256 (a quick check).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", default="benchmarks/results/probe_speed_side_by_side.json")
    args = parser.parse_args()

    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    pythons = {name: (getattr(args, f"{name}_python") or str(tree / ".venv" / "bin" / "python"))
               for name, tree in trees.items()}
    for name, python in pythons.items():
        if not Path(python).exists():
            raise SystemExit(f"no Python for the {name} tree at {python}; pass --{name}-python")
    methods = [m for m in args.methods.split(",") if m]
    root = Path(args.cache_dir)
    shape = dict(n_train=2000, n_eval=500, n_layers=9, hidden=256) if args.small else \
        dict(n_train=20000, n_eval=2000, n_layers=33, hidden=4096)
    if not (root / "train" / "manifest.json").exists() or not (root / "eval" / "manifest.json").exists():
        t = time.perf_counter()
        write_synthetic(root, n_classes=4, **shape)
        print(f"wrote synthetic caches to {root} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print(f"read the cache once in {warm(root):.0f} s", file=sys.stderr)
    train, evals = root / "train", root / "eval"

    report = {"trees": {k: str(v) for k, v in trees.items()}, "pythons": pythons, "methods": methods,
              "rounds": args.rounds, "threads": args.threads, "shape": shape, "seed": args.seed,
              "cpu_count": os.cpu_count(), "load_start": os.getloadavg(), "runs": [], "summary": []}
    for method in methods:
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                out = run_one(trees[name], pythons[name], method, train, evals, args.seed, args.threads)
                report["runs"].append({"method": method, "round": r, "tree": name, **out})
                print(f"{method} round {r + 1} {name}: {out['seconds']:.1f} s, peak {out['peak_rss_mb']:.0f} MB, "
                      f"threads {out['torch_threads']}, load {out['load_before'][0]:.2f} -> {out['load_after'][0]:.2f}",
                      file=sys.stderr)
    report["load_end"] = os.getloadavg()

    print(f"\n{'method':<16} {'old runs s':>16} {'new runs s':>16} {'old s':>7} {'new s':>7} {'new/old':>8} "
          f"{'old MB':>7} {'new MB':>7} {'same acc':>8} {'load':>11}")
    for method in methods:
        runs = {name: [r for r in report["runs"] if r["method"] == method and r["tree"] == name] for name in trees}
        secs = {name: [r["seconds"] for r in rs] for name, rs in runs.items()}
        accs = {name: {json.dumps(r["eval_accuracy"], sort_keys=True) for r in rs} for name, rs in runs.items()}
        loads = [r["load_before"][0] for rs in runs.values() for r in rs]
        row = {"method": method, "old_seconds": secs["old"], "new_seconds": secs["new"],
               "old_mean": float(np.mean(secs["old"])), "new_mean": float(np.mean(secs["new"])),
               "old_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["old"]),
               "new_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["new"]),
               "same_eval_accuracy": accs["old"] == accs["new"] and len(accs["old"]) == 1,
               "mean_eval_accuracy": {name: mean_accuracy(rs[0]) for name, rs in runs.items()},
               "load_range": [min(loads), max(loads)]}
        row["ratio_new_over_old"] = row["new_mean"] / row["old_mean"]
        report["summary"].append(row)
        print(f"{method:<16} {' '.join(f'{s:.1f}' for s in secs['old']):>16} {' '.join(f'{s:.1f}' for s in secs['new']):>16} "
              f"{row['old_mean']:>7.1f} {row['new_mean']:>7.1f} {row['ratio_new_over_old']:>8.3f} "
              f"{row['old_peak_rss_mb']:>7.0f} {row['new_peak_rss_mb']:>7.0f} {'yes' if row['same_eval_accuracy'] else 'no':>8} "
              f"{row['load_range'][0]:>5.2f}-{row['load_range'][1]:<5.2f}")
    print(f"load average (1 min) at start {report['load_start'][0]:.2f}, at end {report['load_end'][0]:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
