"""``chiptuning compare``: chip-tuning against depth-pruning baselines on one model, task and ratio.

For a target number of removed blocks n (or a ratio of the blocks):

* the dense model: feature caches of the train and eval data, chips at every layer; its chip at
  layer L and (decoders) its zero-shot accuracy are the dense rows;
* chip-tuning: the chip at layer L - n of the dense cache (by the layer convention the pruned
  checkpoint produces exactly that feature, which ``chiptuning prune`` checks when it saves);
* every baseline of :mod:`chiptuning.prune.baselines`: prune, save and reload the checkpoint,
  extract its caches, train a chip on its last remaining layer and score it on the eval data;
  decoders also get the pruned model's zero-shot accuracy.

Everything lands in one directory: ``compare.csv``, ``compare.json``, ``compare.md`` (a table
like the Chip-Tuning paper's Table 1) and ``compare.png``, plus the caches, chips and checkpoints
it made (``caches/``, ``chips/``, ``models/``). A re-run into the same directory resumes (the
caches are reused); any other non-empty directory is refused (:mod:`chiptuning.outputs`).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chiptuning import __version__
from chiptuning.cache import CacheReader
from chiptuning.errors import ChipTuningError
from chiptuning.extract import ExtractConfig, extract
from chiptuning.io import write_json_atomic
from chiptuning.models import load_config, load_model, load_tokenizer, weights_hash
from chiptuning.outputs import COMPARE, claim_output
from chiptuning.probe import train_chips
from chiptuning.probe.chipset import majority_baselines
from chiptuning.probe.lens import zero_shot_report
from chiptuning.prune.baselines import METHODS, DepthPruningRecord, n_from_ratio, prune_with_method, read_record
from chiptuning.registry import get_blocks, get_spec, num_blocks

log = logging.getLogger(__name__)

COLUMNS = ("method", "blocks_kept", "blocks_removed", "block_ratio", "param_ratio", "changed_blocks",
           "chip_layer", "chip_accuracy", "zero_shot_accuracy", "zero_shot_calibrated_accuracy", "notes", "seconds")


def _extract(model_path: str, task, out: Path, device: str, dtype: str, batch_size: int | None,
             max_length: int | None, offload: str, tokenizer=None):
    config = ExtractConfig(out=str(out), model=str(model_path), device=device, dtype=dtype, batch_size=batch_size,
                           max_tokens_per_batch="auto", max_length=max_length, offload=offload)
    return extract(config, task, tokenizer=tokenizer)


def _chip_accuracy(chips, layer: int) -> float | None:
    value = chips.metrics_at(layer).get("eval_accuracy")
    return None if value is None else float(value)


def compare(
    model_name_or_path: str,
    train_task,
    eval_task,
    out_dir: str | Path,
    *,
    n_layers: int | Sequence[int] | None = None,
    ratio: float | Sequence[float] | None = None,
    methods: Sequence[str] = METHODS,
    calibration_task=None,
    n_calibration: int | None = 128,
    max_length: int | None = 256,
    batch_size: int | None = None,
    chip: str = "linear",
    device: str = "cpu",
    dtype: str = "fp32",
    offload: str = "auto",
    seed: int = 0,
    angular_from_cache: bool = True,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run chip-tuning and every baseline at one or more pruning ratios; write the table, JSON, CSV
    and plot. The dense caches and chips are made once and serve every ratio.

    Args:
        train_task, eval_task: loaded tasks (``chiptuning.tasks.load_task``): chips train on the
            first and are scored on the second.
        n_layers / ratio: blocks removed by every method, or the fraction of the blocks (exactly
            one of the two; each may be a list, one comparison per value).
        methods: baselines to run (default all of :data:`METHODS`).
        calibration_task: text the baselines calibrate on (default ``train_task``).
        n_calibration, max_length: calibration examples (seeded draw) and prompt length in tokens.
        batch_size: most examples per forward pass (default: what the token budget takes).
        chip: chip kind ("linear", "mlp", "logreg").
        offload: how every model holds its blocks (``--offload``): "none" (in memory), "stream"
            (read from its files as each forward reaches them: a model larger than memory),
            "auto" (stream when the weights do not fit); see :func:`chiptuning.models.load_model`.
            The dense model, each baseline's pruning and every extraction use it.
        angular_from_cache: ``angular`` reads the dense train cache (exact, last token) instead of
            the calibration text.
        method_options: per-method options, e.g. ``{"slm": {"threshold": 0.95}}``.

    Returns:
        The summary written to ``compare.json`` (settings and one row per method and ratio).
    """
    out = Path(out_dir)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ChipTuningError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    config = load_config(model_name_or_path)
    if get_spec(config).images or train_task.image_column is not None:
        raise ChipTuningError("compare measures depth-pruning baselines on text models and text data; for a "
                              "vision-language model use `chiptuning run` (or extract, probe, prune)")
    decoder = get_spec(config).decoder
    L = num_blocks(config)
    ratios = None if ratio is None else ([ratio] if isinstance(ratio, (int, float)) else list(ratio))
    targets = ([n_from_ratio(r, L) for r in ratios] if ratios is not None
               else [int(n_layers)] if isinstance(n_layers, (int, np.integer)) else [int(n) for n in n_layers])
    for n in targets:
        if not 1 <= n <= L - 1:
            raise ChipTuningError(f"cannot remove {n} of {L} blocks (choose 1..{L - 1})")
    calibration_task = calibration_task or train_task
    options = method_options or {}
    claim_output(out, COMPARE)
    if not (out / COMPARE.record).exists():  # claims OUT for a re-run of an interrupted compare
        write_json_atomic(out / COMPARE.record, {"format": COMPARE.formats[0], "complete": False})
    tokenizer = load_tokenizer(model_name_or_path)
    started = time.perf_counter()

    # The dense model: caches (with the label-word lens for decoders), chips of every layer.
    dense = load_model(model_name_or_path, dtype=dtype, device=device, causal_lm=decoder, offload=offload)
    total_params = int(sum(p.numel() for p in dense.parameters()))
    block_params = [int(sum(p.numel() for p in b.parameters())) for b in get_blocks(dense)]
    model_hash = weights_hash(model_name_or_path, dense)
    del dense
    train_cache = _extract(model_name_or_path, train_task, out / "caches" / "dense" / "train", device, dtype,
                           batch_size, max_length, offload)
    eval_cache = _extract(model_name_or_path, eval_task, out / "caches" / "dense" / "eval", device, dtype,
                          batch_size, max_length, offload)
    dense_chips = train_chips(train_cache, eval_cache, chip=chip, out=out / "chips" / "dense", seed=seed,
                              overwrite=True)
    zero_shot_dense = _zero_shot(eval_cache, train_cache)
    best_layer = max(dense_chips.layers, key=lambda layer: dense_chips.metrics_at(layer).get("val_accuracy") or 0)
    rows = [{
        "method": "dense", "blocks_kept": L, "blocks_removed": 0, "block_ratio": 0.0, "param_ratio": 0.0,
        "changed_blocks": "", "chip_layer": L, "chip_accuracy": _chip_accuracy(dense_chips, L),
        **zero_shot_dense, "notes": "unpruned; chip on the last layer",
        "seconds": round(time.perf_counter() - started, 1),
    }]
    for n in targets:
        rows.append({
            "method": "chip-tuning", "blocks_kept": L - n, "blocks_removed": n, "block_ratio": n / L,
            "param_ratio": sum(block_params[L - n:]) / total_params,
            "changed_blocks": " ".join(f"-{i}" for i in range(L - n + 1, L + 1)), "chip_layer": L - n,
            "chip_accuracy": _chip_accuracy(dense_chips, L - n), "zero_shot_accuracy": None,
            "zero_shot_calibrated_accuracy": None,
            "notes": f"chip at layer {L - n} of the dense cache; best layer {best_layer} by validation",
            "seconds": 0.0,
        })
        for method in methods:
            rows.append(_baseline_row(
                method, n, model_name_or_path, out / f"n{n}", train_task, eval_task, train_cache, tokenizer,
                L=L, total_params=total_params, decoder=decoder, calibration_task=calibration_task,
                n_calibration=n_calibration, max_length=max_length, batch_size=batch_size, chip=chip, device=device,
                dtype=dtype, offload=offload, seed=seed, options=options.get(method, {}),
                cache=train_cache if (method == "angular" and angular_from_cache) else None))

    summary = {
        "format": COMPARE.formats[0],
        "complete": True,
        "chiptuning_version": __version__,
        "model": {"id": str(model_name_or_path), "hash": model_hash, "model_type": config.model_type,
                  "num_blocks": L, "decoder": decoder, "parameters": total_params},
        "target": {"n_layers": targets[0], "ratio": ratios[0] if ratios else None, "block_ratio": targets[0] / L},
        "targets": [{"n_layers": n, "ratio": ratios[i] if ratios else None, "block_ratio": n / L}
                    for i, n in enumerate(targets)],
        "train_task": train_task.describe(), "eval_task": eval_task.describe(),
        "n_train": len(train_task.examples), "n_eval": len(eval_task.examples),
        "eval_majority_accuracy": majority_accuracy(eval_task),
        "calibration": record_calibration(calibration_task, n_calibration, max_length), "chip": chip, "seed": seed,
        "max_length": max_length,
        "zero_shot": ("the model's own answer: label words scored by the LM head at the last layer of the dense and "
                      "each pruned model (plain prompts; calibrated: the training part's label prior divided out)"
                      if decoder else "n/a: encoder model (no LM head)"),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(out, summary)
    return summary


def _zero_shot(eval_cache, train_cache) -> dict[str, float | None]:
    """The model's own answer at its last layer, from the caches' label-word lens (None without)."""
    evals, train = CacheReader(eval_cache), CacheReader(train_cache)
    if not (evals.has_lens and train.has_lens):
        return {"zero_shot_accuracy": None, "zero_shot_calibrated_accuracy": None}
    report = zero_shot_report(evals, train)
    return {"zero_shot_accuracy": report.accuracy, "zero_shot_calibrated_accuracy": report.calibrated_accuracy}


def _baseline_row(method: str, n: int, model_name_or_path: str, out: Path, train_task, eval_task, train_cache,
                  tokenizer, *, L: int, total_params: int, decoder: bool, calibration_task, n_calibration, max_length,
                  batch_size, chip, device, dtype, offload, seed, options, cache) -> dict[str, Any]:
    """Prune with ``method`` (``n`` blocks), extract the pruned model's caches, train and score the
    chip on its last layer; its zero-shot answer from the same caches' lens."""
    t0 = time.perf_counter()
    path = prune_with_method(
        model_name_or_path, method, out / "models" / method, n_layers=n, calibration_task=calibration_task,
        n_calibration=n_calibration, max_length=max_length, batch_size=max(1, (batch_size or 16) // 2), cache=cache,
        dtype=dtype, device=device, offload=offload, seed=seed, tokenizer=tokenizer, overwrite=True, **options,
    )
    record = read_record(path)
    depth = record.num_blocks
    m_train = _extract(str(path), train_task, out / "caches" / method / "train", device, dtype, batch_size, max_length,
                       offload)
    m_eval = _extract(str(path), eval_task, out / "caches" / method / "eval", device, dtype, batch_size, max_length,
                      offload)
    chips = train_chips(m_train, m_eval, chip=chip, out=out / "chips" / method, seed=seed, layers=[depth],
                        overwrite=True)
    row = {
        "method": method, "blocks_kept": depth, "blocks_removed": L - depth, "block_ratio": (L - depth) / L,
        "param_ratio": float(1 - record.params.after / total_params),
        "changed_blocks": _describe_groups(record.groups, L), "chip_layer": depth,
        "chip_accuracy": _chip_accuracy(chips, depth), **_zero_shot(m_eval, m_train),
        "notes": _notes(record), "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("%s (%d blocks removed): chip accuracy %s", method, n, row["chip_accuracy"])
    return row


def majority_accuracy(task) -> float:
    """Accuracy of always predicting the most frequent label of ``task`` (context for the table)."""
    return majority_baselines(eval=[ex.label for ex in task.examples])["eval"]


def record_calibration(task, n_calibration, max_length) -> dict[str, Any]:
    return {"task": task.describe(), "n_available": len(task.examples),
            "n_examples": min(n_calibration or len(task.examples), len(task.examples)), "max_length": max_length}


def _describe_groups(groups: list[list[int]], n_blocks: int) -> str:
    """Blocks that changed: "-6" for a deleted block, "3+4+5" for blocks merged or replaced into one."""
    present = {i for g in groups for i in g}
    deleted = [f"-{i}" for i in range(1, n_blocks + 1) if i not in present]
    return " ".join(deleted + ["+".join(str(i) for i in g) for g in groups if len(g) > 1])


def _notes(record: DepthPruningRecord) -> str:
    details, method = record.details, record.method
    parts = []
    if method == "streamline":
        tr = details["training"]
        parts.append(f"{details['replacement']} replaces blocks {details['replaced_blocks']}; held-out MSE "
                     f"{tr['held_out_mse_replacement']:.4g} vs {tr['held_out_mse_drop']:.4g} if dropped")
    elif method in ("slm", "laco"):
        merged = [g for g in record.groups if len(g) > 1]
        thresholds = [s["threshold"] for s in details.get("sweeps", [])]
        parts.append(f"merged {merged}; thresholds used {[round(t, 4) for t in thresholds]}")
    elif method in ("shortgpt", "angular"):
        parts.append(f"scores from {details.get('scores_from')}")
    else:
        parts.append("last blocks dropped, final norm and head kept")
    return "; ".join(parts)


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.4f}"
    return str(value)


def markdown_table(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table (the Chip-Tuning paper's Table 1 layout)."""
    zero_shot = "zero-shot acc. (calibrated)" if summary["model"]["decoder"] else "zero-shot acc. (n/a: encoder)"
    lines = [
        f"| method | blocks kept | pruning ratio (blocks) | pruning ratio (params) | blocks changed | chip layer | chip acc. | {zero_shot} | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        calibrated = row.get("zero_shot_calibrated_accuracy")
        zero = _fmt(row["zero_shot_accuracy"]) + (f" ({_fmt(calibrated)})" if calibrated is not None else "")
        lines.append(
            f"| {row['method']} | {row['blocks_kept']}/{summary['model']['num_blocks']} | {_fmt(row['block_ratio'], True)} "
            f"| {_fmt(row['param_ratio'], True)} | {row['changed_blocks'] or '-'} | {row['chip_layer']} | {_fmt(row['chip_accuracy'])} "
            f"| {zero} | {row['notes']} |"
        )
    majority = summary.get("eval_majority_accuracy")
    if majority is not None:
        lines.append("")
        lines.append(f"Majority-class accuracy on the eval data: {majority:.4f} ({summary['n_eval']} examples).")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart of chip accuracy per method, zero-shot accuracy as points, the majority line."""
    rows = summary["rows"]
    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    acc = [r["chip_accuracy"] if r["chip_accuracy"] is not None else np.nan for r in rows]
    fig = Figure(figsize=(max(7, 0.6 * len(rows)), 3.5))
    FigureCanvasAgg(fig)  # the object API: no global backend switch
    ax = fig.add_subplot()
    colors = ["0.6" if n == "dense" else ("tab:green" if n == "chip-tuning" else "tab:blue") for n in names]
    ax.bar(x, acc, color=colors, label="chip accuracy")
    ax.set_xticks(x, names, rotation=45 if len(rows) > 8 else 0, fontsize=8)
    zs = [r["zero_shot_accuracy"] for r in rows]
    if any(z is not None for z in zs):
        ax.scatter(x, [z if z is not None else np.nan for z in zs], color="tab:red", marker="D", zorder=3,
                   label="zero-shot accuracy")
    if summary.get("eval_majority_accuracy") is not None:
        ax.axhline(summary["eval_majority_accuracy"], color="k", linestyle="--", linewidth=1, label="majority class")
    for i, r in enumerate(rows):
        ax.annotate(f"{100 * r['block_ratio']:.0f}%", (i, 0.02), ha="center", fontsize=8, color="white")
    ax.set_ylim(0, 1.2)  # room above the bars for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("eval accuracy")
    task = summary["eval_task"].get("name", "")
    name = Path(summary["model"]["id"]).name
    name = summary["model"]["model_type"] if name in ("model", "") else name
    removed = ", ".join(str(t["n_layers"]) for t in summary.get("targets", [summary["target"]]))
    ax.set_title(f"{name} on {task}: {removed} of {summary['model']['num_blocks']} blocks removed")
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(out / "compare.json", summary)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in summary["rows"]:
            writer.writerow({k: row.get(k) for k in COLUMNS})
    (out / "compare.md").write_text(markdown_table(summary))
    plot_comparison(summary, out / "compare.png")
