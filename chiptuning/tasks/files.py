"""User datasets: local JSONL / JSON / CSV / TSV / Parquet files, hub datasets, ``datasets.Dataset``.

Each record becomes an :class:`~chiptuning.tasks.base.Example`: the prompt comes from
``text_column`` or a template over the record's fields; the label from ``label_column``
(a dotted name such as ``target_new.str`` reaches into nested records). Label names, in class
order, are taken from the first of:

1. ``labels`` (``--labels a,b,c``). Integer label values index into them when no name is a number.
2. The label column's ``ClassLabel`` feature (hub datasets, ``datasets`` objects, Parquet files
   written by ``datasets``).
3. Inferred from the values, in a stable order: booleans ``False, True``; integers (or strings
   that all spell integers) ascending; anything else sorted as text.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path
from typing import Any

from chiptuning.errors import DataError
from chiptuning.records import name_clash
from chiptuning.tasks.base import Example, TaskData, choice_field, render_field, template_fields

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")


# -- reading ---------------------------------------------------------------------------------------


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Excel's CSV export) is dropped, not glued to the first column's name
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


def _data_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (``.gz`` compressed or not); blank lines are skipped."""
    rows = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    return rows


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], Any]:
    """Rows of a local data file as dicts, and its ``datasets.Features`` where the file has them.

    Reads JSONL / NDJSON, JSON (a list of records), CSV, TSV (a header row), each optionally
    gzip-compressed, and Parquet (with ``ClassLabel`` features when ``datasets`` wrote it).

    Raises:
        DataError: a missing, unreadable or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a data file, or a built-in task with --task NAME --data-dir DIR")
    suffix = _data_suffix(path)
    try:
        if suffix in (".jsonl", ".ndjson"):
            return read_jsonl(path), None
        if suffix == ".json":
            with _open_text(path) as f:
                text = f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                if err.msg == "Extra data":  # JSON Lines under a .json name
                    return read_jsonl(path), None
                raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a JSON list of records (objects)")
            return data, None
        if suffix in (".csv", ".tsv"):
            with _open_text(path) as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")), None
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason})") from None
    except (OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise DataError(f"cannot read {path}: {err}") from None
    raise DataError(f"unsupported data file type {suffix!r} ({path}); use one of {', '.join(FILE_TYPES)}")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local data file as dicts (see :func:`read_table`)."""
    return read_table(path)[0]


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], Any]:
    import pyarrow.parquet as pq  # optional reader (comes with datasets): only for .parquet files

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"cannot read Parquet file {path}: {err}") from None
    features = None
    if table.schema.metadata and b"huggingface" in table.schema.metadata:
        # datasets is heavy (~1 s) and optional offline: imported on use
        from datasets import Features

        features = Features.from_arrow_schema(table.schema)
    return table.to_pylist(), features


def load_hub_dataset(name: str, subset: str | None = None, split: str = "train"):
    """``datasets.load_dataset(name, subset, split=split)`` with errors turned into DataError."""
    import datasets  # heavy (~1 s) and only for hub datasets: imported on use

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, missing dataset, bad config / split: all user-fixable
        raise DataError(
            f"cannot load dataset {name!r}"
            + (f" (subset {subset!r})" if subset else "")
            + f", split {split!r} from the Hugging Face hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            "; check the name, --subset and --split (or use --data FILE for a local file)"
        ) from None


def hub_records(dataset) -> tuple[list[dict[str, Any]], Any]:
    """Records and features of a ``datasets.Dataset``."""
    return dataset.to_list(), dataset.features


# -- labels ----------------------------------------------------------------------------------------


def get_value(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, or a nested value for a dotted name (``target_new.str``).

    Raises:
        KeyError: the column is not there.
    """
    if column in record:
        return record[column]
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spells_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def infer_label_names(values: list[Any]) -> list[str]:
    """Stable label order: booleans False, True; integers (or integer strings) ascending; else text sorted."""
    unique = set(values)
    if unique and all(isinstance(v, bool) for v in unique):
        return ["False", "True"]
    if unique and all(_is_int(v) for v in unique):
        return [str(v) for v in sorted(unique)]
    texts = {str(v) for v in unique}
    if texts and all(_spells_int(t) for t in texts):
        return sorted(texts, key=lambda t: (int(t), t))
    return sorted(texts)


def class_label_names(features: Any, column: str) -> list[str] | None:
    """Names of a ``ClassLabel`` feature of ``column``, else None."""
    if features is None or column not in features:
        return None
    names = getattr(features[column], "names", None)
    return [str(n) for n in names] if names else None


def label_mapping(values: list[Any], labels: list[str] | None, class_names: list[str] | None):
    """Label names and a function value -> class index (None if the value is not a label)."""
    if class_names is not None:
        # ClassLabel values are indices into its names; compare by name so --labels can reorder.
        def to_name(v: Any) -> Any:
            return class_names[v] if _is_int(v) and 0 <= v < len(class_names) else v

        values = [to_name(v) for v in values]
    else:
        def to_name(v: Any) -> Any:
            return v

    label_names = [str(x) for x in labels] if labels is not None else (class_names or infer_label_names(values))
    lookup = {name: i for i, name in enumerate(label_names)}
    positional = not any(_spells_int(name) for name in label_names)

    def index(value: Any) -> int | None:
        value = to_name(value)
        if isinstance(value, str) and value in lookup:
            return lookup[value]
        if str(value) in lookup:
            return lookup[str(value)]
        if positional and _is_int(value) and 0 <= value < len(label_names):
            return value  # integer labels of a dataset without ClassLabel index into --labels
        return None

    return label_names, index


# -- building a task -------------------------------------------------------------------------------


def longest_field(template: str, records: list[dict[str, Any]]) -> str | None:
    """The template field with the most characters over all records (the default truncate field)."""
    names = sorted(template_fields(template))
    if not names:
        return None
    totals = {name: sum(len(render_field(r[name])) for r in records if name in r) for name in names}
    return max(names, key=lambda name: (totals[name], name))


def record_labels(records: list[dict[str, Any]], *, where: str, needed: set[str], label_column: str,
                  labels: list[str] | None, features: Any, options: str) -> tuple[list[str], list[int]]:
    """Check that every record has the ``needed`` columns and a label, and map the labels to
    classes (see the module docstring).

    Args:
        options: the command-line options that name the columns (for the message).

    Returns:
        (label names in class order, the class index of each record).

    Raises:
        DataError: a missing column, one label only, a label outside the label set.
    """
    for n, record in enumerate(records):
        missing = needed - set(record)
        try:
            get_value(record, label_column)
        except KeyError:
            missing.add(label_column)
        if missing:
            raise DataError(
                f"{where}: record {n} has no column {sorted(missing)[0]!r} (columns: {', '.join(sorted(record))}); "
                f"check {options}"
            )
    values = [get_value(r, label_column) for r in records]
    for n, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: record {n} has no label ({'null' if value is None else 'empty'}) in column "
                            f"{label_column!r}; fill it in or drop the record")
    label_names, index = label_mapping(values, labels, class_label_names(features, label_column))
    clash = name_clash(label_names)
    if clash is not None:
        raise DataError(f"{where}: labels {clash[0]!r} and {clash[1]!r} differ only by case or surrounding space, so "
                        "they would be two classes; clean the data (or give the classes with --labels)")
    if len(label_names) < 2:
        raise DataError(f"{where}: only one label {label_names} in column {label_column!r}; a classifier needs two or more")
    classes = []
    for n, value in enumerate(values):
        label = index(value)
        if label is None:
            near = [name for name in label_names if name.strip().casefold() == str(value).strip().casefold()]
            raise DataError(
                f"{where}: record {n} has label {value!r}, not in the label set {label_names}"
                + (f" (it differs from {near[0]!r} only by case or surrounding space)" if near else "")
                + "; fix the data or pass --labels"
            )
        classes.append(label)
    return label_names, classes


def build_user_task(
    records: list[dict[str, Any]],
    *,
    where: str,
    name: str,
    split: str,
    source: dict[str, Any],
    features: Any = None,
    text_column: str | None = None,
    template: str | None = None,
    label_column: str = "label",
    labels: list[str] | None = None,
    id_column: str = "id",
    truncate_field: str | None = None,
    strip_trailing_space: bool = False,
    chat_template: bool = False,
) -> TaskData:
    """Turn records into a task (see the module docstring for labels).

    Args:
        records: the rows, as dicts.
        where: how to name the data in messages (a path or ``hub:name``).
        name, split, source: recorded in :meth:`TaskData.describe`.
        features: ``datasets.Features`` of the records, for ``ClassLabel`` names.
        truncate_field: the field to shorten in over-long prompts; default the template's longest
            field; ``"none"`` never shortens.
        Others: as :func:`chiptuning.tasks.load_task`.

    Raises:
        DataError: no records, a missing column, a label outside the label set, an empty text.
    """
    if (text_column is None) == (template is None):
        raise DataError("give exactly one of --text-column or --template")
    if not records:
        raise DataError(f"{where} holds no records")
    if template is not None and strip_trailing_space:
        template = template.rstrip(" ")
    needed = {text_column} if text_column else template_fields(template)
    label_names, label_of = record_labels(records, where=where, needed=needed, label_column=label_column,
                                          labels=labels, features=features,
                                          options="--text-column / --template / --label-column")
    examples = []
    for n, (record, label) in enumerate(zip(records, label_of)):
        value = get_value(record, label_column)
        if text_column is not None and (record[text_column] is None or not str(record[text_column]).strip()):
            raise DataError(f"{where}: record {n} has empty text in column {text_column!r}; drop it or fill it in")
        for field_name in needed:
            if record[field_name] is None:
                raise DataError(f"{where}: record {n} has no value (null) in field {field_name!r}; drop it or fill it in")
        ex_id = record.get(id_column)
        ex_id = str(n) if ex_id in (None, "") else str(ex_id)
        n_choices = len(label_names)
        choices = choice_field(template, record)
        if choices is not None:
            n_choices = len(record[choices])
            if not 1 <= n_choices <= len(label_names) or label >= n_choices:
                raise DataError(
                    f"{where}: record {n} has {n_choices} options in {choices!r} and label {value!r}; "
                    f"labels {label_names} allow at most {len(label_names)} options, and the answer must be one of them"
                )
        examples.append(Example(id=ex_id, fields=dict(record), label=label, n_choices=n_choices))
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        log.warning("%s: column %r has duplicate values; using row numbers as example ids", where, id_column)
        for n, ex in enumerate(examples):
            ex.id = str(n)
    if template is None:
        truncate = None
    elif truncate_field is None:
        truncate = longest_field(template, records)
    elif truncate_field.lower() == "none":
        truncate = None
    elif truncate_field not in template_fields(template):
        raise DataError(
            f"--truncate-field {truncate_field!r} is not a field of the template (fields: "
            f"{', '.join(sorted(template_fields(template)))})"
        )
    else:
        truncate = truncate_field
    task = TaskData(
        name=name, split=split, label_names=label_names, examples=examples, template=template,
        text_column=text_column, source=source, truncate_field=truncate,
        chat_template=chat_template, strip_trailing_space=strip_trailing_space,
    )
    for ex in examples:
        if not task.format(ex.fields).strip():
            raise DataError(f"{where}: example {ex.id!r} has empty text")
    return task
