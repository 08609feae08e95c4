"""`chiptuning prune | eval | push`: pruned checkpoints, their evaluation and publication."""

from __future__ import annotations

import click

from chiptuning.cli.baselines import baseline_cmd, baseline_options
from chiptuning.cli.tasks import batching_options, load_task_from_options, offload_option, parse_labels, task_options
from chiptuning.errors import ChipTuningError
from chiptuning.prune.baselines import METHODS


@click.command("prune", short_help="Cut the model after the chip's layer; save it.")
@click.option("--model", required=True, help="The full model (hub id or directory) the chips' cache came from.")
@click.option("--method", type=click.Choice(("chip", *METHODS)), default="chip", show_default=True,
              help="chip: chip-tuning. The depth-pruning baselines moved to `chiptuning baseline --method`.")
@click.option("--chips", "chips_dirs", multiple=True,
              help="Chips directory from `chiptuning probe train` (and `select`). Repeat it (as DIR or "
                   "NAME=DIR) to pack several tasks in one checkpoint, cut after the deepest chip.")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="Layer to prune at (default: the chips' selection.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Pruned checkpoint directory (new or empty, or a checkpoint to replace with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the pruned checkpoint at --out.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept chips stored as a pickle (runs code from them: only chips you made); the "
                   "checkpoint then holds a pickle and its card says so.")
@click.option("--keep-lm-head", is_flag=True, help="Keep the LM head so the checkpoint still generates.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Weights dtype of the saved checkpoint [default: the dtype the chips' cache was extracted "
                   "in, so it reproduces its chips].")
@click.option("--adapter", default=None, help="PEFT/LoRA adapter merged first (as given to extract).")
@click.option("--export", type=click.Choice(["sequence-classification"]), default=None,
              help="Save a plain *ForSequenceClassification checkpoint (normed features, bias-free "
                   "linear chip): it serves without chip-tuning.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the parity check.")
@offload_option
@baseline_options(hidden=True)
def prune_cmd(model, method, chips_dirs, layer, out, overwrite, allow_pickle, keep_lm_head, dtype, adapter, export,
              device, offload, **baseline):
    """Truncate MODEL after the chip's layer and save a checkpoint with the chip.

    The checkpoint loads with `transformers.AutoModel.from_pretrained(OUT)` (backbone) or
    `chiptuning.ChipModel.from_pretrained(OUT)` (classifier from raw text).
    """
    if method != "chip":
        click.echo(f"Deprecated: `chiptuning prune --method {method}` is now `chiptuning baseline --method "
                   f"{method}` (same options).", err=True)
        if chips_dirs or layer is not None or export or adapter or allow_pickle:
            raise ChipTuningError(f"--chips, --layer, --export, --adapter and --allow-pickle go with --method chip, "
                                  f"not {method}")
        click.get_current_context().invoke(baseline_cmd, model=model, method=method, out=out, overwrite=overwrite,
                                           dtype=dtype or "fp32", device=device, offload=offload, **baseline)
        return
    from chiptuning.models import resolve_device  # here: `chiptuning --help` stays free of torch
    from chiptuning.prune import PROVENANCE_FILE, CheckpointRecord, prune, read_provenance

    resolve_device(device)  # refuse --device cuda without a GPU before loading anything
    if not chips_dirs:
        raise ChipTuningError("--method chip needs --chips DIR (from `chiptuning probe train`)")
    path = prune(model, list(chips_dirs), out, layer=layer, keep_lm_head=keep_lm_head, dtype=dtype,
                 adapter=adapter, device=device, export=export, overwrite=overwrite, allow_pickle=allow_pickle,
                 offload=offload)
    # prune verified the checkpoint it wrote: read its record without hashing the weights again
    record = CheckpointRecord.from_dict(read_provenance(path), str(path / PROVENANCE_FILE), file=True)
    params = record.params
    click.echo(f"pruned {model} at layer {record.layer} of {record.num_blocks}: {params.before['total']:,} -> "
               f"{params.after['total']:,} parameters ({100 * params.pruning_ratio:.1f}% removed) -> {path}")


@click.command("eval", short_help="Run a pruned checkpoint on labelled data.")
@click.argument("pruned_dir", type=click.Path(file_okay=False, exists=True))
@task_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for metrics.json and predictions.csv.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier eval at --out.")
@click.option("--allow-pickle", is_flag=True,
              help="Load a checkpoint whose chip is a pickle (runs code from it: only checkpoints you made).")
@click.option("--chip-task", "task_name", default=None, help="Which task of a multi-task checkpoint.")
@batching_options
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dense", "compare_dense", is_flag=True,
              help="Also run the dense base model: speedup, and its zero-shot accuracy (decoders).")
@click.option("--dense-model", default=None, help="Where the dense base model is, if not where it was pruned from.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Timed passes per model; the fastest is reported (speed on a shared machine).")
def eval_cmd(pruned_dir, out, overwrite, allow_pickle, task_name, batch_size, max_tokens_per_batch, device,
             compare_dense, dense_model, repeats, **task_opts):
    """Run the pruned checkpoint PRUNED_DIR on labelled data, from raw text.

    The data is given as to `chiptuning extract` (--task NAME or --data FILE); the prompt
    template (or text column) and the label names default to the checkpoint's own.
    """
    from chiptuning.outputs import EVAL, check_output  # here: `chiptuning --help` stays free of torch
    from chiptuning.prune import ChipModel, evaluate

    check_output(out, EVAL, overwrite=overwrite)  # before loading the checkpoint
    clf = ChipModel.from_pretrained(pruned_dir, device=device, allow_pickle=allow_pickle)
    name, _ = clf.task(task_name)
    # The checkpoint's own prompt format and labels, where the options leave them open.
    options = clf.data_options(name, **{k: task_opts.get(k) for k in ("template", "text_column", "strip_trailing_space",
                                                                       "chat_template", "image_column")},
                               labels=parse_labels(task_opts.get("labels")))
    options["labels"] = ",".join(options["labels"])
    data = load_task_from_options(**dict(task_opts, **options))
    metrics = evaluate(pruned_dir, data, out_dir=out, task=name, batch_size=batch_size,
                       max_tokens_per_batch=max_tokens_per_batch, device=device, model=clf,
                       dense=dense_model or compare_dense, repeats=repeats, progress=True, overwrite=overwrite)
    click.echo(f"accuracy {metrics['accuracy']:.4f} on {metrics['n_examples']} examples (layer {metrics['layer']} "
               f"of {metrics['num_blocks']}, {metrics['examples_per_s']:.1f} examples/s) -> {out}")
    if "dense" in metrics:
        dense, zero_shot = metrics["dense"], metrics["dense"]["zero_shot_accuracy"]
        click.echo(f"dense model: {dense['examples_per_s']:.1f} examples/s; pruned is {metrics['speedup']:.2f}x "
                   f"faster (ideal {metrics['ideal_speedup']:.2f}x); dense zero-shot accuracy "
                   + (f"{zero_shot:.4f}" if zero_shot is not None else "n/a"))


@click.command("push", short_help="Verify a pruned checkpoint and upload it.")
@click.argument("pruned_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--repo-id", required=True, help="Hub model repository, user/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to push to.")
@click.option("--token", default=None, envvar="HF_TOKEN", help="Hub token (default: the logged-in one).")
@click.option("--commit-message", default=None, help="Commit message on the Hub  [default: 'Upload chip-tuning checkpoint (layer l of L)'].")
@click.option("--allow-pickle", is_flag=True,
              help="Publish a checkpoint whose chip is a pickle (loading it runs code; its card warns).")
def push_cmd(pruned_dir, repo_id, private, revision, token, commit_message, allow_pickle):
    """Verify PRUNED_DIR and upload it, with its model card, to the Hugging Face Hub.

    A checkpoint holding a pickle (a chip saved with --allow-pickle) is refused unless
    --allow-pickle is given here too.
    """
    from chiptuning.prune.hub import push_to_hub  # here: `chiptuning --help` stays free of torch

    if allow_pickle:
        click.echo("WARNING: pushing with --allow-pickle: if the checkpoint holds a pickle, whoever loads it "
                   "with allow_pickle=True runs code from it", err=True)
    url = push_to_hub(pruned_dir, repo_id, private=private, token=token, revision=revision,
                      commit_message=commit_message, allow_pickle=allow_pickle)
    click.echo(f"pushed {pruned_dir} to {url}")


COMMANDS = [prune_cmd, eval_cmd, push_cmd]
