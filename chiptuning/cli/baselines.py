"""`chiptuning baseline`: prune a model with a depth-pruning method from the literature (no chip)."""

from __future__ import annotations

import functools

import click

from chiptuning.cli.tasks import offload_option
from chiptuning.errors import ChipTuningError
from chiptuning.prune.baselines import DEFAULTS, METHODS

#: The methods' options on the command line: (methods, name, type, help); defaults from DEFAULTS.
METHOD_OPTIONS = (
    (("streamline",), "replacement", click.Choice(["layer", "mlp"]),
     "one transformer layer (initialised from the first removed one) or a single MLP"),
    (("streamline",), "epochs", click.IntRange(min=1), "epochs of training the replacement"),
    (("streamline",), "lr", click.FloatRange(min=0, min_open=True), "AdamW learning rate of the replacement"),
    (("slm", "laco"), "threshold", click.FloatRange(-1, 1),
     "output cosine a merge must keep (lowered when the target needs it)"),
    (("laco",), "merge_layers", click.IntRange(min=2), "layers merged per step"),
    (("laco",), "interval", click.IntRange(min=1), "layers skipped after a merge"),
)


def method_options(prefixed: bool = False, hidden: bool = False):
    """The methods' options: ``--threshold`` (baseline), or one per method, ``--slm-threshold`` (compare)."""
    def decorate(func):
        for methods, name, kind, text in reversed(METHOD_OPTIONS):
            for method in reversed(methods if prefixed else methods[:1]):
                flag = (f"{method}-{name}" if prefixed else name).replace("_", "-")
                about = method if prefixed else " / ".join(methods)
                func = click.option(f"--{flag}", type=kind, default=DEFAULTS[method][name], show_default=True,
                                    hidden=hidden, help=f"{about}: {text}.")(func)
        return func
    return decorate


def method_settings(params: dict, prefixed: bool = False) -> dict[str, dict]:
    """{method: {option: value}} from the parameters :func:`method_options` added."""
    settings: dict[str, dict] = {}
    for methods, name, _, _ in METHOD_OPTIONS:
        for method in methods:
            settings.setdefault(method, {})[name] = params[f"{method}_{name}" if prefixed else name]
    return settings


def baseline_options(hidden: bool = False):
    """How many blocks go, the calibration text and the methods' options (baseline, and the
    deprecated ``prune --method``, where they are hidden)."""
    option = functools.partial(click.option, hidden=hidden)
    options = [
        option("--n-layers", type=click.IntRange(min=1), default=None, help="Number of blocks to remove."),
        option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
               help="Fraction of the blocks to remove."),
        option("--calibration-task", default=None, help="Calibration text: a built-in task or hub dataset's prompts."),
        option("--calibration-data", default=None, type=click.Path(dir_okay=False, exists=True),
               help="Calibration text from a labelled file (JSONL/CSV/...)."),
        option("--calibration-data-dir", default=None, type=click.Path(file_okay=False),
               help="Built-in --calibration-task: directory of its release files (offline)."),
        option("--calibration-split", default=None, help="Split of the calibration data (default: train)."),
        option("--calibration-text-column", default=None, help="Text field of --calibration-data."),
        option("--calibration-template", default=None, help="Prompt template of --calibration-data."),
        option("--n-calibration", type=click.IntRange(min=1), default=128, show_default=True,
               help="Calibration examples (seeded draw)."),
        option("--calibration-max-length", type=click.IntRange(min=1), default=256, show_default=True,
               help="Longest calibration prompt, in tokens."),
        option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False, exists=True),
               help="shortgpt: last-token Block Influence from this cache of MODEL; angular: exact from it."),
        method_options(hidden=hidden),
    ]

    def decorate(func):
        for add in reversed(options):
            func = add(func)
        return func
    return decorate


@click.command("baseline", short_help="Prune with a depth-pruning baseline (no chip); save it.")
@click.option("--model", required=True, help="The full model (hub id or directory).")
@click.option("--method", required=True, type=click.Choice(METHODS),
              help="tail, shortgpt, angular, streamline (LLM-Streamline), slm (sliding layer merging) or laco.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Pruned checkpoint directory (new or empty, or one to replace with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace the pruned checkpoint at --out.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Weights dtype of the saved checkpoint.")
@click.option("--device", default="cpu", show_default=True, help="Where to score, train and check the blocks.")
@offload_option
@baseline_options()
def baseline_cmd(model, method, out, overwrite, dtype, device, offload, n_layers, ratio, calibration_task,
                 calibration_data, calibration_data_dir, calibration_split, calibration_text_column,
                 calibration_template, n_calibration, calibration_max_length, cache_dir, **settings):
    """Prune MODEL with a depth-pruning METHOD and save a plain Hugging Face checkpoint (with its LM
    head for decoders) plus pruning.json: the blocks removed or merged, their scores, the
    calibration source and size.
    """
    from chiptuning.models import resolve_device  # here: `chiptuning --help` stays free of torch
    from chiptuning.prune.baselines import prune_with_method, read_record
    from chiptuning.tasks import load_task

    resolve_device(device)  # refuse --device cuda without a GPU before loading anything
    if calibration_task and calibration_data:
        raise ChipTuningError("give one of --calibration-task or --calibration-data")
    source, calibration = calibration_task or calibration_data, None
    if source is not None:
        calibration = load_task(source, split=calibration_split, text_column=calibration_text_column,
                                template=calibration_template, data_dir=calibration_data_dir)
    path = prune_with_method(model, method, out, n_layers=n_layers, ratio=ratio, calibration_task=calibration,
                             n_calibration=n_calibration, max_length=calibration_max_length, cache=cache_dir,
                             dtype=dtype, device=device, overwrite=overwrite, offload=offload,
                             **method_settings(settings).get(method, {}))
    record = read_record(path)
    click.echo(f"pruned {model} with {method}: {record.base_model.num_blocks} -> {record.num_blocks} blocks, "
               f"{record.params.before:,} -> {record.params.after:,} parameters "
               f"({100 * record.params.pruning_ratio:.1f}% removed) -> {path}")


COMMANDS = [baseline_cmd]
