"""`chiptuning compare`: chip-tuning against depth-pruning baselines on one model, task and ratio."""

from __future__ import annotations

import click

from chiptuning.cli.prune import BASELINE_METHODS
from chiptuning.cli.tasks import load_other_split, load_task_from_options, offload_option, task_options


@click.command("compare", short_help="Chip-tuning against every depth-pruning baseline.")
@click.option("--model", required=True, help="The dense model (hub id or directory).")
@task_options
@click.option("--eval-split", default=None,
              help="Split the chips are scored on (same task, e.g. 'validation[1000:2000]'). "
                   "Default: carve --eval-fraction of the training examples.")
@click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3,
              show_default=True,
              help="Without --eval-split: share of the examples held out for scoring (seeded).")
@click.option("--ratio", default=None,
              help="Target pruning ratio: fraction of the blocks removed; several, comma-separated (0.25,0.5), "
                   "share the dense caches and chips.")
@click.option("--n-layers", default=None, help="Blocks removed by every method (instead of --ratio); comma-separated for several.")
@click.option("--methods", default=",".join(BASELINE_METHODS), show_default=True,
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
@click.option("--streamline-replacement", type=click.Choice(["layer", "mlp"]), default="layer", show_default=True,
              help="LLM-Streamline's replacement: one transformer layer, or a single MLP.")
@click.option("--streamline-epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="LLM-Streamline: epochs of training its replacement block.")
@click.option("--streamline-lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="LLM-Streamline: learning rate of its replacement block.")
@click.option("--slm-threshold", type=click.FloatRange(-1, 1), default=0.9, show_default=True,
              help="Sliding layer merging: output cosine a merged window must keep (lowered if the target needs it).")
@click.option("--laco-threshold", type=click.FloatRange(-1, 1), default=0.9, show_default=True,
              help="LaCo: output cosine a collapse must keep (lowered if the target needs it).")
@click.option("--laco-merge-layers", type=click.IntRange(min=2), default=4, show_default=True,
              help="LaCo: layers merged per step.")
@click.option("--laco-interval", type=click.IntRange(min=1), default=2, show_default=True,
              help="LaCo: step down after a merge.")
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
                calibration_text_column, calibration_label_column, n_calibration, max_length, chip, streamline_replacement, streamline_epochs,
                streamline_lr, slm_threshold, laco_threshold, laco_merge_layers, laco_interval, angular_from_text,
                batch_size, device, dtype, offload, out, **task_opts):
    """Run chip-tuning and every depth-pruning baseline on MODEL at one pruning ratio.

    Each baseline's checkpoint gets a chip trained on its last remaining layer; the table (like
    the Chip-Tuning paper's Table 1) shows the pruning ratio, chip accuracy and, for decoder
    models, zero-shot accuracy. Writes compare.csv, compare.json, compare.md and compare.png.
    """
    # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
    from chiptuning.compare import compare, markdown_table
    from chiptuning.errors import ChipTuningError
    from chiptuning.models import resolve_device
    from chiptuning.pipeline import carve
    from chiptuning.tasks import load_task

    resolve_device(device)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in BASELINE_METHODS]
    if bad:
        raise ChipTuningError(f"--methods: unknown {bad}; choose from {', '.join(BASELINE_METHODS)}")
    task = load_task_from_options(**task_opts)
    if eval_split is not None:
        train_task, eval_task = task, load_other_split(eval_split, task_opts)
    else:
        train_task, eval_task = carve(task, eval_fraction, task_opts["seed"])
    calibration = None
    if calibration_data is not None:
        calibration = load_task(calibration_data, text_column=calibration_text_column,
                                label_column=calibration_label_column)
    elif calibration_split is not None:
        calibration = load_other_split(calibration_split, task_opts)
    options = {
        "streamline": {"replacement": streamline_replacement, "epochs": streamline_epochs, "lr": streamline_lr},
        "slm": {"threshold": slm_threshold},
        "laco": {"threshold": laco_threshold, "merge_layers": laco_merge_layers, "interval": laco_interval},
    }
    ratios = _numbers("--ratio", ratio, float)
    targets = _numbers("--n-layers", n_layers, int)
    summary = compare(model, train_task, eval_task, out, n_layers=targets, ratio=ratios, methods=chosen,
                      calibration_task=calibration, n_calibration=n_calibration, max_length=max_length,
                      batch_size=batch_size, chip=chip, device=device, dtype=dtype, offload=offload,
                      angular_from_cache=not angular_from_text, method_options=options)
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
