"""`chiptuning compare`: chip-tuning against depth-pruning baselines on one model, task and ratio."""

from __future__ import annotations

import click

from chiptuning.cli.baselines import method_options, method_settings
from chiptuning.cli.tasks import (
    eval_part_options,
    load_other_split,
    load_task_from_options,
    offload_option,
    task_options,
)
from chiptuning.errors import ChipTuningError
from chiptuning.prune.baselines import METHODS


@click.command("compare", short_help="Chip-tuning against every depth-pruning baseline.")
@click.option("--model", required=True, help="The dense model (hub id or directory).")
@task_options
@eval_part_options(0.3)
@click.option("--ratio", default=None,
              help="Target pruning ratio: fraction of the blocks removed; several, comma-separated (0.25,0.5), "
                   "share the dense caches and chips.")
@click.option("--n-layers", default=None, help="Blocks removed by every method (instead of --ratio); comma-separated for several.")
@click.option("--methods", default=",".join(METHODS), show_default=True,
              help="Comma-separated baselines to run besides chip-tuning.")
@click.option("--calibration-split", default=None,
              help="Calibration text: this split of the same task (default: the training examples).")
@click.option("--calibration-data", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Calibration text from a file instead (JSONL/CSV/...; with --calibration-text-column).")
@click.option("--calibration-text-column", default="text", show_default=True,
              help="Text field of --calibration-data.")
@click.option("--calibration-label-column", default="label", show_default=True,
              help="Label field of --calibration-data (any file the tool loads as a task).")
@click.option("--n-calibration", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration examples (seeded draw).")
@click.option("--max-length", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest prompt, in tokens.")
@click.option("--chip", type=click.Choice(["linear", "mlp", "logreg"]), default="linear", show_default=True,
              help="The chip: a linear layer, a 2-layer MLP (hidden 256), or scikit-learn's logistic regression.")
@method_options(prefixed=True)
@click.option("--angular-from-text", is_flag=True,
              help="Score `angular` on the calibration text instead of the dense train cache.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Most examples per forward pass  [default: what the token budget takes].")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Compute dtype of the model; bf16 halves memory (fast on GPUs and on CPUs with AMX / AVX512-BF16).")
@offload_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for compare.csv / .json / .md / .png (and the caches, chips, checkpoints).")
def compare_cmd(model, eval_split, eval_fraction, ratio, n_layers, methods, calibration_split, calibration_data,
                calibration_text_column, calibration_label_column, n_calibration, max_length, chip, angular_from_text,
                batch_size, device, dtype, offload, out, **params):
    """Run chip-tuning and every depth-pruning baseline on MODEL at one or more pruning ratios.

    Each baseline's checkpoint gets a chip trained on its last remaining layer; the table (like
    the Chip-Tuning paper's Table 1) shows the pruning ratio, chip accuracy and, for decoder
    models, zero-shot accuracy. Writes compare.csv, compare.json, compare.md and compare.png.
    """
    from chiptuning.compare import compare, markdown_table  # here: `chiptuning --help` stays free of torch
    from chiptuning.models import resolve_device
    from chiptuning.pipeline import carve
    from chiptuning.tasks import load_task

    resolve_device(device)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad:
        raise ChipTuningError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    task = load_task_from_options(**params)  # the task options among the other parameters
    if eval_split is not None:
        train_task, eval_task = task, load_other_split(eval_split, params)
    else:
        train_task, eval_task = carve(task, eval_fraction, params["seed"])
    calibration = None
    if calibration_data is not None:
        calibration = load_task(calibration_data, text_column=calibration_text_column,
                                label_column=calibration_label_column)
    elif calibration_split is not None:
        calibration = load_other_split(calibration_split, params)
    summary = compare(model, train_task, eval_task, out, n_layers=_numbers("--n-layers", n_layers, int),
                      ratio=_numbers("--ratio", ratio, float), methods=chosen, calibration_task=calibration,
                      n_calibration=n_calibration, max_length=max_length, batch_size=batch_size, chip=chip,
                      device=device, dtype=dtype, offload=offload, angular_from_cache=not angular_from_text,
                      method_options=method_settings(params, prefixed=True))
    click.echo(markdown_table(summary), nl=False)
    click.echo(f"-> {out}/compare.csv, compare.json, compare.md, compare.png")


def _numbers(flag: str, text: str | None, cast) -> list | None:
    """``0.25,0.5`` -> [0.25, 0.5] (None when not given)."""
    if text is None:
        return None
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated numbers, got {text!r}", param_hint=flag) from None


COMMANDS = [compare_cmd]
