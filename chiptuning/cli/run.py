"""`chiptuning run`: the whole pipeline in one command; with no arguments, the offline demo."""

from __future__ import annotations

import click

from chiptuning.cli.tasks import load_other_split, load_task_from_options, task_options


@click.command("run")
@click.option("--model", default=None,
              help="Hugging Face model id or directory  [default: the embedded all-MiniLM-L6-v2].")
@task_options
@click.option("--eval-split", default=None,
              help="Evaluate on this split of the same --task/--data (e.g. 'validation[2000:]'); "
                   "default: a seeded --eval-fraction carved from the data, disjoint from training.")
@click.option("--eval-fraction", type=float, default=0.25, show_default=True)
@click.option("--out", default="chiptuning-run", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the caches, chips, pruned checkpoint and eval results.")
@click.option("--chip", type=click.Choice(["linear", "mlp", "logreg"]), default="linear", show_default=True)
@click.option("--strategy", default="validate", show_default=True,
              help="Layer selection: validate, within:DELTA, fixed:L or optimal (an oracle).")
@click.option("--val-size", type=int, default=None,
              help="Validation rows carved from the training part (for the selection)  "
                   "[default: 200, or a fifth of the training part when smaller].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=None, help="Longest prompt in tokens (default: the model's).")
@click.option("--overwrite", is_flag=True, help="Replace chips/pruned/eval folders found under --out.")
def run_cmd(model, eval_split, eval_fraction, out, chip, strategy, val_size, device, dtype, batch_size,
            max_length, overwrite, **task_opts):
    """Extract, train chips at every layer, select a layer, prune and evaluate: one command.

    With no arguments it runs offline on CPU on the embedded demo (all-MiniLM-L6-v2 and 600 topic
    sentences shipped with the package). Caches under OUT/cache are reused by a re-run.
    """
    from chiptuning.errors import DataError
    from chiptuning.pipeline import RunConfig, run_pipeline

    given = task_opts.get("task") is not None or task_opts.get("data") is not None
    train_task = eval_task = None
    if given:
        train_task = load_task_from_options(**task_opts)
        if eval_split is not None:
            eval_task = load_other_split(eval_split, task_opts)
    elif eval_split is not None:
        raise DataError("--eval-split needs --task NAME or --data FILE")
    config = RunConfig(out=out, model=model, chip=chip, strategy=strategy, eval_fraction=eval_fraction,
                       val_size=val_size, seed=task_opts.get("seed") or 42, device=device, dtype=dtype,
                       batch_size=batch_size, max_length=max_length, overwrite=overwrite)
    summary = run_pipeline(config, train_task, eval_task, progress=True)
    click.echo(format_summary(summary))


def format_summary(summary: dict) -> str:
    """The end-of-run report: layer curve, selection, pruned accuracy, pruning ratio, paths."""
    lines = [f"model {summary['model']}  task {summary['task']}  "
             f"({summary['n_train']} train / {summary['n_eval']} eval examples, "
             f"labels {', '.join(summary['label_names'])})", "",
             f"{'layer':>5}  {'val acc':>8}  {'eval acc':>8}"]
    for row in summary["layer_curve"]:
        mark = "  <- selected" if row["layer"] == summary["layer"] else ""
        lines.append(f"{row['layer']:>5}  {_pct(row['val_accuracy']):>8}  {_pct(row['eval_accuracy']):>8}{mark}")
    params = summary["params"]
    sel = summary["selection"]
    lines += [
        "",
        f"selected layer {summary['layer']} of {summary['num_blocks']} ({summary['strategy']}): {sel['why']}",
        f"pruned model accuracy on eval: {_pct(summary['pruned_eval_accuracy'])} "
        f"(majority class {_pct(summary['majority_baseline'])})",
        f"parameters {params['before']['total']:,} -> {params['after']['total']:,} "
        f"({100 * params['pruning_ratio']:.1f}% removed)",
        f"time {summary['timings']['total_s']:.1f} s on {summary['device']}",
    ]
    lines += [f"{name:>12}: {path}" for name, path in summary["paths"].items()]
    lines.append("load it: chiptuning.ChipModel.from_pretrained(" + repr(summary["paths"]["pruned"]) + ")")
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


COMMANDS = [run_cmd]
