"""``chiptuning compare``: chip-tuning against the depth-pruning baselines on one model and task.

For each number n of blocks removed, chip-tuning is the dense model's chip at layer L - n (the
pruned checkpoint produces exactly that feature); each baseline prunes and saves the model, whose
chip is trained on its last remaining layer. Decoders also get each model's zero-shot accuracy.
The directory gets compare.csv / .json / .md (the Chip-Tuning paper's Table 1 layout) / .png and
the caches, chips and checkpoints; a re-run into it resumes, reusing the caches.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chiptuning import __version__
from chiptuning.cache import MANIFEST, read_manifest
from chiptuning.errors import ChipTuningError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.io import write_json_atomic
from chiptuning.models import load_config, load_tokenizer
from chiptuning.outputs import COMPARE, claim_output
from chiptuning.probe import train_chips
from chiptuning.probe.chipset import majority_baselines
from chiptuning.prune.baselines import METHODS, DepthPruningRecord, n_from_ratio, prune_with_method, read_record
from chiptuning.registry import get_spec, num_blocks

log = logging.getLogger(__name__)

COLUMNS = ("method", "blocks_kept", "blocks_removed", "block_ratio", "param_ratio", "changed_blocks",
           "chip_layer", "chip_accuracy", "zero_shot_accuracy", "zero_shot_calibrated_accuracy", "notes", "seconds")
NO_ZERO_SHOT = {"zero_shot_accuracy": None, "zero_shot_calibrated_accuracy": None}


@dataclass
class _Run:
    """What every step of a comparison shares."""

    model: str
    out: Path
    train_task: Any
    eval_task: Any
    calibration_task: Any
    n_calibration: int | None
    max_length: int | None
    batch_size: int | None
    chip: str
    device: str
    dtype: str
    offload: str
    seed: int
    L: int
    total_params: int = 0  # of the dense model

    def caches(self, model: str | Path, where: Path) -> tuple[Path, Path]:
        """Extract the train and eval caches of ``model`` into ``where/train`` and ``where/eval``."""
        return tuple(extract(ExtractConfig(out=str(where / part), model=str(model), device=self.device,
                                           dtype=self.dtype, batch_size=self.batch_size, max_tokens_per_batch="auto",
                                           max_length=self.max_length, offload=self.offload), task)
                     for part, task in (("train", self.train_task), ("eval", self.eval_task)))

    def chips(self, caches: tuple[Path, Path], where: Path, layers: list[int] | None = None):
        """Chips trained on the train cache (at every layer, or ``layers``), scored on the eval cache."""
        return train_chips(*caches, chip=self.chip, out=where, seed=self.seed, layers=layers, overwrite=True)


def compare(model_name_or_path: str, train_task, eval_task, out_dir: str | Path, *,
            n_layers: int | Sequence[int] | None = None, ratio: float | Sequence[float] | None = None,
            methods: Sequence[str] = METHODS, calibration_task=None, n_calibration: int | None = 128,
            max_length: int | None = 256, batch_size: int | None = None, chip: str = "linear", device: str = "cpu",
            dtype: str = "fp32", offload: str = "auto", seed: int = 0, angular_from_cache: bool = True,
            method_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Compare chip-tuning and the baselines at one or more pruning ratios; write the table, JSON,
    CSV and plot. The dense caches and chips are made once and serve every ratio.

    Args:
        train_task, eval_task: loaded tasks: chips train on the first and are scored on the second.
        n_layers / ratio: blocks removed by every method, or the fraction of the blocks (exactly
            one; a list gives one comparison per value).
        calibration_task: the baselines' calibration text (default ``train_task``).
        offload: how every model is held (:func:`chiptuning.models.load_model`).
        angular_from_cache: ``angular`` reads the dense train cache (exact, last token) instead of
            the calibration text.
        method_options: each method's options, e.g. ``{"slm": {"threshold": 0.95}}``.

    Returns:
        The summary written to ``compare.json`` (settings and one row per method and ratio).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ChipTuningError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    config = load_config(model_name_or_path)
    if get_spec(config).reads_images or train_task.image_column is not None:
        raise ChipTuningError("compare measures depth-pruning baselines on text models and text data; for a "
                              "vision-language model use `chiptuning run` (or extract, probe, prune)")
    L, decoder = num_blocks(config), get_spec(config).decoder
    ratios, targets = _targets(n_layers, ratio, L)
    run = _Run(model_name_or_path, _claim(out_dir), train_task, eval_task, calibration_task or train_task,
               n_calibration, max_length, batch_size, chip, device, dtype, offload, seed, L)
    started = time.perf_counter()
    caches = run.caches(model_name_or_path, run.out / "caches" / "dense")
    dense = read_manifest(caches[0] / MANIFEST)  # the dense model's parameter counts and weights hash
    if "blocks" not in dense.model_stats:
        raise ChipTuningError(f"{caches[0]} records no parameter counts (extracted by an older chip-tuning); "
                              "remove it and run compare again")
    block_params, run.total_params = dense.model_stats["blocks"], dense.model_stats["total"]
    chips = run.chips(caches, run.out / "chips" / "dense")
    rows = [_row("dense", L, L, 0.0, "", _chip_accuracy(chips, L), _zero_shot(chips),
                 "unpruned; chip on the last layer", round(time.perf_counter() - started, 1))]
    best = max(chips.layers, key=lambda layer: chips.metrics_at(layer).get("val_accuracy") or 0)
    tokenizer = load_tokenizer(model_name_or_path)
    for n in targets:
        rows.append(_row("chip-tuning", L, L - n, sum(block_params[L - n:]) / run.total_params,
                         " ".join(f"-{i}" for i in range(L - n + 1, L + 1)), _chip_accuracy(chips, L - n),
                         NO_ZERO_SHOT, f"chip at layer {L - n} of the dense cache; best layer {best} by validation",
                         0.0))
        for method in methods:
            cache = caches[0] if method == "angular" and angular_from_cache else None
            rows.append(_baseline_row(run, method, n, tokenizer, (method_options or {}).get(method, {}), cache))
    summary = _summary(run, config, decoder, dense.meta.model_hash, ratios, targets, rows, started)
    write_outputs(run.out, summary)
    return summary


def _targets(n_layers, ratio, L: int) -> tuple[list[float] | None, list[int]]:
    """The ratios asked for (or None) and the blocks each comparison removes, checked against ``L``."""
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    ratios = None if ratio is None else ([ratio] if isinstance(ratio, (int, float)) else list(ratio))
    targets = ([n_from_ratio(r, L) for r in ratios] if ratios is not None
               else [int(n_layers)] if isinstance(n_layers, (int, np.integer)) else [int(n) for n in n_layers])
    for n in targets:
        if not 1 <= n <= L - 1:
            raise ChipTuningError(f"cannot remove {n} of {L} blocks (choose 1..{L - 1})")
    return ratios, targets


def _claim(out_dir: str | Path) -> Path:
    """Create or resume the compare directory; an incomplete ``compare.json`` marks it as ours."""
    out = claim_output(out_dir, COMPARE)
    if not (out / COMPARE.record).exists():
        write_json_atomic(out / COMPARE.record, {"format": COMPARE.formats[0], "complete": False})
    return out


def _chip_accuracy(chips, layer: int) -> float | None:
    value = chips.metrics_at(layer).get("eval_accuracy")
    return None if value is None else float(value)


def _zero_shot(chips) -> dict[str, float | None]:
    """The model's own answer at its last layer, as training the chips found it from the caches'
    label-word lens (None without)."""
    report = chips.record.zero_shot
    if report is None:
        return NO_ZERO_SHOT
    return {"zero_shot_accuracy": report.accuracy, "zero_shot_calibrated_accuracy": report.calibrated_accuracy}


def _row(method: str, L: int, kept: int, param_ratio: float, changed: str, chip_accuracy: float | None,
         zero_shot: dict, notes: str, seconds: float) -> dict[str, Any]:
    """One row of the table: a model with ``kept`` of ``L`` blocks, its chip on its last layer."""
    return {"method": method, "blocks_kept": kept, "blocks_removed": L - kept, "block_ratio": (L - kept) / L,
            "param_ratio": param_ratio, "changed_blocks": changed, "chip_layer": kept, "chip_accuracy": chip_accuracy,
            **zero_shot, "notes": notes, "seconds": seconds}


def _baseline_row(run: _Run, method: str, n: int, tokenizer, options: dict, cache) -> dict[str, Any]:
    """Prune with ``method`` (``n`` blocks) into ``n{n}/``, extract the pruned model's caches, train
    and score the chip on its last layer."""
    started, out = time.perf_counter(), run.out / f"n{n}"
    path = prune_with_method(
        run.model, method, out / "models" / method, n_layers=n, calibration_task=run.calibration_task,
        n_calibration=run.n_calibration, max_length=run.max_length, batch_size=max(1, (run.batch_size or 16) // 2),
        cache=cache, dtype=run.dtype, device=run.device, offload=run.offload, seed=run.seed, tokenizer=tokenizer,
        overwrite=True, **options)
    record = read_record(path)
    depth = record.num_blocks
    caches = run.caches(path, out / "caches" / method)
    chips = run.chips(caches, out / "chips" / method, layers=[depth])
    row = _row(method, run.L, depth, float(1 - record.params.after / run.total_params),
               _describe_groups(record.groups, run.L), _chip_accuracy(chips, depth), _zero_shot(chips),
               _notes(record), round(time.perf_counter() - started, 1))
    log.info("%s (%d blocks removed): chip accuracy %s", method, n, row["chip_accuracy"])
    return row


def _summary(run: _Run, config, decoder: bool, model_hash: str, ratios, targets, rows, started: float) -> dict:
    """What ``compare.json`` holds: the model, targets, data and settings, and the rows."""
    L, calibration = run.L, run.calibration_task
    return {
        "format": COMPARE.formats[0], "complete": True, "chiptuning_version": __version__,
        "model": {"id": str(run.model), "hash": model_hash, "model_type": config.model_type, "num_blocks": L,
                  "decoder": decoder, "parameters": run.total_params},
        "target": {"n_layers": targets[0], "ratio": ratios[0] if ratios else None, "block_ratio": targets[0] / L},
        "targets": [{"n_layers": n, "ratio": ratios[i] if ratios else None, "block_ratio": n / L}
                    for i, n in enumerate(targets)],
        "train_task": run.train_task.describe(), "eval_task": run.eval_task.describe(),
        "n_train": len(run.train_task.examples), "n_eval": len(run.eval_task.examples),
        "eval_majority_accuracy": majority_baselines(eval=[ex.label for ex in run.eval_task.examples])["eval"],
        "calibration": {"task": calibration.describe(), "n_available": len(calibration.examples),
                        "n_examples": min(run.n_calibration or len(calibration.examples), len(calibration.examples)),
                        "max_length": run.max_length},
        "chip": run.chip, "seed": run.seed, "max_length": run.max_length,
        "zero_shot": ("the model's own answer: label words scored by the LM head at the last layer of the dense and "
                      "each pruned model (plain prompts; calibrated: the training part's label prior divided out)"
                      if decoder else "n/a: encoder model (no LM head)"),
        "rows": rows, "seconds": round(time.perf_counter() - started, 1),
    }


def _describe_groups(groups: list[list[int]], n_blocks: int) -> str:
    """Blocks that changed: "-6" for a deleted block, "3+4+5" for blocks merged or replaced into one."""
    present = {i for g in groups for i in g}
    deleted = [f"-{i}" for i in range(1, n_blocks + 1) if i not in present]
    return " ".join(deleted + ["+".join(str(i) for i in g) for g in groups if len(g) > 1])


def _notes(record: DepthPruningRecord) -> str:
    details = record.details
    if record.method == "streamline":
        training = details["training"]
        return (f"{details['replacement']} replaces blocks {details['replaced_blocks']}; held-out MSE "
                f"{training['held_out_mse_replacement']:.4g} vs {training['held_out_mse_drop']:.4g} if dropped")
    if record.method in ("slm", "laco"):
        thresholds = [round(s["threshold"], 4) for s in details.get("sweeps", [])]
        return f"merged {[g for g in record.groups if len(g) > 1]}; thresholds used {thresholds}"
    if record.method in ("shortgpt", "angular"):
        return f"scores from {details.get('scores_from')}"
    return "last blocks dropped, final norm and head kept"


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.4f}"
    return str(value)


def markdown_table(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (the Chip-Tuning paper's Table 1 layout)."""
    zero_shot = "zero-shot acc. (calibrated)" if summary["model"]["decoder"] else "zero-shot acc. (n/a: encoder)"
    lines = [f"| method | blocks kept | pruning ratio (blocks) | pruning ratio (params) | blocks changed | chip layer "
             f"| chip acc. | {zero_shot} | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        calibrated = row.get("zero_shot_calibrated_accuracy")
        zero = _fmt(row["zero_shot_accuracy"]) + (f" ({_fmt(calibrated)})" if calibrated is not None else "")
        lines.append(f"| {row['method']} | {row['blocks_kept']}/{summary['model']['num_blocks']} "
                     f"| {_fmt(row['block_ratio'], True)} | {_fmt(row['param_ratio'], True)} "
                     f"| {row['changed_blocks'] or '-'} | {row['chip_layer']} | {_fmt(row['chip_accuracy'])} "
                     f"| {zero} | {row['notes']} |")
    majority = summary.get("eval_majority_accuracy")
    if majority is not None:
        lines += ["", f"Majority-class accuracy on the eval data: {majority:.4f} ({summary['n_eval']} examples)."]
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart of chip accuracy per method, zero-shot accuracy as points, the majority line."""
    rows = summary["rows"]
    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(7, 0.6 * len(rows)), 3.5))
    FigureCanvasAgg(fig)  # the object API: no global backend switch
    ax = fig.add_subplot()
    colors = ["0.6" if n == "dense" else ("tab:green" if n == "chip-tuning" else "tab:blue") for n in names]
    ax.bar(x, [np.nan if r["chip_accuracy"] is None else r["chip_accuracy"] for r in rows], color=colors,
           label="chip accuracy")
    ax.set_xticks(x, names, rotation=45 if len(rows) > 8 else 0, fontsize=8)
    zs = [r["zero_shot_accuracy"] for r in rows]
    if any(z is not None for z in zs):
        ax.scatter(x, [np.nan if z is None else z for z in zs], color="tab:red", marker="D", zorder=3,
                   label="zero-shot accuracy")
    if summary.get("eval_majority_accuracy") is not None:
        ax.axhline(summary["eval_majority_accuracy"], color="k", linestyle="--", linewidth=1, label="majority class")
    for i, r in enumerate(rows):
        ax.annotate(f"{100 * r['block_ratio']:.0f}%", (i, 0.02), ha="center", fontsize=8, color="white")
    ax.set_ylim(0, 1.2)  # room above the bars for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("eval accuracy")
    name = Path(summary["model"]["id"]).name
    name = summary["model"]["model_type"] if name in ("model", "") else name
    removed = ", ".join(str(t["n_layers"]) for t in summary.get("targets", [summary["target"]]))
    ax.set_title(f"{name} on {summary['eval_task'].get('name', '')}: {removed} of {summary['model']['num_blocks']} "
                 "blocks removed")
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    """compare.json, compare.csv, compare.md and compare.png of ``summary`` in ``out``."""
    write_json_atomic(out / "compare.json", summary)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary["rows"])
    (out / "compare.md").write_text(markdown_table(summary))
    plot_comparison(summary, out / "compare.png")
