"""Chip training speed: a per-layer scikit-learn loop against our batched trainer, on one cache.

Methods, all on the same train / eval caches and the same 200 validation rows:

* ``sklearn_loop``: for each layer, read it, StandardScaler + ``LogisticRegression`` (lbfgs,
  C=1), the way one would write it by hand;
* ``batched_linear``: ``train_chips(chip="linear")``, default regime (every layer at once);
* ``batched_mlp``: ``train_chips(chip="mlp")``, default regime;
* ``paper_linear``: ``train_chips(chip="linear", regime="paper")`` (batch 1, lr 1e-5, 1 epoch);
* ``sweep``: ``probe sweep`` over every layer x {linear, MLP} x 5 weight decays (batch 512;
  linear lr 2e-3, at most 3 epochs; MLP lr 1e-3, at most 2 epochs; patience 2; every setting
  of a chip type shares the minibatches);
* ``stream_linear``: ``train_chips(chip="linear")`` on the last 4 layers with a feature memory
  budget (``--stream-memory-mb``, default 64 MB) smaller than one layer, so the training rows are
  streamed from the cache; its peak RSS is what a cache larger than RAM costs.

Each method runs in its own process, so its wall time and peak memory (``ru_maxrss``) are its
own. The synthetic cache is shaped like Llama-2-7B (33 layers x 4096, 20,000 train rows, 4
classes, bfloat16 storage) and written with the real ``CacheWriter``; its class signal grows with
depth (chance up to layer ~12, a plateau from ~20) and a few outlier dimensions carry large,
class-free activations, as real LLM residual streams do.

    python benchmarks/probe_speed.py                       # full size (about 6 min on 2 cores, + ~80 s to write the cache)
    python benchmarks/probe_speed.py --small               # quick check (about a minute)
    python benchmarks/probe_speed.py --real-train CACHE --real-eval CACHE   # add a real cache
    python benchmarks/probe_speed.py --no-synthetic --real-train CACHE --real-eval CACHE --seeds 42,1,2,3

Prints a table and writes JSON (``--json``, default ``probe_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("sklearn_loop", "batched_linear", "batched_mlp", "paper_linear", "sweep", "stream_linear")
SWEEP_WEIGHT_DECAYS = [0.0, 1e-4, 1e-3, 1e-2, 1e-1]
# The sweep's recipe (early stopping on validation loss, patience 2, keeps each chip's best epoch).
# Chosen on layers 20 / 24 / 32 of the synthetic cache against the previous recipe (lr 1e-3,
# 3 epochs for both, batch 512): the linear chips gain from a larger rate (validation and eval
# accuracy up on all three); the MLP chips had their best validation loss within 2 epochs (early
# stopping never kept the third), so they stop at 2 with the same chips. Larger minibatches
# (1024-2048, lr scaled) lost 1-5 points at equal epochs and were not kept.
SWEEP_BATCH_SIZE = 512
SWEEP_LRS = {"linear": [2e-3], "mlp": [1e-3]}
SWEEP_EPOCHS = {"linear": [3], "mlp": [2]}
SWEEP_PATIENCE = 2
STREAM_LAYERS = 4  # stream_linear trains the last few layers (it re-reads them every epoch)
STREAM_EPOCHS = 3


def write_synthetic(root: Path, n_train: int, n_eval: int, n_layers: int, hidden: int, n_classes: int,
                    seed: int = 0, storage_dtype: str = "bfloat16") -> tuple[Path, Path]:
    """Train and eval caches with a planted signal growing with depth."""
    from chiptuning.cache import CacheWriter

    rng = np.random.default_rng(seed)
    # class directions: a few hundred informative dimensions, not the whole space
    centers = np.zeros((n_classes, hidden), dtype=np.float32)
    informative = rng.choice(hidden, size=min(hidden, 256), replace=False)
    centers[:, informative] = rng.normal(size=(n_classes, len(informative))) / np.sqrt(len(informative))
    depth = np.arange(n_layers)
    # chance at the bottom, a rise around 40-60% of the depth, a plateau (as in the paper's Fig. 2)
    strength = 2.0 / (1 + np.exp(-(depth - 0.5 * n_layers) / (0.06 * n_layers)))
    outliers = rng.choice(hidden, size=4, replace=False)
    stats = {"embedding": 32000 * hidden, "blocks": [202_383_360] * (n_layers - 1), "final_norm": hidden,
             "lm_head": 32000 * hidden, "other": 0}
    stats["total"] = stats["embedding"] + sum(stats["blocks"]) + stats["final_norm"] + stats["lm_head"]
    paths = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        meta = {"model": f"synthetic-llama2-7b-shape-{hidden}x{n_layers}", "label_names": list("ABCD")[:n_classes],
                "task": {"template": "{text}", "split": split, "label_names": list("ABCD")[:n_classes]},
                "hidden_size": hidden, "num_blocks": n_layers - 1, "feature_mode": "raw", "seed": seed}
        path = root / split
        writer = CacheWriter(path, meta, n_rows=n, layers=range(n_layers), hidden_size=hidden,
                             storage_dtype=storage_dtype, shard_size=2048, extra={"model_stats": stats})
        split_rng = np.random.default_rng(seed + (1 if split == "train" else 2))
        y = split_rng.integers(0, n_classes, n)
        for start in range(0, n, 1024):
            yb = y[start:start + 1024]
            b = len(yb)
            feats = split_rng.standard_normal((b, n_layers, hidden), dtype=np.float32)  # (b, L+1, H)
            feats += strength[None, :, None].astype(np.float32) * centers[yb][:, None, :]
            feats[:, :, outliers] *= 50.0  # massive activations: why features are standardized
            writer.write(np.arange(start, start + b), feats, yb, [f"{split}-{i}" for i in range(start, start + b)],
                         np.full(b, 64), np.full(b, n_classes))
        writer.close()
        paths.append(path)
    return paths[0], paths[1]


# -- one method, in its own process --------------------------------------------------------------

def run_method(method: str, train: str, evals: str, seed: int, sweep_batch_size: int = SWEEP_BATCH_SIZE,
               stream_memory_mb: int = 64) -> dict:
    """Train with one method; returns wall time, peak memory and per-layer eval accuracy."""
    import torch

    from chiptuning.cache import CacheReader
    from chiptuning.probe import train_chips
    from chiptuning.probe.data import carve_rows
    from chiptuning.probe.sweep import SweepConfig, sweep

    reader, ev = CacheReader(train), CacheReader(evals)
    start = time.perf_counter()
    out: dict = {"method": method, "load_before": os.getloadavg()}
    if method == "sklearn_loop":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits

        from chiptuning.probe.bank import choose_threads

        train_rows, _ = carve_rows(reader.n_rows, 200, seed, None)
        accs, iters = {}, []
        # The same thread count as our trainer (on this VM 1 thread beats 2 by far for BLAS too),
        # so the baseline is not slowed down by oversubscription.
        out["blas_threads"] = choose_threads(None)
        with threadpool_limits(limits=out["blas_threads"]):
            for layer in reader.layers:
                x = reader.layer(layer, train_rows)
                scaler = StandardScaler().fit(x)
                clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x), reader.labels[train_rows])
                accs[layer] = float(clf.score(scaler.transform(ev.layer(layer)), ev.labels))
                iters.append(int(clf.n_iter_.max()))
        out["eval_accuracy"] = accs
        out["lbfgs_iterations"] = iters
    elif method == "sweep":
        config = SweepConfig(chips=["linear", "mlp"], weight_decays=SWEEP_WEIGHT_DECAYS, chip_lrs=SWEEP_LRS,
                             chip_epochs=SWEEP_EPOCHS, n_iter_no_change=SWEEP_PATIENCE, seed=seed,
                             batch_size=sweep_batch_size)
        out["sweep_batch_size"] = sweep_batch_size
        result = sweep(train, evals, config=config)
        best = {}
        for row in result["best_per_layer"]:
            best.setdefault(row["chip"], {})[row["layer"]] = row["eval_accuracy"]
        out["eval_accuracy"] = best.get("linear", {})
        out["eval_accuracy_mlp"] = best.get("mlp", {})
        out["n_chips"] = len(result["rows"])
        out["best"] = {k: result["best"][k] for k in ("chip", "setting", "layer", "val_accuracy", "eval_accuracy")}
        out["epochs_run"] = sorted({r["epochs_run"] for r in result["rows"]})
        for part in ("val", "eval"):  # mean over layers of the best setting's accuracy, per chip type
            out[f"mean_best_{part}_accuracy"] = {
                kind: float(np.mean([r[f"{part}_accuracy"] for r in result["best_per_layer"] if r["chip"] == kind]))
                for kind in ("linear", "mlp")}
    elif method == "stream_linear":
        layers = reader.layers[-STREAM_LAYERS:]
        layer_mb = reader.n_rows * reader.hidden_size * 4 / 2**20
        chips = train_chips(reader, ev, chip="linear", seed=seed, layers=layers, epochs=STREAM_EPOCHS,
                            max_memory_mb=stream_memory_mb)
        out["eval_accuracy"] = {m["layer"]: m["eval_accuracy"] for m in chips.metrics}
        out.update(layers=layers, max_memory_mb=stream_memory_mb, epochs=STREAM_EPOCHS,
                   one_layer_float32_mb=layer_mb,
                   one_layer_stored_mb=reader.n_rows * reader.hidden_size * 2 / 2**20)
    else:
        kind = "mlp" if method == "batched_mlp" else "linear"
        regime = "paper" if method == "paper_linear" else "default"
        chips = train_chips(reader, ev, chip=kind, regime=regime, seed=seed)
        out["eval_accuracy"] = {m["layer"]: m["eval_accuracy"] for m in chips.metrics}
        out["epochs_run"] = sorted({m["epochs_run"] for m in chips.metrics})
        out["best_epoch"] = [m["best_epoch"] for m in chips.metrics]
        out["precision"] = chips.config["train"]["precision"]
    out["seconds"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_after"] = os.getloadavg()
    out["torch_threads"] = torch.get_num_threads() if method == "sklearn_loop" else _trainer_threads()
    return out


def _trainer_threads() -> int:
    from chiptuning.probe.bank import choose_threads

    return choose_threads(None)  # the count the trainer used (timed once per process, cached)


def _baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports what a method imports (the floor of every row)."""
    code = ("import resource, torch, sklearn, chiptuning.probe, chiptuning.cache; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)



def summarize(result: dict, reference: dict | None) -> dict:
    accs = {int(k): v for k, v in result["eval_accuracy"].items()}
    best_layer = max(accs, key=lambda layer: accs[layer])
    row = {"method": result["method"], "seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
           "best_layer": best_layer, "best_eval_accuracy": accs[best_layer],
           "mean_eval_accuracy": float(np.mean(list(accs.values()))), "n_layers": len(accs),
           "load": result.get("load_before", [None])[0], "threads": result.get("torch_threads")}
    if reference is not None:
        ref = {int(k): v for k, v in reference["eval_accuracy"].items()}
        diffs = [accs[layer] - ref[layer] for layer in ref if layer in accs]
        row["mean_diff_vs_sklearn"] = float(np.mean(diffs))  # over the layers both trained
        if set(accs) == set(ref):  # a speedup only means something over the same layers
            row["speedup_vs_sklearn"] = reference["seconds"] / result["seconds"]
    return row


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    header = (f"{'method':<18} {'layers':>6} {'wall s':>8} {'peak MB':>8} {'best layer':>10} {'best acc':>9} "
              f"{'mean acc':>9} {'vs sklearn':>10} {'speedup':>8} {'load':>5} {'thr':>3}")
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = r.get("mean_diff_vs_sklearn")
        speed = r.get("speedup_vs_sklearn")
        load = "" if r.get("load") is None else f"{r['load']:.2f}"
        print(f"{r['method']:<18} {r['n_layers']:>6d} {r['seconds']:>8.1f} {r['peak_rss_mb']:>8.0f} "
              f"{'' if r['best_layer'] is None else r['best_layer']:>10} {r['best_eval_accuracy']:>9.4f} "
              f"{r['mean_eval_accuracy']:>9.4f} {'' if diff is None else f'{100 * diff:+.2f} pt':>10} "
              f"{'' if speed is None else f'{speed:.1f}x':>8} {load:>5} {r['threads'] or '':>3}")


def mean_over_seeds(tables: list[list[dict]]) -> list[dict]:
    """Per method, the mean over seeds of every number (best layer: the most frequent)."""
    out = []
    for i, row in enumerate(tables[0]):
        same = [table[i] for table in tables]
        mean = {"method": row["method"], "n_layers": row["n_layers"], "threads": row["threads"], "load": None,
                "best_layer": max({r["best_layer"] for r in same}, key=[r["best_layer"] for r in same].count)}
        for key in ("seconds", "peak_rss_mb", "best_eval_accuracy", "mean_eval_accuracy", "mean_diff_vs_sklearn",
                    "speedup_vs_sklearn"):
            values = [r[key] for r in same if r.get(key) is not None]
            if values:
                mean[key] = float(np.mean(values))
        if "mean_diff_vs_sklearn" in mean:
            mean["diff_vs_sklearn_per_seed"] = [r.get("mean_diff_vs_sklearn") for r in same]
        out.append(mean)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 rows x 9 layers x 256 (a quick check).")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--cache-dir", default=None, help="Where to write the synthetic caches (default a temp dir).")
    parser.add_argument("--real-train", default=None, help="Also run on this real train cache (e.g. MiniLM features).")
    parser.add_argument("--real-eval", default=None, help="Its eval cache.")
    parser.add_argument("--no-synthetic", action="store_true", help="Only the real cache.")
    parser.add_argument("--json", default="benchmarks/results/probe_speed.json", help="Where to write the results.")
    parser.add_argument("--sweep-batch-size", type=int, default=SWEEP_BATCH_SIZE,
                        help="Rows per step of the sweep (every setting shares the minibatches).")
    parser.add_argument("--stream-memory-mb", type=int, default=64,
                        help="Feature memory budget of stream_linear (below one layer: forces streaming).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", default=None,
                        help="Comma-separated seeds (validation rows, row order, initialisation): every method "
                             "runs once per seed, and a table of the means follows (e.g. 42,1,2,3 on a small "
                             "real cache, where one seed's accuracy difference is mostly noise).")
    parser.add_argument("--run-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_method:  # child process: one method
        print(json.dumps(run_method(args.run_method, args.train, args.eval, args.seed, args.sweep_batch_size,
                                    args.stream_memory_mb)))
        return

    methods = [m for m in args.methods.split(",") if m]
    shape = dict(n_train=2000, n_eval=500, n_layers=9, hidden=256) if args.small else \
        dict(n_train=20000, n_eval=2000, n_layers=33, hidden=4096)
    caches = {}
    tmp = None
    root = Path(args.cache_dir) if args.cache_dir else Path(tmp := tempfile.mkdtemp(prefix="probe-speed-"))
    if args.no_synthetic:
        pass
    elif not (root / "train" / "manifest.json").exists() or not (root / "eval" / "manifest.json").exists():
        t = time.perf_counter()
        write_synthetic(root, n_classes=4, **shape)
        print(f"wrote synthetic caches to {root} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if not args.no_synthetic:
        caches["synthetic"] = (root / "train", root / "eval")
    if args.real_train and args.real_eval:
        caches["real"] = (Path(args.real_train), Path(args.real_eval))

    seeds = [int(v) for v in str(args.seeds or args.seed).split(",") if v.strip()]
    report = {"shape": shape, "cpu_count": os.cpu_count(), "sweep_epochs": SWEEP_EPOCHS, "sweep_lrs": SWEEP_LRS,
              "sweep_patience": SWEEP_PATIENCE, "sweep_batch_size": args.sweep_batch_size, "methods": methods,
              "seeds": seeds, "baseline_rss_mb": _baseline_rss_mb(), "caches": {}}
    for name, (train, evals) in caches.items():
        per_seed = {}
        for seed in seeds:
            results, rows = {}, []
            for method in methods:
                cmd = [sys.executable, __file__, "--run-method", method, "--train", str(train), "--eval", str(evals),
                       "--seed", str(seed), "--sweep-batch-size", str(args.sweep_batch_size),
                       "--stream-memory-mb", str(args.stream_memory_mb)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{method} failed on {name}")
                results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = results[method]
                print(f"[{name} seed {seed}] {method}: {r['seconds']:.1f} s, peak {r['peak_rss_mb']:.0f} MB, "
                      f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}, threads {r['torch_threads']}",
                      file=sys.stderr)
            reference = results.get("sklearn_loop")
            for method in methods:
                rows.append(summarize(results[method], reference if method != "sklearn_loop" else None))
                if method == "sweep" and results[method].get("eval_accuracy_mlp"):
                    rows.append(summarize(dict(results[method], method="sweep (best mlp)",
                                               eval_accuracy=results[method]["eval_accuracy_mlp"]), reference))
            per_seed[seed] = {"rows": rows, "raw": results}
            print_table(f"{name} cache: {train} (seed {seed})", rows)
        entry = {"seeds": per_seed}
        if len(seeds) > 1:
            entry["mean_over_seeds"] = mean_over_seeds([per_seed[seed]["rows"] for seed in seeds])
            print_table(f"{name} cache: mean over seeds {seeds}", entry["mean_over_seeds"])
        report["caches"][name] = entry
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"\nwrote {args.json}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
