"""`chiptuning prune | eval | push`: pruned checkpoints, their evaluation and publication."""

from __future__ import annotations

import click

from chiptuning.cli.tasks import batching_options, load_task_from_options, offload_option, parse_labels, task_options
from chiptuning.outputs import EVAL, check_output

# chiptuning.prune.baselines.METHODS, repeated here so `--help` does not import torch (a test keeps them equal).
BASELINE_METHODS = ("tail", "shortgpt", "angular", "streamline", "slm", "laco")


@click.command("prune", short_help="Cut the model after the chip's layer; save it.")
@click.option("--model", required=True, help="The full model (hub id or directory) the chips' cache came from.")
@click.option("--method", type=click.Choice(("chip",) + BASELINE_METHODS), default="chip", show_default=True,
              help="chip: chip-tuning (needs --chips). Others: depth-pruning baselines (no chip): tail, "
                   "shortgpt, angular, streamline (LLM-Streamline), slm (sliding layer merging), laco.")
@click.option("--chips", "chips_dirs", multiple=True,
              help="Chips directory from `chiptuning probe train` (and `select`); --method chip only. Repeat it "
                   "(as DIR or NAME=DIR) to pack several tasks in one checkpoint, cut after the deepest chip.")
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
              help="Weights dtype of the saved checkpoint [default: a chip checkpoint keeps the dtype its "
                   "cache was extracted in, so it reproduces its chips; a baseline fp32].")
@click.option("--adapter", default=None, help="PEFT/LoRA adapter merged first (as given to extract).")
@click.option("--export", type=click.Choice(["sequence-classification"]), default=None,
              help="Save a plain *ForSequenceClassification checkpoint (normed features, bias-free "
                   "linear chip): it serves without chip-tuning.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the parity check.")
@offload_option
@click.option("--n-layers", type=click.IntRange(min=1), default=None, help="Baselines: number of blocks to remove.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Baselines: fraction of the blocks to remove.")
@click.option("--calibration-task", default=None,
              help="Baselines: calibration text from a built-in task or hub dataset (its prompts).")
@click.option("--calibration-data", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Baselines: calibration text from a labelled file (JSONL/CSV/...).")
@click.option("--calibration-data-dir", default=None, type=click.Path(file_okay=False),
              help="Built-in --calibration-task: directory of its release files (offline).")
@click.option("--calibration-split", default=None, help="Split of the calibration data (default: its train split).")
@click.option("--calibration-text-column", default=None, help="Text field of --calibration-data.")
@click.option("--calibration-template", default=None, help="Prompt template of --calibration-data.")
@click.option("--n-calibration", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration examples (seeded draw).")
@click.option("--calibration-max-length", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest calibration prompt, in tokens.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False, exists=True),
              help="shortgpt: last-token Block Influence from this cache of MODEL; angular: exact from it.")
@click.option("--replacement", type=click.Choice(["layer", "mlp"]), default="layer", show_default=True,
              help="streamline: one transformer layer (initialised from the first removed one) or a single MLP.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="streamline: training epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="streamline: AdamW learning rate.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=0.9, show_default=True,
              help="slm / laco: output cosine a merge must keep (lowered when the target needs it).")
@click.option("--merge-layers", type=click.IntRange(min=2), default=4, show_default=True,
              help="laco: layers merged per step.")
@click.option("--interval", type=click.IntRange(min=1), default=2, show_default=True,
              help="laco: layers skipped after a merge.")
def prune_cmd(model, method, chips_dirs, layer, out, overwrite, allow_pickle, keep_lm_head, dtype, adapter, export, device,
              offload, n_layers, ratio,
              calibration_task, calibration_data, calibration_data_dir, calibration_split, calibration_text_column,
              calibration_template, n_calibration, calibration_max_length, cache_dir, replacement, epochs, lr,
              threshold, merge_layers, interval):
    """Truncate MODEL after the chip's layer and save a checkpoint with the chip; or, with
    --method, prune it with a depth-pruning baseline.

    The checkpoint loads with `transformers.AutoModel.from_pretrained(OUT)` (backbone) or
    `chiptuning.ChipModel.from_pretrained(OUT)` (classifier from raw text). A baseline checkpoint
    is a plain HF model (with its LM head for decoders) plus pruning.json (method, blocks removed
    or merged, scores, calibration source and size).
    """
    # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
    from chiptuning.errors import ChipTuningError
    from chiptuning.models import resolve_device

    resolve_device(device)  # refuse --device cuda without a GPU before loading anything
    if method != "chip":
        # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
        from chiptuning.prune.baselines import prune_with_method, read_record
        from chiptuning.tasks import load_task

        if chips_dirs or layer is not None or export or adapter or allow_pickle:
            raise ChipTuningError(f"--chips, --layer, --export, --adapter and --allow-pickle go with --method chip, "
                                  f"not {method}")
        if calibration_task and calibration_data:
            raise ChipTuningError("give one of --calibration-task or --calibration-data")
        source = calibration_task or calibration_data
        calibration = None
        if source is not None:
            calibration = load_task(source, split=calibration_split, text_column=calibration_text_column,
                                    template=calibration_template, data_dir=calibration_data_dir)
        elif method in ("streamline", "slm", "laco") or (method in ("shortgpt", "angular") and cache_dir is None):
            raise ChipTuningError(f"--method {method} needs calibration text: --calibration-task or --calibration-data"
                                  + (" (or --cache)" if method in ("shortgpt", "angular") else ""))
        options = {"streamline": {"replacement": replacement, "epochs": epochs, "lr": lr},
                   "slm": {"threshold": threshold},
                   "laco": {"threshold": threshold, "merge_layers": merge_layers, "interval": interval}}.get(method, {})
        path = prune_with_method(model, method, out, n_layers=n_layers, ratio=ratio, calibration_task=calibration,
                                 n_calibration=n_calibration, max_length=calibration_max_length, cache=cache_dir,
                                 dtype=dtype or "fp32", device=device, overwrite=overwrite, offload=offload,
                                 **options)
        record = read_record(path)
        params = record.params
        click.echo(
            f"pruned {model} with {method}: {record.base_model.num_blocks} -> {record.num_blocks} blocks, "
            f"{params.before:,} -> {params.after:,} parameters "
            f"({100 * params.pruning_ratio:.1f}% removed) -> {path}"
        )
        return
    if not chips_dirs:
        raise ChipTuningError("--method chip needs --chips DIR (from `chiptuning probe train`)")
    # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
    from chiptuning.prune import load_record, prune

    path = prune(model, list(chips_dirs), out, layer=layer, keep_lm_head=keep_lm_head, dtype=dtype,
                 adapter=adapter, device=device, export=export, overwrite=overwrite, allow_pickle=allow_pickle,
                 offload=offload)
    record = load_record(path)
    params = record.params
    click.echo(
        f"pruned {model} at layer {record.layer} of {record.num_blocks}: "
        f"{params.before['total']:,} -> {params.after['total']:,} parameters "
        f"({100 * params.pruning_ratio:.1f}% removed) -> {path}"
    )


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
    # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
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
    click.echo(
        f"accuracy {metrics['accuracy']:.4f} on {metrics['n_examples']} examples "
        f"(layer {metrics['layer']} of {metrics['num_blocks']}, "
        f"{metrics['examples_per_s']:.1f} examples/s) -> {out}"
    )
    if "dense" in metrics:
        dense = metrics["dense"]
        zero_shot = dense["zero_shot_accuracy"]
        click.echo(
            f"dense model: {dense['examples_per_s']:.1f} examples/s; pruned is {metrics['speedup']:.2f}x "
            f"faster (ideal {metrics['ideal_speedup']:.2f}x); dense zero-shot accuracy "
            + (f"{zero_shot:.4f}" if zero_shot is not None else "n/a")
        )


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
    # imported here, not at the top: `chiptuning --help` stays instant (no torch import)
    from chiptuning.prune.hub import push_to_hub

    if allow_pickle:
        click.echo("WARNING: pushing with --allow-pickle: if the checkpoint holds a pickle, whoever loads it "
                   "with allow_pickle=True runs code from it", err=True)
    url = push_to_hub(pruned_dir, repo_id, private=private, token=token, revision=revision,
                      commit_message=commit_message, allow_pickle=allow_pickle)
    click.echo(f"pushed {pruned_dir} to {url}")


COMMANDS = [prune_cmd, eval_cmd, push_cmd]
