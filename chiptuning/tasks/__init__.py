"""Tasks: labelled examples plus the prompt template that turns a record into text.

:func:`load_task` reads four kinds of data into a :class:`TaskData`:

- a built-in task (``boolq``, ``race-high``, ``race-middle``, ``c3``, ``mmlu``; see
  :mod:`chiptuning.tasks.builtin`) from the hub or offline from ``data_dir``;
- a local JSONL / JSON / CSV / TSV / Parquet file, or a hub dataset by name, or a
  ``datasets.Dataset`` (see :mod:`chiptuning.tasks.files` for how labels are named and ordered);
- image data for vision-language models (see :mod:`chiptuning.tasks.images`): an image folder, a
  file with an image column, a dataset with an ``Image`` column;

and :meth:`TaskData.build_prompts` turns the examples into prompts that fit ``max_length``
tokens by shortening the long field (passage, article, documents), never the question, the
options or the ``Answer:`` suffix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from chiptuning.errors import DataError
from chiptuning.io import sha256_file
from chiptuning.tasks.base import (
    LETTERS,
    Example,
    PromptFormatter,
    TaskData,
    choice_field,
    format_options,
    format_template,
    image_chat_prompt,
    template_fields,
)
from chiptuning.tasks.builtin import BUILTIN_TASKS, BuiltinTask, get_builtin, load_builtin_examples, mmlu_template
from chiptuning.tasks.files import (
    FILE_TYPES,
    build_user_task,
    hub_records,
    infer_label_names,
    load_hub_dataset,
    read_records,
    read_table,
)
from chiptuning.tasks.images import (
    DEFAULT_IMAGE_PROMPT,
    ImageRef,
    build_image_task,
    dataset_images,
    has_image_feature,
    load_image_folder,
)

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_IMAGE_PROMPT",
    "LETTERS",
    "BuiltinTask",
    "Example",
    "ImageRef",
    "PromptFormatter",
    "TaskData",
    "choice_field",
    "format_options",
    "format_template",
    "get_builtin",
    "image_chat_prompt",
    "infer_label_names",
    "load_task",
    "read_records",
    "template_fields",
]

log = logging.getLogger(__name__)


def load_task(
    data: str | Path | Any,
    *,
    split: str | None = None,
    text_column: str | None = None,
    template: str | None = None,
    label_column: str | None = "label",
    labels: list[str] | None = None,
    limit: int | None = None,
    seed: int = 42,
    id_column: str = "id",
    data_dir: str | Path | None = None,
    subset: str | None = None,
    truncate_field: str | None = None,
    strip_trailing_space: bool = False,
    chat_template: bool = False,
    image_column: str | None = None,
) -> TaskData:
    """Load a task: a built-in benchmark, a local file, a hub dataset, a ``datasets.Dataset``, or
    image data (an image folder, or any of those with an image column).

    Args:
        data: a built-in task name (``boolq``, ``race-high``, ``race-middle``, ``c3``, ``mmlu``),
            the path of a JSONL / JSON / CSV / TSV / Parquet file, a Hugging Face dataset name,
            a ``datasets.Dataset`` / ``DatasetDict``, or an image folder (one subfolder per class).
        split: built-in task: ``train``, ``validation`` (alias ``dev``), ``test``, ... (default
            its train split), or a union of them, ``auxiliary_train+validation``; hub dataset: the split to load (default ``train``); file: a name
            recorded in provenance (default the file stem). A slice in dataset order may follow,
            as in ``datasets``: ``validation[:2000]``, ``validation[2000:]``, ``train[:10%]``
            (percentages round down), e.g. to train and evaluate on disjoint parts of one split.
        text_column: field holding the prompt text (user data; exclusive with ``template``).
        template: prompt template over the record's fields (``str.format``; a list field renders
            as ``A. ...`` option lines, ``{field:lines}`` joins it with newlines). For a built-in
            task it replaces the reference template and may use the task's fields.
        label_column: field holding the label (user data; dotted names reach nested fields).
        labels: label names in class order; default from a ``ClassLabel`` feature, else inferred.
            For a built-in task they must equal its label names.
        limit: keep this many examples, drawn by a seeded shuffle (seed ``seed``, first ``limit``).
        seed: seed of that shuffle.
        id_column: user data: field used as example id when present (else the row number).
        data_dir: built-in task: directory of the original release files (offline).
        subset: hub dataset: its configuration name.
        truncate_field: field shortened when a prompt is too long (user templates default to
            the longest field; built-in tasks declare theirs); ``"none"`` never shortens.
        strip_trailing_space: drop the template's trailing space (``Answer: `` -> ``Answer:``).
        chat_template: wrap prompts in the tokenizer's chat template in ``build_prompts``.
        image_column: image data: the column holding each record's image (a path relative to the
            data file, or image bytes). Found by itself for an image folder, and for a dataset with
            an ``image`` column of type ``Image`` when neither ``text_column`` nor ``template`` is
            given. With images, ``template`` is the prompt asked about each image (default
            :data:`DEFAULT_IMAGE_PROMPT`).

    Returns:
        The task with its examples, in dataset order or the seeded ``limit`` draw.

    Raises:
        DataError: a missing file or column, an unknown split or label, empty text, bad options.
    """
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be a positive number of examples, got {limit}")
    if labels is not None:
        names = [str(x) for x in labels]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DataError(f"--labels names {', '.join(map(repr, repeated))} more than once; give each label once, "
                            "in class order")
        if any(not name.strip() for name in names):
            raise DataError(f"--labels has an empty label name ({','.join(names)!r}); give every label a name")
    style = dict(truncate_field=truncate_field, strip_trailing_space=strip_trailing_space,
                 chat_template=chat_template)
    user = dict(text_column=text_column, template=template, label_column=label_column or "label",
                labels=labels, id_column=id_column, **style)
    split, part = _parse_split(split)
    builtin = get_builtin(data) if isinstance(data, str) else None
    is_dataset = not isinstance(data, (str, Path)) and hasattr(data, "column_names")  # datasets.Dataset(Dict)
    is_folder = isinstance(data, (str, Path)) and Path(data).is_dir()
    local = isinstance(data, (str, Path)) and Path(data).exists()
    if builtin is not None:
        if image_column is not None:
            raise DataError(f"--image-column does not apply to the built-in task {builtin.name} (it is text)")
        task = _load_builtin(builtin, split=split, data_dir=data_dir, subset=subset, text_column=text_column,
                             template=template, label_column=label_column, labels=labels, **style)
    elif data_dir is not None:
        raise DataError(
            f"--data-dir is for the built-in tasks ({', '.join(BUILTIN_TASKS)}), not {data!r}{_did_you_mean(data)}; "
            "pass your own file with --data FILE"
        )
    elif (text_column is None and template is None and image_column is None and isinstance(data, str)
          and not local and not _looks_like_file(data) and _closest_task(data, cutoff=0.8)):
        # a typo of a built-in task's name, not a hub dataset to read as images
        raise DataError(
            f"unknown task {data!r}{_did_you_mean(data)}; the built-in tasks are {', '.join(BUILTIN_TASKS)} "
            "(see `chiptuning tasks`); a Hugging Face dataset also needs --text-column or --template"
        )
    elif is_folder or image_column is not None or (
            text_column is None and template is None and not local and not _looks_like_file(data)):
        task = _load_images(data, split=split, subset=subset, folder=is_folder, dataset=is_dataset,
                            image_column=image_column, **user)
    elif (text_column is None) == (template is None):  # checked before reading any data
        raise DataError("give exactly one of --text-column or --template (or --image-column for image data)")
    elif is_dataset:
        task = _load_dataset_object(data, split=split, **user)
    else:
        task = _load_file_or_hub(data, split=split, subset=subset, **user)
    if part is not None:
        task.examples = _slice(task.examples, part, split)
        task.split = f"{task.split}[{part[0] or ''}:{part[1] or ''}]"
    if limit is not None and limit < len(task.examples):
        order = np.random.default_rng(seed).permutation(len(task.examples))[:limit]
        task.examples = [task.examples[i] for i in order]
        task.source.update(limit=limit, seed=seed)
    if task.template is not None and not template_fields(task.template):
        log.warning("the template %r has no {field}: every prompt is the same text, so no chip can tell the "
                    "examples apart; put the record's fields in it, e.g. '{text}'", task.template)
    log.info("task %s/%s: %d examples, labels %s", task.name, task.split, len(task.examples), task.label_names)
    return task


def _closest_task(name: Any, cutoff: float = 0.6) -> str | None:
    """The built-in task whose name is closest to ``name`` (difflib ratio >= ``cutoff``), or None."""
    close = difflib.get_close_matches(str(name).lower(), list(BUILTIN_TASKS), n=1, cutoff=cutoff)
    return close[0] if close else None


def _did_you_mean(name: Any) -> str:
    """`` (did you mean 'boolq'?)`` for a name close to a built-in task's, else ''."""
    close = _closest_task(name)
    return f" (did you mean {close!r}?)" if close else ""


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\]$")


def _parse_split(split: str | None) -> tuple[str | None, tuple[str | None, str | None] | None]:
    """``"validation[:2000]"`` -> ``("validation", (None, "2000"))``; no slice -> (split, None)."""
    if split is None or "[" not in split:
        return split, None
    match = _SLICE.match(split.strip())
    if match is None:
        raise DataError(f"--split {split!r} is not NAME or NAME[start:stop], e.g. validation[:2000] or train[10%:]")
    return match["name"], (match["start"], match["stop"])


def _slice(examples: list[Example], part: tuple[str | None, str | None], split: str | None) -> list[Example]:
    n = len(examples)

    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        return int(text[:-1]) * n // 100 if text.endswith("%") else int(text)

    chosen = examples[bound(part[0]):bound(part[1])]
    if not chosen:
        raise DataError(f"--split {split}[{part[0] or ''}:{part[1] or ''}] selects no examples (the split has {n})")
    return chosen


def _looks_like_file(data) -> bool:
    name = str(data).lower()
    return any(name.endswith(s) or name.endswith(s + ".gz") for s in FILE_TYPES) or name.startswith((".", "~"))


def _load_images(data, *, split, subset, folder: bool, dataset: bool, image_column, text_column, template,
                 label_column, labels, id_column, truncate_field, strip_trailing_space, chat_template) -> TaskData:
    """Image data: a folder, a file with an image column, a dataset (object or hub name) with one."""
    if text_column is not None:
        raise DataError("--text-column does not apply to image data; the prompt asked about each image is "
                        "--template (default: the paper's question)")
    if truncate_field not in (None, "none"):
        raise DataError("--truncate-field does not apply to image data (image prompts are never shortened)")
    if folder:
        if label_column not in (None, "label"):
            raise DataError("--label-column does not apply to an image folder (its labels are the subfolder names)")
        return load_image_folder(data, split=split, labels=labels, template=template,
                                 strip_trailing_space=strip_trailing_space, image_column=image_column or "image")
    common = dict(template=template, label_column=label_column, labels=labels, id_column=id_column,
                  strip_trailing_space=strip_trailing_space)
    if not dataset and Path(data).exists():  # a local file: image paths are relative to its folder
        if subset is not None:
            raise DataError("--subset is for hub datasets, not local files")
        path = Path(data)
        records, features = read_table(path)
        column = image_column or "image"
        return build_image_task(records, where=str(path), name="custom", split=split or _stem(path),
                                source={"file": path.name, "sha256": sha256_file(path)}, image_column=column,
                                base_dir=path.parent.resolve(), features=features, **common)
    if dataset:
        if not hasattr(data, "to_list"):  # a DatasetDict: pick the split
            split = split or "train"
            if split not in data:
                raise DataError(f"the dataset has no split {split!r}; use one of {', '.join(data)}")
            data = data[split]
        name = getattr(getattr(data, "info", None), "dataset_name", None) or "dataset"
        where, source, hub_data = f"dataset {name}", {"dataset": name, "rows": len(data)}, data
    else:
        name = str(data)
        split = split or "train"
        where, source, hub_data = f"hub:{name}", {"hub": name, "subset": subset}, load_hub_dataset(name, subset, split)
    column = image_column or "image"
    if column not in hub_data.column_names:
        if image_column is None:  # neither text nor image options: the usual message
            raise DataError("give exactly one of --text-column or --template (or --image-column for image data); "
                            f"{where} has no 'image' column (columns: {', '.join(hub_data.column_names)})")
        raise DataError(f"{where} has no image column {column!r} (columns: {', '.join(hub_data.column_names)})")
    if image_column is None and not has_image_feature(hub_data.features, column):
        raise DataError(f"{where}: column 'image' is not an Image feature; pass --image-column image to read it "
                        "as image paths, or --text-column / --template for text")
    records, images, features = dataset_images(hub_data, column, where)
    return build_image_task(records, where=where, name="custom", split=split or "train", source=source,
                            image_column=column, features=features, images=images, **common)


def _load_builtin(spec: BuiltinTask, *, split, data_dir, subset, text_column, template, label_column,
                  labels, truncate_field, strip_trailing_space, chat_template) -> TaskData:
    if text_column is not None:
        raise DataError(f"--text-column does not apply to the built-in task {spec.name}; use --template to change its prompt")
    if label_column not in (None, "label"):
        raise DataError(f"--label-column does not apply to the built-in task {spec.name} (its labels: {', '.join(spec.label_names)})")
    if labels is not None and [str(x) for x in labels] != list(spec.label_names):
        raise DataError(f"--labels {','.join(map(str, labels))} differ from {spec.name}'s labels {','.join(spec.label_names)}; leave --labels out")
    if subset is not None:
        raise DataError(f"--subset does not apply to the built-in task {spec.name} (it reads {spec.hub[0]} itself)")
    if template is not None:
        unknown = template_fields(template) - set(spec.fields)
        if unknown:
            raise DataError(f"--template field(s) {sorted(unknown)} are not fields of {spec.name} (fields: {', '.join(spec.fields)})")
    names = [spec.resolve_split(name) for name in (split.split("+") if split else [None])]
    split = "+".join(names)
    if len(names) == 1:
        examples, source = load_builtin_examples(spec, split, data_dir)
    else:  # a union of splits ("auxiliary_train+validation"): ids get their split, to stay unique
        examples, source = [], {}
        for name in names:
            part, source = load_builtin_examples(spec, name, data_dir)
            examples += [dataclasses.replace(ex, id=f"{name}:{ex.id}") for ex in part]
        source = dict(source, splits=names)
    source["template"] = "reference" if template is None else "custom"
    if template is None:
        template = mmlu_template(examples) if spec.name == "mmlu" else spec.template
    fields = template_fields(template)
    if truncate_field is None:
        truncate = spec.truncate_field if spec.truncate_field in fields else None
    elif truncate_field.lower() == "none":
        truncate = None
    elif truncate_field not in fields:
        raise DataError(f"--truncate-field {truncate_field!r} is not a field of the template (fields: {', '.join(sorted(fields))})")
    else:
        truncate = truncate_field
    if strip_trailing_space:
        template = template.rstrip(" ")
    return TaskData(
        name=spec.name, split=split, label_names=list(spec.label_names), examples=examples, template=template,
        source=source, truncate_field=truncate, chat_template=chat_template,
        strip_trailing_space=strip_trailing_space,
    )


def _load_dataset_object(dataset, *, split, **user) -> TaskData:
    if not hasattr(dataset, "to_list"):  # a DatasetDict: pick the split
        split = split or "train"
        if split not in dataset:
            raise DataError(f"the dataset has no split {split!r}; use one of {', '.join(dataset)}")
        dataset = dataset[split]
    records, features = hub_records(dataset)
    name = getattr(getattr(dataset, "info", None), "dataset_name", None) or "dataset"
    return build_user_task(records, where=f"dataset {name}", name="custom", split=split or "train",
                           source={"dataset": name, "rows": len(records)}, features=features, **user)


def _stem(path: Path) -> str:
    return Path(path.stem).stem if path.suffix.lower() == ".gz" else path.stem


def _load_file_or_hub(data: str | Path, *, split, subset, **user) -> TaskData:
    path = Path(data)
    if path.exists():
        if subset is not None:
            raise DataError("--subset is for hub datasets, not local files")
        records, features = read_table(path)
        return build_user_task(records, where=str(path), name="custom", split=split or _stem(path),
                               source={"file": path.name, "sha256": sha256_file(path)}, features=features,
                               **user)
    name = str(data)
    if _looks_like_file(name):
        raise DataError(f"data file {path} does not exist")
    split = split or "train"
    records, features = hub_records(load_hub_dataset(name, subset, split))
    return build_user_task(records, where=f"hub:{name}", name="custom", split=split,
                           source={"hub": name, "subset": subset}, features=features, **user)
