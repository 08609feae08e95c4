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
it made (``caches/``, ``chips/``, ``models/``).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from chiptuning.prune.baselines import METHODS, n_from_ratio, prune_with_method, read_record

from chiptuning import __version__
from chiptuning.errors import ChipTuningError
from chiptuning.features import last_token_features
from chiptuning.registry import get_blocks, get_spec, num_blocks

log = logging.getLogger(__name__)

COLUMNS = ("method", "blocks_kept", "blocks_removed", "block_ratio", "param_ratio", "changed_blocks",
           "chip_layer", "chip_accuracy", "zero_shot_accuracy", "notes", "seconds")


def _choice_ids(tokenizer, label_names: Sequence[str], prompt: str) -> list[int] | None:
    """First token of each label as the continuation of ``prompt``; None when two labels share it."""
    prefix = "" if prompt[-1:].isspace() else " "
    ids = [tokenizer(prefix + str(name), add_special_tokens=False)["input_ids"][0] for name in label_names]
    return ids if len(set(ids)) == len(ids) else None


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, task, max_length: int | None = None, batch_size: int = 16) -> float | None:
    """Zero-shot accuracy of a ``*ForCausalLM``: the LM head's score of each label's first token at
    the last prompt token (final-normed state of the last block); None when labels share a token."""
    prompts, _ = task.build_prompts(tokenizer, max_length)
    labels = np.array([ex.label for ex in task.examples])
    n_choices = np.array([ex.n_choices for ex in task.examples])
    choices = [_choice_ids(tokenizer, task.label_names, p) for p in prompts]
    if any(c is None for c in choices):
        log.warning("two labels of %s start with the same token; no zero-shot accuracy", task.label_names)
        return None
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    L = len(get_blocks(model))
    tokenizer.truncation_side = "left"  # keep the end of the prompt ("Answer:")
    predictions = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], padding=True, truncation=max_length is not None,
                        max_length=max_length, return_tensors="pt")
        state = last_token_features(model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                    layers=[L], mode="normed")[:, 0]  # (B, H)
        logits = head(state).float()  # (B, V)
        picked = logits.gather(1, torch.tensor(choices[start:start + batch_size], device=device))  # (B, C)
        valid = torch.arange(picked.shape[1], device=device)[None, :] < torch.tensor(
            n_choices[start:start + batch_size], device=device)[:, None]
        predictions.append(picked.masked_fill(~valid, -torch.inf).argmax(-1).cpu().numpy())
    return float(np.mean(np.concatenate(predictions) == labels))


def _extract(model_path: str, task, out: Path, device: str, dtype: str, batch_size: int, max_length: int | None,
             tokenizer=None):
    from chiptuning.extract import ExtractConfig, extract

    config = ExtractConfig(out=str(out), model=str(model_path), device=device, dtype=dtype, batch_size=batch_size,
                           max_length=max_length)
    return extract(config, task, tokenizer=tokenizer)


def _chip_accuracy(chips, layer: int) -> float | None:
    value = chips.metrics_at(layer).get("eval_accuracy")
    return None if value is None else float(value)


def _load(path: str, decoder: bool, dtype: str, device: str):
    from chiptuning.models import load_model

    return load_model(path, dtype=dtype, device=device, causal_lm=decoder)


def compare(
    model_name_or_path: str,
    train_task,
    eval_task,
    out_dir: str | Path,
    *,
    n_layers: int | None = None,
    ratio: float | None = None,
    methods: Sequence[str] = METHODS,
    calibration_task=None,
    n_calibration: int | None = 128,
    max_length: int | None = 256,
    batch_size: int = 16,
    chip: str = "linear",
    device: str = "cpu",
    dtype: str = "fp32",
    seed: int = 0,
    angular_from_cache: bool = True,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run chip-tuning and every baseline at one pruning ratio; write the table, JSON, CSV and plot.

    Args:
        train_task, eval_task: loaded tasks (``chiptuning.tasks.load_task``): chips train on the
            first and are scored on the second.
        n_layers / ratio: blocks removed by every method, or the fraction of blocks (exactly one).
        methods: baselines to run (default all of :data:`METHODS`).
        calibration_task: text the baselines calibrate on (default ``train_task``).
        n_calibration, max_length: calibration examples (seeded draw) and prompt length in tokens.
        chip: chip kind ("linear", "mlp", "logreg").
        angular_from_cache: ``angular`` reads the dense train cache (exact, last token) instead of
            the calibration text.
        method_options: per-method options, e.g. ``{"slm": {"threshold": 0.95}}``.

    Returns:
        The summary written to ``compare.json`` (settings and one row per method).
    """
    from chiptuning.probe import train_chips
    from transformers import AutoConfig

    from chiptuning.models import load_tokenizer, weights_hash

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ChipTuningError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if (n_layers is None) == (ratio is None):
        raise ChipTuningError("give exactly one of --n-layers or --ratio")
    config = AutoConfig.from_pretrained(model_name_or_path)
    decoder = get_spec(config).decoder
    L = num_blocks(config)
    n = n_from_ratio(ratio, L) if ratio is not None else int(n_layers)
    if not 1 <= n <= L - 1:
        raise ChipTuningError(f"cannot remove {n} of {L} blocks (choose 1..{L - 1})")
    calibration_task = calibration_task or train_task
    options = method_options or {}
    tokenizer = load_tokenizer(model_name_or_path)
    started = time.perf_counter()

    # The dense model: caches, chips of every layer, parameter counts, zero-shot.
    dense = _load(model_name_or_path, decoder, dtype, device)
    total_params = int(sum(p.numel() for p in dense.parameters()))
    block_params = [int(sum(p.numel() for p in b.parameters())) for b in get_blocks(dense)]
    model_hash = weights_hash(model_name_or_path, dense)
    zero_shot_dense = zero_shot_accuracy(dense, tokenizer, eval_task, max_length, batch_size) if decoder else None
    del dense
    train_cache = _extract(model_name_or_path, train_task, out / "caches" / "dense" / "train", device, dtype,
                           batch_size, max_length)
    eval_cache = _extract(model_name_or_path, eval_task, out / "caches" / "dense" / "eval", device, dtype,
                          batch_size, max_length)
    dense_chips = train_chips(train_cache, eval_cache, chip=chip, out=out / "chips" / "dense", seed=seed)
    rows = [{
        "method": "dense", "blocks_kept": L, "blocks_removed": 0, "block_ratio": 0.0, "param_ratio": 0.0,
        "changed_blocks": "", "chip_layer": L, "chip_accuracy": _chip_accuracy(dense_chips, L),
        "zero_shot_accuracy": zero_shot_dense, "notes": "unpruned; chip on the last layer",
        "seconds": round(time.perf_counter() - started, 1),
    }, {
        "method": "chip-tuning", "blocks_kept": L - n, "blocks_removed": n, "block_ratio": n / L,
        "param_ratio": sum(block_params[L - n:]) / total_params,
        "changed_blocks": " ".join(f"-{i}" for i in range(L - n + 1, L + 1)), "chip_layer": L - n,
        "chip_accuracy": _chip_accuracy(dense_chips, L - n), "zero_shot_accuracy": None,
        "notes": f"chip at layer {L - n} of the dense cache; best layer "
                 f"{max(dense_chips.layers, key=lambda layer: dense_chips.metrics_at(layer).get('val_accuracy') or 0)}"
                 " by validation",
        "seconds": 0.0,
    }]

    for method in methods:
        t0 = time.perf_counter()
        model = _load(model_name_or_path, decoder, dtype, device)
        cache = train_cache if (method == "angular" and angular_from_cache) else None
        path = prune_with_method(
            model_name_or_path, method, out / "models" / method, n_layers=n, calibration_task=calibration_task,
            n_calibration=n_calibration, max_length=max_length, batch_size=max(1, batch_size // 2), cache=cache,
            dtype=dtype, device=device, seed=seed, model=model, tokenizer=tokenizer, **options.get(method, {}),
        )
        del model
        record = read_record(path)
        depth = int(record["num_blocks"])
        m_train = _extract(str(path), train_task, out / "caches" / method / "train", device, dtype, batch_size,
                           max_length)
        m_eval = _extract(str(path), eval_task, out / "caches" / method / "eval", device, dtype, batch_size,
                          max_length)
        chips = train_chips(m_train, m_eval, chip=chip, out=out / "chips" / method, seed=seed, layers=[depth])
        zero_shot = None
        if decoder:
            pruned = _load(str(path), True, dtype, device)
            zero_shot = zero_shot_accuracy(pruned, tokenizer, eval_task, max_length, batch_size)
            del pruned
        rows.append({
            "method": method, "blocks_kept": depth, "blocks_removed": L - depth, "block_ratio": (L - depth) / L,
            "param_ratio": float(1 - record["params"]["after"] / total_params),
            "changed_blocks": _describe_groups(record["groups"], L), "chip_layer": depth,
            "chip_accuracy": _chip_accuracy(chips, depth), "zero_shot_accuracy": zero_shot,
            "notes": _notes(record), "seconds": round(time.perf_counter() - t0, 1),
        })
        log.info("%s: chip accuracy %s", method, rows[-1]["chip_accuracy"])

    calibration = record_calibration(calibration_task, n_calibration, max_length)
    summary = {
        "chiptuning_version": __version__,
        "model": {"id": str(model_name_or_path), "hash": model_hash, "model_type": config.model_type,
                  "num_blocks": L, "decoder": decoder, "parameters": total_params},
        "target": {"n_layers": n, "ratio": ratio, "block_ratio": n / L},
        "train_task": train_task.describe(), "eval_task": eval_task.describe(),
        "n_train": len(train_task.examples), "n_eval": len(eval_task.examples),
        "eval_majority_accuracy": majority_accuracy(eval_task),
        "calibration": calibration, "chip": chip, "seed": seed, "max_length": max_length,
        "zero_shot": "dense and pruned *ForCausalLM" if decoder else "n/a: encoder model (no LM head, no generation)",
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(out, summary)
    return summary


def majority_accuracy(task) -> float:
    """Accuracy of always predicting the most frequent label of ``task`` (context for the table)."""
    from chiptuning.probe.artifacts import majority_baselines

    return majority_baselines(eval=[ex.label for ex in task.examples])["eval"]


def record_calibration(task, n_calibration, max_length) -> dict[str, Any]:
    return {"task": task.describe(), "n_available": len(task.examples),
            "n_examples": min(n_calibration or len(task.examples), len(task.examples)), "max_length": max_length}


def _describe_groups(groups: list[list[int]], n_blocks: int) -> str:
    """Blocks that changed: "-6" for a deleted block, "3+4+5" for blocks merged or replaced into one."""
    present = {i for g in groups for i in g}
    deleted = [f"-{i}" for i in range(1, n_blocks + 1) if i not in present]
    return " ".join(deleted + ["+".join(str(i) for i in g) for g in groups if len(g) > 1])


def _notes(record: dict[str, Any]) -> str:
    details = record.get("details") or {}
    method = record["method"]
    parts = []
    if method == "streamline":
        tr = details["training"]
        parts.append(f"{details['replacement']} replaces blocks {details['replaced_blocks']}; held-out MSE "
                     f"{tr['held_out_mse_replacement']:.4g} vs {tr['held_out_mse_drop']:.4g} if dropped")
    elif method in ("slm", "laco"):
        merged = [g for g in record["groups"] if len(g) > 1]
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
    zero_shot = "zero-shot acc." if summary["model"]["decoder"] else "zero-shot acc. (n/a: encoder)"
    lines = [
        f"| method | blocks kept | pruning ratio (blocks) | pruning ratio (params) | blocks changed | chip layer | chip acc. | {zero_shot} | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['method']} | {row['blocks_kept']}/{summary['model']['num_blocks']} | {_fmt(row['block_ratio'], True)} "
            f"| {_fmt(row['param_ratio'], True)} | {row['changed_blocks'] or '-'} | {row['chip_layer']} | {_fmt(row['chip_accuracy'])} "
            f"| {_fmt(row['zero_shot_accuracy'])} | {row['notes']} |"
        )
    majority = summary.get("eval_majority_accuracy")
    if majority is not None:
        lines.append("")
        lines.append(f"Majority-class accuracy on the eval data: {majority:.4f} ({summary['n_eval']} examples).")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    names = [r["method"] for r in rows]
    acc = [r["chip_accuracy"] if r["chip_accuracy"] is not None else np.nan for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = ["0.6" if n == "dense" else ("tab:green" if n == "chip-tuning" else "tab:blue") for n in names]
    ax.bar(names, acc, color=colors, label="chip accuracy")
    zs = [r["zero_shot_accuracy"] for r in rows]
    if any(z is not None for z in zs):
        ax.scatter(names, [z if z is not None else np.nan for z in zs], color="tab:red", marker="D", zorder=3,
                   label="zero-shot accuracy")
    if summary.get("eval_majority_accuracy") is not None:
        ax.axhline(summary["eval_majority_accuracy"], color="k", linestyle="--", linewidth=1, label="majority class")
    for i, r in enumerate(rows):
        ax.annotate(f"{100 * r['block_ratio']:.0f}%", (i, 0.02), ha="center", fontsize=8, color="white")
    ax.set_ylim(0, 1)
    ax.set_ylabel("eval accuracy")
    task = summary["eval_task"].get("name", "")
    name = Path(summary["model"]["id"]).name
    name = summary["model"]["model_type"] if name in ("model", "") else name
    ax.set_title(f"{name} on {task}: {summary['target']['n_layers']} of "
                 f"{summary['model']['num_blocks']} blocks removed")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: Path, summary: dict[str, Any]) -> None:
    (out / "compare.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in summary["rows"]:
            writer.writerow({k: row.get(k) for k in COLUMNS})
    (out / "compare.md").write_text(markdown_table(summary))
    plot_comparison(summary, out / "compare.png")
