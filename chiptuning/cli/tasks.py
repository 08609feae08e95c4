"""Task options shared by every command that reads examples, and `chiptuning tasks`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

# The click parameter names task_options adds: the data (task or data), then TaskOptions fields.
TASK_PARAMS = (
    "task", "data", "data_dir", "subset", "split", "text_column", "template", "label_column", "labels",
    "truncate_field", "strip_trailing_space", "chat_template", "limit", "seed", "image_column",
)


def task_options(func):
    """Options that say which examples to read and how to make prompts of them (shared): the command
    receives them as the keyword arguments :data:`TASK_PARAMS`, for ``load_task_from_options(**params)``."""
    options = [
        click.option("--task", "task", default=None, metavar="NAME",
                     help="Built-in task (boolq, race-high, race-middle, c3, mmlu; see `chiptuning tasks`) "
                          "or a Hugging Face dataset name."),
        click.option("--data", "data", default=None, type=click.Path(),
                     help="Labelled JSONL / JSON / CSV / TSV / Parquet file, or an image folder (one subfolder "
                          "per class, for vision-language models) (instead of --task)."),
        click.option("--data-dir", default=None, type=click.Path(file_okay=False),
                     help="Built-in task: directory of its original release files (offline, no hub)."),
        click.option("--subset", default=None, help="Hub dataset: configuration name (e.g. sst2 of glue)."),
        click.option("--split", default=None,
                     help="Split, optionally sliced: validation, test[:500], train[10%:]. Default: the "
                          "built-in task's train split, a hub dataset's train, a file's name."),
        click.option("--text-column", default=None, help="Field holding the prompt text."),
        click.option("--template", default=None,
                     help="Prompt template over the record's fields, e.g. '{question}\\n{options}\\nAnswer:' "
                          "(a list field renders as 'A. ...' lines; \\n and \\t are unescaped). Image data: the "
                          "question asked about each image [default: 'What type of object is in this photo?']."),
        click.option("--image-column", default=None,
                     help="Image data: the column holding each record's image (a path relative to the data file, "
                          "or image bytes). Not needed for an image folder, or a dataset whose 'image' column "
                          "is an Image feature."),
        click.option("--label-column", default=None, help="Field holding the label  [default: label]."),
        click.option("--labels", default=None, help="Label names in class order, comma-separated."),
        click.option("--truncate-field", default=None,
                     help="Field shortened when a prompt exceeds --max-length (default: the task's long "
                          "field, or a template's longest; 'none' never shortens)."),
        click.option("--strip-trailing-space", is_flag=True, default=False,
                     help="End prompts with 'Answer:' instead of 'Answer: ' (the chip reads ':', not a lone space)."),
        click.option("--chat-template", is_flag=True, default=False,
                     help="Wrap each prompt in the tokenizer's chat template, with the generation prompt."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Keep N examples (seeded shuffle)."),
        click.option("--seed", type=int, default=42, show_default=True,
                     help="Seed of the --limit shuffle (run and compare: also of the eval part they carve and of "
                          "the chips)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class TokenBudget(click.ParamType):
    """``--max-tokens-per-batch``: "auto" or an integer >= 0."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither auto nor an integer", param, ctx)
        if number < 0:
            self.fail(f"{number} is negative; give auto, 0 (fixed batches) or a token count", param, ctx)
        return number


def eval_part_options(fraction: float):
    """``--eval-split`` and ``--eval-fraction`` (default ``fraction``): the examples scored on, held
    out from the training examples (``run`` and ``compare``)."""
    def decorate(func):
        func = click.option("--eval-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                            default=fraction, show_default=True,
                            help="Without --eval-split: the share of the examples held out for scoring (seeded by "
                                 "--seed).")(func)
        return click.option("--eval-split", default=None,
                            help="Score on this split of the same --task/--data (e.g. 'validation[1000:2000]'); "
                                 "default: a seeded --eval-fraction of the examples, disjoint from training.")(func)
    return decorate


def offload_option(func):
    """``--offload``: hold the model's blocks in memory, or stream them from its files (shared by
    every command that loads a full model)."""
    return click.option("--offload", type=click.Choice(["auto", "stream", "none"]), default="auto",
                        show_default=True,
                        help="stream: read each block from the model's files when a batch reaches it (a model "
                             "larger than memory runs); auto: stream when the weights do not fit; none: all in "
                             "memory.")(func)


def batching_options(func):
    """``--batch-size`` and ``--max-tokens-per-batch``: how prompts are grouped into forward passes
    (shared by extract and eval, which batch the same way)."""
    func = click.option("--max-tokens-per-batch", type=TokenBudget(), default="auto", show_default=True,
                        help="Token budget per batch over length-sorted examples: an integer, 0 for fixed "
                             "batches in dataset order, or auto (from free GPU memory; 8192 on CPU).")(func)
    return click.option("--batch-size", type=click.IntRange(min=1), default=None,
                        help="Most examples per batch  [default: 16 with fixed batches, else the budget "
                             "decides].")(func)


def parse_labels(text: str | None) -> list[str] | None:
    """``--labels a,b,c`` -> ["a", "b", "c"] (None when not given)."""
    return [x.strip() for x in text.split(",")] if text else None


def load_task_from_options(**options: Any):
    """Load the task the :func:`task_options` parameters describe (others are ignored); DataError for
    not exactly one of --task / --data, or anything :func:`load_task` refuses."""
    from chiptuning.errors import DataError  # here: `chiptuning --help` stays free of torch
    from chiptuning.tasks import TaskOptions, load_task

    task, data = options.get("task"), options.get("data")
    if (task is None) == (data is None):
        raise DataError("give exactly one of --task NAME (built-in or hub dataset) or --data FILE")
    if data is not None and options.get("data_dir") is not None:
        raise DataError("--data-dir goes with a built-in --task NAME, not with --data FILE")
    if data is not None and not (Path(data).is_file() or Path(data).is_dir()):
        raise DataError(f"--data {data} does not exist; give a local data file or image folder, or a hub "
                        "dataset with --task NAME")
    settings = {key: options[key] for key in TASK_PARAMS[2:] if options.get(key) is not None}
    if "template" in settings:
        # a shell gives '\n' as two characters; only \n and \t are decoded, so non-ASCII text (C3's
        # Chinese) and other backslashes stay as typed
        settings["template"] = settings["template"].replace("\\n", "\n").replace("\\t", "\t")
    settings["labels"] = parse_labels(settings.get("labels"))
    return load_task(task if task is not None else data, TaskOptions(**settings))


def load_other_split(split: str, options: dict):
    """The same data as ``options`` describe, another split of it, whole (no --limit draw)."""
    return load_task_from_options(**dict(options, split=split, limit=None))


@click.command("tasks", short_help="List the built-in tasks.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def tasks_cmd(as_json: bool) -> None:
    """List the built-in tasks: splits, labels and prompt template.

    Load one with `--task NAME` (from the Hugging Face hub) or `--task NAME --data-dir DIR`
    (offline, from the original release files listed here).
    """
    from chiptuning.tasks import BUILTIN_TASKS  # here: `chiptuning --help` stays free of torch

    entries = [task.summary() for task in BUILTIN_TASKS.values()]
    if as_json:
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
        return
    for entry in entries:
        roles = {entry["eval_split"]: " (eval)", entry["train_split"]: " (train)"}
        shortened = f" (shortened to fit: {entry['truncate_field']})" if entry["truncate_field"] else ""
        click.echo(f"{entry['name']}: {entry['description']}")
        click.echo(f"  hub:        {entry['hub']}")
        click.echo(f"  data-dir:   {entry['local_files']}")
        click.echo(f"  splits:     {', '.join(s + roles.get(s, '') for s in entry['splits'])}")
        click.echo(f"  labels:     {', '.join(entry['labels'])}")
        click.echo(f"  fields:     {', '.join(entry['fields'])}{shortened}")
        # JSON quoting shows the newlines and the trailing space the chip reads.
        click.echo(f"  template:   {json.dumps(entry['template'], ensure_ascii=False)}\n")


COMMANDS: list = [tasks_cmd]

