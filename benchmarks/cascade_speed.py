"""Early exit against the fixed-layer pruned model and the dense model, measured in one run.

From one chips directory (``probe train`` on a real decoder's cache), the script makes two pruned
checkpoints with the command line (``select --strategy validate`` + ``prune``, and ``select
--strategy cascade:DELTA`` + ``prune``), then classifies the same evaluation prompts with

* ``dense``: the full model (:func:`chiptuning.prune.dense.dense_pass`, what ``eval --dense`` runs);
* ``fixed``: the pruned model at the best fixed layer (``ChipModel`` with one chip);
* ``cascade``: the cascade checkpoint (``ChipModel.cascade_of_prompts``, exited rows leave the batch);

at batch size 1 and with the default batching (length-sorted, token budget), repeats interleaved.
It reports examples/s, accuracy and the cascade's mean exit depth, and the cascade's wall-clock
speedup over the fixed model against its block ratio (target: at least 0.8 of it at batch size 1).

    python benchmarks/cascade_speed.py --chips runs/smollm2/boolq/chips-linear --task boolq \\
        --data-dir ../shared/data --split 'validation[2000:]' --limit 200 --delta 0.005

Prints a table and writes ``benchmarks/results/cascade_speed_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from chiptuning import __version__
from chiptuning.models import load_model
from chiptuning.pipeline import default_model
from chiptuning.probe import optional_class_mask
from chiptuning.prune import ChipModel
from chiptuning.prune.dense import dense_pass
from chiptuning.tasks import load_task

REPO = Path(__file__).resolve().parents[1]


def cli(*args) -> None:
    subprocess.run(["chiptuning", "-q", *map(str, args)], check=True)


def checkpoint(chips: Path, work: Path, strategy: str, model: str) -> Path:
    """A copy of the chips directory, selected with ``strategy`` and pruned (reused when present)."""
    tag = strategy.split(":")[0]
    pruned = work / f"pruned-{tag}"
    if not (pruned / "chiptuning.json").exists():
        copy = work / f"chips-{tag}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(chips, copy)
        cli("select", copy, "--strategy", strategy)
        cli("prune", "--model", model, "--chips", copy, "--out", pruned)
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chips", required=True, help="chips directory (probe train, with validation rows)")
    parser.add_argument("--model", default=None, help="the full model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default=None)
    parser.add_argument("--template", default=None)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--delta", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=None, help="where the checkpoints go (default: next to the chips)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = args.model or default_model()
    chips = Path(args.chips)
    work = Path(args.work or chips.parent / f"cascade-bench-{args.delta:g}")
    work.mkdir(parents=True, exist_ok=True)
    fixed = ChipModel.from_pretrained(checkpoint(chips, work, "validate", model))
    cascade = ChipModel.from_pretrained(checkpoint(chips, work, f"cascade:{args.delta:g}", model))
    name, entry = cascade.task()
    template = args.template.replace("\\n", "\n") if args.template else None
    data = load_task(args.task, split=args.split, data_dir=args.data_dir, limit=args.limit, seed=0,
                     **({"template": template} if template else {}))
    prompts, _ = data.build_prompts(fixed.tokenizer, fixed.record.max_length)
    labels = np.array([ex.label for ex in data.examples])
    mask = optional_class_mask([ex.n_choices for ex in data.examples], len(entry.label_names))
    dense_model = load_model(model, dtype=fixed.record.dtype, causal_lm=True)  # as the pruned ones
    fixed_name, fixed_entry = fixed.task()
    fixed_chip = fixed.chips[fixed_name]

    def run_dense(batching):
        out = dense_pass(dense_model, fixed.tokenizer, prompts, fixed_entry.layer, fixed_entry.feature_mode, fixed_chip,
                         list(entry.label_names), fixed.record.max_length, class_mask=mask, **batching)
        return out["chip_predictions"], None

    def run_fixed(batching):
        feats = fixed.features_of_prompts(prompts, **batching)
        return np.asarray(fixed_chip.predict(feats, class_mask=mask)), None

    def run_cascade(batching):
        pred, exits, _ = cascade.cascade_of_prompts(prompts, class_mask=mask, **batching)
        return pred, exits

    runs = {"dense": run_dense, "fixed": run_fixed, "cascade": run_cascade}
    modes = {"batch size 1": {"batch_size": 1, "max_tokens_per_batch": 0}, "default batching": {}}
    rows = []
    for mode, batching in modes.items():
        times: dict[str, list[float]] = {k: [] for k in runs}
        answers = {}
        for _ in range(args.repeats):  # interleaved: a burst of other load hits all three alike
            for key, fn in runs.items():
                started = time.perf_counter()
                answers[key] = fn(batching)
                times[key].append(time.perf_counter() - started)
        for key in runs:
            pred, exits = answers[key]
            best = min(times[key])
            depth = float(exits.mean()) if exits is not None else (fixed_entry.layer if key == "fixed" else fixed.record.num_blocks)
            rows.append({"mode": mode, "model": key, "seconds": best, "examples_per_s": len(prompts) / best,
                         "accuracy": float((np.asarray(pred) == labels).mean()), "mean_blocks": depth})
            print(f"{mode:>16} {key:>8}: {len(prompts) / best:7.2f} ex/s, accuracy {rows[-1]['accuracy']:.4f}, "
                  f"{depth:.2f} blocks", flush=True)
    summary = []
    for mode in modes:
        by = {r["model"]: r for r in rows if r["mode"] == mode}
        block_ratio = by["fixed"]["mean_blocks"] / by["cascade"]["mean_blocks"]
        speedup = by["fixed"]["seconds"] / by["cascade"]["seconds"]
        summary.append({"mode": mode, "cascade_over_fixed_speedup": speedup, "block_ratio": block_ratio,
                        "fraction_of_block_ratio": speedup / block_ratio,
                        "fixed_over_dense_speedup": by["dense"]["seconds"] / by["fixed"]["seconds"]})
    result = {"task": args.task, "split": args.split, "n_examples": len(prompts), "delta": args.delta,
              "cascade": entry.cascade, "fixed_layer": fixed_entry.layer, "num_blocks": fixed.record.num_blocks,
              "model": Path(model).name, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "chiptuning": __version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary,
              "command": "python benchmarks/cascade_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {json.dumps(v) if isinstance(v, str) and ' ' in v else v}"
                  for k, v in vars(args).items() if v is not None and k not in ("json", "work"))}
    path = Path(args.json or REPO / "benchmarks" / "results" / f"cascade_speed_{args.task}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| batching | model | examples/s | accuracy | mean blocks |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['model']} | {r['examples_per_s']:.2f} | {100 * r['accuracy']:.1f}% | "
              f"{r['mean_blocks']:.2f} |")
    for s in summary:
        print(f"{s['mode']}: cascade {s['cascade_over_fixed_speedup']:.2f}x faster than the fixed model for a block "
              f"ratio of {s['block_ratio']:.2f}x ({s['fraction_of_block_ratio']:.2f} of it)")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
