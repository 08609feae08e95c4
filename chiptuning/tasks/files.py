"""User datasets: local JSONL / JSON / CSV / TSV / Parquet files, hub datasets, ``datasets.Dataset``.

A record's prompt is its ``text_column`` or a template over its fields; its label is its
``label_column`` (``target_new.str`` reaches into nested records). Label names, in class order, are
``labels`` (integer values index them when no name is a number), else the label column's
``ClassLabel`` names, else the values in a stable order: ``False, True``; integers (or strings that
all spell integers) ascending; anything else sorted as text.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiptuning.errors import DataError
from chiptuning.io import sha256_file
from chiptuning.records import name_clash
from chiptuning.tasks.base import Example, TaskData, TaskOptions, choice_field, template_fields, truncate_field_of

log = logging.getLogger(__name__)

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark (Excel's CSV export) is dropped, not glued to the first column's name
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig", newline="")


def _data_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes else ""


def looks_like_file(data: Any) -> bool:
    """Whether a name is meant as a local file (a data file's suffix, or a relative path)."""
    name = str(data).lower()
    return any(name.endswith(s) or name.endswith(s + ".gz") for s in FILE_TYPES) or name.startswith((".", "~"))


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


def _read_json(path: Path) -> tuple[list[dict[str, Any]], None]:
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines under a .json name
            return read_jsonl(path), None
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of records (objects)")
    return data, None


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], None]:
    with _open_text(path) as f:
        return list(csv.DictReader(f, delimiter="\t" if _data_suffix(path) == ".tsv" else ",")), None


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


_READERS = {".jsonl": lambda path: (read_jsonl(path), None), ".ndjson": lambda path: (read_jsonl(path), None),
            ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv, ".parquet": _read_parquet}


def read_table(path: str | Path) -> tuple[list[dict[str, Any]], Any]:
    """Rows of a JSONL, JSON (a list of records), CSV or TSV file (gzipped or not) or a Parquet file as
    dicts, and its ``datasets.Features`` where it has them; DataError for a file it cannot read."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a data file, or a built-in task with --task NAME --data-dir DIR")
    suffix = _data_suffix(path)
    if suffix not in _READERS:
        raise DataError(f"unsupported data file type {suffix!r} ({path}); use one of {', '.join(FILE_TYPES)}")
    try:
        return _READERS[suffix](path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local data file as dicts (see :func:`read_table`)."""
    return read_table(path)[0]


def load_hub_dataset(name: str, subset: str | None = None, split: str = "train"):
    """``datasets.load_dataset(name, subset, split=split)`` with errors turned into DataError."""
    import datasets  # heavy (~1 s) and only for hub datasets: imported on use
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # network, missing dataset, bad config / split: all user-fixable
        named = f"{name!r}" + (f" (subset {subset!r})" if subset else "")
        raise DataError(f"cannot load dataset {named}, split {split!r} from the Hugging Face hub: "
                        f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}; check the name, --subset and "
                        "--split (or use --data FILE for a local file)") from None


@dataclass
class Source:
    """Rows of a local file, a ``datasets`` object or a hub dataset, and how to name them."""

    where: str  # the data's name in messages: a path, ``hub:NAME`` or ``dataset NAME``
    split: str
    provenance: dict[str, Any]  # the task's ``source``
    records: list[dict[str, Any]] | None = None  # a file's rows
    features: Any = None  # a file's datasets.Features, when it has them
    dataset: Any = None  # a datasets.Dataset, whose rows the caller reads
    base_dir: Path | None = None  # a file's folder: what relative image paths are relative to


def read_source(data: Any, opts: TaskOptions) -> Source:
    """The rows of a local file, a ``datasets.Dataset`` / ``DatasetDict`` or a hub dataset's name
    (DataError for a missing file or split, ``subset`` for a file, a hub dataset that fails to load)."""
    split = opts.split or "train"
    if not isinstance(data, (str, Path)):  # a datasets.Dataset, or a DatasetDict to take the split from
        if not hasattr(data, "to_list"):
            if split not in data:
                raise DataError(f"the dataset has no split {split!r}; use one of {', '.join(data)}")
            data = data[split]
        name = getattr(getattr(data, "info", None), "dataset_name", None) or "dataset"
        return Source(f"dataset {name}", split, {"dataset": name, "rows": len(data)}, dataset=data)
    path = Path(data)
    if path.exists():
        if opts.subset is not None:
            raise DataError("--subset is for hub datasets, not local files")
        records, features = read_table(path)
        stem = Path(path.stem).stem if path.suffix.lower() == ".gz" else path.stem
        return Source(str(path), opts.split or stem, {"file": path.name, "sha256": sha256_file(path)},
                      records=records, features=features, base_dir=path.parent.resolve())
    if looks_like_file(data):
        raise DataError(f"data file {path} does not exist")
    return Source(f"hub:{data}", split, {"hub": str(data), "subset": opts.subset},
                  dataset=load_hub_dataset(str(data), opts.subset, split))


def get_value(record: dict[str, Any], column: str) -> Any:
    """``record[column]``, or a nested value for a dotted name (``target_new.str``); KeyError if absent."""
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


def _label_values(records: list[dict[str, Any]], column: str, needed: set[str], where: str, options: str) -> list:
    """Each record's label, once every record has the ``needed`` columns and a label."""
    for n, record in enumerate(records):
        missing = needed - set(record)
        try:
            get_value(record, column)
        except KeyError:
            missing.add(column)
        if missing:
            raise DataError(f"{where}: record {n} has no column {sorted(missing)[0]!r} (columns: "
                            f"{', '.join(sorted(record))}); check {options}")
    values = [get_value(r, column) for r in records]
    for n, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: record {n} has no label ({'null' if value is None else 'empty'}) in column "
                            f"{column!r}; fill it in or drop the record")
    return values


def record_labels(records: list[dict[str, Any]], opts: TaskOptions, *, where: str, needed: set[str],
                  features: Any, options: str) -> tuple[list[str], list[int]]:
    """(label names in class order, each record's class), labels as in the module docstring. DataError
    for a missing column, a null or empty label, labels equal up to case or space, one label only, a
    label outside the label set; ``options`` names the columns' options in messages."""
    column = opts.label_column
    values = _label_values(records, column, needed, where, options)
    class_names = getattr(features[column], "names", None) if features is not None and column in features else None
    class_names = [str(name) for name in class_names] if class_names else None
    named = values  # ClassLabel values index its names: compared by name, so --labels can reorder them
    if class_names is not None:
        named = [class_names[v] if _is_int(v) and 0 <= v < len(class_names) else v for v in values]
    label_names = opts.labels if opts.labels is not None else (class_names or infer_label_names(values))
    clash = name_clash(label_names)
    if clash is not None:
        raise DataError(f"{where}: labels {clash[0]!r} and {clash[1]!r} differ only by case or surrounding space, so "
                        "they would be two classes; clean the data (or give the classes with --labels)")
    if len(label_names) < 2:
        raise DataError(f"{where}: only one label {label_names} in column {column!r}; a classifier needs two or more")
    lookup = {name: i for i, name in enumerate(label_names)}
    positional = not any(_spells_int(name) for name in label_names)  # then integers index the labels
    classes = []
    for n, (value, name) in enumerate(zip(values, named)):
        label = lookup.get(str(name))
        if label is None and positional and _is_int(name) and 0 <= name < len(label_names):
            label = name
        if label is None:
            near = [x for x in label_names if x.strip().casefold() == str(name).strip().casefold()]
            raise DataError(f"{where}: record {n} has label {value!r}, not in the label set {label_names}"
                            + (f" (it differs from {near[0]!r} only by case or surrounding space)" if near else "")
                            + "; fix the data or pass --labels")
        classes.append(label)
    return label_names, classes


def example_ids(records: list[dict[str, Any]], id_column: str, where: str) -> list[str]:
    """Each record's ``id_column`` value, else its row number; row numbers for all when two share one."""
    ids = [str(n) if r.get(id_column) in (None, "") else str(r[id_column]) for n, r in enumerate(records)]
    if len(set(ids)) == len(ids):
        return ids
    log.warning("%s: column %r has duplicate values; using row numbers as example ids", where, id_column)
    return [str(n) for n in range(len(records))]


def checked_task(where: str, **task_fields: Any) -> TaskData:
    """``TaskData(**task_fields)``, refused when an example's prompt is empty."""
    task = TaskData(**task_fields)
    for ex in task.examples:
        if not task.format(ex.fields).strip():
            raise DataError(f"{where}: example {ex.id!r} has an empty prompt")
    return task


def _text_examples(records: list[dict[str, Any]], classes: list[int], label_names: list[str], needed: set[str],
                   opts: TaskOptions, where: str) -> list[Example]:
    """The records as examples, refused where the text is empty or a field null, or the options are
    more than the labels or do not include the answer."""
    examples, column, ids = [], opts.text_column, example_ids(records, opts.id_column, where)
    for n, (record, label) in enumerate(zip(records, classes)):
        if column is not None and (record[column] is None or not str(record[column]).strip()):
            raise DataError(f"{where}: record {n} has empty text in column {column!r}; drop it or fill it in")
        for name in needed:
            if record[name] is None:
                raise DataError(f"{where}: record {n} has no value (null) in field {name!r}; drop it or fill it in")
        choices = choice_field(opts.template, record)
        n_choices = len(record[choices]) if choices is not None else len(label_names)
        if choices is not None and (not 1 <= n_choices <= len(label_names) or label >= n_choices):
            raise DataError(f"{where}: record {n} has {n_choices} options in {choices!r} and label "
                            f"{get_value(record, opts.label_column)!r}; labels {label_names} allow at most "
                            f"{len(label_names)} options, and the answer must be one of them")
        examples.append(Example(id=ids[n], fields=dict(record), label=label, n_choices=n_choices))
    return examples


def load_user_data(data: Any, opts: TaskOptions) -> TaskData:
    """Text data (a local file, a ``datasets`` object or a hub dataset's name) as a task. DataError
    for not exactly one of text column and template, no records, and what :func:`read_source`,
    :func:`record_labels` and the records' checks refuse."""
    text_column, template = opts.text_column, opts.template
    if (text_column is None) == (template is None):
        raise DataError("give exactly one of --text-column or --template")
    source = read_source(data, opts)
    records, features = source.records, source.features
    if source.dataset is not None:
        records, features = source.dataset.to_list(), source.dataset.features
    if not records:
        raise DataError(f"{source.where} holds no records")
    if template is not None and opts.strip_trailing_space:
        template = template.rstrip(" ")
    needed = {text_column} if text_column else template_fields(template)
    label_names, classes = record_labels(records, opts, where=source.where, needed=needed, features=features,
                                         options="--text-column / --template / --label-column")
    examples = _text_examples(records, classes, label_names, needed, opts, source.where)
    return checked_task(source.where, name="custom", split=source.split, label_names=label_names, examples=examples,
                        template=template, text_column=text_column, source=source.provenance,
                        truncate_field=truncate_field_of(template, opts.truncate_field, records=records),
                        chat_template=opts.chat_template, strip_trailing_space=opts.strip_trailing_space)
