"""Tasks: labelled examples plus the prompt template that turns a record into text.

:func:`load_task` reads a built-in task (:mod:`~chiptuning.tasks.builtin`), a file or dataset
(:mod:`~chiptuning.tasks.files`), or image data (:mod:`~chiptuning.tasks.images`) into a :class:`TaskData`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning.errors import DataError
from chiptuning.tasks.base import (
    LETTERS,
    Example,
    PromptFormatter,
    TaskData,
    TaskOptions,
    choice_field,
    format_options,
    format_template,
    image_chat_prompt,
    template_fields,
)
from chiptuning.tasks.builtin import BUILTIN_TASKS, BuiltinTask, get_builtin, load_builtin_task
from chiptuning.tasks.files import infer_label_names, load_user_data, looks_like_file, read_records
from chiptuning.tasks.images import DEFAULT_IMAGE_PROMPT, ImageRef, load_image_data

__all__ = [
    "BUILTIN_TASKS", "DEFAULT_IMAGE_PROMPT", "LETTERS", "BuiltinTask", "Example", "ImageRef", "PromptFormatter",
    "TaskData", "TaskOptions", "choice_field", "format_options", "format_template", "get_builtin",
    "image_chat_prompt", "infer_label_names", "load_task", "read_records", "template_fields",
]

log = logging.getLogger(__name__)


def load_task(data: str | Path | Any, options: TaskOptions | None = None, **settings: Any) -> TaskData:
    """Load a task from ``data``: a built-in task's name (see ``chiptuning tasks``), a JSONL / JSON /
    CSV / TSV / Parquet file, a hub dataset's name, a ``datasets.Dataset`` / ``DatasetDict`` or an image
    folder. ``options`` say how; ``settings`` override its fields: ``load_task(path, template="{text}")``.
    DataError for a missing file or column, an unknown split or label, empty text, bad options."""
    opts = dataclasses.replace(options or TaskOptions(), **settings)
    split, part = _parse_split(opts.split)
    opts = dataclasses.replace(opts, split=split)
    task = _reader(data, opts)(data, opts)
    if part is not None:
        _keep_part(task, part)
    if opts.limit is not None and opts.limit < len(task.examples):
        order = np.random.default_rng(opts.seed).permutation(len(task.examples))[:opts.limit]
        task.examples = [task.examples[i] for i in order]
        task.source.update(limit=opts.limit, seed=opts.seed)
    if task.template is not None and not template_fields(task.template):
        log.warning("the template %r has no {field}: every prompt is the same text, so no chip can tell the "
                    "examples apart; put the record's fields in it, e.g. '{text}'", task.template)
    log.info("task %s/%s: %d examples, labels %s", task.name, task.split, len(task.examples), task.label_names)
    return task


def _reader(data: Any, opts: TaskOptions) -> Callable[[Any, TaskOptions], TaskData]:
    """The reader of ``data``; options that cannot apply are refused before any data is read."""
    if isinstance(data, str) and get_builtin(data) is not None:
        return load_builtin_task
    tasks = ", ".join(BUILTIN_TASKS)
    if opts.data_dir is not None:
        raise DataError(f"--data-dir is for the built-in tasks ({tasks}), not {data!r}{_did_you_mean(data)}; "
                        "pass your own file with --data FILE")
    no_prompt = opts.text_column is None and opts.template is None
    hub_name = not (isinstance(data, (str, Path)) and Path(data).exists()) and not looks_like_file(data)
    if no_prompt and opts.image_column is None and isinstance(data, str) and hub_name and _did_you_mean(data, 0.8):
        # a typo of a built-in task's name, not a hub dataset to read as images
        raise DataError(f"unknown task {data!r}{_did_you_mean(data)}; the built-in tasks are {tasks} (see "
                        "`chiptuning tasks`); a Hugging Face dataset also needs --text-column or --template")
    folder = isinstance(data, (str, Path)) and Path(data).is_dir()
    if folder or opts.image_column is not None or (no_prompt and hub_name):
        return load_image_data
    if (opts.text_column is None) == (opts.template is None):
        raise DataError("give exactly one of --text-column or --template (or --image-column for image data)")
    return load_user_data


def _did_you_mean(name: Any, cutoff: float = 0.6) -> str:
    """`` (did you mean 'boolq'?)`` for a name close to a built-in task's (difflib ratio >= ``cutoff``)."""
    close = difflib.get_close_matches(str(name).lower(), list(BUILTIN_TASKS), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def _parse_split(split: str | None) -> tuple[str | None, tuple[str | None, str | None] | None]:
    """``"validation[:2000]"`` -> ``("validation", (None, "2000"))``; no slice -> (split, None)."""
    if split is None or "[" not in split:
        return split, None
    match = _SLICE.match(split.strip())
    if match is None:
        raise DataError(f"--split {split!r} is not NAME or NAME[start:stop], e.g. validation[:2000] or train[10%:]")
    return match["name"], (match["start"], match["stop"])


def _keep_part(task: TaskData, part: tuple[str | None, str | None]) -> None:
    """Keep the slice ``part`` of the task's examples (``"10%"`` bounds round down)."""
    n = len(task.examples)

    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        return int(text[:-1]) * n // 100 if text.endswith("%") else int(text)

    sliced = f"{task.split}[{part[0] or ''}:{part[1] or ''}]"
    task.examples = task.examples[bound(part[0]):bound(part[1])]
    if not task.examples:
        raise DataError(f"--split {sliced} selects no examples (the split has {n})")
    task.split = sliced
